package qcow2

import (
	"errors"
	"fmt"
	"io"
	"sync"

	"golang.org/x/sys/unix"
)

// Crash-consistent bitmaps (OpenOptions.CrashConsistentBitmaps).
//
// The guarantee: at every moment, for every enabled consistent bitmap, the
// bits on disk cover every guest range whose new contents may have reached
// the disk. Hence after SIGKILL or power loss the bitmap is still a correct
// superset of the changes since it was started, and it is loaded as
// consistent although it was left in_use.
//
// How:
//   - While the image is open this way, every enabled bitmap's table points
//     to a data cluster for every chunk (no all-zero or all-ones entries),
//     so setting a bit on disk is an in-place write of one cluster: no
//     allocation, no table or directory change. storeBitmapsLocked lays
//     bitmaps out like that and sets AutoclearCrashConsistentBitmaps in the
//     same header write that publishes them.
//   - A write request first sets its bits in memory and, when that changed
//     anything on disk, waits until the changed bitmap clusters are written
//     durably (bitmapWriteAhead; RWF_DSYNC writes, see writeDurable).
//     Concurrent writers share the work: the first waiter writes everything
//     pending, the others wait for it. Only then does the request write
//     data.
//   - To pay that sync rarely, the bits written to disk are coarser than
//     the bitmap: each bitmap has a shadow at durableUnit granularity (at
//     least the bitmap's own); a write dirties whole units on disk, and a
//     write that continues a run of dirty units (sequential I/O) dirties
//     as many units ahead as the run holds (16 to 256). In memory the
//     bitmap keeps its exact bits, and a clean close stores them: the
//     coarse superset is what a crash leaves, never what a clean session
//     leaves.
//   - Everything that stores bitmaps (open, add, enable, merge, resize,
//     close) writes the exact bits and empties the shadows: the disk then
//     holds exactly the memory bits, and later writes start over.
//
// A program that does not know the autoclear bit clears it before writing
// (qcow2 spec), so in_use bitmaps of an image written since by anyone else
// are inconsistent again, as in qemu. Bits on disk only ever grow while
// open (clear and merge go through a store), so a torn or lost bitmap
// cluster write can only lose bits of a request that has not written data.

const (
	// durableUnitBits: 1 MiB of the disk per on-disk bit set ahead of data.
	durableUnitBits = 20
	// durableAhead, durableAheadMax: a write that extends a run of dirty
	// units dirties as many units again as the run holds, within these
	// bounds, so that a sequential writer syncs once per 16 MiB at first
	// and once per 256 MiB once streaming.
	durableAhead    = 16
	durableAheadMax = 256
)

// bitmapJournal orders bitmap cluster writes before the data they cover.
type bitmapJournal struct {
	// Guarded by Image.mu: bitmap clusters changed in memory but not yet
	// written; the number of such changes so far; and, per bitmap, the
	// shadow units set by a change not yet known durable, with that
	// change's number (a writer to such a unit waits for it too).
	pending map[*imgBitmap]map[uint64]struct{}
	seq     uint64
	units   map[*imgBitmap]map[uint64]uint64

	// io is held while bitmap clusters are written outside Image.mu; a
	// store takes it (after Image.mu) before freeing old bitmap clusters,
	// so no journal write can land in a cluster that was reused.
	io sync.Mutex

	// Guarded by mu: the changes up to durable are on disk; one flusher
	// at a time (flushing), the others wait on cond.
	mu       sync.Mutex
	cond     *sync.Cond
	durable  uint64
	flushing bool
}

// resetShadow gives an enabled bitmap of a crash-consistent image an empty
// shadow (the disk holds exactly b.bits), or drops it. mu held.
func (img *Image) resetShadow(b *imgBitmap) {
	delete(img.journal.units, b)
	if !img.durableBitmaps || !b.enabled || b.inconsistent {
		b.shadow = nil
		return
	}
	b.shadow = newDirtyBitmap(b.bits.size, max(uint(b.granBits), durableUnitBits))
}

// bitmapWriteAhead makes the bits covering [off, off+n) durable in every
// enabled bitmap before the caller writes data there. drain held shared.
func (img *Image) bitmapWriteAhead(off, n int64) error {
	if !img.durableBitmaps || n <= 0 {
		return nil
	}
	img.mu.Lock()
	j := &img.journal
	var target uint64 // the newest change this write must see durable
	for _, b := range img.bms.list {
		if b.shadow == nil || !b.enabled || b.inconsistent {
			continue
		}
		first, end, ok := b.shadow.bitRange(uint64(off), uint64(n))
		if !ok {
			continue
		}
		units := j.units[b]
		for u := first; u < end && len(units) > 0; u++ {
			if s, ok := units[u]; ok {
				target = max(target, s) // set by a change still in flight
			}
		}
		if b.shadow.next(first, end, false) == end {
			// Every unit is dirty on disk, or about to be: only the
			// exact bits (stored at close) remain to set.
			b.bits.setRange(uint64(off), uint64(n))
			continue
		}
		if f, e, ok := b.bits.bitRange(uint64(off), uint64(n)); ok && b.bits.next(f, e, false) == e {
			// The exact bits are set already. In this mode they are
			// set only here (under a unit made durable first) or by
			// loading and storing, so they are on disk, or in flight
			// in a unit waited for above.
			continue
		}
		if run := first - b.shadow.runStart(first, first-min(first, durableAheadMax)); run > 0 {
			// Continues a dirty run: a sequential writer. Dirty as much
			// ahead as the run is long (at least durableAhead, at most
			// durableAheadMax units), so a stream pays O(log n) syncs.
			end = min(max(end, first+min(max(run, durableAhead), durableAheadMax)), b.shadow.nbits)
		}
		j.seq++
		target = j.seq
		if units == nil {
			if j.units == nil {
				j.units = map[*imgBitmap]map[uint64]uint64{}
			}
			units = map[uint64]uint64{}
			j.units[b] = units
		}
		for u := b.shadow.next(first, end, false); u < end; u = b.shadow.next(u+1, end, false) {
			units[u] = j.seq
		}
		b.bits.setRange(uint64(off), uint64(n))
		b.shadow.setBits(first, end)
		if j.pending == nil {
			j.pending = map[*imgBitmap]map[uint64]struct{}{}
		}
		chunks := j.pending[b]
		if chunks == nil {
			chunks = map[uint64]struct{}{}
			j.pending[b] = chunks
		}
		perChunk := uint64(img.clusterSize) * 8 // bitmap bits per cluster
		lo := (first << b.shadow.granBits >> b.granBits) / perChunk
		hi := ((end<<b.shadow.granBits>>b.granBits)-1)/perChunk + 1
		for c := lo; c < min(hi, uint64(len(b.table))); c++ {
			chunks[c] = struct{}{}
		}
	}
	img.mu.Unlock()
	if target == 0 {
		return nil
	}
	return img.waitBitmapsDurable(target)
}

// waitBitmapsDurable returns once the bitmap changes up to target are on
// disk, flushing them itself unless another writer is doing it.
func (img *Image) waitBitmapsDurable(target uint64) error {
	j := &img.journal
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.cond == nil {
		j.cond = sync.NewCond(&j.mu)
	}
	for j.durable < target {
		if j.flushing {
			j.cond.Wait()
			continue
		}
		j.flushing = true
		j.mu.Unlock()
		done, err := img.flushBitmapJournal()
		j.mu.Lock()
		j.flushing = false
		if err == nil && done > j.durable {
			j.durable = done
		}
		j.cond.Broadcast()
		if err != nil {
			return err
		}
	}
	return nil
}

// flushBitmapJournal writes every pending bitmap cluster (the exact bits
// ORed with the shadow's units) durably; it returns the change count that
// is now durable. The writes happen outside Image.mu (under journal.io), so
// other requests keep mapping and allocating meanwhile.
func (img *Image) flushBitmapJournal() (uint64, error) {
	type clusterWrite struct {
		off int64
		buf []byte
	}
	img.mu.Lock()
	j := &img.journal
	upto, pending := j.seq, j.pending
	j.pending = nil
	var writes []clusterWrite
	var err error
	for b, chunks := range pending {
		if img.bms.find(b.name) != b || b.shadow == nil {
			continue // removed or disabled since: stored without it
		}
		for c := range chunks {
			if c >= uint64(len(b.table)) || b.table[c].offset() == 0 {
				err = fmt.Errorf("qcow2: internal: bitmap %q chunk %d has no data cluster in crash-consistent mode", b.name, c)
				break
			}
			buf := make([]byte, img.clusterSize)
			b.bits.serializeChunk(c, buf)
			orShadowChunk(buf, c, b.bits, b.shadow)
			if err = img.checkOverlap(b.table[c].offset(), int64(len(buf)), 0); err != nil {
				break
			}
			writes = append(writes, clusterWrite{b.table[c].offset(), buf})
		}
		if err != nil {
			break
		}
	}
	if err == nil {
		j.io.Lock()
		img.mu.Unlock()
		for _, w := range writes {
			if err = img.writeDurable(w.buf, w.off); err != nil {
				break
			}
		}
		j.io.Unlock()
		img.mu.Lock()
	}
	if err != nil {
		// Keep everything pending: the next waiter writes it again.
		if j.pending == nil {
			j.pending = map[*imgBitmap]map[uint64]struct{}{}
		}
		for b, chunks := range pending {
			if j.pending[b] == nil {
				j.pending[b] = map[uint64]struct{}{}
			}
			for c := range chunks {
				j.pending[b][c] = struct{}{}
			}
		}
		img.mu.Unlock()
		return 0, err
	}
	for b, units := range j.units {
		for u, s := range units {
			if s <= upto {
				delete(units, u)
			}
		}
		if len(units) == 0 {
			delete(j.units, b)
		}
	}
	img.mu.Unlock()
	return upto, nil
}

// dsyncWriter is an image file that writes one range durably itself (the
// power-loss model in tests).
type dsyncWriter interface {
	WriteAtDsync(p []byte, off int64) (int, error)
}

// writeDurable writes p at off and makes that range durable, without
// waiting for the rest of the file: a write with RWF_DSYNC, whose sync
// covers only its own range (plus the device cache flush). An fsync of the
// whole file would first write back every dirty data page, which turns a
// streaming writer synchronous. The bitmap clusters it targets were
// written and fsynced when they were laid out, so no file system metadata
// is needed to find them again. Falls back to write + fsync where the
// kernel or file system lacks RWF_DSYNC.
func (img *Image) writeDurable(p []byte, off int64) error {
	if img.noSync {
		_, err := img.f.WriteAt(p, off)
		return ioErr("write bitmap data", err)
	}
	if d, ok := img.f.(dsyncWriter); ok {
		_, err := d.WriteAtDsync(p, off)
		return ioErr("write bitmap data", err)
	}
	n, err := unix.Pwritev2(int(img.f.Fd()), [][]byte{p}, off, unix.RWF_DSYNC)
	switch {
	case err == nil && n == len(p):
		return nil
	case err == nil:
		err = io.ErrShortWrite
	case errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EINVAL):
		if _, err = img.f.WriteAt(p, off); err == nil {
			err = img.f.Sync()
		}
	}
	return ioErr("write bitmap data", err)
}

// orShadowChunk sets in buf (cluster c of exact's serialization) every
// exact bit that lies in a dirty unit of shadow.
func orShadowChunk(buf []byte, c uint64, exact, shadow *dirtyBitmap) {
	perChunk := uint64(len(buf)) * 8
	first := c * perChunk
	end := min(first+perChunk, exact.nbits)
	shift := shadow.granBits - exact.granBits // exact bits per unit = 1<<shift
	for u := shadow.next(first>>shift, (end-1)>>shift+1, true); u<<shift < end; {
		stop := shadow.next(u, shadow.nbits, false) // end of this dirty run
		setBufBits(buf, max(u<<shift, first)-first, min(stop<<shift, end)-first)
		if stop >= shadow.nbits {
			break
		}
		u = shadow.next(stop, (end-1)>>shift+1, true)
	}
}

// setBufBits sets bits [lo, hi) of buf (bit i is bit i%8 of byte i/8).
func setBufBits(buf []byte, lo, hi uint64) {
	for ; lo < hi && lo%8 != 0; lo++ {
		buf[lo/8] |= 1 << (lo % 8)
	}
	for ; lo+8 <= hi; lo += 8 {
		buf[lo/8] = 0xff
	}
	for ; lo < hi; lo++ {
		buf[lo/8] |= 1 << (lo % 8)
	}
}
