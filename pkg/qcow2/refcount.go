package qcow2

import (
	"encoding/binary"
	"fmt"

	"golang.org/x/sys/unix"
)

// Refcount entries are refBits wide, packed big-endian for widths of 8 bits
// and more, and least-significant-bits first inside a byte below that.

func getRefEntry(buf []byte, order uint32, i int64) uint64 {
	switch order {
	case 0, 1, 2:
		w := uint(1) << order
		per := int64(8 >> order)
		return uint64(buf[i/per]>>(uint(i%per)*w)) & (1<<w - 1)
	case 3:
		return uint64(buf[i])
	case 4:
		return uint64(binary.BigEndian.Uint16(buf[i*2:]))
	case 5:
		return uint64(binary.BigEndian.Uint32(buf[i*4:]))
	default:
		return binary.BigEndian.Uint64(buf[i*8:])
	}
}

func setRefEntry(buf []byte, order uint32, i int64, v uint64) {
	switch order {
	case 0, 1, 2:
		w := uint(1) << order
		per := int64(8 >> order)
		sh := uint(i%per) * w
		mask := byte((1<<w - 1) << sh)
		buf[i/per] = buf[i/per]&^mask | byte(v<<sh)&mask
	case 3:
		buf[i] = byte(v)
	case 4:
		binary.BigEndian.PutUint16(buf[i*2:], uint16(v))
	case 5:
		binary.BigEndian.PutUint32(buf[i*4:], uint32(v))
	default:
		binary.BigEndian.PutUint64(buf[i*8:], v)
	}
}

func (img *Image) maxRefcount() uint64 {
	if img.refBits == 64 {
		return ^uint64(0)
	}
	return 1<<uint(img.refBits) - 1
}

// refBlock returns the cached refcount block covering host cluster index
// ci, or nil when the refcount table has no block for it. mu held.
func (img *Image) refBlock(ci int64) (*cacheEntry, error) {
	bi := ci >> img.refBlockBits
	if bi >= int64(len(img.refTable)) {
		return nil, nil
	}
	off := img.refTable[bi].offset()
	if off == 0 {
		return nil, nil
	}
	if e := img.rcCache.get(off); e != nil {
		return e, nil
	}
	buf := make([]byte, img.clusterSize)
	if _, err := img.f.ReadAt(buf, off); err != nil {
		return nil, ioErr(fmt.Sprintf("read refcount block at %#x", off), err)
	}
	return img.rcCache.put(off, buf, false)
}

// getRefcount returns the refcount of host cluster index ci. mu held.
func (img *Image) getRefcount(ci int64) (uint64, error) {
	b, err := img.refBlock(ci)
	if err != nil || b == nil {
		return 0, err
	}
	return getRefEntry(b.buf, img.refOrder, ci&(img.refBlockEnts-1)), nil
}

// addRefcount adds delta to the refcount of host cluster ci and returns the
// new value. A missing refcount block is created for increments. mu held.
func (img *Image) addRefcount(ci int64, delta int64) (uint64, error) {
	b, err := img.refBlock(ci)
	if err != nil {
		return 0, err
	}
	if b == nil {
		if delta < 0 {
			return 0, corruptf("refcount", -1, "decrement of cluster %#x which has no refcount block", ci<<img.clusterBits)
		}
		if err := img.ensureRefBlock(ci >> img.refBlockBits); err != nil {
			return 0, err
		}
		if b, err = img.refBlock(ci); err != nil {
			return 0, err
		}
	}
	nv, err := img.addRefEntry(b, ci, delta)
	if err != nil {
		return 0, err
	}
	if nv == 0 && ci < img.freeHint {
		img.freeHint = ci
	}
	return nv, nil
}

// addRefEntry adds delta to the entry of host cluster ci in b, its refcount
// block, and returns the new value; a refcount may neither drop below zero
// (corruption) nor overflow the image's refcount width. mu held.
func (img *Image) addRefEntry(b *cacheEntry, ci, delta int64) (uint64, error) {
	i := ci & (img.refBlockEnts - 1)
	v := getRefEntry(b.buf, img.refOrder, i)
	switch {
	case delta < 0 && uint64(-delta) > v:
		return 0, corruptf("refcount", -1, "refcount of cluster %#x would drop below zero (%d%+d)", ci<<img.clusterBits, v, delta)
	case delta > 0 && uint64(delta) > img.maxRefcount()-v:
		return 0, fmt.Errorf("%w: refcount of cluster %#x would overflow %d-bit refcounts", ErrUnsupported, ci<<img.clusterBits, img.refBits)
	}
	nv := uint64(int64(v) + delta)
	setRefEntry(b.buf, img.refOrder, i, nv)
	b.dirty = true
	return nv, nil
}

// ensureRefBlock creates the refcount block for block index bi (growing the
// refcount table if needed). The block describes itself: it is placed in
// the first cluster of the range it covers, which is free because nothing
// in that range has a refcount yet. mu held.
func (img *Image) ensureRefBlock(bi int64) error {
	if bi >= int64(len(img.refTable)) {
		if err := img.growRefTable(bi + 1); err != nil {
			return err
		}
		if img.refTable[bi].offset() != 0 {
			return nil // the growth placed a block there
		}
	}
	first := bi << img.refBlockBits
	ci := first
	for ; ci < first+img.refBlockEnts; ci++ {
		if _, used := img.metaMap[ci]; !used && ci != 0 {
			break
		}
	}
	if ci == first+img.refBlockEnts {
		return corruptf("refcount_table", -1, "no room for refcount block %d: its range is all metadata", bi)
	}
	off := ci << img.clusterBits
	buf := make([]byte, img.clusterSize)
	setRefEntry(buf, img.refOrder, ci-first, 1)
	if err := img.checkOverlap(off, img.clusterSize, metaRefBlock); err != nil {
		return err
	}
	if _, err := img.f.WriteAt(buf, off); err != nil {
		return ioErr("write refcount block", err)
	}
	if err := img.fsync(); err != nil {
		return err
	}
	if err := img.writeRefTableEntry(bi, refTableEntry(off)); err != nil {
		return err
	}
	img.metaMap[ci] = metaRefBlock
	if _, err := img.rcCache.put(off, buf, false); err != nil {
		return err
	}
	img.fileEnd = max(img.fileEnd, off+img.clusterSize)
	return nil
}

func (img *Image) writeRefTableEntry(bi int64, e refTableEntry) error {
	off := int64(img.hdr.RefcountTableOffset) + bi*8
	if err := img.checkOverlap(off, 8, metaRefTable); err != nil {
		return err
	}
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(e))
	if _, err := img.f.WriteAt(b[:], off); err != nil {
		return ioErr("write refcount table entry", err)
	}
	img.refTable[bi] = e
	img.metaUnsynced = true
	return nil
}

// growRefTable replaces the refcount table by a larger one with at least
// need entries, placed at the end of the file together with the refcount
// blocks that describe it. mu held.
func (img *Image) growRefTable(need int64) error {
	cs := img.clusterSize
	entsPerCluster := cs / 8
	newEnts := max(need, int64(len(img.refTable))*2)
	p := img.fileEnd >> img.clusterBits // first cluster of the new area
	var tblClusters int64
	var newBlocks []int64 // block indexes that need a new block
	for {
		tblClusters = (newEnts + entsPerCluster - 1) / entsPerCluster
		// Blocks needed for the clusters [p, p+tblClusters+len(newBlocks)).
		newBlocks = newBlocks[:0]
		k := int64(0)
		for iter := 0; iter < 8; iter++ {
			end := p + tblClusters + k
			newBlocks = newBlocks[:0]
			for bi := p >> img.refBlockBits; bi <= (end-1)>>img.refBlockBits; bi++ {
				if bi >= int64(len(img.refTable)) || img.refTable[bi].offset() == 0 {
					newBlocks = append(newBlocks, bi)
				}
			}
			if int64(len(newBlocks)) == k {
				break
			}
			k = int64(len(newBlocks))
		}
		maxBi := int64(0)
		for _, bi := range newBlocks {
			maxBi = max(maxBi, bi)
		}
		if maxBi < newEnts {
			break
		}
		newEnts = maxBi + 1
	}
	if tblClusters*cs > maxRefcountTableBytes {
		return fmt.Errorf("%w: refcount table would exceed %d bytes", ErrUnsupported, maxRefcountTableBytes)
	}
	newEnts = tblClusters * entsPerCluster
	tbl := make([]refTableEntry, newEnts)
	copy(tbl, img.refTable)
	blockBase := p + tblClusters
	end := blockBase + int64(len(newBlocks))
	for i, bi := range newBlocks {
		tbl[bi] = refTableEntry((blockBase + int64(i)) << img.clusterBits)
	}
	// Refcount 1 for every cluster of the new area.
	if _, err := img.writeNewRefBlocks(newBlocks, blockBase, p, end); err != nil {
		return err
	}
	oldOff, oldClusters := int64(img.hdr.RefcountTableOffset), int64(img.hdr.RefcountTableClusters)
	if err := img.commitRefTable(p<<img.clusterBits, tbl); err != nil {
		return err
	}
	for c := oldOff >> img.clusterBits; c < (oldOff>>img.clusterBits)+oldClusters; c++ {
		delete(img.metaMap, c)
	}
	for c := p; c < blockBase; c++ {
		img.metaMap[c] = metaRefTable
	}
	for c := blockBase; c < end; c++ {
		img.metaMap[c] = metaRefBlock
	}
	img.fileEnd = max(img.fileEnd, end<<img.clusterBits)
	// The old table is no longer referenced by the (durable) header.
	for c := oldOff >> img.clusterBits; c < (oldOff>>img.clusterBits)+oldClusters; c++ {
		if _, err := img.addRefcount(c, -1); err != nil {
			return err
		}
	}
	return nil
}

// commitRefTable makes tbl, written at off, the image's refcount table:
// the table is made durable, then the header names it and is made durable
// in turn. Every block tbl names must be written already, so a crash leaves
// either the old structures in force or the new ones. mu held.
func (img *Image) commitRefTable(off int64, tbl []refTableEntry) error {
	cs := img.clusterSize
	clusters := (int64(len(tbl))*8 + cs - 1) / cs
	tb := make([]byte, clusters*cs)
	for i, e := range tbl {
		binary.BigEndian.PutUint64(tb[i*8:], uint64(e))
	}
	var hb [12]byte
	binary.BigEndian.PutUint64(hb[:], uint64(off))
	binary.BigEndian.PutUint32(hb[8:], uint32(clusters))
	if err := img.switchTable("refcount table", tb, off, hb[:], hdrRefcountTableOffset); err != nil {
		return err
	}
	img.hdr.RefcountTableOffset = uint64(off)
	img.hdr.RefcountTableClusters = uint32(clusters)
	img.refTable = tbl
	return nil
}

// switchTable moves a table the header names to a new place: the new
// table tb is written at off and made durable, then the header fields at
// hdrOff get hdr (the new location and size) and are made durable in turn,
// so a crash leaves the header naming the old table or the new one, whole.
// mu held.
func (img *Image) switchTable(what string, tb []byte, off int64, hdr []byte, hdrOff int64) error {
	if _, err := img.f.WriteAt(tb, off); err != nil {
		return ioErr("write "+what, err)
	}
	if err := img.fsync(); err != nil {
		return err
	}
	if _, err := img.f.WriteAt(hdr, hdrOff); err != nil {
		return ioErr("write header", err)
	}
	return img.fsync()
}

// allocClusters allocates n contiguous free host clusters, sets their
// refcounts to 1 (in the refcount cache) and returns the offset of the
// first. It reuses free space inside the file first; otherwise the run
// ends past the current end of the file. mu held.
func (img *Image) allocClusters(n int64) (int64, error) {
	if n <= 0 {
		return 0, fmt.Errorf("qcow2: internal: allocClusters(%d)", n)
	}
	// Make sure the refcount table can describe a run at the end of the
	// file plus its refcount blocks, so growing it never interleaves with
	// the placement below.
	endCluster := img.fileEnd >> img.clusterBits
	worst := endCluster + n + n/img.refBlockEnts + 2
	if bi := worst >> img.refBlockBits; bi >= int64(len(img.refTable)) {
		if err := img.growRefTable(bi + 1); err != nil {
			return 0, err
		}
		endCluster = img.fileEnd >> img.clusterBits
	}
	hint := max(img.freeHint, 1)
	runStart, run, firstFree := hint, int64(0), int64(-1)
	ci := hint
	// One cache lookup per refcount block, not per cluster: after an open
	// the scan starts at cluster 1 and crosses every allocated cluster (an
	// 8 GiB image has 131072).
	var b *cacheEntry
	curBlock := int64(-1)
	for ; run < n && ci < endCluster; ci++ {
		if bi := ci >> img.refBlockBits; bi != curBlock {
			var err error
			if b, err = img.refBlock(ci); err != nil {
				return 0, err
			}
			if b == nil {
				if err := img.ensureRefBlock(bi); err != nil {
					return 0, err
				}
				if b, err = img.refBlock(ci); err != nil {
					return 0, err
				}
			}
			curBlock = bi
		}
		if getRefEntry(b.buf, img.refOrder, ci&(img.refBlockEnts-1)) != 0 {
			run, runStart = 0, ci+1
			continue
		}
		// Metadata with a zero refcount means an inconsistent image: never
		// allocate over it.
		if _, isMeta := img.metaMap[ci]; isMeta {
			run, runStart = 0, ci+1
			continue
		}
		if firstFree < 0 {
			firstFree = ci
		}
		run++
	}
	start := runStart
	if run < n {
		// The run continues past the end of the file, where everything is
		// free; refcount blocks it lacks go right after it.
		if err := img.placeBlocksAfter(start, n); err != nil {
			return 0, err
		}
	}
	for c := start; c < start+n; c++ {
		if _, err := img.addRefcount(c, 1); err != nil {
			return 0, err
		}
	}
	if firstFree < 0 || firstFree == start {
		img.freeHint = max(img.freeHint, start+n)
	} else {
		img.freeHint = firstFree
	}
	off := start << img.clusterBits
	img.fileEnd = max(img.fileEnd, off+n*img.clusterSize)
	return off, nil
}

// placeBlocksAfter creates the refcount blocks missing for clusters
// [start, start+n), placing them right after that range (and blocks for
// those blocks, until nothing is missing). mu held.
func (img *Image) placeBlocksAfter(start, n int64) error {
	p := start + n
	var missing []int64
	for k := int64(-1); k != int64(len(missing)); {
		k = int64(len(missing))
		missing = missing[:0]
		for bi := start >> img.refBlockBits; bi <= (p+k-1)>>img.refBlockBits; bi++ {
			if bi >= int64(len(img.refTable)) {
				return fmt.Errorf("qcow2: internal: refcount table too small for block %d", bi)
			}
			if img.refTable[bi].offset() == 0 {
				missing = append(missing, bi)
			}
		}
	}
	if len(missing) == 0 {
		return nil
	}
	bufs, err := img.writeNewRefBlocks(missing, p, p, p+int64(len(missing)))
	if err != nil {
		return err
	}
	if err := img.fsync(); err != nil {
		return err
	}
	for i, bi := range missing {
		off := (p + int64(i)) << img.clusterBits
		if err := img.writeRefTableEntry(bi, refTableEntry(off)); err != nil {
			return err
		}
		img.metaMap[p+int64(i)] = metaRefBlock
		if _, err := img.rcCache.put(off, bufs[bi], false); err != nil {
			return err
		}
	}
	img.fileEnd = max(img.fileEnd, (p+int64(len(missing)))<<img.clusterBits)
	return nil
}

// writeNewRefBlocks writes new refcount blocks for the block indexes
// blocks, at consecutive clusters from base, with refcount 1 for every
// cluster of [from, to) (the new area that holds them): in the new blocks
// where they describe it, through the refcount cache elsewhere; then the
// cached refcounts. It returns the new blocks' contents by block index. The
// refcount table does not name them yet: the caller does that once they are
// durable. mu held.
func (img *Image) writeNewRefBlocks(blocks []int64, base, from, to int64) (map[int64][]byte, error) {
	bufs := make(map[int64][]byte, len(blocks))
	for _, bi := range blocks {
		bufs[bi] = make([]byte, img.clusterSize)
	}
	for ci := from; ci < to; ci++ {
		if buf, ok := bufs[ci>>img.refBlockBits]; ok {
			setRefEntry(buf, img.refOrder, ci&(img.refBlockEnts-1), 1)
		} else if _, err := img.addRefcount(ci, 1); err != nil {
			return nil, err
		}
	}
	for i, bi := range blocks {
		if _, err := img.f.WriteAt(bufs[bi], (base+int64(i))<<img.clusterBits); err != nil {
			return nil, ioErr("write refcount block", err)
		}
	}
	return bufs, img.syncRefcounts(false)
}

// freeLater records a refcount decrement for the host range [off, off+n)
// that must wait until the metadata that dropped the reference is durable.
// punch asks to deallocate the host space once the refcount reaches zero.
func (img *Image) freeLater(off, n int64, punch bool) {
	img.pendingFree = append(img.pendingFree, pendingFree{off: off, n: n, punch: punch})
}

// freeNow decrements the refcounts of the clusters covering [off, off+n)
// immediately; for space nothing durable references. mu held.
func (img *Image) freeNow(off, n int64) error {
	for ci := off >> img.clusterBits; ci <= (off+n-1)>>img.clusterBits; ci++ {
		if _, err := img.addRefcount(ci, -1); err != nil {
			return err
		}
	}
	return nil
}

// applyPendingFrees performs the deferred decrements; callers have made
// the L2/L1 updates durable first. mu held.
func (img *Image) applyPendingFrees() error {
	pf := img.pendingFree
	img.pendingFree = nil
	for _, p := range pf {
		for ci := p.off >> img.clusterBits; ci <= (p.off+p.n-1)>>img.clusterBits; ci++ {
			v, err := img.addRefcount(ci, -1)
			if err != nil {
				return err
			}
			if v == 0 {
				img.forgetFreedCluster(ci)
				if p.punch {
					// Best effort: give the space back to the file system.
					_ = unix.Fallocate(int(img.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, ci<<img.clusterBits, img.clusterSize)
				}
			}
		}
	}
	return nil
}

// writeRefBlock is the refcount cache write-back. mu held.
func (img *Image) writeRefBlock(e *cacheEntry) error {
	if err := img.checkOverlap(e.off, int64(len(e.buf)), metaRefBlock); err != nil {
		return err
	}
	if _, err := img.f.WriteAt(e.buf, e.off); err != nil {
		return ioErr("write refcount block", err)
	}
	img.rcSynced = false
	return nil
}

// syncRefcounts writes every dirty refcount block and, when sync is set,
// makes them durable. mu held.
func (img *Image) syncRefcounts(sync bool) error {
	for _, e := range img.rcCache.dirtyEntries() {
		if err := img.writeRefBlock(e); err != nil {
			return err
		}
		e.dirty = false
	}
	if sync && !img.rcSynced {
		if err := img.fsync(); err != nil {
			return err
		}
	}
	return nil
}

func (img *Image) fsync() error {
	if img.noSync {
		// cache=unsafe: the write order is kept, durability is not.
		img.rcSynced, img.metaUnsynced = true, false
		return nil
	}
	if err := img.f.Sync(); err != nil {
		return ioErr("fsync", err)
	}
	img.rcSynced = true
	img.metaUnsynced = false
	return nil
}
