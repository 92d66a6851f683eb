//go:build linux

package vm

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/qcow2-csi/qcow2-csi/pkg/imagebackend"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"github.com/qcow2-csi/qcow2-csi/tests/vm/vmharness"
)

// TestGuestQcow2 attaches a qcow2 image made by pkg/qcow2, through the
// adapter (imagebackend.Backend), with two connections, puts ext4 on it, writes and verifies files, and leaves in the
// share the image and what the kernel read of the device, for TestVM to run
// qemu-img check and qemu-img compare on.
func TestGuestQcow2(t *testing.T) {
	vmharness.Guest(t)
	ctx := context.Background()
	const size = 128 << 20
	path := filepath.Join(t.TempDir(), "vol.qcow2")
	img, err := qcow2.Create(path, qcow2.CreateOptions{Size: size})
	if err != nil {
		t.Fatal(err)
	}
	b, err := imagebackend.New(img, imagebackend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	a := kernelAttacher()
	dev, err := a.Attach(ctx, "vol-qcow2", b, nbdattach.AttachOptions{Connections: 2})
	if err != nil {
		t.Fatal(err)
	}
	run(t, "mkfs.ext4", "-q", "-F", dev.Path())
	mnt := "/mnt/qcow2"
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	run(t, "mount", "-t", "ext4", dev.Path(), mnt)
	sums := writeFileSet(t, mnt, 2, 16)
	run(t, "umount", mnt)
	dropCaches(t)
	run(t, "mount", "-t", "ext4", dev.Path(), mnt)
	verifyFileSet(t, sums)
	// Deleting files and fstrim sends TRIM: clusters are discarded.
	if err := os.RemoveAll(filepath.Join(mnt, "d0")); err != nil {
		t.Fatal(err)
	}
	run(t, "fstrim", mnt)
	run(t, "umount", mnt)
	copyDeviceSparse(t, dev.Path(), filepath.Join(vmharness.SharePath, "vol.dev.raw"))
	if err := dev.Detach(ctx); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	copySparse(t, path, filepath.Join(vmharness.SharePath, "vol.qcow2"))
}

// copyDeviceSparse reads the whole device through the kernel (O_DIRECT) and
// writes it to dst, leaving all-zero chunks as holes.
func copyDeviceSparse(t *testing.T, dev, dst string) {
	t.Helper()
	d, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	size, err := d.Seek(0, io.SeekEnd)
	if err != nil {
		t.Fatal(err)
	}
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	if err := out.Truncate(size); err != nil {
		t.Fatal(err)
	}
	const chunk = 1 << 20
	buf := alignedBuf(chunk)
	zero := make([]byte, 64<<10)
	for off := int64(0); off < size; off += chunk {
		n := min(int64(chunk), size-off)
		if _, err := d.ReadAt(buf[:n], off); err != nil {
			t.Fatalf("read %s at %d: %v", dev, off, err)
		}
		for o := int64(0); o < n; o += int64(len(zero)) {
			e := min(o+int64(len(zero)), n)
			if !bytes.Equal(buf[o:e], zero[:e-o]) {
				if _, err := out.WriteAt(buf[o:e], off+o); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	if err := out.Sync(); err != nil {
		t.Fatal(err)
	}
}
