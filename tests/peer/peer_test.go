package peer

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// fakeQemu writes a program that fails with msg on its first fails runs and
// then prints "ok", counting its runs in a file beside it.
func fakeQemu(t *testing.T, fails int, msg string) (runs func() int) {
	t.Helper()
	dir := t.TempDir()
	count := filepath.Join(dir, "runs")
	script := "#!/bin/sh\necho x >> " + count + "\n" +
		"if [ $(wc -l < " + count + ") -le " + strconv.Itoa(fails) + " ]; then echo '" + msg + "' >&2; exit 1; fi\necho ok\n"
	if err := os.WriteFile(filepath.Join(dir, "fake-qemu"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))
	return func() int {
		b, _ := os.ReadFile(count)
		return strings.Count(string(b), "\n")
	}
}

func TestRunRetriesOnlyTheCalibrationFailure(t *testing.T) {
	runs := fakeQemu(t, 2, "qemu-img: x.qcow2: "+pbkdfCalibration)
	out, _, err := Run(context.Background(), t, "fake-qemu")
	if err != nil || string(out) != "ok\n" || runs() != 3 {
		t.Fatalf("calibration flake twice: out %q err %v after %d runs, want ok after 3", out, err, runs())
	}

	runs = fakeQemu(t, calibrationTries+1, "qemu-img: x.qcow2: "+pbkdfCalibration)
	if _, _, err := Run(context.Background(), t, "fake-qemu"); err == nil || runs() != calibrationTries {
		t.Fatalf("calibration failing for good: err %v after %d runs, want an error after %d", err, runs(), calibrationTries)
	}

	runs = fakeQemu(t, 1, "qemu-img: Could not open 'x.qcow2'")
	_, stderr, err := Run(context.Background(), t, "fake-qemu")
	if err == nil || runs() != 1 || !strings.Contains(string(stderr), "Could not open") {
		t.Fatalf("other failure: err %v stderr %q after %d runs, want it returned after 1", err, stderr, runs())
	}
}
