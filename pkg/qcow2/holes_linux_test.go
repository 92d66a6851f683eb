package qcow2

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// TestHostSegmentsDataRegion: a scan in small pieces through one
// dataRegion finds the same data and holes as asking the file system for
// every piece.
func TestHostSegmentsDataRegion(t *testing.T) {
	const mib = 1 << 20
	f, err := os.Create(filepath.Join(t.TempDir(), "holes"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// data [0,1M) [3M,5M) [8M,9M); holes elsewhere up to 12M.
	for _, d := range [][2]int64{{0, 1}, {3, 5}, {8, 9}} {
		if _, err := f.WriteAt(bytes.Repeat([]byte{1}, int((d[1]-d[0])*mib)), d[0]*mib); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(12 * mib); err != nil {
		t.Fatal(err)
	}
	merge := func(ss []seg) []seg {
		var out []seg
		for _, s := range ss {
			if n := len(out); n > 0 && out[n-1].hole == s.hole && out[n-1].off+out[n-1].n == s.off {
				out[n-1].n += s.n
				continue
			}
			out = append(out, s)
		}
		return out
	}
	want := merge(hostSegments(f, 0, 12*mib, nil))
	if len(want) != 6 || want[0] != (seg{0, mib, false}) || want[5] != (seg{9 * mib, 3 * mib, true}) {
		t.Skipf("file system reports no holes here: %v", want)
	}
	for _, piece := range []int64{4096, 64 << 10, 768 << 10, 3 * mib} {
		var dr dataRegion
		var got []seg
		for off := int64(0); off < 12*mib; off += piece {
			got = append(got, hostSegments(f, off, min(piece, 12*mib-off), &dr)...)
		}
		if got := merge(got); !slices.Equal(got, want) {
			t.Errorf("pieces of %d: %v, want %v", piece, got, want)
		}
	}
}
