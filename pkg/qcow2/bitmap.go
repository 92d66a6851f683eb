package qcow2

import (
	"encoding/binary"
	"fmt"
)

// Bitmap directory entry flags.
const (
	bitmapFlagInUse     = 1 << 0
	bitmapFlagAuto      = 1 << 1
	bitmapFlagExtraComp = 1 << 2
	bitmapTypeDirty     = 1

	bitmapEntryFixedLen = 24
	bitmapTableMaxBytes = 64 << 20 // BME_MAX_TABLE_SIZE entries * 8 (qemu: 0x8000000 entries cap)
	bmeMaxGranularity   = 31
	bmeMinGranularity   = 9
)

// bitmapDirEntry is one persistent dirty bitmap's directory entry.
type bitmapDirEntry struct {
	TableOffset     uint64
	TableSize       uint32 // entries
	Flags           uint32
	Type            uint8
	GranularityBits uint8
	Name            string
	ExtraData       []byte
}

// decodeBitmapDirectory parses n entries from buf (the directory bytes at
// file offset base).
func decodeBitmapDirectory(buf []byte, n uint32, base int64, clusterBits uint32, fileSize int64) ([]bitmapDirEntry, error) {
	if n > maxBitmaps {
		return nil, corruptf("nb_bitmaps", -1, "%d exceeds limit %d", n, maxBitmaps)
	}
	be := binary.BigEndian
	cs := uint64(1) << clusterBits
	out := make([]bitmapDirEntry, 0, min(int(n), len(buf)/bitmapEntryFixedLen+1))
	off := 0
	for i := uint32(0); i < n; i++ {
		at := base + int64(off)
		field := func(f string) string { return fmt.Sprintf("bitmap[%d].%s", i, f) }
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
		extraLen := int(be.Uint32(e[20:]))
		if nameLen > maxBitmapNameSize {
			return nil, corruptf(field("name_size"), at+18, "%d exceeds limit %d", nameLen, maxBitmapNameSize)
		}
		if extraLen > 1<<20 {
			return nil, corruptf(field("extra_data_size"), at+20, "%d is too large", extraLen)
		}
		total := bitmapEntryFixedLen + extraLen + nameLen
		if off+total > len(buf) {
			return nil, corruptf(field("entry"), at, "entry of %d bytes runs past the end of the bitmap directory", total)
		}
		if uint64(b.TableSize)*8 > bitmapTableMaxBytes {
			return nil, corruptf(field("bitmap_table_size"), at+8, "%d exceeds limit %d", b.TableSize, bitmapTableMaxBytes/8)
		}
		if b.TableSize > 0 {
			if err := checkTable(field("bitmap_table_offset"), at, b.TableOffset, uint64(b.TableSize)*8, cs, fileSize); err != nil {
				return nil, err
			}
		}
		if b.GranularityBits < bmeMinGranularity || b.GranularityBits > bmeMaxGranularity {
			return nil, corruptf(field("granularity_bits"), at+17, "%d is outside %d..%d", b.GranularityBits, bmeMinGranularity, bmeMaxGranularity)
		}
		b.ExtraData = append([]byte(nil), e[bitmapEntryFixedLen:bitmapEntryFixedLen+extraLen]...)
		b.Name = string(e[bitmapEntryFixedLen+extraLen : total])
		out = append(out, b)
		off += (total + 7) &^ 7
	}
	return out, nil
}

// encodeBitmapDirectory is the inverse of decodeBitmapDirectory.
func encodeBitmapDirectory(dir []bitmapDirEntry) []byte {
	be := binary.BigEndian
	var buf []byte
	for _, b := range dir {
		var e [bitmapEntryFixedLen]byte
		be.PutUint64(e[0:], b.TableOffset)
		be.PutUint32(e[8:], b.TableSize)
		be.PutUint32(e[12:], b.Flags)
		e[16] = b.Type
		e[17] = b.GranularityBits
		be.PutUint16(e[18:], uint16(len(b.Name)))
		be.PutUint32(e[20:], uint32(len(b.ExtraData)))
		buf = append(buf, e[:]...)
		buf = append(buf, b.ExtraData...)
		buf = append(buf, b.Name...)
		for len(buf)%8 != 0 {
			buf = append(buf, 0)
		}
	}
	return buf
}
