package qcow2

import "fmt"

// On-disk layout of qcow2 (QEMU docs/interop/qcow2.rst). All integers are
// big-endian. Offsets below are byte offsets in the header.
const (
	magic = 0x514649fb // "QFI\xfb"

	hdrMagic               = 0
	hdrVersion             = 4
	hdrBackingFileOffset   = 8
	hdrBackingFileSize     = 16
	hdrClusterBits         = 20
	hdrSize                = 24
	hdrCryptMethod         = 32
	hdrL1Size              = 36
	hdrL1TableOffset       = 40
	hdrRefcountTableOffset = 48
	hdrRefcountTableClust  = 56
	hdrNbSnapshots         = 60
	hdrSnapshotsOffset     = 64
	hdrIncompatible        = 72
	hdrCompatible          = 80
	hdrAutoclear           = 88
	hdrRefcountOrder       = 96
	hdrHeaderLength        = 100
	hdrCompressionType     = 104

	headerV2Len = 72
	headerV3Len = 104 // minimum v3 header
	// headerV3FullLen is the header length we write for v3: it includes the
	// compression type byte padded to a multiple of 8, as qemu does.
	headerV3FullLen = 112

	minClusterBits = 9
	maxClusterBits = 21

	// Limits qemu enforces when opening (block/qcow2.h).
	maxL1Bytes            = 32 << 20 // QCOW_MAX_L1_SIZE
	maxRefcountTableBytes = 8 << 20  // QCOW_MAX_REFTABLE_SIZE
	maxSnapshots          = 65536
	maxSnapshotExtraData  = 1024
	maxBackingFileName    = 1023
	maxBitmaps            = 65535
	maxBitmapDirSize      = 1024 * maxBitmaps
	maxBitmapNameSize     = 1023
	maxExtensionsSize     = 1 << 20 // header extensions must fit in the first cluster anyway

	// maxLUKSRegion bounds the LUKS header region a crypto header
	// extension may declare (QEMU's own is about 2 MiB; 8 slots of 4000
	// stripes of a 64-byte key, with alignment, need under 2.1 MiB).
	maxLUKSRegion = 16 << 20

	// crypt_method values.
	cryptNone = 0
	cryptAES  = 1
	cryptLUKS = 2

	// Header extension types.
	extEnd              = 0x00000000
	extBackingFormat    = 0xe2792aca
	extFeatureTable     = 0x6803f857
	extBitmaps          = 0x23852875
	extCryptoHeader     = 0x0537be77
	extExternalDataFile = 0x44415441
)

// Incompatible feature bits.
const (
	IncompatDirty           = 1 << 0
	IncompatCorrupt         = 1 << 1
	IncompatExternalData    = 1 << 2
	IncompatCompressionType = 1 << 3
	IncompatExtendedL2      = 1 << 4

	incompatKnown = IncompatDirty | IncompatCorrupt | IncompatExternalData | IncompatCompressionType | IncompatExtendedL2
)

// Compatible and autoclear feature bits.
const (
	CompatLazyRefcounts = 1 << 0

	AutoclearBitmaps     = 1 << 0
	AutoclearDataFileRaw = 1 << 1
	// AutoclearCrashConsistentBitmaps is qcow2-csi's own autoclear bit: set
	// while a writer keeps the enabled bitmaps crash-consistent on disk
	// (OpenOptions.CrashConsistentBitmaps), so that bitmaps found in_use
	// may still be trusted. A writer that does not know it clears it before
	// writing, as the spec requires for unknown autoclear bits, which is
	// exactly what makes it safe: once anyone else wrote, in_use means
	// inconsistent again. The highest bit keeps clear of the bits qemu
	// assigns from the bottom.
	AutoclearCrashConsistentBitmaps = 1 << 63
	autoclearKnown                  = AutoclearBitmaps | AutoclearDataFileRaw | AutoclearCrashConsistentBitmaps
)

// Compression types (header byte 104).
const (
	CompressionZlib = 0
	CompressionZstd = 1
)

// Entry bits shared by L1, L2 and refcount table entries.
const (
	oflagCopied     = uint64(1) << 63
	oflagCompressed = uint64(1) << 62
	oflagZero       = uint64(1) << 0
	offsetMask      = uint64(0x00fffffffffffe00) // bits 9-55

	l1ReservedMask       = uint64(0x7f000000000001ff)
	l2StdReservedMask    = uint64(0x3f000000000001fe)
	refTableReservedMask = uint64(0x1ff)

	subclustersPerCluster = 32
	l2BitmapAllAlloc      = uint64(0xffffffff)
	l2BitmapAllZero       = uint64(0xffffffff) << 32
)

// l1Entry is one entry of an L1 table: the offset of an L2 table plus the
// COPIED flag (set when the L2 table's refcount is exactly one, i.e. it may
// be written in place).
type l1Entry uint64

func (e l1Entry) offset() int64    { return int64(uint64(e) & offsetMask) }
func (e l1Entry) copied() bool     { return uint64(e)&oflagCopied != 0 }
func (e l1Entry) reserved() uint64 { return uint64(e) & l1ReservedMask }

func (e l1Entry) String() string {
	if e.offset() == 0 {
		return "l1(unallocated)"
	}
	return fmt.Sprintf("l1(l2@%#x copied=%t)", e.offset(), e.copied())
}

// l2Entry is the 64-bit descriptor of one guest cluster. For extended L2
// images it is followed by an l2Bitmap.
type l2Entry uint64

func (e l2Entry) compressed() bool { return uint64(e)&oflagCompressed != 0 }
func (e l2Entry) copied() bool     { return uint64(e)&oflagCopied != 0 }

// zeroFlag is bit 0 of a standard descriptor: the cluster reads as zeroes
// (v3 without extended L2 only).
func (e l2Entry) zeroFlag() bool { return !e.compressed() && uint64(e)&oflagZero != 0 }

// offset is the host offset of a standard (uncompressed) cluster.
func (e l2Entry) offset() int64 { return int64(uint64(e) & offsetMask) }

// compressedRange decodes a compressed descriptor: the host byte offset
// where the compressed data starts and how many bytes it may span (a whole
// number of 512-byte sectors counted from the sector holding the start).
func (e l2Entry) compressedRange(clusterBits uint32) (off, size int64) {
	x := 62 - (clusterBits - 8)
	v := uint64(e) &^ (oflagCopied | oflagCompressed)
	off = int64(v & (uint64(1)<<x - 1))
	nsec := int64(v>>x) + 1
	size = nsec*512 - (off & 511)
	return off, size
}

func (e l2Entry) String() string {
	switch {
	case e.compressed():
		return fmt.Sprintf("l2(compressed %#x)", uint64(e))
	case e == 0:
		return "l2(unallocated)"
	default:
		return fmt.Sprintf("l2(data@%#x copied=%t zero=%t)", e.offset(), e.copied(), e.zeroFlag())
	}
}

// l2Bitmap is the second word of an extended L2 entry: bit i (0..31) says
// subcluster i is allocated in the cluster, bit 32+i says it reads as zeroes.
type l2Bitmap uint64

func (b l2Bitmap) alloc(i uint) bool { return uint64(b)>>i&1 != 0 }
func (b l2Bitmap) zero(i uint) bool  { return uint64(b)>>(32+i)&1 != 0 }

func (b l2Bitmap) String() string {
	return fmt.Sprintf("subclusters(alloc=%08x zero=%08x)", uint32(b), uint32(b>>32))
}

// refTableEntry is one refcount table entry: the offset of a refcount block.
type refTableEntry uint64

// offset is the block's offset in a table open validated (loadRefTable
// keeps only entries for which hostOffset holds).
func (e refTableEntry) offset() int64 { return int64(uint64(e) &^ refTableReservedMask) }

// rawOffset is the offset as the spec reads it: bits 9-63, unchecked.
func (e refTableEntry) rawOffset() uint64 { return uint64(e) &^ refTableReservedMask }

// hostOffset is the block's offset, and whether the entry can name one:
// no reserved bit set and the offset within the 56 bits host offsets have
// (offsetMask, as in L1 and L2 entries). The spec gives the offset bits up
// to 63, but a higher offset lies outside any image, and taken as an int64
// it would turn negative.
func (e refTableEntry) hostOffset() (int64, bool) {
	o := e.rawOffset()
	return int64(o & offsetMask), uint64(e)&refTableReservedMask == 0 && o <= offsetMask
}

func (e refTableEntry) String() string { return fmt.Sprintf("reftable(block@%#x)", e.offset()) }

// clusterKind classifies what a guest cluster (or subcluster) reads as.
type clusterKind uint8

const (
	kindUnallocated clusterKind = iota // falls through to the backing file, or zeroes
	kindZero                           // reads as zeroes (zero flag / subcluster zero bit)
	kindZeroAlloc                      // zero flag with a preallocated host cluster
	kindNormal                         // data at a host offset
	kindCompressed                     // compressed data
	// kindUnallocatedAlloc: an unallocated subcluster of an allocated host
	// cluster (extended L2): reads like kindUnallocated.
	kindUnallocatedAlloc
)

func (k clusterKind) String() string {
	return [...]string{"unallocated", "zero", "zero-alloc", "normal", "compressed", "unallocated-alloc"}[k]
}
