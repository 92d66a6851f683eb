package qcow2

import (
	"encoding/binary"
	"fmt"
	"math/bits"
)

// header is the decoded image header plus its extensions.
type header struct {
	Version               uint32
	BackingFileOffset     uint64
	BackingFileSize       uint32
	ClusterBits           uint32
	Size                  uint64
	CryptMethod           uint32
	L1Size                uint32
	L1TableOffset         uint64
	RefcountTableOffset   uint64
	RefcountTableClusters uint32
	NbSnapshots           uint32
	SnapshotsOffset       uint64
	Incompatible          uint64
	Compatible            uint64
	Autoclear             uint64
	RefcountOrder         uint32
	HeaderLength          uint32
	CompressionType       uint8

	BackingFile   string // from BackingFileOffset/Size
	BackingFormat string // extension 0xe2792aca
	DataFile      string // extension 0x44415441
	Features      []featureName
	Bitmaps       *bitmapsExt
	Unknown       []rawExtension // preserved verbatim on rewrite
	Crypto        *cryptoExt     // full disk encryption header extension
}

type featureName struct {
	Type uint8 // 0 incompatible, 1 compatible, 2 autoclear
	Bit  uint8
	Name string
}

type bitmapsExt struct {
	NbBitmaps uint32
	DirSize   uint64
	DirOffset uint64
}

// cryptoExt is the full disk encryption header extension: where the LUKS
// header region lies in the file (luks.go).
type cryptoExt struct {
	Offset uint64 // cluster aligned
	Length uint64
}

type rawExtension struct {
	Type uint32
	Data []byte
}

// decodeHeader parses the header and its extensions from buf, which holds
// the start of the file (at least the first cluster when the file is that
// long). fileSize bounds every offset. It validates everything that can be
// checked without reading further metadata.
func decodeHeader(buf []byte, fileSize int64) (*header, error) {
	if len(buf) < 8 {
		return nil, fmt.Errorf("%w: file is %d bytes, too short for a header", ErrNotQcow2, len(buf))
	}
	be := binary.BigEndian
	if be.Uint32(buf[hdrMagic:]) != magic {
		return nil, ErrNotQcow2
	}
	h := &header{Version: be.Uint32(buf[hdrVersion:])}
	if h.Version != 2 && h.Version != 3 {
		return nil, unsupportedf("version", hdrVersion, "%d is not 2 or 3", h.Version)
	}
	if len(buf) < headerV2Len {
		return nil, corruptf("header", 0, "file is %d bytes, shorter than the %d-byte header", len(buf), headerV2Len)
	}
	h.BackingFileOffset = be.Uint64(buf[hdrBackingFileOffset:])
	h.BackingFileSize = be.Uint32(buf[hdrBackingFileSize:])
	h.ClusterBits = be.Uint32(buf[hdrClusterBits:])
	h.Size = be.Uint64(buf[hdrSize:])
	h.CryptMethod = be.Uint32(buf[hdrCryptMethod:])
	h.L1Size = be.Uint32(buf[hdrL1Size:])
	h.L1TableOffset = be.Uint64(buf[hdrL1TableOffset:])
	h.RefcountTableOffset = be.Uint64(buf[hdrRefcountTableOffset:])
	h.RefcountTableClusters = be.Uint32(buf[hdrRefcountTableClust:])
	h.NbSnapshots = be.Uint32(buf[hdrNbSnapshots:])
	h.SnapshotsOffset = be.Uint64(buf[hdrSnapshotsOffset:])
	h.RefcountOrder = 4
	h.HeaderLength = headerV2Len
	if h.Version >= 3 {
		if len(buf) < headerV3Len {
			return nil, corruptf("header", 0, "file is %d bytes, shorter than the %d-byte v3 header", len(buf), headerV3Len)
		}
		h.Incompatible = be.Uint64(buf[hdrIncompatible:])
		h.Compatible = be.Uint64(buf[hdrCompatible:])
		h.Autoclear = be.Uint64(buf[hdrAutoclear:])
		h.RefcountOrder = be.Uint32(buf[hdrRefcountOrder:])
		h.HeaderLength = be.Uint32(buf[hdrHeaderLength:])
		if h.HeaderLength < headerV3Len {
			return nil, corruptf("header_length", hdrHeaderLength, "%d is less than %d", h.HeaderLength, headerV3Len)
		}
		if h.HeaderLength > uint32(len(buf)) {
			return nil, corruptf("header_length", hdrHeaderLength, "%d exceeds the first cluster / file (%d bytes)", h.HeaderLength, len(buf))
		}
		if h.HeaderLength > headerV3Len {
			h.CompressionType = buf[hdrCompressionType]
		}
	}
	if err := h.validate(fileSize); err != nil {
		return nil, err
	}
	clusterSize := uint64(1) << h.ClusterBits
	if uint64(len(buf)) > clusterSize {
		buf = buf[:clusterSize]
	}
	if err := h.decodeExtensions(buf, fileSize); err != nil {
		return nil, err
	}
	if (h.CryptMethod == cryptLUKS) != (h.Crypto != nil) {
		return nil, corruptf("crypt_method", hdrCryptMethod, "method %d does not match the presence of the full disk encryption header extension (%t)", h.CryptMethod, h.Crypto != nil)
	}
	if h.BackingFileOffset != 0 {
		if h.BackingFileSize > maxBackingFileName {
			return nil, corruptf("backing_file_size", hdrBackingFileSize, "%d exceeds limit %d", h.BackingFileSize, maxBackingFileName)
		}
		end := h.BackingFileOffset + uint64(h.BackingFileSize)
		if h.BackingFileOffset >= clusterSize || end > clusterSize || end > uint64(len(buf)) {
			return nil, corruptf("backing_file_offset", hdrBackingFileOffset, "backing file name at %d+%d lies outside the first cluster", h.BackingFileOffset, h.BackingFileSize)
		}
		h.BackingFile = string(buf[h.BackingFileOffset:end])
	}
	return h, nil
}

func (h *header) validate(fileSize int64) error {
	if h.ClusterBits < minClusterBits || h.ClusterBits > maxClusterBits {
		return corruptf("cluster_bits", hdrClusterBits, "%d is outside %d..%d", h.ClusterBits, minClusterBits, maxClusterBits)
	}
	cs := uint64(1) << h.ClusterBits
	if h.Version >= 3 {
		if unk := h.Incompatible &^ incompatKnown; unk != 0 {
			return unsupportedf("incompatible_features", hdrIncompatible, "unknown incompatible feature bit %d set (%#x)", bits.TrailingZeros64(unk), unk)
		}
		if h.RefcountOrder > 6 {
			return corruptf("refcount_order", hdrRefcountOrder, "%d exceeds 6 (64-bit refcounts)", h.RefcountOrder)
		}
		if h.HeaderLength%8 != 0 && h.HeaderLength > headerV3Len {
			// qemu writes multiples of 8 but tolerates others; nothing to do.
		}
	}
	if h.Incompatible&IncompatExternalData != 0 {
		return unsupportedf("incompatible_features", hdrIncompatible, "external data file (bit 2) is not supported")
	}
	if h.Incompatible&IncompatCompressionType != 0 {
		if h.HeaderLength <= headerV3Len {
			return corruptf("header_length", hdrHeaderLength, "compression type bit set but header has no compression_type field")
		}
	}
	if h.CompressionType > CompressionZstd {
		return unsupportedf("compression_type", hdrCompressionType, "unknown compression type %d", h.CompressionType)
	}
	if h.CompressionType != CompressionZlib && h.Incompatible&IncompatCompressionType == 0 {
		return corruptf("compression_type", hdrCompressionType, "%d set without incompatible bit 3", h.CompressionType)
	}
	if h.Incompatible&IncompatExtendedL2 != 0 && h.ClusterBits < 14 {
		return corruptf("cluster_bits", hdrClusterBits, "extended L2 needs clusters of at least 16 KiB, got %d bytes", cs)
	}
	switch h.CryptMethod {
	case cryptNone, cryptLUKS:
	case cryptAES:
		return unsupportedf("crypt_method", hdrCryptMethod, "legacy AES-CBC encryption (method 1) is not supported; convert with qemu-img to encrypt.format=luks")
	default:
		return unsupportedf("crypt_method", hdrCryptMethod, "unknown encryption method %d", h.CryptMethod)
	}
	if int64(h.Size) < 0 {
		return corruptf("size", hdrSize, "%d is too large", h.Size)
	}
	// L1 table.
	if uint64(h.L1Size)*8 > maxL1Bytes {
		return corruptf("l1_size", hdrL1Size, "%d exceeds limit %d", h.L1Size, maxL1Bytes/8)
	}
	entryShift := uint32(3)
	if h.Incompatible&IncompatExtendedL2 != 0 {
		entryShift = 4
	}
	l2Coverage := uint64(1) << (2*h.ClusterBits - entryShift)
	need := (h.Size + l2Coverage - 1) / l2Coverage
	if need > uint64(h.L1Size) {
		return corruptf("l1_size", hdrL1Size, "%d is too small for a %d-byte disk (needs %d)", h.L1Size, h.Size, need)
	}
	if h.L1Size > 0 {
		if err := checkTable("l1_table_offset", hdrL1TableOffset, h.L1TableOffset, uint64(h.L1Size)*8, cs, fileSize); err != nil {
			return err
		}
	}
	// Refcount table.
	if h.RefcountTableClusters == 0 {
		return corruptf("refcount_table_clusters", hdrRefcountTableClust, "is 0")
	}
	if uint64(h.RefcountTableClusters)*cs > maxRefcountTableBytes {
		return corruptf("refcount_table_clusters", hdrRefcountTableClust, "%d exceeds limit %d", h.RefcountTableClusters, maxRefcountTableBytes/cs)
	}
	if err := checkTable("refcount_table_offset", hdrRefcountTableOffset, h.RefcountTableOffset, uint64(h.RefcountTableClusters)*cs, cs, fileSize); err != nil {
		return err
	}
	// Snapshot table (entries are variable-sized; checked again when read).
	if h.NbSnapshots > maxSnapshots {
		return corruptf("nb_snapshots", hdrNbSnapshots, "%d exceeds limit %d", h.NbSnapshots, maxSnapshots)
	}
	if h.NbSnapshots > 0 {
		if err := checkTable("snapshots_offset", hdrSnapshotsOffset, h.SnapshotsOffset, uint64(h.NbSnapshots)*40, cs, fileSize); err != nil {
			return err
		}
	}
	return nil
}

// checkTable verifies that a table of n bytes at off is cluster aligned and
// lies within the file.
func checkTable(field string, at int64, off, n, clusterSize uint64, fileSize int64) error {
	if off%clusterSize != 0 {
		return corruptf(field, at, "%#x is not aligned to the cluster size %d", off, clusterSize)
	}
	if off == 0 {
		return corruptf(field, at, "is 0 (overlaps the header)")
	}
	if off > uint64(fileSize) || n > uint64(fileSize)-off {
		return corruptf(field, at, "table at %#x of %d bytes extends past end of file (%d bytes)", off, n, fileSize)
	}
	return nil
}

func (h *header) decodeExtensions(buf []byte, fileSize int64) error {
	if h.Version < 3 && h.BackingFileOffset == 0 && len(buf) < headerV2Len+8 {
		return nil
	}
	be := binary.BigEndian
	off := uint64(h.HeaderLength)
	end := uint64(len(buf))
	if h.BackingFileOffset != 0 && h.BackingFileOffset < end && h.BackingFileOffset >= off {
		end = h.BackingFileOffset
	}
	for {
		if off+8 > end {
			if h.Version < 3 && off >= end {
				return nil // v2 images may have no end marker before the backing name
			}
			return corruptf("header_extension", int64(off), "extension header runs past the end of the header area (%d)", end)
		}
		typ := be.Uint32(buf[off:])
		ln := uint64(be.Uint32(buf[off+4:]))
		if typ == extEnd {
			return nil
		}
		dataOff := off + 8
		if ln > end-dataOff {
			return corruptf("header_extension", int64(off), "extension %#x length %d runs past the end of the header area (%d)", typ, ln, end)
		}
		data := buf[dataOff : dataOff+ln]
		switch typ {
		case extBackingFormat:
			h.BackingFormat = string(data)
		case extFeatureTable:
			for i := 0; i+48 <= len(data); i += 48 {
				name := data[i+2 : i+48]
				n := 0
				for n < len(name) && name[n] != 0 {
					n++
				}
				h.Features = append(h.Features, featureName{Type: data[i], Bit: data[i+1], Name: string(name[:n])})
			}
		case extBitmaps:
			if ln < 24 {
				return corruptf("bitmaps_extension", int64(off), "length %d is shorter than 24", ln)
			}
			b := &bitmapsExt{NbBitmaps: be.Uint32(data), DirSize: be.Uint64(data[8:]), DirOffset: be.Uint64(data[16:])}
			if b.NbBitmaps > maxBitmaps {
				return corruptf("nb_bitmaps", int64(dataOff), "%d exceeds limit %d", b.NbBitmaps, maxBitmaps)
			}
			if b.DirSize > maxBitmapDirSize {
				return corruptf("bitmap_directory_size", int64(dataOff+8), "%d exceeds limit %d", b.DirSize, maxBitmapDirSize)
			}
			if b.NbBitmaps > 0 {
				if err := checkTable("bitmap_directory_offset", int64(dataOff+16), b.DirOffset, b.DirSize, uint64(1)<<h.ClusterBits, fileSize); err != nil {
					return err
				}
			}
			h.Bitmaps = b
		case extExternalDataFile:
			h.DataFile = string(data)
		case extCryptoHeader:
			if ln != 16 {
				return corruptf("crypto_header_extension", int64(off), "length %d is not 16", ln)
			}
			c := &cryptoExt{Offset: be.Uint64(data), Length: be.Uint64(data[8:])}
			if c.Length < luksHeaderLen || c.Length > maxLUKSRegion {
				return corruptf("crypto_header_length", int64(dataOff+8), "%d is outside %d..%d", c.Length, luksHeaderLen, maxLUKSRegion)
			}
			if err := checkTable("crypto_header_offset", int64(dataOff), c.Offset, c.Length, uint64(1)<<h.ClusterBits, fileSize); err != nil {
				return err
			}
			h.Crypto = c
		default:
			h.Unknown = append(h.Unknown, rawExtension{Type: typ, Data: append([]byte(nil), data...)})
		}
		off = dataOff + (ln+7)&^7
	}
}

// encode serialises the header, its extensions and the backing file name
// into one buffer of at most clusterSize bytes (the whole first cluster is
// the header area).
func (h *header) encode() ([]byte, error) {
	be := binary.BigEndian
	hl := uint32(headerV2Len)
	if h.Version >= 3 {
		// Extensions are 8-byte aligned from the end of the header:
		// keep the header length a multiple of 8 so they are absolutely
		// aligned too.
		hl = (max(h.HeaderLength, headerV3FullLen) + 7) &^ 7
	}
	buf := make([]byte, hl, 4096)
	be.PutUint32(buf[hdrMagic:], magic)
	be.PutUint32(buf[hdrVersion:], h.Version)
	be.PutUint32(buf[hdrBackingFileSize:], 0)
	be.PutUint32(buf[hdrClusterBits:], h.ClusterBits)
	be.PutUint64(buf[hdrSize:], h.Size)
	be.PutUint32(buf[hdrCryptMethod:], h.CryptMethod)
	be.PutUint32(buf[hdrL1Size:], h.L1Size)
	be.PutUint64(buf[hdrL1TableOffset:], h.L1TableOffset)
	be.PutUint64(buf[hdrRefcountTableOffset:], h.RefcountTableOffset)
	be.PutUint32(buf[hdrRefcountTableClust:], h.RefcountTableClusters)
	be.PutUint32(buf[hdrNbSnapshots:], h.NbSnapshots)
	be.PutUint64(buf[hdrSnapshotsOffset:], h.SnapshotsOffset)
	if h.Version >= 3 {
		be.PutUint64(buf[hdrIncompatible:], h.Incompatible)
		be.PutUint64(buf[hdrCompatible:], h.Compatible)
		be.PutUint64(buf[hdrAutoclear:], h.Autoclear)
		be.PutUint32(buf[hdrRefcountOrder:], h.RefcountOrder)
		be.PutUint32(buf[hdrHeaderLength:], hl)
		buf[hdrCompressionType] = h.CompressionType
	}
	ext := func(typ uint32, data []byte) {
		var hd [8]byte
		be.PutUint32(hd[:], typ)
		be.PutUint32(hd[4:], uint32(len(data)))
		buf = append(buf, hd[:]...)
		buf = append(buf, data...)
		for len(buf)%8 != 0 {
			buf = append(buf, 0)
		}
	}
	if h.BackingFormat != "" {
		ext(extBackingFormat, []byte(h.BackingFormat))
	}
	if h.DataFile != "" {
		ext(extExternalDataFile, []byte(h.DataFile))
	}
	if h.Crypto != nil {
		// qemu writes it before the feature table.
		var c [16]byte
		be.PutUint64(c[:], h.Crypto.Offset)
		be.PutUint64(c[8:], h.Crypto.Length)
		ext(extCryptoHeader, c[:])
	}
	if h.Version >= 3 {
		if len(h.Features) > 0 {
			ft := make([]byte, 48*len(h.Features))
			for i, f := range h.Features {
				ft[i*48] = f.Type
				ft[i*48+1] = f.Bit
				copy(ft[i*48+2:i*48+48], f.Name)
			}
			ext(extFeatureTable, ft)
		}
		if h.Bitmaps != nil {
			var b [24]byte
			be.PutUint32(b[:], h.Bitmaps.NbBitmaps)
			be.PutUint64(b[8:], h.Bitmaps.DirSize)
			be.PutUint64(b[16:], h.Bitmaps.DirOffset)
			ext(extBitmaps, b[:])
		}
	}
	for _, u := range h.Unknown {
		ext(u.Type, u.Data)
	}
	if h.Version >= 3 || h.BackingFile != "" {
		ext(extEnd, nil)
	}
	if h.BackingFile != "" {
		if len(h.BackingFile) > maxBackingFileName {
			return nil, fmt.Errorf("%w: backing file name is %d bytes, limit %d", ErrInvalidOption, len(h.BackingFile), maxBackingFileName)
		}
		be.PutUint64(buf[hdrBackingFileOffset:], uint64(len(buf)))
		be.PutUint32(buf[hdrBackingFileSize:], uint32(len(h.BackingFile)))
		buf = append(buf, h.BackingFile...)
	}
	if uint64(len(buf)) > uint64(1)<<h.ClusterBits {
		if len(h.Features) > 0 {
			// The feature name table is informational: with small
			// clusters qemu leaves it out to make room (e.g. for the
			// bitmaps extension); so do we.
			h2 := *h
			h2.Features = nil
			return h2.encode()
		}
		return nil, fmt.Errorf("%w: header and extensions (%d bytes) do not fit in one cluster", ErrInvalidOption, len(buf))
	}
	return buf, nil
}

// defaultFeatureTable is the feature name table qemu writes into v3 images.
func defaultFeatureTable() []featureName {
	return []featureName{
		{0, 0, "dirty bit"},
		{0, 1, "corrupt bit"},
		{0, 2, "external data file"},
		{0, 3, "compression type"},
		{0, 4, "extended L2 entries"},
		{1, 0, "lazy refcounts"},
		{2, 0, "bitmaps"},
		{2, 1, "raw external data"},
	}
}
