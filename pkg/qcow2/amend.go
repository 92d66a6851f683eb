package qcow2

import (
	"encoding/binary"
	"fmt"
	"math/bits"
)

// Amend changes format options of an open image in place, in qemu's order
// (qcow2_amend_options): upgrade first, then refcount width, backing file,
// lazy refcounts and size, downgrade last.

// AmendOptions lists what to change; zero values leave a setting alone.
type AmendOptions struct {
	// Compat is "0.10" (version 2) or "1.1" (version 3); "" keeps it.
	Compat string
	// LazyRefcounts turns lazy refcounts on or off (compat 1.1 only).
	LazyRefcounts *bool
	// RefcountBits is the new refcount width (1, 2, 4, ..., 64); 0 keeps
	// it. The refcount table and blocks are rebuilt.
	RefcountBits int
	// Size resizes the disk (shrinking allowed, as qemu-img amend -o size
	// allows it); 0 keeps the size.
	Size int64
	// BackingFile and BackingFormat rewrite the backing file name and
	// format in the header only (qemu-img rebase -u): the data is not
	// looked at. An empty BackingFile removes the backing file.
	BackingFile   *string
	BackingFormat *string
}

// Amend applies opts. Refusals say why, in qemu's words where qemu has
// them; a refused downgrade leaves the image unchanged.
func (img *Image) Amend(opts AmendOptions) error {
	unlock, err := img.lockMetaOp()
	if err != nil {
		return err
	}
	defer unlock()
	oldVersion := img.hdr.Version
	newVersion := oldVersion
	switch opts.Compat {
	case "":
	case "0.10", "v2":
		newVersion = 2
	case "1.1", "v3":
		newVersion = 3
	default:
		return fmt.Errorf("%w: unknown compatibility level %s", ErrInvalidOption, opts.Compat)
	}
	if newVersion < 3 && img.crypto != nil {
		return fmt.Errorf("%w: LUKS encryption needs compat=1.1; cannot downgrade an encrypted image", ErrInvalidOption)
	}
	refBits := int(img.refBits)
	if opts.RefcountBits != 0 {
		refBits = opts.RefcountBits
		if refBits < 1 || refBits > 64 || refBits&(refBits-1) != 0 {
			return fmt.Errorf("%w: refcount width must be a power of two and may not exceed 64 bits", ErrInvalidOption)
		}
	}
	lazy := img.lazyRefcounts()
	if opts.LazyRefcounts != nil {
		lazy = *opts.LazyRefcounts
	}
	// Asking for lazy refcounts on a v2 target is an error; lazy refcounts
	// already on are dropped by the downgrade (as in qemu).
	if opts.LazyRefcounts != nil && lazy && newVersion < 3 {
		return fmt.Errorf("%w: lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)", ErrInvalidOption)
	}
	if refBits != 16 && newVersion < 3 {
		if refBits != int(img.refBits) {
			return fmt.Errorf("%w: refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)", ErrInvalidOption)
		}
	}
	if opts.BackingFormat != nil && *opts.BackingFormat != "" {
		switch *opts.BackingFormat {
		case "qcow2", "raw":
		default:
			return fmt.Errorf("%w: backing format %q is not supported (qcow2 or raw)", ErrUnsupported, *opts.BackingFormat)
		}
		bf := img.hdr.BackingFile
		if opts.BackingFile != nil {
			bf = *opts.BackingFile
		}
		if bf == "" {
			return fmt.Errorf("%w: a backing format needs a backing file", ErrInvalidOption)
		}
	}
	if newVersion < oldVersion {
		// Check everything before changing anything.
		if err := img.downgradeAllowed(refBits); err != nil {
			return err
		}
	}
	if err := img.flushLocked(false); err != nil {
		return err
	}

	if newVersion > oldVersion {
		if err := img.upgrade(); err != nil {
			return err
		}
	}
	if refBits != int(img.refBits) {
		if err := img.changeRefcountOrder(uint32(bits.TrailingZeros(uint(refBits)))); err != nil {
			return err
		}
	}
	if opts.BackingFile != nil || opts.BackingFormat != nil {
		h := *img.hdr
		if opts.BackingFile != nil {
			h.BackingFile = *opts.BackingFile
			if h.BackingFile == "" {
				h.BackingFormat = ""
			}
		}
		if opts.BackingFormat != nil {
			h.BackingFormat = *opts.BackingFormat
		}
		if err := img.rewriteHeader(&h); err != nil {
			return err
		}
	}
	if lazy != img.lazyRefcounts() {
		h := *img.hdr
		if lazy {
			h.Compatible |= CompatLazyRefcounts
		} else {
			// Refcounts durable and the dirty bit gone before lazy
			// refcounts are off: the image is clean by then.
			if err := img.flushLocked(true); err != nil {
				return err
			}
			h.Incompatible &^= IncompatDirty
			h.Compatible &^= CompatLazyRefcounts
		}
		if err := img.rewriteHeader(&h); err != nil {
			return err
		}
	}
	if opts.Size != 0 && opts.Size != img.size {
		if err := img.resizeLocked(opts.Size); err != nil {
			return err
		}
	}
	if newVersion < oldVersion {
		if err := img.downgrade(); err != nil {
			return err
		}
	}
	return nil
}

// rewriteHeader writes a whole new header (first cluster) and makes it
// durable. mu held.
func (img *Image) rewriteHeader(h *header) error {
	buf, err := h.encode()
	if err != nil {
		return err
	}
	if err := img.flushLocked(true); err != nil {
		return err
	}
	old := img.hdr
	img.hdr = h
	if err := img.writeHeader(); err != nil {
		img.hdr = old
		return err
	}
	_ = buf
	return img.fsync()
}

// upgrade goes from compat=0.10 to 1.1 (qcow2_upgrade): v3 wants every
// snapshot entry to carry the 64-bit VM state size and the disk size, so
// the snapshot table is rewritten when one lacks them. mu held.
func (img *Image) upgrade() error {
	need := false
	for i := range img.snapshots {
		if len(img.snapshots[i].ExtraData) < 16 {
			need = true
		}
	}
	if need {
		list := append([]snapshotEntry(nil), img.snapshots...)
		if err := img.writeSnapshotTable(list, nil); err != nil {
			return fmt.Errorf("failed to update the snapshot table: %w", err)
		}
	}
	h := *img.hdr
	h.Version = 3
	h.RefcountOrder = 4
	h.HeaderLength = headerV3FullLen
	h.Features = defaultFeatureTable()
	return img.rewriteHeader(&h)
}

// downgradeAllowed lists qemu's reasons to refuse compat=0.10 (and one of
// ours: persistent bitmaps, which v2 cannot flag, would be silently lost
// and leaked by qemu). Nothing is changed. mu held.
func (img *Image) downgradeAllowed(refBits int) error {
	if refBits != 16 {
		return fmt.Errorf("%w: compat=0.10 requires refcount_bits=16", ErrUnsupported)
	}
	if img.hdr.DataFile != "" || img.hdr.Incompatible&IncompatExternalData != 0 {
		return fmt.Errorf("%w: cannot downgrade an image with a data file", ErrUnsupported)
	}
	for i := range img.snapshots {
		s := img.snapshotInfo(&img.snapshots[i])
		if s.VMStateSize > 0xffffffff || int64(s.DiskSize) != img.size {
			return fmt.Errorf("%w: internal snapshots prevent downgrade of image (snapshot %s %q has a different disk size or a VM state over 4 GiB)", ErrUnsupported, s.ID, s.Name)
		}
	}
	if x := img.hdr.Incompatible &^ (IncompatDirty | IncompatCompressionType); x != 0 {
		return fmt.Errorf("%w: cannot downgrade an image with incompatible features %#x set", ErrUnsupported, x)
	}
	if img.hdr.Bitmaps != nil && img.hdr.Bitmaps.NbBitmaps > 0 {
		return fmt.Errorf("%w: cannot downgrade an image with persistent bitmaps (compat=0.10 cannot keep them); remove them first", ErrUnsupported)
	}
	if img.hdr.CompressionType != CompressionZlib {
		has, err := img.hasCompressedClusters()
		if err != nil {
			return err
		}
		if has {
			return fmt.Errorf("%w: cannot downgrade an image with zstd compression type and existing compressed clusters", ErrUnsupported)
		}
	}
	return nil
}

// allL1Tables returns the active L1 table and every snapshot's. mu held.
func (img *Image) allL1Tables() ([][]l1Entry, error) {
	out := [][]l1Entry{img.l1}
	for i := range img.snapshots {
		l1, err := img.readSnapshotL1(&img.snapshots[i], i)
		if err != nil {
			return nil, err
		}
		out = append(out, l1)
	}
	return out, nil
}

// forEachL2Entry calls fn for every L2 entry of every table, visiting each
// L2 table once even when snapshots share it. mu held.
func (img *Image) forEachL2Entry(fn func(s *cacheEntry, p int64, e l2Entry, shared bool) error) error {
	tables, err := img.allL1Tables()
	if err != nil {
		return err
	}
	seen := map[int64]bool{}
	entryBytes := int64(1) << img.l2EntryShift
	perSlice := img.sliceSize / entryBytes
	for _, l1 := range tables {
		for _, le := range l1 {
			l2Off := le.offset()
			if l2Off == 0 || seen[l2Off] {
				continue
			}
			seen[l2Off] = true
			rc, err := img.getRefcount(l2Off >> img.clusterBits)
			if err != nil {
				return err
			}
			for first := int64(0); first < img.l2Entries; first += perSlice {
				s, _, err := img.l2Slice(l2Off, first)
				if err != nil {
					return err
				}
				s.pins++
				for j := int64(0); j < perSlice; j++ {
					p := j << img.l2EntryShift
					e := l2Entry(binary.BigEndian.Uint64(s.buf[p:]))
					if e == 0 {
						continue
					}
					if err := fn(s, p, e, rc > 1); err != nil {
						s.pins--
						return err
					}
				}
				s.pins--
			}
		}
	}
	return nil
}

// hasCompressedClusters reports whether any table (active or snapshot)
// references compressed data. mu held.
func (img *Image) hasCompressedClusters() (bool, error) {
	found := false
	err := img.forEachL2Entry(func(_ *cacheEntry, _ int64, e l2Entry, _ bool) error {
		if e.compressed() {
			found = true
		}
		return nil
	})
	return found, err
}

// downgrade goes from compat=1.1 to 0.10 (qcow2_downgrade); the checks in
// downgradeAllowed have passed. mu held.
func (img *Image) downgrade() error {
	if err := img.flushLocked(true); err != nil {
		return err
	}
	if err := img.expandZeroClusters(); err != nil {
		return fmt.Errorf("failed to turn zero into data clusters: %w", err)
	}
	if err := img.flushLocked(true); err != nil {
		return err
	}
	h := *img.hdr
	h.Version = 2
	h.Incompatible = 0
	h.Compatible = 0
	h.Autoclear = 0
	h.CompressionType = CompressionZlib
	h.RefcountOrder = 4
	h.HeaderLength = headerV2Len
	h.Features = nil
	h.Bitmaps = nil
	return img.rewriteHeader(&h)
}

// expandZeroClusters turns v3 zero clusters into something v2 reads the
// same (qcow2_expand_zero_clusters): without a backing file a plain zero
// cluster becomes unallocated; with one it gets a new cluster of zeroes
// (refcount = the L2 table's refcount, as every L1 reaching the table
// reaches it); preallocated zero clusters get zeroes written and lose the
// flag. Each L2 table is visited once. mu held.
func (img *Image) expandZeroClusters() error {
	zero := make([]byte, img.clusterSize)
	return img.forEachL2Entry(func(s *cacheEntry, p int64, e l2Entry, shared bool) error {
		if e.compressed() || !e.zeroFlag() {
			return nil
		}
		off := e.offset()
		var ne l2Entry
		switch {
		case off == 0 && img.backing == nil:
			ne = 0
		default:
			if off == 0 {
				l2rc, err := img.getRefcount(s.off >> img.clusterBits)
				if err != nil {
					return err
				}
				if off, err = img.allocClusters(1); err != nil {
					return err
				}
				if l2rc > 1 {
					if _, err := img.addRefcount(off>>img.clusterBits, int64(l2rc)-1); err != nil {
						return err
					}
				}
			}
			if err := img.checkOverlap(off, img.clusterSize, 0); err != nil {
				return err
			}
			if _, err := img.f.WriteAt(zero, off); err != nil {
				return ioErr("write zero cluster", err)
			}
			rc, err := img.getRefcount(off >> img.clusterBits)
			if err != nil {
				return err
			}
			ne = l2Entry(uint64(off))
			if rc == 1 {
				ne |= l2Entry(oflagCopied)
			}
		}
		binary.BigEndian.PutUint64(s.buf[p:], uint64(ne))
		s.dirty = true
		return nil
	})
}

// resizeLocked is Resize with shrinking allowed, for amend. mu and drain
// held.
func (img *Image) resizeLocked(newSize int64) error {
	if newSize%512 != 0 || newSize <= 0 {
		return fmt.Errorf("%w: the new size must be a positive multiple of 512 (got %d)", ErrInvalidOption, newSize)
	}
	if err := img.resizeAllowed(newSize); err != nil {
		return err
	}
	if newSize > img.size {
		return img.grow(img.size, newSize)
	}
	return img.shrink(img.size, newSize)
}

// changeRefcountOrder rebuilds the refcount table and blocks with
// 2^order-bit entries. qemu's qcow2_change_refcount_order converts the old
// structures; here the refcounts are recounted from every reference (the
// same walk as the open-time repair), which gives the same result on a
// clean image. The new width is in the header, under the dirty bit, before
// the rebuild: a crash in between leaves an image the next open rebuilds
// with the new width. mu held; compat=1.1 (checked by Amend).
func (img *Image) changeRefcountOrder(order uint32) error {
	if err := img.flushLocked(true); err != nil {
		return err
	}
	counts, err := img.countReferences(nil)
	if err != nil {
		return err
	}
	newBits := uint(1) << order
	if newBits < 64 {
		limit := uint64(1)<<newBits - 1
		for ci := int64(0); ci < int64(len(counts.small)); ci++ {
			if v := counts.get(ci); v > limit {
				return fmt.Errorf("%w: cannot decrease refcount entry width to %d bits: cluster at offset %#x has a refcount of %d",
					ErrUnsupported, newBits, ci<<img.clusterBits, v)
			}
		}
	}
	op, err := img.beginMetaOp()
	if err != nil {
		return err
	}
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], order)
	if _, err := img.f.WriteAt(b[:], hdrRefcountOrder); err != nil {
		return img.failMetaOp(ioErr("write header", err))
	}
	img.hdr.RefcountOrder = order
	img.refOrder = order
	img.refBits = 1 << order
	img.refBlockBits = img.clusterBits + 3 - order
	img.refBlockEnts = 1 << img.refBlockBits
	img.rcCache.clear()
	if err := img.rebuildRefcountsLocked(); err != nil {
		return img.failMetaOp(err)
	}
	// The rebuild clears the dirty bit; a lazy-refcounts image that has
	// been written must get it back before its next lazy write.
	img.wroteOnce = false
	if op.setDirty {
		op.setDirty = img.hdr.Incompatible&IncompatDirty != 0
	}
	return img.endMetaOp(op)
}
