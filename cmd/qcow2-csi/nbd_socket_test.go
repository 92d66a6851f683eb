package main

import (
	"bufio"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"syscall"
	"testing"
	"time"
)

// Without -k the socket goes in a new private directory: a file another
// user put at a predictable path first does not stop the server, and
// "serving ... on unix socket PATH" is printed only once PATH accepts
// clients (the first dial after the line succeeds).
func TestNBDDefaultSocketIsPrivate(t *testing.T) {
	tmp := t.TempDir()
	img := rawImage(t)
	// The path the server used to take, squatted by someone else.
	squat := filepath.Join(tmp, "qcow2-csi-nbd-"+filepath.Base(img)+".sock")
	if err := os.WriteFile(squat, []byte("not a socket"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperNBDMain$")
	cmd.Env = append(os.Environ(), "QCOW2_CSI_NBD_ARGS="+img, "TMPDIR="+tmp, "XDG_RUNTIME_DIR=")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	serving := regexp.MustCompile(`^qcow2-csi nbd: serving .* on unix socket (.*)$`)
	var sock string
	guard := time.After(30 * time.Second) // only keeps a broken server from hanging the test
	for sock == "" {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatal("qcow2-csi nbd exited without saying where it serves")
			}
			if m := serving.FindStringSubmatch(l); m != nil {
				sock = m[1]
			} else {
				t.Logf("stderr: %s", l)
			}
		case <-guard:
			t.Fatal("qcow2-csi nbd never said where it serves")
		}
	}
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("dial %s right after the serving line: %v", sock, err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, 18)); err != nil {
		t.Fatalf("NBD greeting on %s: %v", sock, err)
	}
	c.Close()

	dir := filepath.Dir(sock)
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if dir == tmp || filepath.Dir(dir) != tmp || fi.Mode().Perm() != 0o700 {
		t.Fatalf("socket directory %s (mode %v): want a new 0700 directory under %s", dir, fi.Mode().Perm(), tmp)
	}
	if b, err := os.ReadFile(squat); err != nil || string(b) != "not a socket" {
		t.Fatalf("the squatted file was touched: %q %v", b, err)
	}

	cmd.Process.Signal(syscall.SIGTERM)
	go func() {
		for range lines {
		}
	}()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("qcow2-csi nbd after SIGTERM: %v", err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("socket directory %s left behind: %v", dir, err)
	}
}
