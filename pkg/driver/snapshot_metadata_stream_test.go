package driver

import (
	"fmt"
	"runtime"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/qcow2-csi/qcow2-csi/pkg/snapshotter"
)

// TestStreamBoundedHeap: the listing of a 1 TiB disk whose every other
// 64 KiB cluster holds data is 8 Mi extents (16 Mi tuples as 32 KiB
// FIXED_LENGTH blocks). Held whole as CSI tuples it would take well over
// 500 MiB; stream holds one window's ranges and one message at a time, so
// the heap stays within a few MiB of where it started, however big the
// disk. The ranges are made up here as snapshotter.Allocated would return
// them for such a disk (writing 512 GiB of clusters to make a real one is
// out of reach): what is under test is everything between the per-window
// ranges and the gRPC send.
func TestStreamBoundedHeap(t *testing.T) {
	if testing.Short() {
		t.Skip("lists 8 Mi extents; -short")
	}
	const (
		size  = int64(1) << 40
		ext   = int64(64) << 10
		limit = 64 << 20 // heap growth allowed, bytes
	)
	// Every other cluster: [0, ext), [2ext, 3ext), ...
	alternating := func(off, n int64) ([]snapshotter.Range, error) {
		var rs []snapshotter.Range
		for o := (off + 2*ext - 1) / (2 * ext) * (2 * ext); o < off+n; o += 2 * ext {
			rs = append(rs, snapshotter.Range{Offset: o, Length: min(ext, off+n-o)})
		}
		return rs, nil
	}
	for _, tc := range []struct {
		name  string
		block int64
		want  int64 // tuples
	}{
		{"VARIABLE_LENGTH", 0, size / (2 * ext)},
		{"FIXED_LENGTH", ext / 2, size / ext},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var ms runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&ms)
			base, peak := ms.HeapAlloc, ms.HeapAlloc
			var tuples, msgs int64
			err := stream(size, 0, 0, tc.block, alternating, func(b []*csi.BlockMetadata) error {
				for _, m := range b {
					// VARIABLE_LENGTH: extent i is [2i ext, +ext); FIXED_LENGTH:
					// tuple i is block i%2 of extent i/2.
					want, wantLen := tuples*2*ext, ext
					if tc.block != 0 {
						want, wantLen = tuples/2*2*ext+tuples%2*tc.block, tc.block
					}
					if m.ByteOffset != want || m.SizeBytes != wantLen {
						return fmt.Errorf("tuple %d is [%d, +%d), want [%d, +%d)", tuples, m.ByteOffset, m.SizeBytes, want, wantLen)
					}
					tuples++
				}
				if msgs++; msgs%64 == 0 {
					runtime.ReadMemStats(&ms)
					peak = max(peak, ms.HeapAlloc)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if tuples != tc.want {
				t.Errorf("%d tuples, want %d", tuples, tc.want)
			}
			grew := int64(peak) - int64(base)
			t.Logf("%d tuples in %d messages; heap grew by at most %.1f MiB", tuples, msgs, float64(grew)/(1<<20))
			if grew > limit {
				t.Errorf("heap grew by %d MiB while streaming, want under %d MiB: the listing is being held", grew>>20, limit>>20)
			}
		})
	}
}
