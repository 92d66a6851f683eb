package driver

import (
	"slices"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/qcow2-csi/qcow2-csi/pkg/snapshotter"
)

// stream's FIXED_LENGTH widening: ranges that are not block-aligned, share a
// block, or straddle a window boundary give each block once, in order, and
// max_results splits messages without changing the list.
func TestStreamFixedLength(t *testing.T) {
	const size, block = 1 << 20, 4096
	rs := []snapshotter.Range{{Offset: 100, Length: 200}, {Offset: 300, Length: 10}, {Offset: 4000, Length: 200}, {Offset: 12288, Length: 4096}, {Offset: 65535, Length: 2}, {Offset: size - 1, Length: 1}}
	ranges := func(off, n int64) ([]snapshotter.Range, error) {
		var out []snapshotter.Range
		for _, r := range rs {
			s, e := max(r.Offset, off), min(r.Offset+r.Length, off+n)
			if s < e {
				out = append(out, snapshotter.Range{Offset: s, Length: e - s})
			}
		}
		return out, nil
	}
	for _, tc := range []struct {
		start int64
		max   int32
		want  []int64
	}{
		{0, 0, []int64{0, 4096, 12288, 61440, 65536, size - block}},
		{0, 1, []int64{0, 4096, 12288, 61440, 65536, size - block}},
		{4100, 4, []int64{4096, 12288, 61440, 65536, size - block}},
		{65536, 2, []int64{65536, size - block}},
		{size - 1, 0, []int64{size - block}},
	} {
		var got []int64
		msgs := 0
		err := stream(size, tc.start, tc.max, block, ranges, func(b []*csi.BlockMetadata) error {
			msgs++
			if tc.max > 0 && len(b) > int(tc.max) {
				t.Errorf("%d tuples in a message, max %d", len(b), tc.max)
			}
			for _, m := range b {
				if m.SizeBytes != block {
					t.Errorf("tuple %v is not one block", m)
				}
				got = append(got, m.ByteOffset)
			}
			return nil
		})
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("from %d max %d: %v %v, want %v", tc.start, tc.max, got, err, tc.want)
		}
	}
}
