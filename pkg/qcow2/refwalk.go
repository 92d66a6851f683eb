package qcow2

import (
	"encoding/binary"
	"fmt"
)

// refKind says what kind of structure a reference found by walkReferences
// belongs to.
type refKind uint8

const (
	refHeader refKind = iota + 1
	refActiveL1
	refL2
	refData
	refCompressed
	refSnapshotTable
	refInactiveL1
	refBitmapDir
	refBitmapTable
	refBitmapData
	refRefTable
	refRefBlock
	refCryptoHeader
)

// reference is one use of host space. A host cluster's refcount must equal
// the number of references covering it (a compressed range counts once for
// every cluster it touches).
type reference struct {
	Off, Len int64
	Kind     refKind
	// Snapshot is the index of the snapshot whose L1 led here, or -1 for
	// the active L1 (and for structures not reached through an L1).
	Snapshot int
	// L1Index/L2Index locate the entry that points here (L2 tables and
	// data clusters), Entry is that raw entry (the check code uses it to
	// verify COPIED flags of the active tables).
	L1Index, L2Index int64
	Entry            uint64
}

// walkOptions selects what walkReferences reports.
type walkOptions struct {
	// RefcountStructures also reports the refcount table and blocks.
	RefcountStructures bool
	// Bad receives entries that cannot be followed (misaligned or outside
	// the file); when nil the walk stops with the error instead.
	Bad func(where string, err error)
}

// walkReferences calls fn for every reference to host space: the header,
// the active L1 table, every L2 table and data cluster reached from the
// active L1 and from every snapshot's L1, the snapshot table, the bitmap
// directory, bitmap tables and bitmap data, and optionally the refcount
// structures. L2 tables are read through the cache so unflushed updates
// count. mu held. Check (check.go) and the refcount rebuild
// (refrebuild.go) build on this.
func (img *Image) walkReferences(opt walkOptions, fn func(r reference) error) error {
	bad := func(where string, err error) error {
		if opt.Bad != nil {
			opt.Bad(where, err)
			return nil
		}
		return err
	}
	inFile := func(off, n int64) bool { return off > 0 && off+n <= img.fileEnd && off+n > off }
	// One buffer for every L2 table: nothing keeps a table past its loop.
	tbl := make([]byte, img.clusterSize)

	if err := fn(reference{Off: 0, Len: img.clusterSize, Kind: refHeader, Snapshot: -1}); err != nil {
		return err
	}
	walkL1 := func(l1 []l1Entry, snap int) error {
		for i1, e := range l1 {
			o := e.offset()
			if o == 0 {
				continue
			}
			where := func() string { return fmt.Sprintf("L1[%d] of %s", i1, snapName(snap)) }
			if o%img.clusterSize != 0 || !inFile(o, img.clusterSize) {
				if err := bad(where(), corruptf(where(), -1, "L2 table offset %#x is misaligned or outside the file", o)); err != nil {
					return err
				}
				continue
			}
			if err := fn(reference{Off: o, Len: img.clusterSize, Kind: refL2, Snapshot: snap, L1Index: int64(i1), L2Index: -1, Entry: uint64(e)}); err != nil {
				return err
			}
			if err := img.readL2TableInto(tbl, o); err != nil {
				return err
			}
			if err := img.walkL2Table(tbl, snap, int64(i1), where, bad, fn); err != nil {
				return err
			}
		}
		return nil
	}
	h := img.hdr
	if h.L1Size > 0 {
		if err := fn(reference{Off: int64(h.L1TableOffset), Len: int64(h.L1Size) * 8, Kind: refActiveL1, Snapshot: -1}); err != nil {
			return err
		}
	}
	if err := walkL1(img.l1, -1); err != nil {
		return err
	}
	if len(img.snapshots) > 0 {
		n := int64(len(encodeSnapshotTable(img.snapshots)))
		if err := fn(reference{Off: int64(h.SnapshotsOffset), Len: n, Kind: refSnapshotTable, Snapshot: -1}); err != nil {
			return err
		}
	}
	for si, s := range img.snapshots {
		if s.L1Size == 0 {
			continue
		}
		if err := fn(reference{Off: int64(s.L1TableOffset), Len: int64(s.L1Size) * 8, Kind: refInactiveL1, Snapshot: si}); err != nil {
			return err
		}
		l1, err := img.readL1Table(int64(s.L1TableOffset), s.L1Size)
		if err != nil {
			return err
		}
		if err := walkL1(l1, si); err != nil {
			return err
		}
	}
	if b := h.Bitmaps; b != nil && b.NbBitmaps > 0 {
		if err := fn(reference{Off: int64(b.DirOffset), Len: int64(b.DirSize), Kind: refBitmapDir, Snapshot: -1}); err != nil {
			return err
		}
	}
	for bi, b := range img.bitmapDir {
		if b.TableSize == 0 {
			continue
		}
		if err := fn(reference{Off: int64(b.TableOffset), Len: int64(b.TableSize) * 8, Kind: refBitmapTable, Snapshot: -1, L1Index: int64(bi)}); err != nil {
			return err
		}
		buf := make([]byte, int64(b.TableSize)*8)
		if _, err := img.f.ReadAt(buf, int64(b.TableOffset)); err != nil {
			return ioErr("read bitmap table", err)
		}
		for i := int64(0); i < int64(b.TableSize); i++ {
			e := binary.BigEndian.Uint64(buf[i*8:])
			o := int64(e & offsetMask)
			if o == 0 {
				continue
			}
			if o%img.clusterSize != 0 || !inFile(o, img.clusterSize) {
				where := fmt.Sprintf("bitmap %q table[%d]", b.Name, i)
				if err := bad(where, corruptf(where, -1, "data offset %#x is misaligned or outside the file", o)); err != nil {
					return err
				}
				continue
			}
			if err := fn(reference{Off: o, Len: img.clusterSize, Kind: refBitmapData, Snapshot: -1, L1Index: int64(bi), L2Index: i, Entry: e}); err != nil {
				return err
			}
		}
	}
	if c := h.Crypto; c != nil {
		if err := fn(reference{Off: int64(c.Offset), Len: int64(c.Length), Kind: refCryptoHeader, Snapshot: -1}); err != nil {
			return err
		}
	}
	if opt.RefcountStructures {
		if err := fn(reference{Off: int64(h.RefcountTableOffset), Len: int64(h.RefcountTableClusters) << img.clusterBits, Kind: refRefTable, Snapshot: -1}); err != nil {
			return err
		}
		for i, e := range img.refTable {
			if o := e.offset(); o != 0 {
				if err := fn(reference{Off: o, Len: img.clusterSize, Kind: refRefBlock, Snapshot: -1, L1Index: int64(i)}); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// walkL2Table is walkReferences over the entries of one L2 table (tbl,
// pointed to by entry i1 of the L1 table of snapshot snap): the hot loop of
// check and rebuild, with the image's geometry in locals.
func (img *Image) walkL2Table(tbl []byte, snap int, i1 int64, where func() string, bad func(string, error) error, fn func(r reference) error) error {
	n, shift, cs, bits, end := img.l2Entries, img.l2EntryShift, img.clusterSize, img.clusterBits, img.fileEnd
	for i2 := int64(0); i2 < n; i2++ {
		// The entry alone: an extended L2 bitmap refers to no host space.
		le := l2Entry(binary.BigEndian.Uint64(tbl[i2<<shift:]))
		if le == 0 {
			continue
		}
		r := reference{Snapshot: snap, L1Index: i1, L2Index: i2, Entry: uint64(le)}
		if le.compressed() {
			r.Off, r.Len = le.compressedRange(bits)
			r.Kind = refCompressed
			if r.Off <= 0 || r.Off >= end {
				if err := bad(where(), corruptf(fmt.Sprintf("L2[%d] of %s", i2, where()), -1, "compressed data offset %#x outside the file", r.Off)); err != nil {
					return err
				}
				continue
			}
		} else {
			r.Off, r.Len, r.Kind = le.offset(), cs, refData
			if r.Off == 0 {
				continue
			}
			if r.Off&(cs-1) != 0 || r.Off < 0 || r.Off > end-cs {
				if err := bad(where(), corruptf(fmt.Sprintf("L2[%d] of %s", i2, where()), -1, "data offset %#x is misaligned or outside the file", r.Off)); err != nil {
					return err
				}
				continue
			}
		}
		if err := fn(r); err != nil {
			return err
		}
	}
	return nil
}

func snapName(i int) string {
	if i < 0 {
		return "the active L1 table"
	}
	return fmt.Sprintf("snapshot %d", i)
}

// readL2Table returns a whole L2 table, with unflushed cached slices. mu held.
func (img *Image) readL2Table(off int64) ([]byte, error) {
	buf := make([]byte, img.clusterSize)
	return buf, img.readL2TableInto(buf, off)
}

// readL2TableInto is readL2Table into buf (one cluster long). mu held.
func (img *Image) readL2TableInto(buf []byte, off int64) error {
	if _, err := img.f.ReadAt(buf, off); err != nil {
		return ioErr(fmt.Sprintf("read L2 table at %#x", off), err)
	}
	for s := int64(0); s < img.clusterSize; s += img.sliceSize {
		if c := img.l2Cache.get(off + s); c != nil {
			copy(buf[s:], c.buf)
		}
	}
	return nil
}

// readL1Table reads an (inactive) L1 table of n entries at off.
func (img *Image) readL1Table(off int64, n uint32) ([]l1Entry, error) {
	buf := make([]byte, int64(n)*8)
	if _, err := img.f.ReadAt(buf, off); err != nil {
		return nil, ioErr(fmt.Sprintf("read L1 table at %#x", off), err)
	}
	l1 := make([]l1Entry, n)
	for i := range l1 {
		l1[i] = l1Entry(binary.BigEndian.Uint64(buf[i*8:]))
	}
	return l1, nil
}

// refCounts is a refcount per host cluster, computed from references.
// Counts above 65535 (rare) spill into a map so memory stays 2 bytes per
// cluster.
type refCounts struct {
	small []uint16
	big   map[int64]uint64
}

func (c *refCounts) add(ci int64) {
	for int64(len(c.small)) <= ci {
		c.small = append(c.small, make([]uint16, max(ci+1-int64(len(c.small)), int64(len(c.small))))...)
	}
	if c.small[ci] == 0xffff {
		if c.big == nil {
			c.big = map[int64]uint64{}
		}
		c.big[ci]++
		return
	}
	c.small[ci]++
}

func (c *refCounts) get(ci int64) uint64 {
	if ci >= int64(len(c.small)) {
		return 0
	}
	if c.big == nil { // the common case: no count above 65535
		return uint64(c.small[ci])
	}
	return uint64(c.small[ci]) + c.big[ci]
}

// reset forgets the count of cluster ci.
func (c *refCounts) reset(ci int64) {
	if ci < int64(len(c.small)) {
		c.small[ci] = 0
	}
	delete(c.big, ci)
}

// firstAbove returns the first cluster whose count exceeds limit, and that
// count; 0, 0 when none does.
func (c *refCounts) firstAbove(limit uint64) (int64, uint64) {
	if limit >= 0xffff && len(c.big) == 0 {
		return 0, 0
	}
	for ci := range c.small {
		if v := c.get(int64(ci)); v > limit {
			return int64(ci), v
		}
	}
	return 0, 0
}

func (c *refCounts) addRange(off, n, clusterBits int64) {
	for ci := off >> clusterBits; ci <= (off+n-1)>>clusterBits; ci++ {
		c.add(ci)
	}
}

// countReferences computes every cluster's expected refcount, leaving out
// the refcount structures themselves. mu held.
func (img *Image) countReferences(bad func(string, error)) (*refCounts, error) {
	c := &refCounts{small: make([]uint16, img.fileEnd>>img.clusterBits)}
	err := img.walkReferences(walkOptions{Bad: bad}, func(r reference) error {
		c.addRange(r.Off, r.Len, int64(img.clusterBits))
		return nil
	})
	return c, err
}
