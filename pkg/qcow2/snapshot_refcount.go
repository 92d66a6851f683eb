package qcow2

import (
	"encoding/binary"
	"fmt"
)

// metaOp is one whole-image metadata change (snapshot create/delete/revert,
// resize, amend). On compat=1.1 images it runs under the dirty bit.
type metaOp struct {
	// protected: the dirty bit is set on disk for the whole operation, so
	// intermediate states need no ordering (the next read-write open
	// recomputes refcounts and COPIED flags), and only three syncs are
	// needed: dirty bit, everything else, header.
	protected bool
	// setDirty: this operation set the bit and clears it at the end (a
	// lazy-refcounts image that is already dirty stays dirty until Close).
	setDirty bool
	// snapTable is a new snapshot table pointer (nb_snapshots, offset)
	// that endMetaOp writes into the header once the table is durable.
	snapTable *[12]byte
}

// beginMetaOp starts a metadata change: on compat=1.1 it makes the dirty
// bit durable first. mu held.
func (img *Image) beginMetaOp() (*metaOp, error) {
	if img.hdr.Version < 3 {
		return &metaOp{}, nil
	}
	if img.hdr.Incompatible&IncompatDirty != 0 {
		return &metaOp{protected: true}, nil
	}
	if err := img.writeIncompatible(img.hdr.Incompatible | IncompatDirty); err != nil {
		return nil, err
	}
	if err := img.fsync(); err != nil {
		return nil, err
	}
	return &metaOp{protected: true, setDirty: true}, nil
}

// endMetaOp makes the change durable, then writes the header fields the
// change was waiting for (snapshot table pointer, dirty bit cleared when
// this operation set it) in one sector write, and makes that durable too.
// mu held.
func (img *Image) endMetaOp(op *metaOp) error {
	if err := img.writeMetadataCoalesced(); err != nil {
		return img.failMetaOp(err)
	}
	if len(img.pendingFree) > 0 {
		// Frees waiting for the tables that dropped their references.
		if err := img.flushLocked(true); err != nil {
			return img.failMetaOp(err)
		}
	} else if err := img.fsync(); err != nil {
		return img.failMetaOp(err)
	}
	if op.snapTable == nil && !op.setDirty {
		return nil
	}
	// nb_snapshots, snapshots_offset and (v3) the incompatible features
	// are adjacent header fields (offsets 60..80): one write.
	var b [20]byte
	n := 0
	at := int64(hdrIncompatible)
	if op.snapTable != nil {
		copy(b[:], op.snapTable[:])
		n, at = 12, hdrNbSnapshots
	}
	if op.setDirty {
		binary.BigEndian.PutUint64(b[n:], img.hdr.Incompatible&^IncompatDirty)
		n += 8
	}
	if _, err := img.f.WriteAt(b[:n], at); err != nil {
		return img.failMetaOp(ioErr("write header", err))
	}
	if op.setDirty {
		img.hdr.Incompatible &^= IncompatDirty
	}
	if err := img.fsync(); err != nil {
		return img.failMetaOp(err)
	}
	return nil
}

// writeMetadataCoalesced writes the dirty refcount blocks, then the dirty
// L2 slices, merging adjacent slices into one write (a snapshot of a large
// image dirties whole L2 tables). Ordering as flushLocked's: refcounts
// before the L2 tables that rely on them. No sync. mu held.
func (img *Image) writeMetadataCoalesced() error {
	if err := img.syncRefcounts(false); err != nil {
		return err
	}
	dirty := img.l2Cache.dirtyEntries()
	for i := 0; i < len(dirty); {
		j := i + 1
		for j < len(dirty) && dirty[j].off == dirty[j-1].off+int64(len(dirty[j-1].buf)) {
			j++
		}
		start := dirty[i].off
		n := dirty[j-1].off + int64(len(dirty[j-1].buf)) - start
		if err := img.checkOverlap(start, n, metaL2); err != nil {
			return err
		}
		buf := dirty[i].buf
		if j-i > 1 {
			buf = make([]byte, 0, n)
			for _, e := range dirty[i:j] {
				buf = append(buf, e.buf...)
			}
		}
		if _, err := img.f.WriteAt(buf, start); err != nil {
			return ioErr("write L2 table", err)
		}
		for _, e := range dirty[i:j] {
			e.dirty = false
		}
		img.metaUnsynced = true
		i = j
	}
	return nil
}

// prefetchL2 reads a whole L2 table into the cache with one read, leaving
// slices that are already cached (possibly dirty) alone. mu held.
func (img *Image) prefetchL2(l2Off int64) error {
	if img.sliceSize == img.clusterSize {
		return nil
	}
	missing := false
	for s := int64(0); s < img.clusterSize; s += img.sliceSize {
		if img.l2Cache.get(l2Off+s) == nil {
			missing = true
			break
		}
	}
	if !missing {
		return nil
	}
	buf := make([]byte, img.clusterSize)
	if _, err := img.f.ReadAt(buf, l2Off); err != nil {
		return ioErr(fmt.Sprintf("read L2 table at %#x", l2Off), err)
	}
	for s := int64(0); s < img.clusterSize; s += img.sliceSize {
		if img.l2Cache.get(l2Off+s) != nil {
			continue
		}
		if _, err := img.l2Cache.put(l2Off+s, buf[s:s+img.sliceSize:s+img.sliceSize], false); err != nil {
			return err
		}
	}
	return nil
}

// failMetaOp records an error in the middle of a metadata change: memory
// and disk may disagree now, so the image refuses further writes until it
// is reopened (and, on compat=1.1, repaired because the dirty bit is still
// set). mu held.
func (img *Image) failMetaOp(err error) error {
	if img.err == nil {
		img.err = fmt.Errorf("qcow2: image needs reopening after a failed metadata update: %w", err)
	}
	return err
}

// writeIncompatible writes the incompatible-features word of the header
// (v3 only). mu held.
func (img *Image) writeIncompatible(v uint64) error {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	if _, err := img.f.WriteAt(b[:], hdrIncompatible); err != nil {
		return ioErr("write header", err)
	}
	img.hdr.Incompatible = v
	return nil
}

// updateTreeRefcounts is qemu's qcow2_update_snapshot_refcount: it adds
// delta (+1, -1 or 0) to the refcount of every L2 table l1 references and
// of every host cluster those tables reference (compressed clusters: every
// cluster their data spans), then sets COPIED exactly on the entries whose
// cluster now has refcount one — in the L2 tables, and in l1 itself (which,
// when active, is written back). mu held.
func (img *Image) updateTreeRefcounts(l1 []l1Entry, active bool, delta int64) error {
	rb := refBatch{img: img}
	defer rb.release()
	entryBytes := int64(1) << img.l2EntryShift
	perSlice := img.sliceSize / entryBytes
	l1Changed := false
	for i, le := range l1 {
		l2Off := le.offset()
		if l2Off == 0 {
			continue
		}
		if l2Off%img.clusterSize != 0 || l2Off+img.clusterSize > img.fileEnd {
			return corruptf(fmt.Sprintf("l1[%d]", i), -1, "L2 table offset %#x is unaligned or past the end of the file", l2Off)
		}
		if err := img.prefetchL2(l2Off); err != nil {
			return err
		}
		for first := int64(0); first < img.l2Entries; first += perSlice {
			s, _, err := img.l2Slice(l2Off, first)
			if err != nil {
				return err
			}
			s.pins++
			err = img.updateSliceRefcounts(s, perSlice, &rb, delta, l2Off, first)
			s.pins--
			if err != nil {
				return err
			}
		}
		var rc uint64
		var err error
		if delta != 0 {
			rc, err = rb.add(l2Off>>img.clusterBits, delta)
		} else {
			rc, err = rb.get(l2Off >> img.clusterBits)
		}
		if err != nil {
			return err
		}
		ne := l1Entry(uint64(le) &^ oflagCopied)
		if rc == 1 {
			ne = l1Entry(uint64(ne) | oflagCopied)
		}
		if ne != le {
			l1[i] = ne
			l1Changed = true
		}
	}
	if active && l1Changed {
		return img.writeWholeL1(l1)
	}
	return nil
}

// updateSliceRefcounts applies delta to the clusters one cached L2 slice
// references and recomputes their COPIED flags. mu held.
func (img *Image) updateSliceRefcounts(s *cacheEntry, n int64, rb *refBatch, delta int64, l2Off, first int64) error {
	buf := s.buf
	for j := int64(0); j < n; j++ {
		p := j << img.l2EntryShift
		e := l2Entry(binary.BigEndian.Uint64(buf[p:]))
		if e == 0 {
			continue
		}
		var rc uint64
		switch {
		case e.compressed():
			if delta != 0 {
				off, size := e.compressedRange(img.clusterBits)
				if off <= 0 || off+size > img.fileEnd+img.clusterSize {
					return corruptf(fmt.Sprintf("L2 table %#x entry %d", l2Off, first+j), l2Off+(first+j)*(1<<img.l2EntryShift),
						"compressed data at %#x (+%d) is outside the file", off, size)
				}
				for ci := off >> img.clusterBits; ci <= (off+size-1)>>img.clusterBits; ci++ {
					if _, err := rb.add(ci, delta); err != nil {
						return err
					}
				}
			}
			rc = 2 // compressed clusters are never written in place
		case e.offset() != 0:
			off := e.offset()
			if off%img.clusterSize != 0 || off+img.clusterSize > img.fileEnd {
				return corruptf(fmt.Sprintf("L2 table %#x entry %d", l2Off, first+j), l2Off+(first+j)*(1<<img.l2EntryShift),
					"data cluster offset %#x is unaligned or past the end of the file", off)
			}
			var err error
			if delta != 0 {
				rc, err = rb.add(off>>img.clusterBits, delta)
			} else {
				rc, err = rb.get(off >> img.clusterBits)
			}
			if err != nil {
				return err
			}
		default:
			rc = 0 // unallocated or a plain zero cluster
		}
		ne := l2Entry(uint64(e) &^ oflagCopied)
		if rc == 1 {
			ne = l2Entry(uint64(ne) | oflagCopied)
		}
		if ne != e {
			binary.BigEndian.PutUint64(buf[p:], uint64(ne))
			s.dirty = true
		}
	}
	return nil
}

// writeWholeL1 replaces the active L1 table's contents (same size, same
// place) in memory and on disk. mu held.
func (img *Image) writeWholeL1(l1 []l1Entry) error {
	off := int64(img.hdr.L1TableOffset)
	buf := encodeL1(l1)
	if len(buf) == 0 {
		img.l1 = l1
		return nil
	}
	if err := img.checkOverlap(off, int64(len(buf)), metaActiveL1); err != nil {
		return err
	}
	if _, err := img.f.WriteAt(buf, off); err != nil {
		return ioErr("write L1 table", err)
	}
	img.l1 = l1
	img.metaUnsynced = true
	return nil
}

// refBatch adds to many refcounts in a row, keeping the current refcount
// block pinned in the cache instead of looking it up per cluster: a
// snapshot of an 8 GiB image touches 131072 refcounts. mu held throughout.
type refBatch struct {
	img *Image
	bi  int64
	blk *cacheEntry
}

func (r *refBatch) release() {
	if r.blk != nil {
		r.blk.pins--
		r.blk = nil
	}
}

func (r *refBatch) block(ci int64) (*cacheEntry, error) {
	bi := ci >> r.img.refBlockBits
	if r.blk != nil && r.bi == bi {
		return r.blk, nil
	}
	r.release()
	b, err := r.img.refBlock(ci)
	if err != nil || b == nil {
		return nil, err
	}
	b.pins++
	r.blk, r.bi = b, bi
	return b, nil
}

func (r *refBatch) get(ci int64) (uint64, error) {
	b, err := r.block(ci)
	if err != nil || b == nil {
		return 0, err
	}
	return getRefEntry(b.buf, r.img.refOrder, ci&(r.img.refBlockEnts-1)), nil
}

func (r *refBatch) add(ci, delta int64) (uint64, error) {
	img := r.img
	b, err := r.block(ci)
	if err != nil {
		return 0, err
	}
	var nv uint64
	if b == nil {
		// No refcount block yet: the general path creates one (or
		// reports the corruption of a decrement).
		r.release()
		if nv, err = img.addRefcount(ci, delta); err != nil {
			return 0, err
		}
	} else if nv, err = img.addRefEntry(b, ci, delta); err != nil {
		return 0, err
	}
	if nv == 0 {
		img.forgetFreedCluster(ci)
	}
	return nv, nil
}

// repairCopiedLocked recomputes COPIED on the active L1 and L2 tables from
// the refcounts (after a refcount rebuild) and makes it durable. mu held.
func (img *Image) repairCopiedLocked() error {
	if err := img.updateTreeRefcounts(img.l1, true, 0); err != nil {
		return err
	}
	if err := img.writeMetadataCoalesced(); err != nil {
		return err
	}
	return img.fsync()
}

// forgetFreedCluster drops what memory says about a host cluster whose
// refcount reached zero: its overlap-map entry, and any cached L2 slices.
// The cache is dropped whatever the map said: an L2 table only a snapshot
// used is not in the map (the map covers the active tables), and a stale
// slice would shadow whatever the cluster holds once it is reused. mu held.
func (img *Image) forgetFreedCluster(ci int64) {
	if ci < img.freeHint {
		img.freeHint = ci
	}
	delete(img.metaMap, ci)
	img.l2Cache.dropRange(ci<<img.clusterBits, img.clusterSize)
}
