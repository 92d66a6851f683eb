package qcow2

import (
	"errors"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// TestNoSpace: a full file system gives ErrNoSpace (wrapping ENOSPC), not
// a corrupt image: after space is freed the image is still clean.
func TestNoSpace(t *testing.T) {
	peer.Root(t)
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", dir).CombinedOutput(); err != nil {
		peer.Missing(t, "tmpfs mount", string(out))
	}
	t.Cleanup(func() { _ = exec.Command("umount", dir).Run() })
	p := filepath.Join(dir, "full.qcow2")
	img, err := Create(p, CreateOptions{Size: 64 << 20, ClusterSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64<<10)
	for i := range buf {
		buf[i] = byte(i + 1)
	}
	var werr error
	written := int64(0)
	for off := int64(0); off < 64<<20; off += int64(len(buf)) {
		if _, werr = img.WriteAt(buf, off); werr != nil {
			break
		}
		written = off + int64(len(buf))
	}
	if !errors.Is(werr, ErrNoSpace) {
		t.Fatalf("write to a full file system: %v, want ErrNoSpace", werr)
	}
	if err := img.Close(); err != nil && !errors.Is(err, ErrNoSpace) {
		t.Fatalf("Close: %v", err)
	}
	// What was written before the error reads back, and the image is not
	// corrupt (leaks are fine).
	r, out := qemuCheck(t, p)
	if r.Corruptions != 0 {
		t.Fatalf("image corrupt after ENOSPC: %s", out)
	}
	im, err := Open(p, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	got := make([]byte, len(buf))
	for off := int64(0); off < written; off += int64(len(buf)) {
		if _, err := im.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		if string(got) != string(buf) {
			t.Fatalf("data at %d lost after ENOSPC", off)
		}
	}
}
