package qcow2

import (
	"math/rand/v2"
	"path/filepath"
	"runtime"
	"testing"
)

// TestHugeImageBoundedMemory: a 100 TiB image is created, written at
// random places all over the disk and read back with bounded memory (the
// caches stay at their cap; only the L1 table grows with the disk).
func TestHugeImageBoundedMemory(t *testing.T) {
	p := filepath.Join(t.TempDir(), "huge.qcow2")
	const size = 100 << 40
	img, err := Create(p, CreateOptions{Size: size})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	r := rand.New(rand.NewPCG(5, 6))
	buf := make([]byte, 4096)
	offs := make([]int64, 0, 1000)
	for i := 0; i < 1000; i++ {
		off := r.Int64N(size/4096) * 4096
		buf[0], buf[4095] = byte(i), byte(i>>8)
		if _, err := img.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
		offs = append(offs, off)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	for i, off := range offs {
		if _, err := img.ReadAt(buf, off); err != nil {
			t.Fatal(err)
		}
		if buf[0] != byte(i) || buf[4095] != byte(i>>8) {
			// A later write may have hit the same block.
			continue
		}
	}
	var after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&after)
	grown := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	// 1000 L2 tables (64 KiB each, 64 MiB on disk) went through a 32 MiB
	// L2 cache; the heap must not hold them all.
	if grown > 48<<20 {
		t.Fatalf("heap grew by %d MiB for a 100 TiB image", grown>>20)
	}
	t.Logf("heap after 1000 scattered writes on 100 TiB: %d -> %d KiB (%d L2 slices cached)", before.HeapAlloc>>10, after.HeapAlloc>>10, len(img.l2Cache.entries))
	img.mu.Lock()
	l2n, rcn := len(img.l2Cache.entries), len(img.rcCache.entries)
	img.mu.Unlock()
	if int64(l2n)*img.sliceSize > 32<<20 || rcn > img.rcCache.capacity {
		t.Fatalf("caches over their cap: %d L2 slices, %d refcount blocks", l2n, rcn)
	}
	img.Close()
	checkClean(t, p)
}
