package imagebackend

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

func newTestImage(t *testing.T, opts qcow2.CreateOptions) (*qcow2.Image, string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.qcow2")
	img, err := qcow2.Create(p, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return img, p
}

func TestImageBackendStatus(t *testing.T) {
	ctx := context.Background()
	img, path := newTestImage(t, qcow2.CreateOptions{Size: 1 << 20})
	b := mustBackend(t, img, Options{AllocationDepth: true})
	if err := b.WriteAt(ctx, bytes.Repeat([]byte{7}, 65536), 65536, true); err != nil {
		t.Fatal(err)
	}
	if err := b.WriteZeroes(ctx, 196608, 65536, nbdattach.ZeroFlags{NoHole: true}); err != nil {
		t.Fatal(err)
	}
	got, err := b.BlockStatus(ctx, 0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	// base:allocation as qemu-nbd: data 0, zero cluster hole|zero (3),
	// unallocated hole|zero (3), merged when equal.
	want := []nbdattach.Extent{{Length: 65536, Flags: 3}, {Length: 65536, Flags: 0}, {Length: 1<<20 - 131072, Flags: 3}}
	if !equalExtents(got, want) {
		t.Fatalf("base:allocation %v, want %v", got, want)
	}
	got, err = b.MetaContextStatus(ctx, nbdattach.ContextAllocationDepth, 0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	// allocation depth: 0 unallocated, 1 allocated here (data or zero cluster).
	want = []nbdattach.Extent{{Length: 65536, Flags: 0}, {Length: 65536, Flags: 1}, {Length: 65536, Flags: 0}, {Length: 65536, Flags: 1}, {Length: 1<<20 - 262144, Flags: 0}}
	if !equalExtents(got, want) {
		t.Fatalf("allocation depth %v, want %v", got, want)
	}
	if names := b.MetaContexts(); len(names) != 1 || names[0] != nbdattach.ContextAllocationDepth {
		t.Fatalf("contexts %v", names)
	}
	if _, err := b.MetaContextStatus(ctx, "qemu:dirty-bitmap:x", 0, 512); !errors.Is(err, nbdattach.ErrInvalid) {
		t.Fatalf("unknown context: %v", err)
	}
	_ = path
}

func TestImageBackendErrors(t *testing.T) {
	ctx := context.Background()
	img, path := newTestImage(t, qcow2.CreateOptions{Size: 1 << 20})
	b := mustBackend(t, img, Options{})
	// A fast zero over partial clusters would have to write: ENOTSUP, as qemu.
	if err := b.WriteZeroes(ctx, 512, 4096, nbdattach.ZeroFlags{Fast: true}); !errors.Is(err, nbdattach.ErrNotSupported) {
		t.Fatalf("fast partial zero: %v", err)
	}
	if err := b.WriteZeroes(ctx, 0, 1<<20, nbdattach.ZeroFlags{Fast: true}); err != nil {
		t.Fatalf("fast whole-cluster zero: %v", err)
	}
	img.Close()
	ro, err := qcow2.Open(path, qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	rb := mustBackend(t, ro, Options{})
	if err := rb.WriteAt(ctx, make([]byte, 512), 0, false); !errors.Is(err, nbdattach.ErrPermission) {
		t.Fatalf("write to read-only image: %v, want ErrPermission", err)
	}
	if err := rb.ReadAt(ctx, make([]byte, 512), 1<<20); !errors.Is(err, nbdattach.ErrInvalid) {
		t.Fatalf("read past the end: %v, want ErrInvalid", err)
	}
}

func equalExtents(a, b []nbdattach.Extent) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func mustBackend(t *testing.T, img *qcow2.Image, opts Options) *Backend {
	t.Helper()
	b, err := New(img, opts)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestImageBackendBitmaps(t *testing.T) {
	ctx := context.Background()
	img, _ := newTestImage(t, qcow2.CreateOptions{Size: 1 << 20})
	if _, err := New(img, Options{Bitmaps: []string{"b1"}}); err == nil {
		t.Fatal("missing bitmap accepted")
	}
	if err := img.AddBitmap("b1", qcow2.BitmapOptions{Granularity: 65536}); err != nil {
		t.Fatal(err)
	}
	b := mustBackend(t, img, Options{Bitmaps: []string{"b1"}})
	if err := b.WriteAt(ctx, []byte{1}, 200000, false); err != nil {
		t.Fatal(err)
	}
	got, err := b.MetaContextStatus(ctx, "qemu:dirty-bitmap:b1", 0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	// The write at 200000 dirties the 64 KiB granule [196608, 262144).
	want := []nbdattach.Extent{{Length: 196608, Flags: 0}, {Length: 65536, Flags: 1}, {Length: 1<<20 - 262144, Flags: 0}}
	if !equalExtents(got, want) {
		t.Fatalf("bitmap extents %v, want %v", got, want)
	}
	if names := b.MetaContexts(); len(names) != 1 || names[0] != "qemu:dirty-bitmap:b1" {
		t.Fatalf("contexts %v", names)
	}
}

func TestSnapshotBackend(t *testing.T) {
	ctx := context.Background()
	img, _ := newTestImage(t, qcow2.CreateOptions{Size: 1 << 20})
	if _, err := img.WriteAt(bytes.Repeat([]byte{1}, 65536), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := img.CreateSnapshot("s1"); err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(bytes.Repeat([]byte{2}, 65536), 0); err != nil {
		t.Fatal(err)
	}
	view, err := img.OpenSnapshot("s1")
	if err != nil {
		t.Fatal(err)
	}
	defer view.Close()
	b, err := NewSnapshot(img, view, Options{AllocationDepth: true})
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 4096)
	if err := b.ReadAt(ctx, p, 0); err != nil || !bytes.Equal(p, bytes.Repeat([]byte{1}, 4096)) {
		t.Fatalf("snapshot read: %v %x", err, p[:4])
	}
	for name, err := range map[string]error{
		"write":  b.WriteAt(ctx, p, 0, false),
		"trim":   b.Trim(ctx, 0, 65536),
		"zeroes": b.WriteZeroes(ctx, 0, 65536, nbdattach.ZeroFlags{}),
	} {
		if !errors.Is(err, nbdattach.ErrPermission) {
			t.Errorf("%s on a snapshot view: %v, want ErrPermission", name, err)
		}
	}
	if err := b.Flush(ctx); err != nil {
		t.Fatalf("flush: %v", err)
	}
	got, err := b.BlockStatus(ctx, 0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if want := []nbdattach.Extent{{Length: 65536}, {Length: 1<<20 - 65536, Flags: 3}}; !equalExtents(got, want) {
		t.Fatalf("snapshot block status %v, want %v", got, want)
	}
}
