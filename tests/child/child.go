// Package child runs one test function of the current test binary in a
// child process, as crash tests need: a writer that says it is ready and
// can then be killed mid-work.
//
// The child test finds its job in the environment (an image path, a seed)
// and skips when that variable is unset, so it is inert in a normal run.
package child

import (
	"bufio"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
)

// Start runs the test named test (a func TestXxx of this binary) with env
// (NAME=value) added to the environment, and returns once the child prints
// its first line, trimmed. Standard error is passed through; the rest of
// standard output is discarded. A child that exits or says nothing fails t;
// the child is killed when t ends.
func Start(t testing.TB, test string, env ...string) (*exec.Cmd, string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^"+test+"$", "-test.count=1")
	cmd.Env = append(os.Environ(), env...)
	cmd.Stderr = os.Stderr
	// Our own pipe, not StdoutPipe: Wait (in Kill) must not race with the
	// reader draining it.
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout = pw
	err = cmd.Start()
	pw.Close()
	if err != nil {
		pr.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { Kill(cmd) })
	r := bufio.NewReader(pr)
	line, err := r.ReadString('\n')
	if err != nil {
		Kill(cmd)
		pr.Close()
		t.Fatalf("child %s: %q, %v", test, line, err)
	}
	go func() {
		_, _ = io.Copy(io.Discard, r)
		pr.Close()
	}()
	return cmd, strings.TrimSpace(line)
}

// Kill sends SIGKILL to the child and reaps it; a second call is a no-op.
func Kill(cmd *exec.Cmd) {
	if cmd.ProcessState != nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGKILL)
	_ = cmd.Wait()
}
