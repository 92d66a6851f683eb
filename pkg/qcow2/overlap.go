package qcow2

import (
	"encoding/binary"
	"fmt"
)

// metaKind names what metadata lives in a host cluster, for the overlap
// checks done before every write (qemu's overlap-check=cached set).
type metaKind uint8

const (
	metaHeader metaKind = iota + 1
	metaActiveL1
	metaL2
	metaRefTable
	metaRefBlock
	metaSnapshotTable
	metaInactiveL1
	metaBitmapDir
	metaBitmapTable
	metaCryptoHeader
)

func (k metaKind) String() string {
	switch k {
	case metaHeader:
		return "qcow2_header"
	case metaActiveL1:
		return "active L1 table"
	case metaL2:
		return "L2 table"
	case metaRefTable:
		return "refcount table"
	case metaRefBlock:
		return "refcount block"
	case metaSnapshotTable:
		return "snapshot table"
	case metaInactiveL1:
		return "inactive L1 table"
	case metaBitmapDir:
		return "bitmap directory"
	case metaBitmapTable:
		return "bitmap table"
	case metaCryptoHeader:
		return "crypto header"
	}
	return fmt.Sprintf("metadata(%d)", uint8(k))
}

// buildMetaMap indexes every metadata cluster by host cluster index. mu held
// (or the image not yet shared).
func (img *Image) buildMetaMap() {
	m := map[int64]metaKind{0: metaHeader}
	addRange := func(off, n int64, k metaKind) {
		if n <= 0 || off <= 0 {
			return
		}
		for c := off >> img.clusterBits; c <= (off+n-1)>>img.clusterBits; c++ {
			if _, ok := m[c]; !ok {
				m[c] = k
			}
		}
	}
	h := img.hdr
	addRange(int64(h.L1TableOffset), int64(h.L1Size)*8, metaActiveL1)
	addRange(int64(h.RefcountTableOffset), int64(h.RefcountTableClusters)<<img.clusterBits, metaRefTable)
	for _, e := range img.l1 {
		addRange(e.offset(), img.clusterSize, metaL2)
	}
	for _, e := range img.refTable {
		addRange(e.offset(), img.clusterSize, metaRefBlock)
	}
	if h.NbSnapshots > 0 {
		addRange(int64(h.SnapshotsOffset), int64(len(encodeSnapshotTable(img.snapshots))), metaSnapshotTable)
	}
	for _, s := range img.snapshots {
		addRange(int64(s.L1TableOffset), int64(s.L1Size)*8, metaInactiveL1)
	}
	if b := h.Bitmaps; b != nil && b.NbBitmaps > 0 {
		addRange(int64(b.DirOffset), int64(b.DirSize), metaBitmapDir)
	}
	for _, b := range img.bitmapDir {
		addRange(int64(b.TableOffset), int64(b.TableSize)*8, metaBitmapTable)
	}
	if c := h.Crypto; c != nil {
		addRange(int64(c.Offset), int64(c.Length), metaCryptoHeader)
	}
	img.metaMap = m
}

// checkOverlap refuses a write of n bytes at host offset off that would
// land on metadata other than the kind being written (allowed; 0 for data
// writes). On overlap the image is marked corrupt and becomes read-only,
// as qemu does. mu held.
func (img *Image) checkOverlap(off, n int64, allowed metaKind) error {
	if img.corrupt {
		return fmt.Errorf("%w: image is marked corrupt, refusing writes", ErrCorrupt)
	}
	for c := off >> img.clusterBits; c <= (off+n-1)>>img.clusterBits; c++ {
		k, ok := img.metaMap[c]
		if !ok || k == allowed {
			continue
		}
		err := fmt.Errorf("%w: preventing write of %d bytes at %#x: it would overwrite the %s in cluster %#x", ErrCorrupt, n, off, k, c<<img.clusterBits)
		img.markCorrupt(err)
		return err
	}
	return nil
}

// markCorrupt sets the corrupt bit on disk (best effort) and makes the
// image read-only. mu held.
func (img *Image) markCorrupt(cause error) {
	img.logger().Error("qcow2: marking image corrupt", "path", img.path, "err", cause)
	img.corrupt = true
	img.readOnly = true
	if img.hdr.Version < 3 {
		return
	}
	img.hdr.Incompatible |= IncompatCorrupt
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], img.hdr.Incompatible)
	if _, err := img.f.WriteAt(b[:], hdrIncompatible); err == nil {
		_ = img.f.Sync()
	}
}
