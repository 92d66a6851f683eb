package qcow2

import (
	"bytes"
	"path/filepath"
	"testing"
)

// KnownZero says yes only where the disk reads as zeroes and the metadata
// in memory proves it: never for data, never through a backing file, never
// when an L2 slice would have to be read, never when a lock is held.
func TestKnownZero(t *testing.T) {
	dir := t.TempDir()
	const cs = 65536
	path := filepath.Join(dir, "z.qcow2")
	img, err := Create(path, CreateOptions{Size: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	// Fresh: everything, up to the end and not past it.
	for _, c := range []struct {
		off, n int64
		want   bool
	}{{0, 4096, true}, {64<<20 - 4096, 4096, true}, {0, 64 << 20, true}, {64<<20 - 4096, 8192, false}, {-1, 4096, false}, {0, 0, false}} {
		if got := img.KnownZero(c.off, c.n); got != c.want {
			t.Fatalf("fresh image: KnownZero(%d, %d) = %v, want %v", c.off, c.n, got, c.want)
		}
	}
	// Data in cluster 1, zero clusters 2-3 (preallocated by data first).
	if _, err := img.WriteAt(bytes.Repeat([]byte{7}, 3*cs), cs); err != nil {
		t.Fatal(err)
	}
	if err := img.WriteZeroes(2*cs, 2*cs, 0); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		off, n int64
		want   bool
	}{{0, cs, true}, {cs - 4096, 8192, false}, {cs + 4096, 4096, false}, {2 * cs, 2 * cs, true}, {4 * cs, cs, true}, {0, 5 * cs, false}} {
		if got := img.KnownZero(c.off, c.n); got != c.want {
			t.Fatalf("after writes: KnownZero(%d, %d) = %v, want %v", c.off, c.n, got, c.want)
		}
		buf := make([]byte, c.n)
		if _, err := img.ReadAt(buf, c.off); err != nil {
			t.Fatal(err)
		}
		if c.want && !bytes.Equal(buf, make([]byte, c.n)) {
			t.Fatalf("KnownZero(%d, %d) but the range reads non-zero", c.off, c.n)
		}
	}
	// Held locks: the answer is not at hand, so no.
	img.mu.Lock()
	got := img.KnownZero(0, 4096)
	img.mu.Unlock()
	img.drain.Lock()
	got2 := img.KnownZero(0, 4096)
	img.drain.Unlock()
	if got || got2 {
		t.Fatalf("KnownZero with mu held %v, with drain held %v; want false", got, got2)
	}
	// A snapshot view answers for the snapshot's disk.
	if _, err := img.CreateSnapshot("s"); err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt([]byte{1}, 0); err != nil {
		t.Fatal(err)
	}
	v, err := img.OpenSnapshot("s")
	if err != nil {
		t.Fatal(err)
	}
	// (The write copied the L2 table: the snapshot's is read back first.)
	if _, err := v.ReadAt(make([]byte, 1), 0); err != nil {
		t.Fatal(err)
	}
	if !v.KnownZero(0, 4096) || v.KnownZero(cs, 4096) || img.KnownZero(0, 4096) {
		t.Fatalf("snapshot view KnownZero(0) %v (want true), (cs) %v (want false); active disk (0) %v (want false)",
			v.KnownZero(0, 4096), v.KnownZero(cs, 4096), img.KnownZero(0, 4096))
	}
	v.Close()
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if img.KnownZero(4*cs, 4096) {
		t.Fatal("KnownZero on a closed image")
	}

	// Reopened: the L2 slice is not cached until something reads it.
	img, err = Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if img.KnownZero(4*cs, 4096) {
		t.Fatal("KnownZero before the L2 slice was loaded")
	}
	if _, err := img.ReadAt(make([]byte, 1), 4*cs); err != nil {
		t.Fatal(err)
	}
	if !img.KnownZero(4*cs, 4096) {
		t.Fatal("KnownZero false once the L2 slice is cached")
	}
	img.Close()

	// An overlay: unallocated space is the backing file's, not zeroes;
	// its zero clusters still are.
	// (Create's handle is opened without the backing file: open again.)
	ovPath := filepath.Join(dir, "ov.qcow2")
	ov, err := Create(ovPath, CreateOptions{Size: 64 << 20, BackingFile: path, BackingFormat: "qcow2"})
	if err != nil {
		t.Fatal(err)
	}
	if err := ov.Close(); err != nil {
		t.Fatal(err)
	}
	if ov, err = Open(ovPath, OpenOptions{}); err != nil {
		t.Fatal(err)
	}
	defer ov.Close()
	if err := ov.WriteZeroes(8*cs, cs, 0); err != nil {
		t.Fatal(err)
	}
	if ov.KnownZero(4*cs, 4096) || !ov.KnownZero(8*cs, cs) {
		t.Fatalf("overlay: KnownZero over the backing file %v (want false), of a zero cluster %v (want true)",
			ov.KnownZero(4*cs, 4096), ov.KnownZero(8*cs, cs))
	}
}
