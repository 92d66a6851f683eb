package qcow2

import (
	"encoding/binary"
	"fmt"
)

// Guest address arithmetic.
func (img *Image) l1Index(vcluster int64) int64 { return vcluster / img.l2Entries }
func (img *Image) l2Index(vcluster int64) int64 { return vcluster % img.l2Entries }

// l2Slice returns the cached slice of the L2 table at l2Off that holds entry
// idx, loading it when needed, and the entry's index inside the slice. mu held.
func (img *Image) l2Slice(l2Off, idx int64) (*cacheEntry, int64, error) {
	if e, i := img.cachedL2Slice(l2Off, idx); e != nil {
		return e, i, nil
	}
	perSlice := img.sliceSize >> img.l2EntryShift
	sOff := l2Off + (idx/perSlice)*img.sliceSize
	buf := make([]byte, img.sliceSize)
	if _, err := img.f.ReadAt(buf, sOff); err != nil {
		return nil, 0, ioErr(fmt.Sprintf("read L2 table at %#x", l2Off), err)
	}
	e, err := img.l2Cache.put(sOff, buf, false)
	if err != nil {
		return nil, 0, err
	}
	return e, idx % perSlice, nil
}

// cachedL2Slice is l2Slice from the cache alone: nil when the slice is not
// in memory. mu held.
func (img *Image) cachedL2Slice(l2Off, idx int64) (*cacheEntry, int64) {
	perSlice := img.sliceSize >> img.l2EntryShift
	e := img.l2Cache.get(l2Off + (idx/perSlice)*img.sliceSize)
	if e == nil {
		return nil, 0
	}
	return e, idx % perSlice
}

// getL2 returns the L2 entry (and extended bitmap) of a guest cluster. A
// missing L2 table reads as an unallocated entry. mu held.
func (img *Image) getL2(vcluster int64) (l2Entry, l2Bitmap, error) {
	return img.getL2From(img.l1, vcluster)
}

// getL2From is getL2 through the given L1 table (a snapshot's, for
// SnapshotView). mu held.
func (img *Image) getL2From(l1 []l1Entry, vcluster int64) (l2Entry, l2Bitmap, error) {
	i1 := img.l1Index(vcluster)
	if i1 >= int64(len(l1)) {
		return 0, 0, nil
	}
	l2Off := l1[i1].offset()
	if l2Off == 0 {
		return 0, 0, nil
	}
	s, i, err := img.l2Slice(l2Off, img.l2Index(vcluster))
	if err != nil {
		return 0, 0, err
	}
	return img.decodeL2(s.buf, i, l2Off)
}

func (img *Image) decodeL2(buf []byte, i int64, l2Off int64) (l2Entry, l2Bitmap, error) {
	p := i << img.l2EntryShift
	e := l2Entry(binary.BigEndian.Uint64(buf[p:]))
	var bm l2Bitmap
	if img.extL2 {
		bm = l2Bitmap(binary.BigEndian.Uint64(buf[p+8:]))
	}
	return e, bm, nil
}

// classify turns an L2 entry into the kind of one subcluster (or of the
// whole cluster when sc < 0 or the image has no subclusters), validating
// what it relies on. where names the entry for error messages.
func (img *Image) classify(e l2Entry, bm l2Bitmap, sc int, where func() string) (clusterKind, error) {
	if e.compressed() {
		if img.extL2 && bm != 0 {
			return 0, corruptf(where(), -1, "compressed cluster has a nonzero subcluster bitmap %s", bm)
		}
		off, _ := e.compressedRange(img.clusterBits)
		if off == 0 || off >= img.fileEnd {
			return 0, corruptf(where(), -1, "compressed data offset %#x is outside the file", off)
		}
		return kindCompressed, nil
	}
	off := e.offset()
	if off != 0 {
		if off%img.clusterSize != 0 {
			return 0, corruptf(where(), -1, "data cluster offset %#x is not cluster aligned", off)
		}
		if off+img.clusterSize > img.fileEnd {
			return 0, corruptf(where(), -1, "data cluster offset %#x is past end of file", off)
		}
	}
	if img.extL2 {
		if uint64(e)&oflagZero != 0 {
			return 0, corruptf(where(), -1, "zero flag set in an extended L2 entry (%#x)", uint64(e))
		}
		if uint64(bm)&uint64(bm>>32)&0xffffffff != 0 {
			return 0, corruptf(where(), -1, "subcluster both allocated and zero: %s", bm)
		}
		if off == 0 && uint32(bm) != 0 {
			return 0, corruptf(where(), -1, "allocated subclusters without a host cluster: %s", bm)
		}
		if sc < 0 {
			sc = 0
		}
		switch {
		case bm.alloc(uint(sc)):
			return kindNormal, nil
		case bm.zero(uint(sc)) && off != 0:
			return kindZeroAlloc, nil
		case bm.zero(uint(sc)):
			return kindZero, nil
		case off != 0:
			return kindUnallocatedAlloc, nil
		default:
			return kindUnallocated, nil
		}
	}
	if img.hdr.Version >= 3 && e.zeroFlag() {
		if off != 0 {
			return kindZeroAlloc, nil
		}
		return kindZero, nil
	}
	if off != 0 {
		return kindNormal, nil
	}
	return kindUnallocated, nil
}

// setL2 stores an L2 entry (and bitmap) for a guest cluster, allocating the
// L2 table or copying a shared one first. mu held.
func (img *Image) setL2(vcluster int64, e l2Entry, bm l2Bitmap) error {
	l2Off, err := img.l2ForWrite(img.l1Index(vcluster))
	if err != nil {
		return err
	}
	s, i, err := img.l2Slice(l2Off, img.l2Index(vcluster))
	if err != nil {
		return err
	}
	p := i << img.l2EntryShift
	binary.BigEndian.PutUint64(s.buf[p:], uint64(e))
	if img.extL2 {
		binary.BigEndian.PutUint64(s.buf[p+8:], uint64(bm))
	}
	s.dirty = true
	return nil
}

// l2ForWrite returns the offset of a writable (refcount 1, COPIED) L2 table
// for L1 index i1, allocating a new table or copying a shared one. The new
// table is durable, and its refcount too, before the L1 entry points to it.
// mu held.
func (img *Image) l2ForWrite(i1 int64) (int64, error) {
	if i1 >= int64(len(img.l1)) {
		return 0, corruptf("l1_size", hdrL1Size, "guest offset needs L1 index %d beyond l1_size %d", i1, len(img.l1))
	}
	old := img.l1[i1]
	if old.offset() != 0 && old.copied() {
		return old.offset(), nil
	}
	newOff, err := img.allocClusters(1)
	if err != nil {
		return 0, err
	}
	buf := make([]byte, img.clusterSize)
	if o := old.offset(); o != 0 {
		// Copy the shared table, taking dirty cached slices into account.
		if _, err := img.f.ReadAt(buf, o); err != nil {
			return 0, ioErr("read L2 table for copy", err)
		}
		for s := int64(0); s < img.clusterSize; s += img.sliceSize {
			if c := img.l2Cache.get(o + s); c != nil {
				copy(buf[s:], c.buf)
			}
		}
	}
	if err := img.checkOverlap(newOff, img.clusterSize, metaL2); err != nil {
		return 0, err
	}
	if _, err := img.f.WriteAt(buf, newOff); err != nil {
		return 0, ioErr("write new L2 table", err)
	}
	if err := img.syncRefcounts(true); err != nil {
		return 0, err
	}
	img.metaMap[newOff>>img.clusterBits] = metaL2
	if err := img.writeL1Entry(i1, l1Entry(uint64(newOff)|oflagCopied)); err != nil {
		return 0, err
	}
	if o := old.offset(); o != 0 {
		// The old table stays referenced by a snapshot; drop our reference
		// once the new L1 entry is durable.
		img.freeLater(o, img.clusterSize, false)
	}
	return newOff, nil
}

// writeL1Entry updates one active L1 entry in memory and on disk. mu held.
func (img *Image) writeL1Entry(i1 int64, e l1Entry) error {
	off := int64(img.hdr.L1TableOffset) + i1*8
	if err := img.checkOverlap(off, 8, metaActiveL1); err != nil {
		return err
	}
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(e))
	if _, err := img.f.WriteAt(b[:], off); err != nil {
		return ioErr("write L1 entry", err)
	}
	img.l1[i1] = e
	img.metaUnsynced = true
	return nil
}

// writeL2Slice is the L2 cache write-back: refcounts first (unless lazy
// refcounts are on), then the slice. mu held.
func (img *Image) writeL2Slice(e *cacheEntry) error {
	if !img.lazyRefcounts() {
		if err := img.syncRefcounts(true); err != nil {
			return err
		}
	}
	if err := img.checkOverlap(e.off, int64(len(e.buf)), metaL2); err != nil {
		return err
	}
	if _, err := img.f.WriteAt(e.buf, e.off); err != nil {
		return ioErr("write L2 table", err)
	}
	img.metaUnsynced = true
	return nil
}

func (img *Image) lazyRefcounts() bool {
	return img.hdr.Compatible&CompatLazyRefcounts != 0
}
