package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Resize, with qemu's semantics (qcow2_co_truncate): growing never moves
// data, it only grows (and relocates) the L1 table when the new size needs
// more entries; shrinking must be asked for, frees every cluster past the
// new end and keeps the L1 table's size (as qemu does); snapshots keep their
// own disk size.

// ErrShrinkNotAllowed means the new size is smaller than the current one
// and ResizeOptions.Shrink was not set (qemu-img resize without --shrink).
var ErrShrinkNotAllowed = errors.New("qcow2: shrinking needs the shrink option")

// ResizeOptions controls Resize.
type ResizeOptions struct {
	// Shrink allows a new size below the current one. Data past the new
	// end is lost (qemu-img resize --shrink).
	Shrink bool
}

// Resize changes the virtual disk size. newSize must be a positive multiple
// of 512. Growing exposes zeroes (also where a backing file is longer than
// the old size, and in the tail of a last partial cluster, unlike qemu 7.2
// which can expose stale data there). Shrinking needs opts.Shrink.
func (img *Image) Resize(newSize int64, opts ResizeOptions) error {
	unlock, err := img.lockMetaOp()
	if err != nil {
		return err
	}
	defer unlock()
	if newSize <= 0 {
		return fmt.Errorf("%w: new size %d must be positive", ErrInvalidOption, newSize)
	}
	if newSize%512 != 0 {
		return fmt.Errorf("%w: the new size must be a multiple of 512 (got %d)", ErrInvalidOption, newSize)
	}
	old := img.size
	if newSize == old {
		return nil
	}
	if newSize < old && !opts.Shrink {
		return fmt.Errorf("%w: %d is smaller than the current size %d", ErrShrinkNotAllowed, newSize, old)
	}
	if err := img.resizeAllowed(newSize); err != nil {
		return err
	}
	if err := img.flushLocked(false); err != nil {
		return err
	}
	if newSize > old {
		return img.grow(old, newSize)
	}
	return img.shrink(old, newSize)
}

// resizeAllowed refuses what qemu refuses: a compat=0.10 image with
// snapshots (v2 snapshots carry no disk size), a size beyond the largest L1
// table, and persistent bitmaps that cannot follow (an inconsistent one,
// ErrBitmapInconsistent). Last, once nothing else can refuse, the bitmaps
// are marked in use on disk until setVirtualSize resizes and stores them
// (bitmap_api.go), so a crash in between leaves them inconsistent, never of
// the wrong size. mu held.
func (img *Image) resizeAllowed(newSize int64) error {
	if img.hdr.Version < 3 && len(img.snapshots) > 0 {
		return fmt.Errorf("%w: can't resize a v2 image which has snapshots", ErrUnsupported)
	}
	if n := img.sizeToL1(newSize); n*8 > maxL1Bytes {
		return fmt.Errorf("%w: %d bytes need an L1 table of %d entries, limit %d", ErrTooLarge, newSize, n, maxL1Bytes/8)
	}
	return img.bitmapsResizeCheck(newSize)
}

// sizeToL1 is the number of L1 entries a disk of size bytes needs.
func (img *Image) sizeToL1(size int64) int64 {
	per := img.l2Entries << img.clusterBits
	return (size + per - 1) / per
}

func (img *Image) grow(old, newSize int64) error {
	op, err := img.beginMetaOp()
	if err != nil {
		return err
	}
	if need := img.sizeToL1(newSize); need > int64(len(img.l1)) {
		if err := img.growL1(need); err != nil {
			return img.failMetaOp(err)
		}
	}
	if err := img.setVirtualSize(newSize); err != nil {
		return img.failMetaOp(err)
	}
	if err := img.endMetaOp(op); err != nil {
		return err
	}
	// What the new area must read as zeroes where something else would
	// show through: the tail of the old last cluster (a shrink keeps it)
	// and a backing file longer than the old size (qemu zero-fills that).
	zeroEnd := min(newSize, alignUp(old, img.clusterSize))
	if img.backing != nil && img.backing.virtualSize() > old {
		zeroEnd = newSize
	}
	if zeroEnd > old {
		img.mu.Unlock()
		err := img.zeroRange(old, zeroEnd-old, 0, false)
		img.mu.Lock()
		if err != nil {
			return err
		}
	}
	return nil
}

// setVirtualSize writes the new size into the header and resizes the
// persistent bitmaps with the disk, as qemu does. mu held.
func (img *Image) setVirtualSize(n int64) error {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(n))
	if _, err := img.f.WriteAt(b[:], hdrSize); err != nil {
		return ioErr("write header", err)
	}
	img.metaUnsynced = true
	img.hdr.Size = uint64(n)
	img.size = n
	img.sizeCaches()
	return img.resizeBitmaps(n)
}

func (img *Image) shrink(old, newSize int64) error {
	op, err := img.beginMetaOp()
	if err != nil {
		return err
	}
	firstDrop := alignUp(newSize, img.clusterSize) >> img.clusterBits // first guest cluster to free
	lastCluster := (old - 1) >> img.clusterBits
	newL1 := img.sizeToL1(newSize)
	// L2 tables wholly past the new end: unhook them from the L1 table
	// first, then drop the references they held.
	var dropped []l1Entry
	l1 := append([]l1Entry(nil), img.l1...)
	for i := newL1; i < int64(len(l1)); i++ {
		if l1[i].offset() != 0 {
			dropped = append(dropped, l1[i])
			l1[i] = 0
		}
	}
	if len(dropped) > 0 {
		if err := img.writeWholeL1(l1); err != nil {
			return img.failMetaOp(err)
		}
		if !op.protected {
			if err := img.fsync(); err != nil {
				return img.failMetaOp(err)
			}
		}
		if err := img.updateTreeRefcounts(dropped, false, -1); err != nil {
			return img.failMetaOp(err)
		}
	}
	// The L2 table holding the new end: clear its entries past the end
	// (copying it first when a snapshot shares it).
	if firstDrop <= lastCluster && firstDrop < newL1*img.l2Entries {
		i1 := img.l1Index(firstDrop)
		if img.l1[i1].offset() != 0 {
			end := min(lastCluster+1, (i1+1)*img.l2Entries)
			if err := img.clearL2Range(firstDrop, end); err != nil {
				return img.failMetaOp(err)
			}
		}
	}
	if err := img.setVirtualSize(newSize); err != nil {
		return img.failMetaOp(err)
	}
	if err := img.endMetaOp(op); err != nil {
		return err
	}
	return img.truncateToLastCluster()
}

// clearL2Range makes guest clusters [from, to) of one L2 table unallocated,
// dropping their clusters' references once the table is durable. mu held.
func (img *Image) clearL2Range(from, to int64) error {
	var frees [][2]int64
	for vc := from; vc < to; vc++ {
		e, _, err := img.getL2(vc)
		if err != nil {
			return err
		}
		if e == 0 {
			continue
		}
		switch {
		case e.compressed():
			off, size := e.compressedRange(img.clusterBits)
			frees = append(frees, [2]int64{off, size})
		case e.offset() != 0:
			frees = append(frees, [2]int64{e.offset(), img.clusterSize})
		}
		if err := img.setL2(vc, 0, 0); err != nil {
			return err
		}
	}
	if err := img.flushLocked(true); err != nil {
		return err
	}
	for _, f := range frees {
		if err := img.freeClustersNow(f[0], f[1]); err != nil {
			return err
		}
	}
	return nil
}

// truncateToLastCluster cuts the file after the last cluster in use, as
// qemu does after a shrink (a failure only leaves the file longer). mu
// held.
func (img *Image) truncateToLastCluster() error {
	rb := refBatch{img: img}
	defer rb.release()
	last := int64(0)
	for ci := (img.fileEnd >> img.clusterBits) - 1; ci > 0; ci-- {
		if _, isMeta := img.metaMap[ci]; isMeta {
			last = ci
			break
		}
		rc, err := rb.get(ci)
		if err != nil {
			return err
		}
		if rc > 0 {
			last = ci
			break
		}
	}
	end := (last + 1) << img.clusterBits
	if end >= img.fileEnd {
		return nil
	}
	if err := img.f.Truncate(end); err != nil {
		return nil
	}
	img.fileEnd = end
	if img.freeHint > last+1 {
		img.freeHint = last + 1
	}
	return nil
}
