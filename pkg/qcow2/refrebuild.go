package qcow2

import "fmt"

// Rebuilding the refcount structures from computed refcounts. Two callers
// need a fresh refcount table and fresh refcount blocks, and differ only in
// where the new structures may go:
//
//   - Opening a dirty lazy-refcounts image, and amend's change of the
//     refcount width (rebuildRefcountsLocked): the counts leave the old
//     structures out and the new ones are appended after everything
//     counted. The old structures become free space.
//   - Check with RepairAll when the structures themselves are broken
//     (checkLocked; qemu's rebuild_refcount_structure): the counts keep the
//     old structures, which the durable header references until the switch,
//     and the new ones take the first free clusters that fit, so that an
//     image on a block device, whose end cannot move, can be repaired. The
//     old structures are leaks afterwards, which the check's next pass frees.
//
// Both go through rebuildRefcountStructure: plan (place every refcount
// block, then the table, counting each cluster placed), write the blocks,
// then switch the header with commitRefTable, which growRefTable uses too.

// refPlacement says where rebuildRefcountStructure puts the new structures.
type refPlacement uint8

const (
	// placeAppend puts them after the counted area.
	placeAppend refPlacement = iota
	// placeFirstFit puts each into the first run of unreferenced clusters
	// that fits; past the end of the file only when none does.
	placeFirstFit
)

// rebuildRefcounts recomputes every refcount from the references and
// appends fresh refcount structures to the file (the old ones become free
// space), then points the header at them. Callers hold drain exclusively or
// have not shared the image yet; mu must NOT be held.
func (img *Image) rebuildRefcounts() error {
	img.mu.Lock()
	defer img.mu.Unlock()
	return img.rebuildRefcountsLocked()
}

func (img *Image) rebuildRefcountsLocked() error {
	// Unflushed L2 updates first, so what we count is what is on disk.
	for _, e := range img.l2Cache.dirtyEntries() {
		if err := img.checkOverlap(e.off, int64(len(e.buf)), metaL2); err != nil {
			return err
		}
		if _, err := img.f.WriteAt(e.buf, e.off); err != nil {
			return ioErr("write L2 table", err)
		}
		e.dirty = false
	}
	if err := img.fsync(); err != nil {
		return err
	}
	img.pendingFree = nil
	counts, err := img.countReferences(nil)
	if err != nil {
		return err
	}
	end := max(img.fileEnd>>img.clusterBits, int64(len(counts.small)))
	if err := img.rebuildRefcountStructure(counts, end, placeAppend); err != nil {
		return err
	}
	if !img.readOnly {
		// COPIED flags of the active tables from the new refcounts,
		// durable before the dirty bit goes (qemu's repair fixes them
		// too; a crash inside a snapshot operation leaves them stale).
		if err := img.repairCopiedLocked(); err != nil {
			return err
		}
	}
	if img.hdr.Incompatible&IncompatDirty != 0 && !img.readOnly {
		img.hdr.Incompatible &^= IncompatDirty
		if err := img.writeHeader(); err != nil {
			return err
		}
		if err := img.fsync(); err != nil {
			return err
		}
	}
	return nil
}

// rebuildRefcountStructure replaces the refcount table and blocks by new
// ones that hold counts, placed as place says, and switches the header to
// them. Every cluster in use lies below end or is counted there; with
// placeAppend the new structures start at end. counts gains the clusters
// placed. mu held.
func (img *Image) rebuildRefcountStructure(counts *refCounts, end int64, place refPlacement) error {
	p, err := img.planRefcountStructure(counts, end, place)
	if err != nil {
		return err
	}
	if err := p.writeBlocks(); err != nil {
		return err
	}
	if err := img.commitRefTable(p.tableOff, p.table); err != nil {
		return err
	}
	img.rcCache.clear()
	img.freeHint = 1
	img.fileEnd = max(img.fileEnd, p.end<<img.clusterBits)
	img.buildMetaMap()
	return nil
}

// refcountPlan is the layout of new refcount structures.
type refcountPlan struct {
	img    *Image
	counts *refCounts
	// floor is the first cluster a new structure may take.
	floor int64
	// firstFree is where the search for the next refcount block starts.
	firstFree int64
	// table is the new refcount table, in whole clusters of entries.
	table    []refTableEntry
	tableOff int64
	// end is one past the last cluster placed.
	end int64
}

// planRefcountStructure places a refcount block for every block range in
// use (the blocks' own ranges included), then the table, then blocks for
// the table's range; a table that has to grow for those gives its slot
// back and is placed again. Nothing is written.
func (img *Image) planRefcountStructure(counts *refCounts, end int64, place refPlacement) (*refcountPlan, error) {
	p := &refcountPlan{img: img, counts: counts}
	if place == placeAppend {
		p.floor = end
	}
	p.placeBlocks(0, end)
	if len(p.table) == 0 {
		return nil, fmt.Errorf("qcow2: internal: refcount rebuild found no cluster in use")
	}
	cs := img.clusterSize
	for {
		n := int64(len(p.table)) * 8 / cs
		if n*cs > maxRefcountTableBytes {
			return nil, fmt.Errorf("%w: refcount table would exceed %d bytes", ErrUnsupported, maxRefcountTableBytes)
		}
		from := int64(0)
		start := p.alloc(n, &from)
		if !p.placeBlocks(start, start+n) {
			p.tableOff = start << img.clusterBits
			p.end = max(p.end, start+n)
			return p, nil
		}
		// The table outgrew its slot: free it again (nothing is written
		// yet) and find a bigger one. The blocks placed for it stay,
		// counting themselves.
		for c := start; c < start+n; c++ {
			p.counts.reset(c)
		}
	}
}

// alloc finds n contiguous unreferenced clusters at or after *from and the
// floor, moves *from to the first unreferenced cluster it meets, and counts
// the run.
func (p *refcountPlan) alloc(n int64, from *int64) int64 {
	ci, run, first := max(*from, p.floor), int64(0), true
	for run < n {
		if p.counts.get(ci) == 0 {
			if first {
				*from, first = ci, false
			}
			run++
		} else {
			run = 0
		}
		ci++
	}
	start := ci - n
	for c := start; c < ci; c++ {
		p.counts.add(c)
	}
	return start
}

// placeBlocks gives a refcount block to every block range in use among
// clusters [first, end), and to the ranges the blocks placed on the way
// fall into. It reports whether the table had to grow.
func (p *refcountPlan) placeBlocks(first, end int64) bool {
	img := p.img
	grown := false
	for ci := first; ci < end; ci++ {
		if p.counts.get(ci) == 0 {
			continue
		}
		bi := ci >> img.refBlockBits
		start := bi << img.refBlockBits
		if bi >= int64(len(p.table)) || p.table[bi] == 0 {
			// As qemu does: a block never goes below the range it
			// describes, whose predecessors are settled.
			p.firstFree = max(p.firstFree, start)
			bc := p.alloc(1, &p.firstFree)
			p.end = max(p.end, bc+1)
			end = max(end, bc+1) // the block's own range needs a block
			if bi >= int64(len(p.table)) {
				per := img.clusterSize / 8
				p.table = append(p.table, make([]refTableEntry, (bi/per+1)*per-int64(len(p.table)))...)
				grown = true
			}
			p.table[bi] = refTableEntry(bc << img.clusterBits)
		}
		ci = start + img.refBlockEnts - 1
	}
	return grown
}

// writeBlocks writes every planned refcount block from the counts, after
// checking that the image's refcount width holds them all.
func (p *refcountPlan) writeBlocks() error {
	img := p.img
	if ci, v := p.counts.firstAbove(img.maxRefcount()); v != 0 {
		return fmt.Errorf("%w: cluster %#x needs refcount %d, more than %d-bit refcounts hold", ErrUnsupported, ci<<img.clusterBits, v, img.refBits)
	}
	buf := make([]byte, img.clusterSize)
	for bi, e := range p.table {
		if e == 0 {
			continue
		}
		clear(buf)
		first := int64(bi) << img.refBlockBits
		for j := int64(0); j < img.refBlockEnts; j++ {
			if v := p.counts.get(first + j); v != 0 {
				setRefEntry(buf, img.refOrder, j, v)
			}
		}
		if _, err := img.f.WriteAt(buf, e.offset()); err != nil {
			return ioErr("write refcount block", err)
		}
	}
	return nil
}
