package qcow2

import (
	"path/filepath"
	"testing"
)

// Appended rebuilds, again and again, on an image with 512-byte clusters,
// whose refcount table cluster covers only 8 MiB of file: the file end
// crosses that boundary on the way, so the new table outgrows its first
// slot. Every rebuild leaves an image qemu-img check finds clean (no leak:
// the old structures are free space, and so is an outgrown slot), whose
// structures lie past the old end and whose data reads as before.
func TestRebuildAppendAcrossTableCluster(t *testing.T) {
	p := filepath.Join(t.TempDir(), "small.qcow2")
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p, "16M")
	qemu(t, "qemu-io", "-c", "write -P 5 0 7800k", p)
	before := qemuRaw(t, p)
	const tableSpan = 512 / 8 * (512 * 8 / 16) // clusters one table cluster covers
	crossed := false
	for i := 0; i < 12 && !crossed; i++ {
		img, err := Open(p, OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		oldEnd := img.fileEnd
		oldClusters := img.hdr.RefcountTableClusters
		err = img.rebuildRefcounts()
		newTable, newClusters := int64(img.hdr.RefcountTableOffset), img.hdr.RefcountTableClusters
		if cerr := img.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			t.Fatalf("rebuild %d: %v", i, err)
		}
		if newTable < oldEnd {
			t.Fatalf("rebuild %d: appended table at %#x, below the old end %#x", i, newTable, oldEnd)
		}
		if r, out := qemuCheck(t, p); r.Corruptions != 0 || r.Leaks != 0 || r.CheckErrors != 0 {
			t.Fatalf("rebuild %d: qemu-img check: %+v\n%s", i, r, out)
		}
		crossed = oldClusters == 1 && newClusters == 2
		t.Logf("rebuild %d: end %d clusters (table span %d), table at %#x, %d cluster(s)", i, oldEnd>>9, tableSpan, newTable, newClusters)
	}
	if !crossed {
		t.Fatal("the refcount table never grew to a second cluster: the test no longer covers that case")
	}
	if string(before) != string(qemuRaw(t, p)) {
		t.Fatal("rebuilds changed readable bytes")
	}
}

// The plan, for both placements and every file end around the point where
// the table needs a second cluster: each cluster in use has a block, the
// table names every block, and nothing is counted that is neither in use
// before nor a placed block or the table (an outgrown table slot is given
// back). Append places nothing below the end.
func TestPlanRefcountStructureAccounts(t *testing.T) {
	img := &Image{clusterSize: 512, clusterBits: 9, refOrder: 4, refBits: 16, refBlockBits: 8, refBlockEnts: 256}
	for _, place := range []refPlacement{placeAppend, placeFirstFit} {
		for end := int64(16100); end < 16400; end++ {
			counts := &refCounts{small: make([]uint16, end)}
			for ci := int64(0); ci < end; ci++ {
				if ci%97 != 5 { // a few holes for first-fit to use
					counts.add(ci)
				}
			}
			p, err := img.planRefcountStructure(counts, end, place)
			if err != nil {
				t.Fatalf("place %d end %d: %v", place, end, err)
			}
			placed := map[int64]bool{}
			for _, e := range p.table {
				if e != 0 {
					placed[e.offset()>>9] = true
				}
			}
			// The clusters at tableOff hold every entry of the table, and
			// are inside the plan.
			if len(p.table) == 0 || len(p.table)*8%512 != 0 || p.tableOff <= 0 || p.tableOff%512 != 0 {
				t.Fatalf("place %d end %d: a table of %d entries at %#x, want whole clusters at a cluster boundary", place, end, len(p.table), p.tableOff)
			}
			tc := int64(len(p.table)) * 8 / 512
			if p.tableOff>>9+tc > p.end {
				t.Fatalf("place %d end %d: table at clusters [%d, %d) past the plan's end %d", place, end, p.tableOff>>9, p.tableOff>>9+tc, p.end)
			}
			for c := p.tableOff >> 9; c < p.tableOff>>9+tc; c++ {
				if placed[c] {
					t.Fatalf("place %d end %d: table overlaps block at cluster %d", place, end, c)
				}
				placed[c] = true
			}
			for ci := int64(0); ci < max(int64(len(counts.small)), p.end); ci++ {
				inUse := ci < end && ci%97 != 5
				v := counts.get(ci)
				switch {
				case inUse && placed[ci]:
					t.Fatalf("place %d end %d: cluster %d in use and placed", place, end, ci)
				case (inUse || placed[ci]) != (v == 1):
					t.Fatalf("place %d end %d: cluster %d counted %d (in use %v, placed %v)", place, end, ci, v, inUse, placed[ci])
				case placed[ci] && place == placeAppend && ci < end:
					t.Fatalf("append placed cluster %d below the end %d", ci, end)
				case placed[ci] && ci >= p.end:
					t.Fatalf("place %d end %d: cluster %d placed past the plan's end %d", place, end, ci, p.end)
				}
				if v != 0 {
					bi := ci >> 8
					if bi >= int64(len(p.table)) || p.table[bi] == 0 {
						t.Fatalf("place %d end %d: cluster %d in use without a block", place, end, ci)
					}
				}
			}
		}
	}
}
