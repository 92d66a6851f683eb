package qcow2

import (
	"encoding/binary"
	"fmt"
)

// rebuildRefcountStructure writes a new refcount table and new refcount
// blocks from the computed counts, then points the header at them (qemu's
// rebuild_refcount_structure). Allocation uses the counts themselves (the
// in-memory refcount table) and takes the first free clusters that fit:
// refblocks fill holes, and the reftable goes into the first gap large
// enough, so an image on a block device (whose end cannot move) can be
// repaired; only when no gap fits does anything land past the end of the
// file. The old structures stay counted while this runs, so nothing the
// durable header references is overwritten before the switch; afterwards
// they are leaks that the following pass frees. mu held.
func (st *checkState) rebuildRefcountStructure() error {
	img := st.img
	cs := img.clusterSize
	var reftable []uint64
	firstFree := int64(0)

	// alloc finds n contiguous clusters with no references at or after
	// *from, past the end of the counted area if need be, and counts them.
	alloc := func(n int64, from *int64) int64 {
		ci, run, first := *from, int64(0), true
		for run < n {
			if st.counts.get(ci) == 0 {
				if first {
					*from, first = ci, false
				}
				run++
			} else {
				run = 0
			}
			ci++
		}
		start := ci - n
		for c := start; c < ci; c++ {
			st.counts.add(c)
		}
		return start
	}

	// writeRefblocks writes the block of every cluster in [first, end)
	// that is in use, allocating blocks not allocated yet. It reports
	// whether the reftable had to grow.
	writeRefblocks := func(first, end int64) (bool, error) {
		grown := false
		for ci := first; ci < end; ci++ {
			if st.counts.get(ci) == 0 {
				continue
			}
			bi := ci >> img.refBlockBits
			start := bi << img.refBlockBits
			var off int64
			if bi < int64(len(reftable)) && reftable[bi] != 0 {
				off = int64(reftable[bi])
			} else {
				// Never put a block inside a range whose block is
				// already written: it would not count itself.
				firstFree = max(firstFree, start)
				bc := alloc(1, &firstFree)
				if bc >= end {
					end = bc + 1 // the block's own refcount must be written
				}
				off = bc << img.clusterBits
				if bi >= int64(len(reftable)) {
					n := ((bi+1)*8 + cs - 1) / cs * cs / 8
					reftable = append(reftable, make([]uint64, n-int64(len(reftable)))...)
					grown = true
				}
				reftable[bi] = uint64(off)
			}
			buf := make([]byte, cs)
			maxRef := img.maxRefcount()
			for j := int64(0); j < img.refBlockEnts; j++ {
				v := st.counts.get(start + j)
				if v > maxRef {
					return false, fmt.Errorf("%w: cluster %d needs refcount %d, more than %d-bit refcounts hold", ErrUnsupported, start+j, v, img.refBits)
				}
				if v != 0 {
					setRefEntry(buf, img.refOrder, j, v)
				}
			}
			if _, err := img.f.WriteAt(buf, off); err != nil {
				return false, ioErr("write refcount block", err)
			}
			ci = start + img.refBlockEnts - 1
		}
		return grown, nil
	}

	nb := max(int64(len(st.counts.small)), (st.fileLen+cs-1)>>img.clusterBits)
	if _, err := writeRefblocks(0, nb); err != nil {
		return err
	}
	if len(reftable) == 0 {
		return fmt.Errorf("qcow2: internal: refcount rebuild found no cluster in use")
	}
	var tblOff, tblClusters int64
	for {
		tblClusters = (int64(len(reftable))*8 + cs - 1) / cs
		if tblClusters*cs > maxRefcountTableBytes {
			return fmt.Errorf("%w: refcount table would exceed %d bytes", ErrUnsupported, maxRefcountTableBytes)
		}
		from := int64(0)
		start := alloc(tblClusters, &from)
		tblOff = start << img.clusterBits
		grown, err := writeRefblocks(start, start+tblClusters)
		if err != nil {
			return err
		}
		if !grown {
			break
		}
		// The table outgrew its slot: that slot stays counted (a leak the
		// next pass frees) and a bigger one is found.
	}
	tb := make([]byte, tblClusters*cs)
	for i, e := range reftable {
		binary.BigEndian.PutUint64(tb[i*8:], e)
	}
	if _, err := img.f.WriteAt(tb, tblOff); err != nil {
		return ioErr("write refcount table", err)
	}
	if err := img.fsync(); err != nil {
		return err
	}
	var hb [12]byte
	binary.BigEndian.PutUint64(hb[:], uint64(tblOff))
	binary.BigEndian.PutUint32(hb[8:], uint32(tblClusters))
	if _, err := img.f.WriteAt(hb[:], hdrRefcountTableOffset); err != nil {
		return ioErr("write header", err)
	}
	if err := img.fsync(); err != nil {
		return err
	}
	img.hdr.RefcountTableOffset = uint64(tblOff)
	img.hdr.RefcountTableClusters = uint32(tblClusters)
	img.refTable = make([]refTableEntry, len(reftable))
	for i, e := range reftable {
		img.refTable[i] = refTableEntry(e)
	}
	img.rcCache.clear()
	img.freeHint = 1
	fi, err := img.f.Stat()
	if err != nil {
		return ioErr("stat", err)
	}
	img.fileEnd = max(img.fileEnd, alignUp(fi.Size(), cs))
	img.buildMetaMap()
	return nil
}
