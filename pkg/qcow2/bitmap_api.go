package qcow2

import "fmt"

// BitmapOptions configures AddBitmap.
type BitmapOptions struct {
	// Granularity is the number of bytes one bit covers: a power of two
	// from 512 B to 2 GiB. 0 means qemu's default: the cluster size,
	// clamped to 4 KiB..64 KiB.
	Granularity int64
	// Disabled creates the bitmap without tracking writes (qemu-img bitmap
	// --add --disable).
	Disabled bool
}

// BitmapStatus describes one persistent dirty bitmap as the open image
// sees it (Info().Bitmaps is the on-disk view qemu-img info prints).
type BitmapStatus struct {
	Name        string
	Granularity int64
	// Enabled: the bitmap records writes (its auto flag).
	Enabled bool
	// Inconsistent: found in_use at open (a writer did not close the image)
	// or carrying extra data it does not let us use. Its bits are unknown;
	// it can only be removed.
	Inconsistent bool
	// InUse and Auto are the flags as stored on disk now (what qemu-img
	// info shows): an enabled bitmap of an image open read-write is in use.
	InUse bool
	Auto  bool
}

// Flags lists the on-disk flags as qemu-img info names them.
func (b BitmapStatus) Flags() []string {
	f := []string{}
	if b.InUse {
		f = append(f, "in-use")
	}
	if b.Auto {
		f = append(f, "auto")
	}
	return f
}

// Bitmaps lists the image's persistent bitmaps in directory order.
func (img *Image) Bitmaps() []BitmapStatus {
	img.mu.Lock()
	defer img.mu.Unlock()
	out := make([]BitmapStatus, 0, len(img.bms.list))
	for _, b := range img.bms.list {
		i := BitmapStatus{Name: b.name, Granularity: 1 << b.granBits, Enabled: b.enabled, Inconsistent: b.inconsistent}
		if b.disk != nil {
			i.InUse, i.Auto = b.disk.inUse(), b.disk.auto()
		}
		out = append(out, i)
	}
	return out
}

// bitmapOp runs fn on the named bitmap under the metadata lock and stores
// the result before returning. consistent refuses inconsistent bitmaps.
func (img *Image) bitmapOp(name string, consistent bool, fn func(b *imgBitmap) error) error {
	unlock, err := img.lockShared()
	if err != nil {
		return err
	}
	defer unlock()
	if img.readOnly {
		return fmt.Errorf("%w: bitmap %q", ErrReadOnly, name)
	}
	b := img.bms.find(name)
	if b == nil {
		return fmt.Errorf("%w: %q", ErrBitmapNotFound, name)
	}
	if consistent && b.inconsistent {
		return fmt.Errorf("%w: %q cannot be used, only removed", ErrBitmapInconsistent, name)
	}
	if err := fn(b); err != nil {
		return err
	}
	img.bms.retrack()
	return img.storeBitmapsLocked(false)
}

// AddBitmap creates a persistent dirty bitmap, empty, enabled unless
// opts.Disabled. Only version 3 images can hold bitmaps (qemu's rule: v2
// has no autoclear bit to protect them).
func (img *Image) AddBitmap(name string, opts BitmapOptions) error {
	unlock, err := img.lockShared()
	if err != nil {
		return err
	}
	defer unlock()
	if img.readOnly {
		return fmt.Errorf("%w: cannot add bitmap %q", ErrReadOnly, name)
	}
	if img.hdr.Version < 3 {
		return fmt.Errorf("%w: cannot store dirty bitmaps in qcow2 v2 files", ErrBitmapInvalid)
	}
	if img.bms.find(name) != nil {
		return fmt.Errorf("%w: %q", ErrBitmapExists, name)
	}
	if img.size == 0 {
		return fmt.Errorf("%w: cannot add bitmap %q to an image of size 0", ErrBitmapInvalid, name)
	}
	g := opts.Granularity
	if g == 0 {
		g = min(max(img.clusterSize, 4096), 65536)
	}
	gb, err := checkBitmapRequest(name, g, img.size, img.clusterSize)
	if err != nil {
		return err
	}
	if len(img.bms.list)+1 > maxBitmaps {
		return fmt.Errorf("%w: maximum number of persistent bitmaps (%d) is already reached", ErrBitmapInvalid, maxBitmaps)
	}
	dirSize := bitmapEntryLen(len(name), 0)
	for _, b := range img.bms.list {
		dirSize += bitmapEntryLen(len(b.name), len(b.disk.extra()))
	}
	if dirSize > maxBitmapDirSize {
		return fmt.Errorf("%w: not enough space in the bitmap directory", ErrBitmapInvalid)
	}
	b := &imgBitmap{name: name, granBits: gb, enabled: !opts.Disabled, bits: newDirtyBitmap(uint64(img.size), uint(gb))}
	img.bms.list = append(img.bms.list, b)
	img.bms.retrack()
	if err := img.storeBitmapsLocked(false); err != nil {
		img.bms.list = img.bms.list[:len(img.bms.list)-1]
		img.bms.retrack()
		return err
	}
	return nil
}

func (e *bitmapDirEntry) extra() []byte {
	if e == nil {
		return nil
	}
	return e.ExtraData
}

// RemoveBitmap deletes a bitmap and frees its clusters. Inconsistent
// bitmaps can be removed (it is the only thing they allow).
func (img *Image) RemoveBitmap(name string) error {
	return img.bitmapOp(name, false, func(b *imgBitmap) error {
		l := img.bms.list
		for i := range l {
			if l[i] == b {
				img.bms.list = append(l[:i:i], l[i+1:]...)
				break
			}
		}
		return nil
	})
}

// ClearBitmap resets every bit of a bitmap.
func (img *Image) ClearBitmap(name string) error {
	return img.bitmapOp(name, true, func(b *imgBitmap) error {
		b.bits.clearAll()
		return nil
	})
}

// EnableBitmap makes a bitmap record writes from now on.
func (img *Image) EnableBitmap(name string) error {
	return img.bitmapOp(name, true, func(b *imgBitmap) error {
		b.enabled = true
		return nil
	})
}

// DisableBitmap freezes a bitmap: writes no longer change it.
func (img *Image) DisableBitmap(name string) error {
	return img.bitmapOp(name, true, func(b *imgBitmap) error {
		b.enabled = false
		return nil
	})
}

// MergeBitmap ORs bitmap src into bitmap dst of the same image. The
// granularities may differ: a dirty src block dirties every dst block it
// overlaps, so dst never misses a change.
func (img *Image) MergeBitmap(dst, src string) error {
	s, err := img.snapshotBits(src)
	if err != nil {
		return err
	}
	return img.mergeBits(dst, src, s)
}

// MergeBitmapFrom ORs bitmap srcName of another open image into bitmap dst
// of img (qemu-img bitmap --merge SRC -b SRC_FILE). The disks must have the
// same size.
func (img *Image) MergeBitmapFrom(dst string, srcImg *Image, srcName string) error {
	s, err := srcImg.snapshotBits(srcName)
	if err != nil {
		return err
	}
	return img.mergeBits(dst, srcName, s)
}

// snapshotBits copies a consistent bitmap's bits.
func (img *Image) snapshotBits(name string) (*dirtyBitmap, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	b := img.bms.find(name)
	if b == nil {
		return nil, fmt.Errorf("%w: %q", ErrBitmapNotFound, name)
	}
	if b.inconsistent {
		return nil, fmt.Errorf("%w: %q cannot be used, only removed", ErrBitmapInconsistent, name)
	}
	c := newDirtyBitmap(b.bits.size, b.bits.granBits)
	c.mergeFrom(b.bits)
	return c, nil
}

func (img *Image) mergeBits(dst, srcName string, s *dirtyBitmap) error {
	return img.bitmapOp(dst, true, func(b *imgBitmap) error {
		if b.bits.size != s.size {
			return fmt.Errorf("%w: cannot merge bitmap %q of a %d-byte disk into %q of a %d-byte disk", ErrBitmapInvalid, srcName, s.size, dst, b.bits.size)
		}
		b.bits.mergeFrom(s)
		return nil
	})
}

// BitmapExtents reports [off, off+length) of the virtual disk as runs the
// bitmap marks dirty or clean, at its granularity and clipped to the range
// (what qemu-nbd serves as qemu:dirty-bitmap:NAME). It does not block I/O.
func (img *Image) BitmapExtents(name string, off, length int64) ([]BitmapExtent, error) {
	if off < 0 || length < 0 {
		return nil, fmt.Errorf("%w: bitmap extents of [%d, +%d)", ErrOutOfRange, off, length)
	}
	img.mu.Lock()
	if err := img.checkOpen(); err != nil {
		img.mu.Unlock()
		return nil, err
	}
	b := img.bms.find(name)
	img.mu.Unlock()
	if b == nil {
		return nil, fmt.Errorf("%w: %q", ErrBitmapNotFound, name)
	}
	if b.inconsistent {
		return nil, fmt.Errorf("%w: %q cannot be used, only removed", ErrBitmapInconsistent, name)
	}
	b.rw.RLock()
	defer b.rw.RUnlock()
	var out []BitmapExtent
	b.bits.extents(uint64(off), uint64(length), func(e BitmapExtent) bool {
		out = append(out, e)
		return true
	})
	return out, nil
}

// StoreBitmaps writes every bitmap to the image now. Disabled bitmaps are
// then consistent on disk even if the process dies; enabled ones stay
// in_use until Close, since writes keep changing them.
func (img *Image) StoreBitmaps() error {
	unlock, err := img.lockShared()
	if err != nil {
		return err
	}
	defer unlock()
	return img.storeBitmapsLocked(false)
}

// bitmapsResizeCheck is the first half of the resize hook (issue 3's
// Resize calls it, mu held, before the new size reaches the header). Like
// qemu it refuses to resize an image with an inconsistent bitmap; then it
// marks every bitmap in_use on disk, so a crash between the header update
// and resizeBitmaps leaves bitmaps that are inconsistent (and an image qemu
// still opens) rather than bitmaps of the wrong size. Enabled bitmaps of a
// read-write image are in_use on disk anyway: that flag alone does not
// make a bitmap inconsistent, Bitmaps() does.
func (img *Image) bitmapsResizeCheck(newSize int64) error {
	if len(img.bms.list) == 0 {
		return nil
	}
	for _, b := range img.bms.list {
		if b.inconsistent {
			return fmt.Errorf("%w: cannot resize an image with inconsistent bitmap %q; remove it first", ErrBitmapInconsistent, b.name)
		}
	}
	if _, err := checkBitmapSizes(img, newSize); err != nil {
		return err
	}
	// The crash-consistent marker must go as well (the in-place rewrite
	// drops it): bitmaps of the old size must not be trusted in_use.
	changed := img.hdr.Autoclear&AutoclearCrashConsistentBitmaps != 0
	for _, b := range img.bms.list {
		if b.disk != nil && !b.disk.inUse() {
			b.disk.Flags |= bitmapFlagInUse
			changed = true
		}
	}
	if !changed {
		return nil
	}
	return img.rewriteBitmapDirInPlace()
}

// checkBitmapSizes verifies every bitmap can cover newSize bytes.
func checkBitmapSizes(img *Image, newSize int64) (int, error) {
	for i, b := range img.bms.list {
		if _, err := checkBitmapRequest(b.name, int64(1)<<b.granBits, newSize, img.clusterSize); err != nil {
			return i, err
		}
	}
	return 0, nil
}

// resizeBitmaps is the second half: once the header holds newSize, every
// bitmap follows as in qemu (bits for new space start clean, bits past a
// new end are dropped) and is stored (disabled ones consistent again).
// mu held.
func (img *Image) resizeBitmaps(newSize int64) error {
	if len(img.bms.list) == 0 {
		return nil
	}
	for _, b := range img.bms.list {
		b.rw.Lock()
		b.bits.setSize(uint64(newSize))
		b.rw.Unlock()
	}
	return img.storeBitmapsLocked(false)
}
