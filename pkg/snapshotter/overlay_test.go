package snapshotter

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// qemuImg runs qemu-img and returns its output; failure fails the test.
func qemuImg(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(peer.Require(t, "qemu-img"), args...).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// qemuReads is the disk of path as qemu-img convert reads it.
func qemuReads(t *testing.T, path string) []byte {
	t.Helper()
	raw := filepath.Join(t.TempDir(), "out.raw")
	qemuImg(t, "convert", "-U", "-O", "raw", path, raw)
	b, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func padTo(b []byte, n int64) []byte { return append(bytes.Clone(b), make([]byte, n-int64(len(b)))...) }

// overlaysIn freezes snapshot s1 into a base in dir/.bases, makes two
// overlays of it, writes one, flattens it, and checks every image with
// qemu-img along the way. It returns how the base was made.
func overlaysIn(t *testing.T, dir string) Method {
	path, want := restoreFixture(t, dir)
	bases := filepath.Join(dir, ".bases")
	if err := os.Mkdir(bases, 0o700); err != nil {
		t.Fatal(err)
	}
	base := filepath.Join(bases, "s1.qcow2")
	src, err := qcow2.Open(path, qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	m, depth, err := Freeze(src, "s1", base, 4, RestoreOptions{SourceClosed: true})
	src.Close()
	if err != nil {
		t.Fatal(err)
	}
	if depth != 0 {
		t.Fatalf("base of a standalone image has %d backing layers", depth)
	}
	a, b := filepath.Join(dir, "a.qcow2"), filepath.Join(dir, "b.qcow2")
	if err := Overlay(base, a, OverlayOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := Overlay(base, b, OverlayOptions{Size: 2 * testDisk}); err != nil {
		t.Fatal(err)
	}
	if err := Overlay(base, b, OverlayOptions{}); !errors.Is(err, ErrExists) {
		t.Fatalf("second Overlay onto b = %v, want ErrExists", err)
	}
	if err := Overlay(base, filepath.Join(dir, "c.qcow2"), OverlayOptions{Size: testDisk / 2}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Overlay smaller than its base = %v, want ErrInvalid", err)
	}
	info := qemuImg(t, "info", "-U", a)
	if !strings.Contains(info, "backing file: .bases/s1.qcow2") || !strings.Contains(info, "backing file format: qcow2") {
		t.Fatalf("qemu-img info of the overlay:\n%s", info)
	}
	for _, p := range []string{base, a, b} {
		qemuImg(t, "check", "-U", p)
	}
	if got := qemuReads(t, a); !bytes.Equal(got, padTo(want, testDisk)) {
		t.Fatal("qemu-img reads the overlay differently from the snapshot")
	}
	if got := qemuReads(t, b); !bytes.Equal(got, padTo(want, 2*testDisk)) {
		t.Fatal("qemu-img reads the grown overlay differently from the snapshot")
	}
	qemuImg(t, "compare", "-U", a, base)

	// Write a, flatten it: b and the base do not change.
	img, err := qcow2.Open(a, qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	wantA := padTo(want, testDisk)
	copy(wantA[70<<10:], bytes.Repeat([]byte{9}, 10000))
	if _, err := img.WriteAt(wantA[70<<10:(70<<10)+10000], 70<<10); err != nil {
		t.Fatal(err)
	}
	var steps []int64
	if err := Flatten(img, 0, func(off int64) error { steps = append(steps, off); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(steps) == 0 || steps[len(steps)-1] != img.Size() {
		t.Fatalf("Flatten steps %v do not reach %d", steps, img.Size())
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if info := qemuImg(t, "info", "-U", a); strings.Contains(info, "backing file") {
		t.Fatalf("flattened image still has a backing file:\n%s", info)
	}
	qemuImg(t, "check", "-U", a)
	if got := qemuReads(t, a); !bytes.Equal(got, wantA) {
		t.Fatal("flattened image reads differently")
	}
	if got := qemuReads(t, b); !bytes.Equal(got, padTo(want, 2*testDisk)) {
		t.Fatal("the other overlay changed")
	}

	// A snapshot of overlay b frozen into a base of its own: flat when the
	// depth limit says so, a chain over the first base when it allows.
	img, err = qcow2.Open(b, qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Take(img, "bs", 10); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name     string
		maxDepth int
	}{{"flat", 1}, {"chain", 4}} {
		nb := filepath.Join(bases, "bs-"+c.name+".qcow2")
		bm, bd, err := Freeze(img, "bs", nb, c.maxDepth, RestoreOptions{SourceClosed: true})
		if err != nil {
			t.Fatal(err)
		}
		if c.maxDepth == 1 && (bm != MethodCopy || bd != 0) {
			t.Fatalf("%s: base made by %s with %d layers, want a flat copy", c.name, bm, bd)
		}
		if bm == MethodReflink && bd != 1 {
			t.Fatalf("%s: reflinked base of an overlay has %d layers, want 1", c.name, bd)
		}
		qemuImg(t, "check", "-U", nb)
		if got := qemuReads(t, nb); !bytes.Equal(got, padTo(want, 2*testDisk)) {
			t.Fatalf("%s: base of the overlay's snapshot reads differently", c.name)
		}
		o := filepath.Join(dir, "o-"+c.name+".qcow2")
		if err := Overlay(nb, o, OverlayOptions{}); err != nil {
			t.Fatal(err)
		}
		if got := qemuReads(t, o); !bytes.Equal(got, padTo(want, 2*testDisk)) {
			t.Fatalf("%s: overlay of the second base reads differently", c.name)
		}
	}
	img.Close()
	return m
}

func TestOverlayCopy(t *testing.T) {
	peer.Require(t, "qemu-img")
	if m := overlaysIn(t, t.TempDir()); m != MethodCopy {
		t.Fatalf("base made by %s on the host's file system, want copy", m)
	}
}

// TestOverlayReflink makes the bases by reflink on an xfs loop mount.
func TestOverlayReflink(t *testing.T) {
	peer.Root(t)
	peer.Require(t, "mkfs.xfs")
	peer.Require(t, "qemu-img")
	if m := overlaysIn(t, xfsMount(t)); m != MethodReflink {
		t.Fatalf("base made by %s on xfs, want reflink", m)
	}
}

// TestOverlayReadsQemuOverlays: overlays qemu-img makes with -b read the
// same through Flatten's library as through qemu.
func TestOverlayReadsQemuOverlays(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", base, "4M")
	out, err := exec.Command(peer.Require(t, "qemu-io"), "-c", "write -P 0x5a 0 3M", base).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-io: %v\n%s", err, out)
	}
	top := filepath.Join(dir, "top.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "8M")
	img, err := qcow2.Open(top, qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	got := make([]byte, img.Size())
	if _, err := img.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, qemuReads(t, top)) {
		t.Fatal("we read qemu's overlay differently")
	}
	if err := Flatten(img, 0, nil); err != nil {
		t.Fatal(err)
	}
	img.Close()
	if err := os.Remove(base); err != nil {
		t.Fatal(err)
	}
	qemuImg(t, "check", top)
	if !bytes.Equal(got, qemuReads(t, top)) {
		t.Fatal("the flattened image reads differently without its base")
	}
}

// TestQemuRunsOurOverlay: qemu's block layer (qemu-io) opens an overlay we
// made over a base we froze, reads the snapshot through it and writes into
// it; we read qemu's write back and qemu-img check stays clean.
func TestQemuRunsOurOverlay(t *testing.T) {
	qemuIO := peer.Require(t, "qemu-io")
	dir := t.TempDir()
	path, want := restoreFixture(t, dir)
	src, err := qcow2.Open(path, qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	_, _, err = Freeze(src, "s1", base, 4, RestoreOptions{SourceClosed: true})
	src.Close()
	if err != nil {
		t.Fatal(err)
	}
	if err := Overlay(base, top, OverlayOptions{}); err != nil {
		t.Fatal(err)
	}
	// restoreFixture's s1: 100 KiB of 1 at 0, 5000 bytes of 2 at 3 MiB.
	out, err := exec.Command(qemuIO, "-c", "read -P 1 0 100k", "-c", "read -P 2 3M 5000", "-c", "write -P 0x77 1M 64k", "-c", "read -P 0x77 1M 64k", top).CombinedOutput()
	if err != nil || strings.Contains(string(out), "Pattern verification failed") {
		t.Fatalf("qemu-io on our overlay: %v\n%s", err, out)
	}
	img, err := qcow2.Open(top, qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, img.Size())
	if _, err := img.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	img.Close()
	exp := padTo(want, testDisk)
	copy(exp[1<<20:], bytes.Repeat([]byte{0x77}, 64<<10))
	if !bytes.Equal(got, exp) {
		t.Fatal("we read qemu's write into our overlay differently")
	}
	qemuImg(t, "check", top)
}
