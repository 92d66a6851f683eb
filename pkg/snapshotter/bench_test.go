package snapshotter

import (
	"path/filepath"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

// BenchmarkDelta100GiB: Delta over a 100 GiB disk with 1 GiB changed in
// 16384 scattered 64 KiB runs (zero writes: they mark the bitmap like data
// writes without filling the disk). Also Allocated on the same snapshot.
func BenchmarkDelta100GiB(b *testing.B) {
	const size = 100 << 30
	img, err := qcow2.Create(filepath.Join(b.TempDir(), "big.qcow2"), qcow2.CreateOptions{Size: size})
	if err != nil {
		b.Fatal(err)
	}
	defer img.Close()
	if _, err := Take(img, "s1", 1); err != nil {
		b.Fatal(err)
	}
	const runs, run = 16384, 64 << 10
	for i := int64(0); i < runs; i++ {
		if err := img.WriteZeroes(i*(size/runs), run, 0); err != nil {
			b.Fatal(err)
		}
	}
	if _, err := Take(img, "s2", 2); err != nil {
		b.Fatal(err)
	}
	b.Run("GetMetadataDelta", func(b *testing.B) {
		for range b.N {
			d, err := Delta(img, 1, 2, 0, size)
			if err != nil || len(d) != runs {
				b.Fatalf("%d ranges, %v", len(d), err)
			}
		}
	})
	b.Run("GetMetadataAllocated", func(b *testing.B) {
		for range b.N {
			if _, err := Allocated(img, "s2", 0, size); err != nil {
				b.Fatal(err)
			}
		}
	})
}
