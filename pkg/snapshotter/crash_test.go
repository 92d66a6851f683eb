package snapshotter

import (
	"bufio"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"github.com/qcow2-csi/qcow2-csi/tests/child"
)

// TestCrashHelper runs in a child process: it opens the image, writes,
// takes s3, prints "ready" and writes until it is killed.
func TestCrashHelper(t *testing.T) {
	path := os.Getenv("SNAPSHOTTER_CRASH_IMAGE")
	if path == "" {
		t.Skip("helper for TestCrashKeepsDeltasSafe")
	}
	cc := os.Getenv("SNAPSHOTTER_CRASH_CC") != ""
	img, err := qcow2.Open(path, qcow2.OpenOptions{CrashConsistentBitmaps: cc})
	if err != nil {
		fmt.Printf("E %v\n", err)
		os.Exit(3)
	}
	rng := rand.New(rand.NewSource(11))
	write := func() {
		p := make([]byte, 1+rng.Intn(20000))
		rng.Read(p)
		if _, err := img.WriteAt(p, rng.Int63n(testDisk-20000)); err != nil {
			fmt.Printf("E %v\n", err)
			os.Exit(3)
		}
	}
	for range 30 {
		write()
	}
	if _, err := Take(img, "s3", 3); err != nil {
		fmt.Printf("E %v\n", err)
		os.Exit(3)
	}
	w := bufio.NewWriter(os.Stdout)
	for i := 0; ; i++ {
		write()
		if i%10 == 9 {
			// A guest flush, so that writes since s3 survive the kill.
			if err := img.Flush(); err != nil {
				fmt.Printf("E %v\n", err)
				os.Exit(3)
			}
		}
		if i == 30 {
			fmt.Fprintln(w, "ready")
			w.Flush()
		}
	}
}

// TestCrashKeepsDeltasSafe: after a SIGKILL during writes, the deltas
// between snapshots taken before the crash are still complete. A delta
// across the span the dead process was tracking is refused (ErrUntrusted)
// when it tracked the qemu way, and complete when it tracked
// crash-consistently; never incomplete.
func TestCrashKeepsDeltasSafe(t *testing.T) {
	if os.Getenv("SNAPSHOTTER_CRASH_IMAGE") != "" {
		t.Skip("inside the helper")
	}
	for _, cc := range []bool{false, true} {
		t.Run(fmt.Sprintf("crash-consistent=%v", cc), func(t *testing.T) { testCrashKeepsDeltasSafe(t, cc) })
	}
}

func testCrashKeepsDeltasSafe(t *testing.T, cc bool) {
	path := filepath.Join(t.TempDir(), "crash.qcow2")
	img, err := qcow2.Create(path, qcow2.CreateOptions{Size: testDisk})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(5))
	for i, name := range []string{"s1", "s2"} {
		for range 20 {
			p := make([]byte, 1+rng.Intn(30000))
			rng.Read(p)
			if _, err := img.WriteAt(p, rng.Int63n(testDisk-30000)); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := Take(img, name, uint64(i+1)); err != nil {
			t.Fatal(err)
		}
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}

	env := []string{"SNAPSHOTTER_CRASH_IMAGE=" + path}
	if cc {
		env = append(env, "SNAPSHOTTER_CRASH_CC=1")
	}
	cmd, line := child.Start(t, "TestCrashHelper", env...)
	if line != "ready" {
		t.Fatalf("helper said %q", line)
	}
	child.Kill(cmd)

	img, err = qcow2.Open(path, qcow2.OpenOptions{CrashConsistentBitmaps: cc})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	// The span after s3 was being tracked when the process died.
	if _, err := Take(img, "s4", 4); err != nil {
		t.Fatal(err)
	}
	for _, pair := range [][2]string{{"s1", "s2"}, {"s2", "s3"}, {"s1", "s3"}, {"s1", "s4"}, {"s3", "s4"}} {
		base, target := pair[0], pair[1]
		bseq, tseq := uint64(base[1]-'0'), uint64(target[1]-'0')
		d, err := Delta(img, bseq, tseq, 0, testDisk)
		switch {
		case errors.Is(err, ErrUntrusted) && target == "s4" && !cc:
			continue // what qemu-style tracking can say after a crash
		case err != nil:
			t.Fatalf("delta %s->%s after the crash: %v", base, target, err)
		case target == "s4" && !cc:
			t.Fatalf("delta %s->%s across the crash of a qemu-style tracker: %d ranges, want ErrUntrusted", base, target, len(d))
		}
		a, err := readSnapshot(img, base)
		if err != nil {
			t.Fatal(err)
		}
		b, err := readSnapshot(img, target)
		if err != nil {
			t.Fatal(err)
		}
		mask := make([]bool, testDisk)
		for _, r := range d {
			for o := r.Offset; o < r.Offset+r.Length; o++ {
				mask[o] = true
			}
		}
		changed := 0
		for i := range a {
			if a[i] != b[i] {
				changed++
				if !mask[i] {
					t.Fatalf("delta %s->%s after the crash misses byte %d", base, target, i)
				}
			}
		}
		if changed == 0 {
			t.Fatalf("snapshots %s and %s are equal: the test proves nothing", base, target)
		}
	}
}
