package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
)

// plan is what one guest cluster of a write needs.
type plan struct {
	vc     int64 // guest cluster index
	wStart int64 // write range inside the cluster [wStart, wEnd)
	wEnd   int64
	src    []byte // guest data for [wStart, wEnd)
	oldE   l2Entry
	oldBm  l2Bitmap
	host   int64 // host cluster offset the data goes to
	alloc  bool  // host is a new cluster
	reuse  bool  // host is the existing, exclusively owned cluster
	// fill: bytes [fillStart, fillEnd) of the cluster must be written
	// (write range widened to subclusters/cluster, filled from the old
	// contents where the guest data does not cover it).
	fillStart, fillEnd int64
	buf                []byte // prepared cluster bytes for the fill range (nil: src is used directly)
	newE               l2Entry
	newBm              l2Bitmap
}

// maxWriteBatch bounds how many clusters one batch allocates and plans.
const maxWriteBatch = 256

// WriteAt writes len(p) bytes at guest offset off (io.WriterAt).
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if err := img.startWrite(off, int64(len(p))); err != nil {
		return 0, err
	}
	defer img.drain.RUnlock()
	if len(p) == 0 {
		return 0, nil
	}
	tok := img.ranges.lock(alignDown(off, img.clusterSize), alignUp(off+int64(len(p)), img.clusterSize), true)
	defer img.ranges.unlock(tok)
	if err := img.writeRange(p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

// startWriteLocked is startWrite's checks and first-write header update,
// under mu (unlocked by defer: see openSize).
func (img *Image) startWriteLocked(off, n int64) error {
	img.mu.Lock()
	defer img.mu.Unlock()
	err := img.checkOpen()
	switch {
	case err != nil:
	case img.readOnly:
		err = ErrReadOnly
	case img.err != nil:
		err = fmt.Errorf("qcow2: image unusable after an earlier metadata write failure: %w", img.err)
	case off < 0 || n < 0 || off > img.size || n > img.size-off:
		err = fmt.Errorf("%w: %d bytes at %d, disk size %d", ErrOutOfRange, n, off, img.size)
	case img.crypto != nil && img.crypto.c == nil:
		err = ErrKeyRequired
	case !img.wroteOnce && n > 0:
		err = img.firstWrite()
	}
	return err
}

// startWrite validates a write request, takes drain shared (released by
// the caller) and does the first-write header updates.
func (img *Image) startWrite(off, n int64) error {
	img.drain.RLock()
	err := img.startWriteLocked(off, n)
	if err == nil {
		// Crash-consistent bitmaps: their bits reach the disk first.
		err = img.bitmapWriteAhead(off, n)
	}
	if err != nil {
		img.drain.RUnlock()
	}
	return err
}

// firstWrite does what qemu does before the first write of a session:
// set the dirty bit for lazy refcounts, clear autoclear bits we do not
// maintain. mu held.
func (img *Image) firstWrite() error {
	h := img.hdr
	if h.Version >= 3 {
		clearBits := h.Autoclear &^ autoclearKnown
		if !img.durableBitmaps {
			// Only a crash-consistent writer may leave its marker on.
			clearBits |= h.Autoclear & AutoclearCrashConsistentBitmaps
		}
		if h.Autoclear&AutoclearBitmaps != 0 && !img.bitmapsTracked {
			// Writes would make the persistent bitmaps stale: drop the
			// bit so no reader trusts them (qemu's rule for writers that
			// do not know the extension).
			clearBits |= AutoclearBitmaps
		}
		newIncompat := h.Incompatible
		if img.lazyRefcounts() {
			newIncompat |= IncompatDirty
		}
		if clearBits != 0 || newIncompat != h.Incompatible {
			h.Autoclear &^= clearBits
			h.Incompatible = newIncompat
			var b [24]byte
			binary.BigEndian.PutUint64(b[:], h.Incompatible)
			binary.BigEndian.PutUint64(b[8:], h.Compatible)
			binary.BigEndian.PutUint64(b[16:], h.Autoclear)
			if _, err := img.f.WriteAt(b[:], hdrIncompatible); err != nil {
				return ioErr("write header", err)
			}
			if err := img.fsync(); err != nil {
				return err
			}
		}
	}
	img.wroteOnce = true
	return nil
}

// writeRange writes p at off; the caller holds the guest range exclusively.
func (img *Image) writeRange(p []byte, off int64) error {
	return img.writeRangeHooks(p, off, true)
}

// writeRangeHooks is writeRange; hooks false skips the write hooks (dirty
// bitmaps), for a copy-up that changes no guest byte (stream.go).
func (img *Image) writeRangeHooks(p []byte, off int64, hooks bool) error {
	for len(p) > 0 {
		vc0 := off >> img.clusterBits
		nClusters := min(int64(maxWriteBatch), ((off+int64(len(p))-1)>>img.clusterBits)-vc0+1)
		batchEnd := min(off+int64(len(p)), (vc0+nClusters)<<img.clusterBits)
		n := batchEnd - off
		if err := img.writeBatch(p[:n], off, hooks); err != nil {
			return err
		}
		p = p[n:]
		off += n
	}
	return nil
}

func (img *Image) writeBatch(p []byte, off int64, hooks bool) error {
	// Most writes touch one or two clusters: their plans stay on the
	// stack (a 16-plan slice was 2.3 KB of garbage per 4k write).
	var few [2]plan
	plans := few[:0]
	for o := off; o < off+int64(len(p)); {
		vc := o >> img.clusterBits
		cEnd := min(off+int64(len(p)), (vc+1)<<img.clusterBits)
		base := vc << img.clusterBits
		plans = append(plans, plan{vc: vc, wStart: o - base, wEnd: cEnd - base, src: p[o-off : cEnd-off]})
		o = cEnd
	}
	// Phase 1 (metadata lock): decide, allocate.
	if err := img.planWritesLocked(plans); err != nil {
		return err
	}
	// Phase 2 (no lock): fill from old contents, write data.
	if err := img.fillAndWrite(plans); err != nil {
		img.freePlanned(plans)
		return err
	}
	// Phase 3 (metadata lock): point L2 at the data, drop old references.
	img.mu.Lock()
	defer img.mu.Unlock()
	for i := range plans {
		pl := &plans[i]
		if !pl.alloc && pl.newE == pl.oldE && pl.newBm == pl.oldBm {
			continue
		}
		if err := img.setL2(pl.vc, pl.newE, pl.newBm); err != nil {
			return img.fail(err)
		}
		if pl.alloc {
			img.dropOldReference(pl.oldE)
		}
	}
	if hooks {
		for _, h := range img.writeHooks {
			h(off, int64(len(p)))
		}
	}
	return img.maybeFlushPending()
}

// planWritesLocked is planWrites under mu (unlocked by defer: see
// openSize). A method rather than a closure given to locked, so that the
// plans do not escape to the heap.
func (img *Image) planWritesLocked(plans []plan) error {
	img.mu.Lock()
	defer img.mu.Unlock()
	return img.planWrites(plans)
}

// freePlanned frees the clusters planWrites allocated for a batch whose
// data could not be written.
func (img *Image) freePlanned(plans []plan) {
	img.mu.Lock()
	defer img.mu.Unlock()
	for _, pl := range plans {
		if pl.alloc {
			_ = img.freeNow(pl.host, img.clusterSize)
		}
	}
}

// dropOldReference schedules the decrement for the cluster an L2 entry
// pointed to before it was replaced. mu held.
func (img *Image) dropOldReference(old l2Entry) {
	switch {
	case old.compressed():
		o, n := old.compressedRange(img.clusterBits)
		img.freeLater(o, n, false)
	case old.offset() != 0:
		img.freeLater(old.offset(), img.clusterSize, false)
	}
}

// fail records a metadata failure: further writes are refused because the
// in-memory and on-disk state may disagree. mu held.
func (img *Image) fail(err error) error {
	if img.err == nil && !errors.Is(err, ErrNoSpace) {
		img.err = err
	}
	return err
}

// planWrites classifies each cluster and allocates new clusters. mu held.
func (img *Image) planWrites(plans []plan) error {
	need := int64(0)
	for i := range plans {
		pl := &plans[i]
		e, bm, err := img.getL2(pl.vc)
		if err != nil {
			return err
		}
		pl.oldE, pl.oldBm = e, bm
		where := func() string { return fmt.Sprintf("l2 entry of guest cluster %d", pl.vc) }
		if _, err := img.classify(e, bm, -1, where); err != nil {
			return err
		}
		owned := !e.compressed() && e.offset() != 0 && e.copied()
		if owned {
			pl.reuse, pl.host = true, e.offset()
		} else {
			need++
		}
	}
	var next int64
	if need > 0 {
		first, err := img.allocClusters(need)
		if err != nil {
			return err
		}
		next = first
	}
	for i := range plans {
		pl := &plans[i]
		if !pl.reuse {
			pl.alloc, pl.host = true, next
			next += img.clusterSize
		}
		img.planFill(pl)
		if img.crypto != nil {
			// Sectors are encrypted whole: a partial one is filled
			// from its old contents like a partial cluster.
			pl.fillStart = alignDown(pl.fillStart, luksSectorSize)
			pl.fillEnd = alignUp(pl.fillEnd, luksSectorSize)
		}
		if err := img.checkOverlap(pl.host+pl.fillStart, pl.fillEnd-pl.fillStart, 0); err != nil {
			return img.fail(err)
		}
	}
	return nil
}

// planFill decides which bytes of the cluster must be written and the new
// L2 entry. mu held.
func (img *Image) planFill(pl *plan) {
	cs := img.clusterSize
	e, bm := pl.oldE, pl.oldBm
	pl.newE = l2Entry(uint64(pl.host) | oflagCopied)
	if !img.extL2 {
		pl.newBm = 0
		if pl.reuse && !e.zeroFlag() {
			pl.fillStart, pl.fillEnd = pl.wStart, pl.wEnd // plain in-place write
		} else {
			pl.fillStart, pl.fillEnd = 0, cs
		}
		return
	}
	// Extended L2: subclusters the write touches become allocated; a
	// touched subcluster not already allocated in this host cluster is
	// filled completely. A copied (shared or compressed) cluster keeps its
	// other allocated subclusters, so it is copied whole.
	scSize := int64(1) << img.scBits
	first, last := pl.wStart>>img.scBits, (pl.wEnd-1)>>img.scBits
	newBm := bm
	if e.compressed() {
		newBm = l2Bitmap(l2BitmapAllAlloc)
	}
	pl.fillStart, pl.fillEnd = pl.wStart, pl.wEnd
	if pl.alloc && (e.compressed() || uint32(bm) != 0) {
		pl.fillStart, pl.fillEnd = 0, cs
	}
	for sc := first; sc <= last; sc++ {
		if pl.reuse && bm.alloc(uint(sc)) {
			continue
		}
		pl.fillStart = min(pl.fillStart, sc*scSize)
		pl.fillEnd = max(pl.fillEnd, (sc+1)*scSize)
	}
	for sc := first; sc <= last; sc++ {
		newBm |= l2Bitmap(1) << uint(sc)
		newBm &^= l2Bitmap(1) << uint(32+sc)
	}
	pl.newBm = newBm
}

// fillAndWrite builds the bytes of each plan's fill range and writes them,
// merging writes to consecutive host clusters. No lock held.
func (img *Image) fillAndWrite(plans []plan) error {
	c, err := img.dataCipher()
	if err != nil {
		return err
	}
	for i := range plans {
		pl := &plans[i]
		if pl.fillStart == pl.wStart && pl.fillEnd == pl.wEnd {
			if c != nil {
				// Never encrypt the caller's buffer in place.
				pl.buf = append([]byte(nil), pl.src...)
			}
		} else {
			buf := make([]byte, pl.fillEnd-pl.fillStart)
			if err := img.readOld(pl, buf, pl.fillStart); err != nil {
				return err
			}
			copy(buf[pl.wStart-pl.fillStart:], pl.src)
			pl.buf = buf
		}
	}
	if c != nil {
		// A copy (the buffers are shared, and encrypted in place): the
		// workers encryptPlans may start would otherwise move every
		// batch's plans to the heap, plain images' included.
		img.encryptPlans(c, slices.Clone(plans))
	}
	// Merge runs whose host ranges and buffers are contiguous.
	for i := 0; i < len(plans); {
		pl := &plans[i]
		data := pl.buf
		if data == nil {
			data = pl.src
		}
		hostStart := pl.host + pl.fillStart
		j := i + 1
		if pl.buf == nil {
			end := hostStart + int64(len(data))
			endsCluster := pl.fillEnd == img.clusterSize
			for j < len(plans) && endsCluster && plans[j].buf == nil && plans[j].fillStart == 0 &&
				plans[j].host == end && sameBacking(data, plans[j].src) {
				data = data[:len(data)+len(plans[j].src)]
				end += int64(len(plans[j].src))
				endsCluster = plans[j].fillEnd == img.clusterSize
				j++
			}
		}
		if _, err := img.f.WriteAt(data, hostStart); err != nil {
			return ioErr("write data", err)
		}
		i = j
	}
	return nil
}

// sameBacking reports whether b directly follows a in the same array.
func sameBacking(a, b []byte) bool {
	if cap(a) < len(a)+len(b) || len(b) == 0 {
		return false
	}
	return &a[:len(a)+1][len(a)] == &b[0]
}

// readOld fills buf with the current guest contents of cluster pl.vc
// starting at byte from, as they read before this write. No lock held (the
// caller holds the guest range exclusively, so the mapping is stable).
func (img *Image) readOld(pl *plan, buf []byte, from int64) error {
	base := pl.vc << img.clusterBits
	e, bm := pl.oldE, pl.oldBm
	if e.compressed() {
		c := make([]byte, img.clusterSize)
		if err := img.readCompressed(e, c); err != nil {
			return err
		}
		copy(buf, c[from:])
		return nil
	}
	if !img.extL2 {
		switch {
		case img.hdr.Version >= 3 && e.zeroFlag():
			clear(buf)
		case e.offset() != 0:
			return img.readGuestData(buf, e.offset()+from)
		default:
			return img.readBacking(buf, base+from)
		}
		return nil
	}
	scSize := int64(1) << img.scBits
	for pos := int64(0); pos < int64(len(buf)); {
		in := from + pos
		sc := in >> img.scBits
		n := min(int64(len(buf))-pos, (sc+1)*scSize-in)
		dst := buf[pos : pos+n]
		switch {
		case bm.alloc(uint(sc)):
			if err := img.readGuestData(dst, e.offset()+in); err != nil {
				return err
			}
		case bm.zero(uint(sc)):
			clear(dst)
		default:
			if err := img.readBacking(dst, base+in); err != nil {
				return err
			}
		}
		pos += n
	}
	return nil
}

func (img *Image) readBacking(dst []byte, guest int64) error {
	if img.backing == nil {
		clear(dst)
		return nil
	}
	return img.backing.readAt(dst, guest)
}

// maxPendingFrees bounds deferred refcount decrements; past it the
// metadata is flushed so freed space becomes reusable. mu held.
const maxPendingFrees = 4096

func (img *Image) maybeFlushPending() error {
	if len(img.pendingFree) < maxPendingFrees {
		return nil
	}
	return img.flushLocked(false)
}

// Flush makes every completed write durable.
func (img *Image) Flush() error {
	unlock, err := img.lockShared()
	if err != nil {
		return err
	}
	defer unlock()
	if img.readOnly {
		return nil
	}
	return img.flushLocked(true)
}

// flushLocked writes metadata in crash-safe order: refcount increments,
// then L2 tables, then the decrements those L2 updates allowed. mu held.
func (img *Image) flushLocked(data bool) error {
	if img.err != nil {
		return img.err
	}
	if err := img.syncRefcounts(!img.lazyRefcounts()); err != nil {
		return img.fail(err)
	}
	for _, e := range img.l2Cache.dirtyEntries() {
		if err := img.writeL2Slice(e); err != nil {
			return img.fail(err)
		}
		e.dirty = false
	}
	if len(img.pendingFree) > 0 {
		if err := img.fsync(); err != nil {
			return img.fail(err)
		}
		if err := img.applyPendingFrees(); err != nil {
			return img.fail(err)
		}
		if err := img.syncRefcounts(false); err != nil {
			return img.fail(err)
		}
	}
	if data || img.metaUnsynced || !img.rcSynced {
		if err := img.fsync(); err != nil {
			return img.fail(err)
		}
	}
	return nil
}

// writeHeader rewrites the header cluster from img.hdr. mu held.
func (img *Image) writeHeader() error {
	buf, err := img.hdr.encode()
	if err != nil {
		return err
	}
	if int64(len(buf)) > img.clusterSize {
		return fmt.Errorf("%w: header does not fit in a cluster", ErrUnsupported)
	}
	if _, err := img.f.WriteAt(buf, 0); err != nil {
		return ioErr("write header", err)
	}
	img.metaUnsynced = true
	return nil
}
