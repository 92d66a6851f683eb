package qcow2

import (
	"encoding/binary"
	"fmt"
	"io"
	"math"
)

// Check verifies the image the way qemu-img check does and, with a repair
// mode, fixes what it may; it returns what qemu-img check reports: after a
// repair the image is checked again and the final counts are returned
// together with what was fixed.
//
// The walk is the core's walkReferences (refwalk.go): header, active and
// snapshot L1/L2 tables, data and compressed clusters, snapshot table, bitmap
// directory, tables and data. On top of it Check counts the refcount
// structures themselves as qemu's check_refblocks does, compares every
// cluster's on-disk refcount with its references (corruption when lower,
// leak when higher), checks COPIED flags of the active tables
// (check_oflag_copied), collects cluster statistics of the active layer and
// the image end offset, and reports bitmaps that cannot be trusted.
//
// Repairs: RepairLeaks lowers refcounts that are too high; RepairAll also
// raises those too low, fixes COPIED flags, turns references to space past
// the end of the file (which read as zeroes) into zero clusters, and, when
// the refcount structures themselves are broken, rebuilds them from the
// computed counts with the reftable placed in the first free space that
// fits (qemu's rebuild_refcount_structure), not only at the end of the file
// (refrebuild.go).
//
// Check holds the image exclusively while it runs. Repairs need an image
// opened read-write.
func (img *Image) Check(mode RepairMode) (*CheckResult, error) {
	img.drain.Lock()
	defer img.drain.Unlock()
	img.mu.Lock()
	defer img.mu.Unlock()
	if err := img.checkOpen(); err != nil {
		return nil, err
	}
	if mode != RepairNone && img.readOnly {
		return nil, fmt.Errorf("%w: repairing needs the image opened read-write", ErrReadOnly)
	}
	if !img.readOnly && img.err == nil {
		if err := img.flushLocked(false); err != nil {
			return nil, err
		}
	}
	res, err := img.checkLocked(mode)
	if err != nil || (res.CorruptionsFixed == 0 && res.LeaksFixed == 0) {
		return res, err
	}
	// qemu-img check: report the state of the repaired image.
	again, err := img.checkLocked(RepairNone)
	if err != nil {
		return res, err
	}
	again.CorruptionsFixed, again.LeaksFixed = res.CorruptionsFixed, res.LeaksFixed
	again.Messages = append(res.Messages, again.Messages...)
	return again, nil
}

// checkState is one pass of the check: the computed references (the
// in-memory refcount table, qemu's IMRT), and what was found.
type checkState struct {
	img     *Image
	res     *CheckResult
	counts  *refCounts
	fileLen int64
	// rebuild: the refcount structures themselves are broken.
	rebuild bool
	// maxRef is the largest refcount the image's refcount width holds.
	maxRef uint64
	// blockOutside: a refcount block lies past the end of the file.
	// qemu only reports it, except under -r all, where it grows the file
	// to reach the block; a rebuild gives the same result without a file
	// of that size (and an offset up to bit 63 leaves no other way).
	blockOutside bool
	// badRefs: references to space outside the file, fixable by zeroing.
	badRefs int
	// disk reads the on-disk refcounts through the raw reftable.
	disk *diskRefcounts
}

func (img *Image) checkLocked(mode RepairMode) (*CheckResult, error) {
	res := &CheckResult{TotalClusters: (img.size + img.clusterSize - 1) >> img.clusterBits}
	for _, b := range img.bms.list {
		if b.inconsistent {
			res.InconsistentBitmaps = append(res.InconsistentBitmaps, b.name)
		}
	}
	if mode.fixErrors() {
		fixed, err := img.zeroOutOfFileRefs(res)
		if err != nil {
			res.CheckErrors++
			return res, err
		}
		res.CorruptionsFixed += fixed
	}
	st, err := img.calculateRefcounts(res)
	if err != nil {
		return res, err
	}
	pre := *res
	pre.Messages = append([]string(nil), res.Messages...)
	highest := st.compare(RepairNone)
	if st.blockOutside && mode.fixErrors() {
		st.rebuild = true
	}
	switch {
	case st.rebuild && mode.fixErrors():
		old := *res
		res.msg("Rebuilding refcount structure")
		end := max(int64(len(st.counts.small)), (st.fileLen+img.clusterSize-1)>>img.clusterBits)
		if err := img.rebuildRefcountStructure(st.counts, end, placeFirstFit); err != nil {
			res.CheckErrors++
			res.msg("ERROR %v", err)
			return res, err
		}
		// The old structures are now leaked; a fresh pass frees them.
		st2, err := img.calculateRefcounts(&CheckResult{})
		if err != nil {
			return res, err
		}
		if st2.rebuild {
			res.msg("ERROR rebuilt refcount structure is still broken")
		}
		fresh := &CheckResult{}
		st2.res = fresh
		highest = st2.compare(RepairLeaks)
		res.Messages = append(res.Messages, fresh.Messages...)
		res.Corruptions, res.Leaks = fresh.Corruptions, 0
		if res.Corruptions < old.Corruptions {
			res.CorruptionsFixed += old.Corruptions - res.Corruptions
		}
		if old.Leaks > 0 {
			res.LeaksFixed += old.Leaks
		}
		res.Leaks += fresh.Leaks
		st = st2
		st.res = res
	case mode != RepairNone:
		if st.rebuild {
			res.msg("ERROR need to rebuild refcount structures")
			res.CheckErrors++
			return res, nil
		}
		if res.Leaks != 0 || res.Corruptions != 0 {
			*res = pre
			highest = st.compare(mode)
		}
	}
	if err := st.checkCopied(mode); err != nil {
		return res, err
	}
	res.ImageEndOffset = (highest + 1) << img.clusterBits
	if mode != RepairNone && res.CheckErrors == 0 && res.Corruptions == 0 {
		if err := img.markCleanAndConsistent(); err != nil {
			return res, err
		}
	}
	return res, nil
}

// calculateRefcounts builds the in-memory refcount table from every
// reference (qemu's calculate_refcounts), counting what is wrong on the way.
func (img *Image) calculateRefcounts(res *CheckResult) (*checkState, error) {
	fi, err := img.f.Stat()
	if err != nil {
		res.CheckErrors++
		return nil, ioErr("stat", err)
	}
	st := &checkState{img: img, res: res, fileLen: fi.Size(), maxRef: img.maxRefcount(),
		counts: &refCounts{small: make([]uint16, (fi.Size()+img.clusterSize-1)>>img.clusterBits)}}
	cs := img.clusterSize
	var nextContiguous int64
	lastL1 := int64(-1)
	err = img.walkReferences(walkOptions{Bad: func(where string, err error) {
		res.Corruptions++
		st.badRefs++
		res.msg("ERROR %v", err)
	}}, func(r reference) error {
		switch r.Kind {
		case refL2:
			if rb := l1Entry(r.Entry).reserved(); rb != 0 {
				res.Corruptions++
				res.msg("ERROR found L1 entry with reserved bits set: %x", r.Entry)
			}
		case refData:
			if uint64(r.Entry)&l2StdReservedMask != 0 {
				res.Corruptions++
				res.msg("ERROR found l2 entry with reserved bits set: %x", r.Entry)
			}
		case refCompressed:
			if l2Entry(r.Entry).copied() {
				res.Corruptions++
				res.msg("ERROR: coffset=0x%x: copied flag must never be set for compressed clusters", r.Off)
			}
		}
		if r.Snapshot == -1 && (r.Kind == refData || r.Kind == refCompressed) {
			// qemu's CHECK_FRAG_INFO: per L2 table, a cluster not
			// following its predecessor on disk is fragmented.
			if r.L1Index != lastL1 {
				lastL1, nextContiguous = r.L1Index, 0
			}
			res.AllocatedClusters++
			if r.Kind == refCompressed {
				res.CompressedClusters++
				res.FragmentedClusters++
			} else {
				if nextContiguous != 0 && r.Off != nextContiguous {
					res.FragmentedClusters++
				}
				nextContiguous = r.Off + cs
			}
		}
		st.inc(r.Off, r.Len)
		return nil
	})
	if err != nil {
		res.CheckErrors++
		res.msg("ERROR %v", err)
		return st, err
	}
	h := img.hdr
	st.inc(int64(h.RefcountTableOffset), int64(h.RefcountTableClusters)<<img.clusterBits)
	if err := st.checkRefblocks(); err != nil {
		return st, err
	}
	return st, nil
}

// inc is qemu's qcow2_inc_refcounts_imrt: a reference reaching a cluster or
// more past the end of the file is a corruption and is not counted.
func (st *checkState) inc(off, n int64) {
	if n <= 0 {
		return
	}
	cs := st.img.clusterSize
	if off < 0 || off+n-st.fileLen >= cs {
		st.res.Corruptions++
		st.res.msg("ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x%x size 0x%x", off, n)
		return
	}
	// Most references are one aligned cluster whose count is far from
	// any limit: count those without the general loop's checks.
	if n == cs && off&(cs-1) == 0 {
		if ci := off >> st.img.clusterBits; ci < int64(len(st.counts.small)) && st.counts.small[ci] < 0xfffe &&
			uint64(st.counts.small[ci]) < st.maxRef-1 {
			st.counts.small[ci]++
			return
		}
	}
	max := st.maxRef
	for ci := off >> st.img.clusterBits; ci <= (off+n-1)>>st.img.clusterBits; ci++ {
		if st.counts.get(ci) >= max {
			st.res.Corruptions++
			st.res.msg("ERROR: overflow cluster offset=0x%x", ci<<st.img.clusterBits)
			continue
		}
		st.counts.add(ci)
	}
}

// checkRefblocks reads the refcount table as it is on disk (not as the
// core validated it at open) and counts each refcount block, flagging
// entries that make the structure unusable (qemu's check_refblocks).
func (st *checkState) checkRefblocks() error {
	img, res := st.img, st.res
	h := img.hdr
	raw := make([]byte, int64(h.RefcountTableClusters)<<img.clusterBits)
	if _, err := img.f.ReadAt(raw, int64(h.RefcountTableOffset)); err != nil && err != io.EOF {
		res.CheckErrors++
		return ioErr("read refcount table", err)
	}
	nbClusters := (st.fileLen + img.clusterSize - 1) >> img.clusterBits
	st.disk = &diskRefcounts{img: img, blocks: map[int64][]byte{}}
	for i := int64(0); i < int64(len(raw))/8; i++ {
		e := binary.BigEndian.Uint64(raw[i*8:])
		st.disk.table = append(st.disk.table, e)
		// Unsigned: the offset bits reach bit 63 (hostOffset).
		off := refTableEntry(e).rawOffset()
		switch {
		case e&refTableReservedMask != 0:
			res.Corruptions++
			res.msg("ERROR refcount table entry %d has reserved bits set", i)
			st.rebuild = true
			continue
		case off%uint64(img.clusterSize) != 0:
			res.Corruptions++
			res.msg("ERROR refcount block %d is not cluster aligned; refcount table entry corrupted", i)
			st.rebuild = true
			continue
		case off>>img.clusterBits >= uint64(nbClusters):
			res.Corruptions++
			res.msg("ERROR refcount block %d is outside image", i)
			st.blockOutside = true
			continue
		case off == 0:
			continue
		}
		st.inc(int64(off), img.clusterSize)
		if n := st.counts.get(int64(off) >> img.clusterBits); n != 1 {
			res.Corruptions++
			res.msg("ERROR refcount block %d refcount=%d", i, n)
			st.rebuild = true
		}
	}
	return nil
}

// diskRefcounts reads refcounts through the on-disk reftable as qemu's
// qcow2_get_refcount does: no block means 0, a block past the end of the
// file reads as zeroes, a misaligned block is an error.
type diskRefcounts struct {
	img    *Image
	table  []uint64
	blocks map[int64][]byte
	// lastBi/last is the block the previous get read: callers walk
	// clusters in order, so most gets need no map lookup.
	lastBi int64
	last   []byte
}

func (d *diskRefcounts) get(ci int64) (uint64, error) {
	img := d.img
	bi := ci >> img.refBlockBits
	if d.last != nil && bi == d.lastBi {
		return getRefEntry(d.last, img.refOrder, ci&(img.refBlockEnts-1)), nil
	}
	if bi >= int64(len(d.table)) {
		return 0, nil
	}
	raw := refTableEntry(d.table[bi]).rawOffset()
	if raw == 0 {
		return 0, nil
	}
	if raw%uint64(img.clusterSize) != 0 {
		return 0, fmt.Errorf("refblock offset %#x unaligned (reftable index: %#x)", raw, bi)
	}
	// Past the end of the file a block reads as zeroes, but no file
	// offset reaches beyond int64 (qemu's read fails there too).
	if raw > math.MaxInt64-uint64(img.clusterSize) {
		return 0, fmt.Errorf("refblock offset %#x is beyond any file offset (reftable index: %#x)", raw, bi)
	}
	off := int64(raw)
	b, ok := d.blocks[bi]
	if !ok {
		b = make([]byte, img.clusterSize)
		if _, err := img.f.ReadAt(b, off); err != nil && err != io.EOF {
			return 0, ioErr("read refcount block", err)
		}
		d.blocks[bi] = b
	}
	d.lastBi, d.last = bi, b
	return getRefEntry(b, img.refOrder, ci&(img.refBlockEnts-1)), nil
}

// compare is qemu's compare_refcounts: every cluster's on-disk refcount
// against its references. It returns the highest cluster in use.
func (st *checkState) compare(mode RepairMode) int64 {
	img, res := st.img, st.res
	nb := max(int64(len(st.counts.small)), (st.fileLen+img.clusterSize-1)>>img.clusterBits)
	var highest int64
	repaired := false
	for ci := int64(0); ci < nb; ci++ {
		rc1, err := st.disk.get(ci)
		if err != nil {
			res.CheckErrors++
			res.msg("Can't get refcount for cluster %d: %v", ci, err)
			continue
		}
		rc2 := st.counts.get(ci)
		if rc1 > 0 || rc2 > 0 {
			highest = ci
		}
		if rc1 == rc2 {
			continue
		}
		var fixed *int64
		switch {
		case rc1 == 0:
			st.rebuild = true
		case rc1 > rc2 && mode.fixLeaks():
			fixed = &res.LeaksFixed
		case rc1 < rc2 && mode.fixErrors():
			fixed = &res.CorruptionsFixed
		}
		word := "Leaked"
		switch {
		case fixed != nil:
			word = "Repairing"
		case rc1 < rc2:
			word = "ERROR"
		}
		res.msg("%s cluster %d refcount=%d reference=%d", word, ci, rc1, rc2)
		if fixed != nil {
			if _, err := img.addRefcount(ci, int64(rc2)-int64(rc1)); err == nil {
				*fixed++
				repaired = true
				continue
			} else {
				res.msg("ERROR could not update refcount of cluster %d: %v", ci, err)
			}
		}
		if rc1 < rc2 {
			res.Corruptions++
		} else {
			res.Leaks++
		}
	}
	if repaired {
		if err := img.syncRefcounts(true); err != nil {
			res.CheckErrors++
			res.msg("ERROR writing refcounts: %v", err)
		}
		// Later reads must see the repaired values.
		st.disk.blocks, st.disk.last = map[int64][]byte{}, nil
	}
	return highest
}

// checkCopied is qemu's check_oflag_copied over the active L1 and L2
// tables: COPIED must be set exactly when the refcount is one.
func (st *checkState) checkCopied(mode RepairMode) error {
	img, res := st.img, st.res
	repair := mode.fixErrors() || (mode.fixLeaks() && res.CheckErrors == 0 && res.Corruptions == 0 && res.Leaks == 0)
	refcount := func(off int64) (uint64, bool) {
		v, err := st.disk.get(off >> img.clusterBits)
		return v, err == nil
	}
	type l2fix struct{ i2, e int64 }
	l2Fixes := map[int64][]l2fix{} // L2 table offset -> entries to rewrite
	var l2Order []int64
	// Only the active tables carry meaningful COPIED flags, so this pass
	// reads just those (qemu's check_oflag_copied), not the snapshots'.
	cs := img.clusterSize
	tbl := make([]byte, cs)
	for i1, e := range img.l1 {
		o := e.offset()
		if o == 0 || o%cs != 0 || o+cs > st.fileLen {
			continue // reported by the reference pass
		}
		if rc, ok := refcount(o); ok && (rc == 1) != e.copied() {
			res.msg("%s OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%x refcount=%d", repairWord(repair), i1, uint64(e), rc)
			if !repair {
				res.Corruptions++
			} else {
				ne := l1Entry(uint64(e) &^ oflagCopied)
				if rc == 1 {
					ne |= l1Entry(oflagCopied)
				}
				if err := img.writeL1Entry(int64(i1), ne); err != nil {
					res.CheckErrors++
					return err
				}
				res.CorruptionsFixed++
			}
		}
		if err := img.readL2TableInto(tbl, o); err != nil {
			res.CheckErrors++
			res.msg("ERROR: Could not read L2 table: %v", err)
			return err
		}
		for i2 := int64(0); i2 < img.l2Entries; i2++ {
			le, _, _ := img.decodeL2(tbl, i2, o)
			d := le.offset()
			if le.compressed() || d == 0 {
				continue
			}
			rc, ok := refcount(d)
			if !ok || (rc == 1) == le.copied() {
				continue
			}
			res.msg("%s OFLAG_COPIED data cluster: l2_entry=%x refcount=%d", repairWord(repair), uint64(le), rc)
			if !repair {
				res.Corruptions++
				continue
			}
			ne := int64(uint64(le) &^ oflagCopied)
			if rc == 1 {
				ne = int64(uint64(le) | oflagCopied)
			}
			if _, ok := l2Fixes[o]; !ok {
				l2Order = append(l2Order, o)
			}
			l2Fixes[o] = append(l2Fixes[o], l2fix{i2, ne})
		}
	}
	for _, l2 := range l2Order {
		n, err := img.patchL2Entries(l2, func(tbl []byte) int {
			for _, f := range l2Fixes[l2] {
				binary.BigEndian.PutUint64(tbl[f.i2<<img.l2EntryShift:], uint64(f.e))
			}
			return len(l2Fixes[l2])
		})
		if err != nil {
			res.CheckErrors++
			res.msg("ERROR: Could not write L2 table: %v", err)
			return err
		}
		res.CorruptionsFixed += int64(n)
	}
	if len(l2Order) > 0 || repair {
		return img.fsync()
	}
	return nil
}

func repairWord(repair bool) string {
	if repair {
		return "Repairing"
	}
	return "ERROR"
}

// patchL2Entries rewrites one L2 table on disk through fn (which returns how
// many entries it changed) and drops its cached slices. mu held.
func (img *Image) patchL2Entries(l2 int64, fn func(tbl []byte) int) (int, error) {
	tbl, err := img.readL2Table(l2)
	if err != nil {
		return 0, err
	}
	n := fn(tbl)
	if n == 0 {
		return 0, nil
	}
	if err := img.checkOverlap(l2, img.clusterSize, metaL2); err != nil {
		return 0, err
	}
	if _, err := img.f.WriteAt(tbl, l2); err != nil {
		return 0, ioErr("write L2 table", err)
	}
	img.l2Cache.dropRange(l2, img.clusterSize)
	img.metaUnsynced = true
	return n, nil
}

// zeroOutOfFileRefs repairs references to space past the end of the file
// (qemu reports them and cannot fix them): such clusters read as zeroes,
// so a zero cluster (v3) or, without a backing file, an unallocated one
// (v2) keeps every readable byte. An L1 entry whose L2 table lies past the
// end is cleared: its whole range already read as unallocated.
func (img *Image) zeroOutOfFileRefs(res *CheckResult) (int64, error) {
	fi, err := img.f.Stat()
	if err != nil {
		return 0, ioErr("stat", err)
	}
	fileLen, cs := fi.Size(), img.clusterSize
	outside := func(off, n int64) bool { return off+n-fileLen >= cs }
	var zero uint64
	switch {
	case img.hdr.Version >= 3 && !img.extL2:
		zero = oflagZero
	case img.hdr.Version >= 3 && img.extL2, img.hdr.BackingFile == "":
		zero = 0
	default:
		return 0, nil // v2 over a backing file: nothing keeps the bytes
	}
	var fixed int64
	fixL1 := func(l1 []l1Entry, write func(i int64, e l1Entry) error) error {
		for i, e := range l1 {
			o := e.offset()
			if o == 0 {
				continue
			}
			if o%cs != 0 || outside(o, cs) {
				if o%cs == 0 {
					res.msg("Repairing L1 entry %d: L2 table at 0x%x is outside the file", i, o)
					if err := write(int64(i), 0); err != nil {
						return err
					}
					fixed++
				}
				continue
			}
			n, err := img.patchL2Entries(o, func(tbl []byte) int {
				changed := 0
				for i2 := int64(0); i2 < img.l2Entries; i2++ {
					at := i2 << img.l2EntryShift
					le := l2Entry(binary.BigEndian.Uint64(tbl[at:]))
					var off, n int64
					switch {
					case le.compressed():
						off, n = le.compressedRange(img.clusterBits)
					case le.offset() != 0:
						off, n = le.offset(), cs
					default:
						continue
					}
					if !outside(off, n) {
						continue
					}
					res.msg("Repairing L2 entry %d of the table at 0x%x: data at 0x%x is outside the file", i2, o, off)
					binary.BigEndian.PutUint64(tbl[at:], zero)
					if img.extL2 {
						binary.BigEndian.PutUint64(tbl[at+8:], l2BitmapAllZero)
					}
					changed++
				}
				return changed
			})
			if err != nil {
				return err
			}
			fixed += int64(n)
		}
		return nil
	}
	if err := fixL1(img.l1, img.writeL1Entry); err != nil {
		return fixed, err
	}
	for si := range img.snapshots {
		s := &img.snapshots[si]
		l1, err := img.readL1Table(int64(s.L1TableOffset), s.L1Size)
		if err != nil {
			continue
		}
		if err := fixL1(l1, func(i int64, e l1Entry) error {
			var b [8]byte
			binary.BigEndian.PutUint64(b[:], uint64(e))
			off := int64(s.L1TableOffset) + i*8
			if err := img.checkOverlap(off, 8, metaInactiveL1); err != nil {
				return err
			}
			_, err := img.f.WriteAt(b[:], off)
			return ioErr("write snapshot L1 entry", err)
		}); err != nil {
			return fixed, err
		}
	}
	if fixed > 0 {
		if err := img.fsync(); err != nil {
			return fixed, err
		}
	}
	return fixed, nil
}

// markCleanAndConsistent clears the dirty and corrupt bits after a repair
// that left no corruption (qemu's qcow2_mark_clean + mark_consistent).
func (img *Image) markCleanAndConsistent() error {
	h := img.hdr
	if h.Incompatible&(IncompatDirty|IncompatCorrupt) == 0 {
		return nil
	}
	h.Incompatible &^= IncompatDirty | IncompatCorrupt
	img.corrupt = false
	if err := img.writeHeader(); err != nil {
		return err
	}
	return img.fsync()
}

// OpenForCheck opens an image for Check the way qemu-img check does: the
// damage Check reports (refcount table entries pointing nowhere, L2 tables
// past the end of the file, the corrupt bit) does not stop the open, and a
// dirty lazy-refcounts image is not repaired behind the check's back.
// opts.ReadOnly must be false to repair.
func OpenForCheck(path string, opts OpenOptions) (*Image, error) {
	opts.checking = true
	return Open(path, opts)
}
