package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// On-disk layout of the bitmaps extension (docs/interop/qcow2.rst, "Bitmaps
// extension"), and the limits qemu enforces on it. Images we write stay
// inside qemu's limits so qemu can always open them.
const (
	bitmapsExtSize = 24 // nb_bitmaps u32, reserved u32, dir size u64, dir offset u64

	maxBitmaps          = 65535
	maxBitmapDirSize    = 1024 * maxBitmaps // QCOW2_MAX_BITMAP_DIRECTORY_SIZE
	bitmapDirEntryFixed = 24                // fixed part of a directory entry
	maxBitmapTableSize  = 0x8000000         // entries per bitmap table
	maxBitmapPhysSize   = 0x20000000        // bytes of bitmap data per bitmap
	minBitmapGranBits   = 9                 // 512 B
	maxBitmapGranBits   = 31                // 2 GiB
	maxBitmapNameSize   = 1023

	bitmapTypeDirty = 1

	bmeFlagInUse                = 1 << 0
	bmeFlagAuto                 = 1 << 1
	bmeFlagExtraDataCompatible  = 1 << 2
	bmeReservedFlags            = ^uint32(bmeFlagInUse | bmeFlagAuto | bmeFlagExtraDataCompatible)
	bitmapTableEntrySize        = 8
	bitmapTableEntryReserved    = 0xff000000000001fe
	bitmapTableEntryOffsetMask  = 0x00fffffffffffe00
	bitmapTableEntryAllOnesFlag = 1
)

// Errors of the bitmap layer; all are wrapped with the detail.
var (
	// ErrBitmapFormat: the bitmaps extension, directory or a bitmap table on
	// disk breaks the specification or qemu's limits.
	ErrBitmapFormat = errors.New("qcow2: invalid bitmap metadata")
	// ErrBitmapNotFound: no bitmap of that name.
	ErrBitmapNotFound = errors.New("qcow2: bitmap not found")
	// ErrBitmapExists: a bitmap of that name already exists.
	ErrBitmapExists = errors.New("qcow2: bitmap already exists")
	// ErrBitmapInconsistent: the bitmap was found in use (its writer did
	// not close the image) or cannot be interpreted; its bits cannot be
	// trusted, so it can only be removed.
	ErrBitmapInconsistent = errors.New("qcow2: bitmap is inconsistent")
	// ErrBitmapInvalid: a request that breaks the bitmap rules (name,
	// granularity, size limits, merge of different sizes, v2 image...).
	ErrBitmapInvalid = errors.New("qcow2: invalid bitmap request")
)

func bitmapFormatErrorf(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrBitmapFormat}, args...)...)
}

// bitmapsExt is the decoded bitmaps header extension.
type bitmapsExt struct {
	nbBitmaps uint32
	dirSize   uint64
	dirOffset uint64
}

// decodeBitmapsExt checks the extension as qemu does when it reads the header.
func decodeBitmapsExt(data []byte, clusterSize uint64) (bitmapsExt, error) {
	if len(data) != bitmapsExtSize {
		return bitmapsExt{}, bitmapFormatErrorf("bitmaps extension length %d, want %d", len(data), bitmapsExtSize)
	}
	e := bitmapsExt{
		nbBitmaps: binary.BigEndian.Uint32(data[0:]),
		dirSize:   binary.BigEndian.Uint64(data[8:]),
		dirOffset: binary.BigEndian.Uint64(data[16:]),
	}
	switch {
	case binary.BigEndian.Uint32(data[4:]) != 0:
		return e, bitmapFormatErrorf("bitmaps extension reserved field at byte 4 is %#x, must be zero", binary.BigEndian.Uint32(data[4:]))
	case e.nbBitmaps == 0:
		return e, bitmapFormatErrorf("bitmaps extension has nb_bitmaps 0")
	case e.nbBitmaps > maxBitmaps:
		return e, bitmapFormatErrorf("bitmaps extension nb_bitmaps %d exceeds limit %d", e.nbBitmaps, maxBitmaps)
	case e.dirSize == 0:
		return e, bitmapFormatErrorf("bitmaps extension bitmap_directory_size is 0")
	case e.dirSize > maxBitmapDirSize:
		return e, bitmapFormatErrorf("bitmaps extension bitmap_directory_size %d exceeds limit %d", e.dirSize, maxBitmapDirSize)
	case e.dirOffset == 0 || e.dirOffset%clusterSize != 0:
		return e, bitmapFormatErrorf("bitmaps extension bitmap_directory_offset %#x is not a cluster-aligned offset", e.dirOffset)
	}
	return e, nil
}

func (e bitmapsExt) encode() []byte {
	b := make([]byte, bitmapsExtSize)
	binary.BigEndian.PutUint32(b[0:], e.nbBitmaps)
	binary.BigEndian.PutUint64(b[8:], e.dirSize)
	binary.BigEndian.PutUint64(b[16:], e.dirOffset)
	return b
}

// bitmapDirEntry is one bitmap directory entry. Extra data is kept verbatim
// so that a bitmap we do not fully understand survives our rewrites.
type bitmapDirEntry struct {
	tableOffset uint64
	tableSize   uint32
	flags       uint32
	typ         uint8
	granBits    uint8
	extra       []byte
	name        string
}

func (e *bitmapDirEntry) inUse() bool { return e.flags&bmeFlagInUse != 0 }
func (e *bitmapDirEntry) auto() bool  { return e.flags&bmeFlagAuto != 0 }

// usable: the spec says a bitmap with extra data we do not know (any) and
// without extra_data_compatible must not be used, only preserved.
func (e *bitmapDirEntry) usable() bool {
	return len(e.extra) == 0 || e.flags&bmeFlagExtraDataCompatible != 0
}

func dirEntrySize(nameLen, extraLen int) int {
	return (bitmapDirEntryFixed + nameLen + extraLen + 7) &^ 7
}

// decodeBitmapDirectory parses and checks a bitmap directory read from
// dirOffset: every entry as qemu's check_dir_entry does (table offset and
// size, granularity, reserved flags, type, name), the entry count against
// nb_bitmaps, names unique, and the bitmap tables placed sanely (aligned,
// not on the header, the directory or each other). virtualSize is the disk
// size the bitmaps must cover.
func decodeBitmapDirectory(dir []byte, dirOffset uint64, nb uint32, clusterSize, virtualSize uint64) ([]bitmapDirEntry, error) {
	var out []bitmapDirEntry
	names := map[string]int{}
	pos := 0
	for pos < len(dir) {
		at := dirOffset + uint64(pos)
		if len(out) >= int(nb) {
			return nil, bitmapFormatErrorf("bitmap directory at %#x holds more entries than nb_bitmaps %d", dirOffset, nb)
		}
		if len(dir)-pos < bitmapDirEntryFixed {
			return nil, bitmapFormatErrorf("bitmap directory entry %d at %#x is truncated (%d bytes left)", len(out), at, len(dir)-pos)
		}
		b := dir[pos:]
		e := bitmapDirEntry{
			tableOffset: binary.BigEndian.Uint64(b[0:]),
			tableSize:   binary.BigEndian.Uint32(b[8:]),
			flags:       binary.BigEndian.Uint32(b[12:]),
			typ:         b[16],
			granBits:    b[17],
		}
		nameSize := int(binary.BigEndian.Uint16(b[18:]))
		extraSize := binary.BigEndian.Uint32(b[20:])
		if extraSize > uint32(len(dir)) {
			return nil, bitmapFormatErrorf("bitmap directory entry %d at %#x: extra_data_size %d exceeds the directory", len(out), at, extraSize)
		}
		size := dirEntrySize(nameSize, int(extraSize))
		if size > len(dir)-pos {
			return nil, bitmapFormatErrorf("bitmap directory entry %d at %#x: entry of %d bytes runs past the directory end", len(out), at, size)
		}
		e.extra = append([]byte(nil), b[bitmapDirEntryFixed:bitmapDirEntryFixed+int(extraSize)]...)
		e.name = string(b[bitmapDirEntryFixed+int(extraSize) : bitmapDirEntryFixed+int(extraSize)+nameSize])
		if err := checkDirEntry(&e, nameSize, clusterSize, virtualSize); err != nil {
			return nil, fmt.Errorf("bitmap directory entry %d (%q) at %#x: %w", len(out), truncName(e.name), at, err)
		}
		if j, dup := names[e.name]; dup {
			return nil, bitmapFormatErrorf("bitmap directory entries %d and %d at %#x are both named %q", j, len(out), dirOffset, truncName(e.name))
		}
		names[e.name] = len(out)
		out = append(out, e)
		pos += size
	}
	if len(out) != int(nb) {
		return nil, bitmapFormatErrorf("bitmap directory at %#x holds %d entries, nb_bitmaps says %d", dirOffset, len(out), nb)
	}
	// Tables must not overlap the header, the directory or each other.
	type span struct{ start, end uint64 }
	dirSpan := span{dirOffset &^ (clusterSize - 1), alignUp(dirOffset+uint64(len(dir)), clusterSize)}
	var spans []span
	for _, e := range out {
		s := span{e.tableOffset, alignUp(e.tableOffset+uint64(e.tableSize)*bitmapTableEntrySize, clusterSize)}
		if s.start < clusterSize {
			return nil, bitmapFormatErrorf("bitmap %q: bitmap_table_offset %#x overlaps the image header", truncName(e.name), e.tableOffset)
		}
		if s.start < dirSpan.end && dirSpan.start < s.end {
			return nil, bitmapFormatErrorf("bitmap %q: table at %#x overlaps the bitmap directory at %#x", truncName(e.name), e.tableOffset, dirOffset)
		}
		for j, o := range spans {
			if s.start < o.end && o.start < s.end {
				return nil, bitmapFormatErrorf("bitmap %q: table at %#x overlaps the table of bitmap %q at %#x", truncName(e.name), e.tableOffset, truncName(out[j].name), out[j].tableOffset)
			}
		}
		spans = append(spans, s)
	}
	return out, nil
}

func checkDirEntry(e *bitmapDirEntry, nameSize int, clusterSize, virtualSize uint64) error {
	switch {
	case e.tableSize == 0:
		return bitmapFormatErrorf("bitmap_table_size is 0")
	case e.tableOffset == 0 || e.tableOffset%clusterSize != 0:
		return bitmapFormatErrorf("bitmap_table_offset %#x is not a cluster-aligned offset", e.tableOffset)
	case e.tableSize > maxBitmapTableSize:
		return bitmapFormatErrorf("bitmap_table_size %d exceeds limit %d", e.tableSize, maxBitmapTableSize)
	case e.granBits < minBitmapGranBits || e.granBits > maxBitmapGranBits:
		return bitmapFormatErrorf("granularity_bits %d outside %d..%d", e.granBits, minBitmapGranBits, maxBitmapGranBits)
	case e.flags&bmeReservedFlags != 0:
		return bitmapFormatErrorf("flags %#x has reserved bits %#x set", e.flags, e.flags&bmeReservedFlags)
	case e.typ != bitmapTypeDirty:
		return bitmapFormatErrorf("type %d is not a dirty tracking bitmap (1)", e.typ)
	case nameSize == 0:
		return bitmapFormatErrorf("name_size is 0")
	case nameSize > maxBitmapNameSize:
		return bitmapFormatErrorf("name_size %d exceeds limit %d", nameSize, maxBitmapNameSize)
	}
	phys := uint64(e.tableSize) * clusterSize
	if phys > maxBitmapPhysSize {
		return bitmapFormatErrorf("bitmap data of %d bytes exceeds limit %d", phys, maxBitmapPhysSize)
	}
	// A bitmap left in use may legitimately be too small (an image resized
	// without updating it); a consistent one must cover the whole disk.
	if !e.inUse() && virtualSize > (phys*8)<<e.granBits {
		return bitmapFormatErrorf("bitmap_table_size %d covers %d bytes at granularity %d, less than the disk size %d",
			e.tableSize, (phys*8)<<e.granBits, uint64(1)<<e.granBits, virtualSize)
	}
	return nil
}

func truncName(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}

func alignUp(v, a uint64) uint64 { return (v + a - 1) &^ (a - 1) }

// encodeBitmapDirectory serializes entries; the caller has checked them.
func encodeBitmapDirectory(entries []bitmapDirEntry) []byte {
	n := 0
	for _, e := range entries {
		n += dirEntrySize(len(e.name), len(e.extra))
	}
	dir := make([]byte, n)
	pos := 0
	for _, e := range entries {
		b := dir[pos:]
		binary.BigEndian.PutUint64(b[0:], e.tableOffset)
		binary.BigEndian.PutUint32(b[8:], e.tableSize)
		binary.BigEndian.PutUint32(b[12:], e.flags)
		b[16] = e.typ
		b[17] = e.granBits
		binary.BigEndian.PutUint16(b[18:], uint16(len(e.name)))
		binary.BigEndian.PutUint32(b[20:], uint32(len(e.extra)))
		copy(b[bitmapDirEntryFixed:], e.extra)
		copy(b[bitmapDirEntryFixed+len(e.extra):], e.name)
		pos += dirEntrySize(len(e.name), len(e.extra))
	}
	return dir
}

// bitmapTableEntry is one entry of a bitmap table: the offset of a cluster of
// bitmap data, or (offset 0) bit 0 saying whether that cluster reads as all
// ones or all zeroes.
type bitmapTableEntry uint64

func (e bitmapTableEntry) offset() uint64 { return uint64(e) & bitmapTableEntryOffsetMask }
func (e bitmapTableEntry) allOnes() bool {
	return e.offset() == 0 && uint64(e)&bitmapTableEntryAllOnesFlag != 0
}

func (e bitmapTableEntry) String() string {
	switch {
	case e.offset() != 0:
		return fmt.Sprintf("data@%#x", e.offset())
	case e.allOnes():
		return "all-ones"
	default:
		return "all-zeroes"
	}
}

func (e bitmapTableEntry) check(clusterSize uint64) error {
	if uint64(e)&bitmapTableEntryReserved != 0 {
		return fmt.Errorf("entry %#x has reserved bits %#x set", uint64(e), uint64(e)&bitmapTableEntryReserved)
	}
	if off := e.offset(); off != 0 {
		if uint64(e)&bitmapTableEntryAllOnesFlag != 0 {
			return fmt.Errorf("entry %#x has both an offset and the all-ones bit", uint64(e))
		}
		if off%clusterSize != 0 {
			return fmt.Errorf("entry %#x: offset %#x is not cluster aligned", uint64(e), off)
		}
	}
	return nil
}

// decodeBitmapTable parses a bitmap table read from tableOffset.
func decodeBitmapTable(buf []byte, tableOffset, clusterSize uint64) ([]bitmapTableEntry, error) {
	if len(buf)%bitmapTableEntrySize != 0 {
		return nil, bitmapFormatErrorf("bitmap table at %#x has length %d, not a multiple of 8", tableOffset, len(buf))
	}
	t := make([]bitmapTableEntry, len(buf)/bitmapTableEntrySize)
	for i := range t {
		t[i] = bitmapTableEntry(binary.BigEndian.Uint64(buf[i*8:]))
		if err := t[i].check(clusterSize); err != nil {
			return nil, bitmapFormatErrorf("bitmap table at %#x, index %d: %v", tableOffset, i, err)
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
// bitmap: name length, granularity range, and the size the data would take.
func checkBitmapRequest(name string, granularity, virtualSize, clusterSize uint64) (granBits uint8, err error) {
	if name == "" {
		return 0, fmt.Errorf("%w: empty bitmap name", ErrBitmapInvalid)
	}
	if len(name) > maxBitmapNameSize {
		return 0, fmt.Errorf("%w: name length %d exceeds maximum (%d characters)", ErrBitmapInvalid, len(name), maxBitmapNameSize)
	}
	if granularity == 0 || granularity&(granularity-1) != 0 {
		return 0, fmt.Errorf("%w: granularity %d is not a power of two", ErrBitmapInvalid, granularity)
	}
	for granularity>>granBits > 1 {
		granBits++
	}
	if granBits < minBitmapGranBits {
		return 0, fmt.Errorf("%w: granularity %d is under minimum (%d bytes)", ErrBitmapInvalid, granularity, 1<<minBitmapGranBits)
	}
	if granBits > maxBitmapGranBits {
		return 0, fmt.Errorf("%w: granularity %d exceeds maximum (%d bytes)", ErrBitmapInvalid, granularity, uint64(1)<<maxBitmapGranBits)
	}
	bytes := (bitCount(virtualSize, uint(granBits)) + 7) / 8
	if bytes > maxBitmapPhysSize || bytes > maxBitmapTableSize*clusterSize {
		return 0, fmt.Errorf("%w: too much space will be occupied by the bitmap (%d bytes); use larger granularity", ErrBitmapInvalid, bytes)
	}
	return granBits, nil
}
