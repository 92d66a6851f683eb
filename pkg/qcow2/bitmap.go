package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Persistent dirty bitmaps: the bitmaps header extension, the bitmap
// directory and the bitmap tables (docs/interop/qcow2.rst, "Bitmaps
// extension"), with the limits qemu enforces (block/qcow2-bitmap.c). Images
// we write stay inside qemu's limits so qemu can always open them.
const (
	bitmapsExtLen       = 24 // nb_bitmaps u32, reserved u32, dir size u64, dir offset u64
	bitmapEntryFixedLen = 24 // fixed part of a directory entry
	maxBitmapTableSize  = 0x8000000
	maxBitmapPhysSize   = 0x20000000 // bytes of bitmap data per bitmap
	minBitmapGranBits   = 9          // 512 B
	maxBitmapGranBits   = 31         // 2 GiB

	bitmapTypeDirty = 1

	bitmapFlagInUse     = 1 << 0
	bitmapFlagAuto      = 1 << 1
	bitmapFlagExtraComp = 1 << 2
	bitmapFlagsReserved = ^uint32(bitmapFlagInUse | bitmapFlagAuto | bitmapFlagExtraComp)

	bitmapTableEntrySize     = 8
	bitmapTableEntryReserved = 0xff000000000001fe
	bitmapTableEntryOffMask  = 0x00fffffffffffe00
	bitmapTableEntryAllOnes  = 1
)

// Errors of the bitmap API. Bad bitmap metadata on disk is ErrCorrupt.
var (
	// ErrBitmapNotFound: no bitmap of that name.
	ErrBitmapNotFound = errors.New("qcow2: bitmap not found")
	// ErrBitmapExists: a bitmap of that name already exists.
	ErrBitmapExists = errors.New("qcow2: bitmap already exists")
	// ErrBitmapInconsistent: the bitmap was found in use (its writer did not
	// close the image cleanly) or carries extra data it does not allow us to
	// interpret. Its bits cannot be trusted; it can only be removed.
	ErrBitmapInconsistent = errors.New("qcow2: bitmap is inconsistent")
	// ErrBitmapInvalid: a request that breaks the bitmap rules (name,
	// granularity, size limits, merge of different sizes, v2 image).
	ErrBitmapInvalid = errors.New("qcow2: invalid bitmap request")
)

// decodeBitmapsExt parses the 24-byte extension body found at file offset
// at, with the checks qemu applies when it reads the header.
func decodeBitmapsExt(data []byte, at int64, clusterSize uint64) (*bitmapsExt, error) {
	if len(data) < bitmapsExtLen {
		return nil, corruptf("bitmaps_extension", at, "length %d is shorter than %d", len(data), bitmapsExtLen)
	}
	be := binary.BigEndian
	e := &bitmapsExt{NbBitmaps: be.Uint32(data), DirSize: be.Uint64(data[8:]), DirOffset: be.Uint64(data[16:])}
	switch r := be.Uint32(data[4:]); {
	case r != 0:
		return nil, corruptf("bitmaps_extension.reserved", at+4, "%#x is not zero", r)
	case e.NbBitmaps == 0:
		return nil, corruptf("nb_bitmaps", at, "is 0 in a bitmaps extension")
	case e.NbBitmaps > maxBitmaps:
		return nil, corruptf("nb_bitmaps", at, "%d exceeds limit %d", e.NbBitmaps, maxBitmaps)
	case e.DirSize == 0:
		return nil, corruptf("bitmap_directory_size", at+8, "is 0")
	case e.DirSize > maxBitmapDirSize:
		return nil, corruptf("bitmap_directory_size", at+8, "%d exceeds limit %d", e.DirSize, maxBitmapDirSize)
	case e.DirOffset == 0 || e.DirOffset%clusterSize != 0:
		return nil, corruptf("bitmap_directory_offset", at+16, "%#x is not a cluster-aligned offset", e.DirOffset)
	}
	return e, nil
}

func encodeBitmapsExt(e *bitmapsExt) []byte {
	b := make([]byte, bitmapsExtLen)
	binary.BigEndian.PutUint32(b, e.NbBitmaps)
	binary.BigEndian.PutUint64(b[8:], e.DirSize)
	binary.BigEndian.PutUint64(b[16:], e.DirOffset)
	return b
}

// bitmapDirEntry is one persistent dirty bitmap's directory entry. Extra
// data is kept verbatim so a bitmap we do not fully understand survives our
// directory rewrites.
type bitmapDirEntry struct {
	TableOffset     uint64
	TableSize       uint32 // entries
	Flags           uint32
	Type            uint8
	GranularityBits uint8
	Name            string
	ExtraData       []byte
}

func (e *bitmapDirEntry) inUse() bool { return e.Flags&bitmapFlagInUse != 0 }
func (e *bitmapDirEntry) auto() bool  { return e.Flags&bitmapFlagAuto != 0 }

// usable: the spec says a bitmap whose extra data we do not know (we know
// none) must not be used unless extra_data_compatible is set, only kept.
func (e *bitmapDirEntry) usable() bool {
	return len(e.ExtraData) == 0 || e.Flags&bitmapFlagExtraComp != 0
}

func bitmapEntryLen(nameLen, extraLen int) int {
	return (bitmapEntryFixedLen + nameLen + extraLen + 7) &^ 7
}

// decodeBitmapDirectory parses the n entries of the directory read from
// file offset base and checks each as qemu's check_dir_entry does (table
// offset, size and placement in the file, granularity, reserved flags,
// type, name), that the directory holds exactly n entries, that names are
// unique, and that no bitmap table overlaps the header, the directory or
// another table. Whether a table covers the whole disk is checked when the
// bitmap is loaded, which knows the disk size.
func decodeBitmapDirectory(buf []byte, n uint32, base int64, clusterBits uint32, fileSize int64) ([]bitmapDirEntry, error) {
	if n > maxBitmaps {
		return nil, corruptf("nb_bitmaps", -1, "%d exceeds limit %d", n, maxBitmaps)
	}
	be := binary.BigEndian
	cs := uint64(1) << clusterBits
	out := make([]bitmapDirEntry, 0, min(int(n), len(buf)/bitmapEntryFixedLen+1))
	names := make(map[string]int, cap(out))
	off := 0
	for off < len(buf) {
		i := len(out)
		at := base + int64(off)
		field := func(f string) string { return fmt.Sprintf("bitmap[%d].%s", i, f) }
		if i >= int(n) {
			return nil, corruptf("bitmap_directory", base, "holds more entries than nb_bitmaps %d", n)
		}
		if off+bitmapEntryFixedLen > len(buf) {
			return nil, corruptf(field("entry"), at, "runs past the end of the bitmap directory")
		}
		e := buf[off:]
		b := bitmapDirEntry{
			TableOffset:     be.Uint64(e[0:]),
			TableSize:       be.Uint32(e[8:]),
			Flags:           be.Uint32(e[12:]),
			Type:            e[16],
			GranularityBits: e[17],
		}
		nameLen := int(be.Uint16(e[18:]))
		extraLen := be.Uint32(e[20:])
		if uint64(extraLen) > uint64(len(buf)) {
			return nil, corruptf(field("extra_data_size"), at+20, "%d exceeds the bitmap directory size %d", extraLen, len(buf))
		}
		total := bitmapEntryLen(nameLen, int(extraLen))
		if off+total > len(buf) {
			return nil, corruptf(field("entry"), at, "entry of %d bytes runs past the end of the bitmap directory", total)
		}
		switch {
		case b.TableSize == 0:
			return nil, corruptf(field("bitmap_table_size"), at+8, "is 0")
		case b.TableSize > maxBitmapTableSize:
			return nil, corruptf(field("bitmap_table_size"), at+8, "%d exceeds limit %d", b.TableSize, maxBitmapTableSize)
		case uint64(b.TableSize)*cs > maxBitmapPhysSize:
			return nil, corruptf(field("bitmap_table_size"), at+8, "%d clusters of bitmap data exceed limit %d bytes", b.TableSize, maxBitmapPhysSize)
		case b.GranularityBits < minBitmapGranBits || b.GranularityBits > maxBitmapGranBits:
			return nil, corruptf(field("granularity_bits"), at+17, "%d is outside %d..%d", b.GranularityBits, minBitmapGranBits, maxBitmapGranBits)
		case b.Flags&bitmapFlagsReserved != 0:
			return nil, corruptf(field("flags"), at+12, "%#x has reserved bits %#x set", b.Flags, b.Flags&bitmapFlagsReserved)
		case b.Type != bitmapTypeDirty:
			return nil, corruptf(field("type"), at+16, "%d is not a dirty tracking bitmap (1)", b.Type)
		case nameLen == 0:
			return nil, corruptf(field("name_size"), at+18, "is 0")
		case nameLen > maxBitmapNameSize:
			return nil, corruptf(field("name_size"), at+18, "%d exceeds limit %d", nameLen, maxBitmapNameSize)
		}
		if err := checkTable(field("bitmap_table_offset"), at, b.TableOffset, uint64(b.TableSize)*bitmapTableEntrySize, cs, fileSize); err != nil {
			return nil, err
		}
		b.ExtraData = append([]byte(nil), e[bitmapEntryFixedLen:bitmapEntryFixedLen+int(extraLen)]...)
		b.Name = string(e[bitmapEntryFixedLen+int(extraLen) : bitmapEntryFixedLen+int(extraLen)+nameLen])
		if j, dup := names[b.Name]; dup {
			return nil, corruptf(field("name"), at+bitmapEntryFixedLen+int64(extraLen), "%q is also the name of bitmap[%d]", shortName(b.Name), j)
		}
		names[b.Name] = i
		out = append(out, b)
		off += total
	}
	if len(out) != int(n) {
		return nil, corruptf("bitmap_directory", base, "holds %d entries, nb_bitmaps says %d", len(out), n)
	}
	// Tables must not overlap the header, the directory or each other.
	type span struct{ start, end uint64 }
	dir := span{uint64(base) &^ (cs - 1), (uint64(base) + uint64(len(buf)) + cs - 1) &^ (cs - 1)}
	spans := make([]span, 0, len(out))
	for i, b := range out {
		s := span{b.TableOffset, (b.TableOffset + uint64(b.TableSize)*bitmapTableEntrySize + cs - 1) &^ (cs - 1)}
		if s.start < dir.end && dir.start < s.end {
			return nil, corruptf(fmt.Sprintf("bitmap[%d].bitmap_table_offset", i), -1, "table at %#x overlaps the bitmap directory at %#x", b.TableOffset, base)
		}
		for j, o := range spans {
			if s.start < o.end && o.start < s.end {
				return nil, corruptf(fmt.Sprintf("bitmap[%d].bitmap_table_offset", i), -1, "table at %#x overlaps the table of bitmap[%d] at %#x", b.TableOffset, j, out[j].TableOffset)
			}
		}
		spans = append(spans, s)
	}
	return out, nil
}

// encodeBitmapDirectory is the inverse of decodeBitmapDirectory.
func encodeBitmapDirectory(dir []bitmapDirEntry) []byte {
	n := 0
	for _, b := range dir {
		n += bitmapEntryLen(len(b.Name), len(b.ExtraData))
	}
	buf := make([]byte, n)
	be := binary.BigEndian
	off := 0
	for _, b := range dir {
		e := buf[off:]
		be.PutUint64(e[0:], b.TableOffset)
		be.PutUint32(e[8:], b.TableSize)
		be.PutUint32(e[12:], b.Flags)
		e[16] = b.Type
		e[17] = b.GranularityBits
		be.PutUint16(e[18:], uint16(len(b.Name)))
		be.PutUint32(e[20:], uint32(len(b.ExtraData)))
		copy(e[bitmapEntryFixedLen:], b.ExtraData)
		copy(e[bitmapEntryFixedLen+len(b.ExtraData):], b.Name)
		off += bitmapEntryLen(len(b.Name), len(b.ExtraData))
	}
	return buf
}

func shortName(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}

// bitmapTableEntry is one entry of a bitmap table: the host offset of a
// cluster of bitmap data or, with offset 0, bit 0 telling whether that
// cluster reads as all ones or all zeroes.
type bitmapTableEntry uint64

func (e bitmapTableEntry) offset() int64 { return int64(uint64(e) & bitmapTableEntryOffMask) }
func (e bitmapTableEntry) allOnes() bool {
	return e.offset() == 0 && uint64(e)&bitmapTableEntryAllOnes != 0
}

func (e bitmapTableEntry) String() string {
	switch {
	case e.offset() != 0:
		return fmt.Sprintf("bitmap-data@%#x", e.offset())
	case e.allOnes():
		return "bitmap-all-ones"
	}
	return "bitmap-all-zeroes"
}

// check is qemu's check_table_entry.
func (e bitmapTableEntry) check(clusterSize int64) string {
	if r := uint64(e) & bitmapTableEntryReserved; r != 0 {
		return fmt.Sprintf("entry %#x has reserved bits %#x set", uint64(e), r)
	}
	if off := e.offset(); off != 0 {
		if uint64(e)&bitmapTableEntryAllOnes != 0 {
			return fmt.Sprintf("entry %#x has both an offset and the all-ones bit", uint64(e))
		}
		if off%clusterSize != 0 {
			return fmt.Sprintf("entry %#x: offset %#x is not cluster aligned", uint64(e), off)
		}
	}
	return ""
}

// decodeBitmapTable parses the bitmap table of bitmap idx read from
// tableOffset; every entry must pass check.
func decodeBitmapTable(buf []byte, idx int, tableOffset, clusterSize int64) ([]bitmapTableEntry, error) {
	if len(buf)%bitmapTableEntrySize != 0 {
		return nil, corruptf(fmt.Sprintf("bitmap[%d].bitmap_table", idx), tableOffset, "length %d is not a multiple of 8", len(buf))
	}
	t := make([]bitmapTableEntry, len(buf)/bitmapTableEntrySize)
	for i := range t {
		t[i] = bitmapTableEntry(binary.BigEndian.Uint64(buf[i*8:]))
		if msg := t[i].check(clusterSize); msg != "" {
			return nil, corruptf(fmt.Sprintf("bitmap[%d].bitmap_table[%d]", idx, i), tableOffset+int64(i)*8, "%s", msg)
		}
	}
	return t, nil
}

func encodeBitmapTable(t []bitmapTableEntry) []byte {
	buf := make([]byte, len(t)*bitmapTableEntrySize)
	for i, e := range t {
		binary.BigEndian.PutUint64(buf[i*8:], uint64(e))
	}
	return buf
}

// checkBitmapRequest applies qemu's check_constraints_on_bitmap to a new
// bitmap: name length, granularity range, and the space its data takes.
func checkBitmapRequest(name string, granularity, virtualSize, clusterSize int64) (granBits uint8, err error) {
	if name == "" {
		return 0, fmt.Errorf("%w: empty bitmap name", ErrBitmapInvalid)
	}
	if len(name) > maxBitmapNameSize {
		return 0, fmt.Errorf("%w: name length %d exceeds maximum (%d characters)", ErrBitmapInvalid, len(name), maxBitmapNameSize)
	}
	if granularity <= 0 || granularity&(granularity-1) != 0 {
		return 0, fmt.Errorf("%w: granularity %d is not a power of two", ErrBitmapInvalid, granularity)
	}
	for granularity>>granBits > 1 {
		granBits++
	}
	if granBits < minBitmapGranBits {
		return 0, fmt.Errorf("%w: granularity %d is under minimum (%d bytes)", ErrBitmapInvalid, granularity, 1<<minBitmapGranBits)
	}
	if granBits > maxBitmapGranBits {
		return 0, fmt.Errorf("%w: granularity %d exceeds maximum (%d bytes)", ErrBitmapInvalid, granularity, int64(1)<<maxBitmapGranBits)
	}
	bytes := (bitCount(uint64(virtualSize), uint(granBits)) + 7) / 8
	if bytes > maxBitmapPhysSize || bytes > maxBitmapTableSize*uint64(clusterSize) {
		return 0, fmt.Errorf("%w: too much space will be occupied by the bitmap (%d bytes); use larger granularity", ErrBitmapInvalid, bytes)
	}
	return granBits, nil
}
