package qcow2

import "fmt"

// ZeroFlags modify WriteZeroes.
type ZeroFlags uint

const (
	// ZeroMayUnmap lets WriteZeroes free the host clusters (like qemu's
	// BDRV_REQ_MAY_UNMAP); without it preallocated clusters stay allocated.
	ZeroMayUnmap ZeroFlags = 1 << iota
)

// WriteZeroes makes [off, off+n) read as zeroes: whole clusters become zero
// clusters (v3) or unallocated (v2 without backing file), subclusters get
// their zero bits (extended L2), and the rest is written as explicit zeroes.
func (img *Image) WriteZeroes(off, n int64, flags ZeroFlags) error {
	if err := img.startWrite(off, n); err != nil {
		return err
	}
	defer img.drain.RUnlock()
	if n == 0 {
		return nil
	}
	tok := img.ranges.lock(alignDown(off, img.clusterSize), alignUp(off+n, img.clusterSize), true)
	defer img.ranges.unlock(tok)
	return img.zeroRange(off, n, flags, false)
}

// Discard tells the image the range is no longer needed. Whole clusters are
// deallocated (they then read as zeroes on v3 images, as the backing file or
// zeroes on v2); partial clusters are left alone, as qemu does.
func (img *Image) Discard(off, n int64) error {
	if err := img.startWrite(off, n); err != nil {
		return err
	}
	defer img.drain.RUnlock()
	s, e := alignUp(off, img.clusterSize), alignDown(off+n, img.clusterSize)
	if off+n == img.Size() {
		e = alignUp(off+n, img.clusterSize)
	}
	if e <= s {
		img.markWritten(off, n)
		return nil
	}
	tok := img.ranges.lock(s, e, true)
	defer img.ranges.unlock(tok)
	if err := img.zeroRange(s, min(e, img.Size())-s, ZeroMayUnmap, true); err != nil {
		return err
	}
	img.markWritten(off, n)
	return nil
}

// zeroRange implements WriteZeroes and Discard; the range is held.
func (img *Image) zeroRange(off, n int64, flags ZeroFlags, discard bool) error {
	cs := img.clusterSize
	end := off + n
	size := img.Size()
	var zbuf []byte
	explicit := func(o, l int64) error {
		if discard {
			return nil
		}
		if zbuf == nil {
			zbuf = make([]byte, min(n, 1<<20))
		}
		for l > 0 {
			k := min(l, int64(len(zbuf)))
			if err := img.writeRange(zbuf[:k], o); err != nil {
				return err
			}
			o, l = o+k, l-k
		}
		return nil
	}
	for off < end {
		vc := off >> img.clusterBits
		cStart := vc << img.clusterBits
		cEnd := min(cStart+cs, end)
		// The last cluster of an odd-sized disk counts as whole up to the
		// disk end.
		whole := off == cStart && (cEnd == cStart+cs || cEnd == size)
		var err error
		if whole {
			err = img.zeroCluster(vc, flags, discard, explicit)
		} else if img.extL2 && !discard {
			err = img.zeroSubclusters(vc, off, cEnd, explicit)
		} else {
			err = explicit(off, cEnd-off)
		}
		if err != nil {
			return err
		}
		off = cEnd
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	for _, h := range img.writeHooks {
		h(off-n, n)
	}
	return img.maybeFlushPending()
}

func (img *Image) zeroCluster(vc int64, flags ZeroFlags, discard bool, explicit func(o, l int64) error) error {
	n, err := img.zeroClusterLocked(vc, flags, discard)
	if err != nil || n == 0 {
		return err
	}
	return explicit(vc<<img.clusterBits, n)
}

// zeroClusterLocked zeroes guest cluster vc through its L2 entry, under mu
// (unlocked by defer: see openSize). Where the entry cannot say "zero" (a
// v2 image over a backing file, or one keeping its allocation) it changes
// nothing and returns how many bytes the caller must write explicitly,
// outside the lock.
func (img *Image) zeroClusterLocked(vc int64, flags ZeroFlags, discard bool) (explicitLen int64, err error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	e, bm, err := img.getL2(vc)
	if err != nil {
		return 0, err
	}
	if _, err := img.classify(e, bm, -1, func() string { return fmt.Sprintf("l2 entry of guest cluster %d", vc) }); err != nil {
		return 0, err
	}
	hasBacking := img.backing != nil || img.hdr.BackingFile != ""
	keep := flags&ZeroMayUnmap == 0 && !e.compressed() && e.offset() != 0 && e.copied()
	var ne l2Entry
	var nbm l2Bitmap
	switch {
	case img.extL2:
		nbm = l2Bitmap(l2BitmapAllZero)
		if discard && !hasBacking && e.offset() == 0 && uint32(bm) == 0 {
			nbm = bm // nothing allocated: leave as is
		}
		if keep {
			ne = e
		}
	case img.hdr.Version >= 3:
		ne = l2Entry(oflagZero)
		if discard && !hasBacking && e == 0 {
			ne = 0
		}
		if keep {
			ne = l2Entry(uint64(e.offset()) | oflagCopied | oflagZero)
		}
	default: // v2: no zero flag
		if (hasBacking && !discard) || keep {
			return min(img.clusterSize, img.size-vc<<img.clusterBits), nil
		}
		ne = 0
	}
	if ne == e && nbm == bm {
		return 0, nil
	}
	if err := img.setL2(vc, ne, nbm); err != nil {
		return 0, img.fail(err)
	}
	if !keep {
		switch {
		case e.compressed():
			o, n := e.compressedRange(img.clusterBits)
			img.freeLater(o, n, false)
		case e.offset() != 0:
			img.freeLater(e.offset(), img.clusterSize, true)
		}
	}
	return 0, nil
}

// zeroSubclusters zeroes part of a cluster of an extended-L2 image: whole
// subclusters by their zero bits, the rest explicitly.
func (img *Image) zeroSubclusters(vc, off, end int64, explicit func(o, l int64) error) error {
	sc := int64(1) << img.scBits
	s, e := alignUp(off, sc), alignDown(end, sc)
	if end == img.Size() {
		e = alignUp(end, sc)
	}
	if e <= s {
		return explicit(off, end-off)
	}
	if s > off {
		if err := explicit(off, s-off); err != nil {
			return err
		}
	}
	if end > e {
		if err := explicit(e, end-e); err != nil {
			return err
		}
	}
	rewrite, err := img.zeroSubclusterBits(vc, s, e, sc)
	if err != nil || !rewrite {
		return err
	}
	// Shared or compressed: rewrite through the write path.
	return explicit(s, min(e, end)-s)
}

// zeroSubclusterBits sets the zero bits of subclusters [s, e) of cluster
// vc, under mu (unlocked by defer: see openSize), or reports that the
// cluster is shared or compressed and must be rewritten instead.
func (img *Image) zeroSubclusterBits(vc, s, e, sc int64) (rewrite bool, err error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	le, bm, err := img.getL2(vc)
	if err != nil {
		return false, err
	}
	if le.compressed() || (le.offset() != 0 && !le.copied()) {
		return true, nil
	}
	base := vc << img.clusterBits
	nbm := bm
	for i := (s - base) / sc; i < (e-base)/sc; i++ {
		nbm &^= l2Bitmap(1) << uint(i)
		nbm |= l2Bitmap(1) << uint(32+i)
	}
	if nbm == bm {
		return false, nil
	}
	return false, img.setL2(vc, le, nbm)
}
