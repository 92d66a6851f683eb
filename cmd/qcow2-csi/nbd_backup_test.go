package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// nbdExtent is one line of `nbdinfo --map`.
type nbdExtent struct {
	off, length int64
	typ         uint32
}

// parseNBDMap reads `nbdinfo --map` output: "offset length type description".
func parseNBDMap(t *testing.T, out string) []nbdExtent {
	t.Helper()
	var ext []nbdExtent
	for line := range strings.Lines(out) {
		f := strings.Fields(line)
		if len(f) < 3 {
			t.Fatalf("nbdinfo --map line %q: want offset, length, type", line)
		}
		off, err1 := strconv.ParseInt(f[0], 10, 64)
		n, err2 := strconv.ParseInt(f[1], 10, 64)
		typ, err3 := strconv.ParseUint(f[2], 10, 32)
		if err1 != nil || err2 != nil || err3 != nil {
			t.Fatalf("nbdinfo --map line %q does not parse", line)
		}
		ext = append(ext, nbdExtent{off, n, uint32(typ)})
	}
	return ext
}

// dirtyAt reports whether [off, off+n) lies inside extents of type 1
// (dirty) of a qemu:dirty-bitmap map.
func dirtyAt(m []nbdExtent, off, n int64) bool {
	for _, e := range m {
		if e.off+e.length <= off || e.off >= off+n {
			continue
		}
		if e.typ&1 == 0 {
			return false
		}
	}
	return true
}

// The backup export: `qcow2-csi nbd -r -l S -B B` must serve the snapshot's
// data (not the active layer's) with B, a persistent bitmap of the active
// layer, as qemu:dirty-bitmap:B, exactly as qemu-nbd does on the same file;
// and B must cover every cluster that changed since S. B is filled once by
// qemu and once by this project's library (writes through `qcow2-csi nbd`).
func TestNBDBackupExport(t *testing.T) {
	for _, peerName := range []string{"qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdcopy"} {
		peer.Require(t, peerName)
	}
	const size, cluster = 32 << 20, 64 << 10
	after := []string{
		"-c", "write -P 0x21 0 64k", // rewrites data the snapshot has
		"-c", "write -P 0x22 4M 128k", // new data
		"-c", "write -P 0x23 9M 4k", // part of a cluster
		"-c", "write -z 12M 64k", // zeroes over snapshot data
		"-c", "discard 20M 1M", // trims snapshot data
		"-c", "write -P 0x24 31M 1M", // the last cluster
	}
	for _, writer := range []string{"qemu-io", "qcow2-csi nbd"} {
		t.Run(writer, func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "vm.qcow2")
			mustRun(t, "qemu-img", "create", "-q", "-f", "qcow2", img, strconv.Itoa(size))
			mustRun(t, "qemu-io", "-c", "write -P 0x11 0 2M", "-c", "write -P 0x12 8M 2M",
				"-c", "write -P 0x13 12M 64k", "-c", "write -P 0x14 20M 1M", img)
			mustRun(t, "qemu-img", "bitmap", "--add", "-g", strconv.Itoa(cluster), img, "B")
			// Dirty in B before S: a bitmap is not tied to a snapshot.
			mustRun(t, "qemu-io", "-c", "write -P 0x15 16M 64k", img)
			mustRun(t, "qemu-img", "snapshot", "-c", "S", img)
			if writer == "qemu-io" {
				mustRun(t, "qemu-io", append(after, img)...)
			} else {
				s, done := startNBD(t, "-t", "--discard=unmap", "-f", "qcow2", img)
				mustRun(t, "qemu-io", append(append([]string{"-f", "raw"}, after...), "nbd+unix:///?socket="+s)...)
				stopNBD(t, done)
				mustRun(t, "qemu-img", "check", img)
			}
			snapRaw, activeRaw := filepath.Join(dir, "snap.raw"), filepath.Join(dir, "active.raw")
			mustRun(t, "qemu-img", "convert", "-f", "qcow2", "-l", "snapshot.name=S", "-O", "raw", img, snapRaw)
			mustRun(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, activeRaw)

			q := qemuNBD(t, "-r", "-l", "S", "-B", "B", "-f", "qcow2", img)
			s, done := startNBD(t, "-t", "-r", "-l", "S", "-B", "B", "-f", "qcow2", img)
			defer stopNBD(t, done)
			uq, us := "nbd+unix:///?socket="+q, "nbd+unix:///?socket="+s

			var dirty []nbdExtent
			for _, args := range [][]string{{"--map=qemu:dirty-bitmap:B"}, {"--map"}, {"--size"}, {"--is", "read-only"}} {
				want := mustRun(t, "nbdinfo", append(args, uq)...)
				got := mustRun(t, "nbdinfo", append(args, us)...)
				if got != want {
					t.Errorf("nbdinfo %v:\nqcow2-csi nbd:\n%s\nqemu-nbd:\n%s", args, got, want)
				}
				if args[0] == "--map=qemu:dirty-bitmap:B" {
					dirty = parseNBDMap(t, got)
				}
			}

			// Content: the snapshot, read over NBD, byte for byte.
			export := filepath.Join(dir, "export.raw")
			mustRun(t, "nbdcopy", us, export)
			got, want, active := readFile(t, export), readFile(t, snapRaw), readFile(t, activeRaw)
			if !bytes.Equal(got, want) {
				t.Fatalf("export differs from snapshot S at byte %s", firstDiff(got, want))
			}
			if bytes.Equal(got, active) {
				t.Fatal("snapshot and active layer are equal: the test writes nothing after S")
			}

			// Coverage: every cluster that differs between S and the active
			// layer is dirty, and so is the write made before S.
			changed := 0
			for off := int64(0); off < size; off += cluster {
				if bytes.Equal(want[off:off+cluster], active[off:off+cluster]) {
					continue
				}
				changed++
				if !dirtyAt(dirty, off, cluster) {
					t.Errorf("cluster at %d changed since S but is clean in B", off)
				}
			}
			if changed != 1+2+1+1+16+16 {
				t.Errorf("%d clusters changed since S, want 37", changed)
			}
			if !dirtyAt(dirty, 16<<20, cluster) {
				t.Error("the write between adding B and taking S is clean in B")
			}
		})
	}
}

// Bad -l or -B with a backup export: refused before listening, with an
// error naming what is wrong and qemu-nbd's exit status.
func TestNBDBackupExportErrors(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "e.qcow2")
	mustRun(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "8M")
	mustRun(t, "qemu-img", "bitmap", "--add", img, "B")
	mustRun(t, "qemu-img", "snapshot", "-c", "S", img)
	torn := filepath.Join(dir, "torn.qcow2")
	mustRun(t, "cp", img, torn)
	// qemu-io killed with the image open leaves B in use (inconsistent).
	runPeer(t, "qemu-io", "-c", "write 0 64k", "-c", "abort", torn)
	if out := mustRun(t, "qemu-img", "info", torn); !strings.Contains(out, "in-use") {
		t.Fatalf("qemu-io abort left no in-use bitmap:\n%s", out)
	}
	cases := []struct {
		name, file string
		args       []string
		want       string
	}{
		{"missing bitmap", img, []string{"-l", "S", "-B", "nope"}, `bitmap "nope" is not found`},
		{"missing snapshot", img, []string{"-l", "nope", "-B", "B"}, `-l "nope": qcow2: snapshot not found in e.qcow2`},
		{"missing snapshot id", img, []string{"-l", "snapshot.id=7", "-B", "B"}, `-l "snapshot.id=7": qcow2: snapshot not found in e.qcow2`},
		{"inconsistent bitmap", torn, []string{"-l", "S", "-B", "B"}, `torn.qcow2 is inconsistent`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"-r", "-f", "qcow2"}, tc.args...)
			cmd := exec.Command(peer.Require(t, "qemu-nbd"), append(append([]string{"-k", filepath.Join(t.TempDir(), "q.sock")}, args...), tc.file)...)
			qout, err := cmd.CombinedOutput()
			wantCode := cmd.ProcessState.ExitCode()
			if err == nil || wantCode <= 0 {
				t.Fatalf("qemu-nbd %v accepted it: %v %s", args, err, qout)
			}
			sock := filepath.Join(t.TempDir(), "s.sock")
			stderr, code := runNBDCaptured(t, append(append([]string{"-k", sock}, args...), tc.file))
			if code != wantCode {
				t.Errorf("exit status %d, qemu-nbd's %d (%s)", code, wantCode, bytes.TrimSpace(qout))
			}
			if !strings.Contains(stderr, tc.want) {
				t.Errorf("stderr %q, want it to contain %q", stderr, tc.want)
			}
			if _, err := os.Stat(sock); err == nil {
				t.Error("the socket was created for a refused export")
			}
		})
	}
}

// runNBDCaptured runs `qcow2-csi nbd ARGS` in a child process (this test
// binary re-executed) and returns its stderr and exit status.
func runNBDCaptured(t *testing.T, args []string) (string, int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperNBDMain$")
	cmd.Env = append(os.Environ(), "QCOW2_CSI_NBD_ARGS="+strings.Join(args, "\n"))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err := cmd.Run()
	if _, ok := err.(*exec.ExitError); err != nil && !ok {
		t.Fatal(err)
	}
	return stderr.String(), cmd.ProcessState.ExitCode()
}

// TestHelperNBDMain is the child of runNBDCaptured.
func TestHelperNBDMain(t *testing.T) {
	args, ok := os.LookupEnv("QCOW2_CSI_NBD_ARGS")
	if !ok {
		t.Skip("helper process only")
	}
	os.Exit(runNBD(strings.Split(args, "\n")))
}

func readFile(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func firstDiff(a, b []byte) string {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return fmt.Sprintf("%d (%#x vs %#x)", i, a[i], b[i])
		}
	}
	return fmt.Sprintf("end (lengths %d and %d)", len(a), len(b))
}
