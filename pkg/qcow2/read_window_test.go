package qcow2

import (
	"fmt"
	"math/rand"
	"path/filepath"
	"slices"
	"testing"
)

// TestBlockStatusWindows: BlockStatus of any window, aligned or not, is the
// whole disk's BlockStatus clipped to it. The disk has missing L2 tables,
// tables of many slices with data, zero and unallocated clusters (and
// subclusters), so windows start and end inside each kind.
func TestBlockStatusWindows(t *testing.T) {
	for _, tc := range []struct {
		cs    int64
		extL2 bool
	}{{65536, false}, {4096, false}, {65536, true}} {
		t.Run(fmt.Sprintf("cluster_%d_extl2_%v", tc.cs, tc.extL2), func(t *testing.T) {
			l2Span := tc.cs / 8 * tc.cs // bytes one L2 table maps (without extL2)
			if tc.extL2 {
				l2Span /= 2
			}
			size := 5 * l2Span
			img, err := Create(filepath.Join(t.TempDir(), "w.qcow2"), CreateOptions{Size: size, ClusterSize: tc.cs, ExtendedL2: tc.extL2})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			rng := rand.New(rand.NewSource(tc.cs))
			p := make([]byte, 3*tc.cs)
			rng.Read(p)
			// Tables 0, 2 and 4 hold something; 1 and 3 stay missing.
			for _, tbl := range []int64{0, 2, 4} {
				for range 40 {
					off := tbl*l2Span + rng.Int63n(l2Span-int64(len(p)))
					n := 1 + rng.Int63n(int64(len(p))-1)
					if rng.Intn(3) == 0 {
						if err := img.WriteZeroes(off, n, 0); err != nil {
							t.Fatal(err)
						}
					} else if _, err := img.WriteAt(p[:n], off); err != nil {
						t.Fatal(err)
					}
				}
			}
			full, err := img.BlockStatus(0, size)
			if err != nil {
				t.Fatal(err)
			}
			for range 300 {
				off := rng.Int63n(size)
				n := 1 + rng.Int63n(size-off)
				if rng.Intn(2) == 0 {
					n = 1 + rng.Int63n(min(size-off, 4*tc.cs))
				}
				got, err := img.BlockStatus(off, n)
				if err != nil {
					t.Fatal(err)
				}
				if want := clipBlockStatus(full, off, n); !slices.Equal(got, want) {
					t.Fatalf("BlockStatus(%d, %d):\n got %+v\nwant %+v", off, n, got, want)
				}
			}
		})
	}
}

// clipBlockStatus cuts ext to [off, off+n), merged as BlockStatus merges.
func clipBlockStatus(ext []Extent, off, n int64) []Extent {
	var out []Extent
	for _, e := range ext {
		s, end := max(e.Start, off), min(e.Start+e.Length, off+n)
		if s >= end {
			continue
		}
		if e.Offset >= 0 {
			e.Offset += s - e.Start
		}
		e.Start, e.Length = s, end-s
		out = appendExtent(out, e)
	}
	return out
}
