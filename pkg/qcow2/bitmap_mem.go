package qcow2

import (
	"encoding/binary"
	"math/bits"
	"sync/atomic"
)

// dirtyBitmap is the in-memory form of one dirty bitmap: bit i covers the
// virtual-disk bytes [i<<granBits, (i+1)<<granBits). The bits live in 64-bit
// words whose little-endian byte image is exactly the on-disk serialization
// (bit i is bit i%8 of byte i/8), so loading or storing one cluster of bitmap
// data is a word copy.
//
// The write path only ever sets bits, with atomic OR, so tracking takes no
// lock of its own. Whoever replaces the word slice (resize) or needs a stable
// view must exclude the write path through the owning bitmapSet's lock.
type dirtyBitmap struct {
	granBits uint
	size     uint64 // virtual size covered, in bytes
	nbits    uint64
	words    []uint64
}

func newDirtyBitmap(size uint64, granBits uint) *dirtyBitmap {
	b := &dirtyBitmap{granBits: granBits}
	b.setSize(size)
	return b
}

// bitCount is how many bits a bitmap of this granularity needs for size bytes.
func bitCount(size uint64, granBits uint) uint64 {
	if size == 0 {
		return 0
	}
	return (size-1)>>granBits + 1
}

func (b *dirtyBitmap) setSize(size uint64) {
	nbits := bitCount(size, b.granBits)
	nwords := (nbits + 63) / 64
	if uint64(len(b.words)) != nwords {
		w := make([]uint64, nwords)
		copy(w, b.words)
		b.words = w
	}
	b.size, b.nbits = size, nbits
	b.maskTail()
}

// maskTail clears the bits past nbits in the last word: they describe no
// part of the disk and must read (and serialize) as zero.
func (b *dirtyBitmap) maskTail() {
	if r := b.nbits % 64; r != 0 {
		b.words[len(b.words)-1] &= (1 << r) - 1
	}
}

// bitRange converts a byte range to the half-open bit range that covers it,
// clipped to the disk. ok is false when nothing of the range is on the disk.
func (b *dirtyBitmap) bitRange(off, n uint64) (first, end uint64, ok bool) {
	if n == 0 || off >= b.size {
		return 0, 0, false
	}
	last := off + n - 1
	if last < off || last >= b.size { // overflow or past the end
		last = b.size - 1
	}
	return off >> b.granBits, last>>b.granBits + 1, true
}

// setRange marks every block touched by [off, off+n) dirty. Safe to call
// concurrently with itself and with readers.
func (b *dirtyBitmap) setRange(off, n uint64) {
	first, end, ok := b.bitRange(off, n)
	if !ok {
		return
	}
	b.setBits(first, end)
}

// wordMask returns the word that holds bit first and the mask of the bits of
// [first, end) in that word.
func wordMask(first, end uint64) (w, mask uint64) {
	w = first / 64
	lo := first % 64
	hi := uint64(64)
	if (w+1)*64 > end {
		hi = end - w*64
	}
	mask = ^uint64(0) << lo
	if hi < 64 {
		mask &= (1 << hi) - 1
	}
	return w, mask
}

func (b *dirtyBitmap) setBits(first, end uint64) {
	for first < end {
		w, mask := wordMask(first, end)
		if atomic.LoadUint64(&b.words[w])&mask != mask {
			atomic.OrUint64(&b.words[w], mask)
		}
		first = (w + 1) * 64
	}
}

func (b *dirtyBitmap) clearAll() {
	for i := range b.words {
		atomic.StoreUint64(&b.words[i], 0)
	}
}

func (b *dirtyBitmap) word(i uint64) uint64 { return atomic.LoadUint64(&b.words[i]) }

// next finds the first bit at or after from, before limit, whose value is
// dirty; it returns limit when there is none. Whole words are skipped, so a
// sparse bitmap of a huge disk is scanned at memory speed.
func (b *dirtyBitmap) next(from, limit uint64, dirty bool) uint64 {
	for from < limit {
		w := b.word(from / 64)
		if !dirty {
			w = ^w
		}
		w &= ^uint64(0) << (from % 64)
		if w != 0 {
			p := from - from%64 + uint64(bits.TrailingZeros64(w))
			if p > limit {
				return limit
			}
			return p
		}
		from = from - from%64 + 64
	}
	return limit
}

// runStart returns where the run of dirty bits ending just before end
// starts (end itself when bit end-1 is clean), looking back no further
// than floor.
func (b *dirtyBitmap) runStart(end, floor uint64) uint64 {
	for end > floor {
		i := end - 1
		w := ^b.word(i / 64) // clean bits
		w &= ^uint64(0) >> (63 - i%64)
		if w != 0 {
			return max(i-i%64+uint64(63-bits.LeadingZeros64(w))+1, floor)
		}
		end = i - i%64
	}
	return floor
}

// countDirty is the number of dirty bits.
func (b *dirtyBitmap) countDirty() uint64 {
	var n uint64
	for i := range b.words {
		n += uint64(bits.OnesCount64(b.word(uint64(i))))
	}
	return n
}

// BitmapExtent is a run of the virtual disk that a dirty bitmap reports as
// uniformly dirty or clean, at the bitmap's granularity and clipped to the
// range asked for (the shape qemu-nbd serves as qemu:dirty-bitmap:NAME).
type BitmapExtent struct {
	Offset int64 `json:"offset"`
	Length int64 `json:"length"`
	Dirty  bool  `json:"dirty"`
}

// extents lists [off, off+n) ∩ disk as alternating clean/dirty runs.
func (b *dirtyBitmap) extents(off, n uint64, fn func(BitmapExtent) bool) {
	first, end, ok := b.bitRange(off, n)
	if !ok {
		return
	}
	stop := off + n
	if stop < off || stop > b.size {
		stop = b.size
	}
	pos := off
	bit := first
	for bit < end {
		dirty := b.word(bit/64)&(1<<(bit%64)) != 0
		nb := b.next(bit, end, !dirty)
		e := nb << b.granBits
		if nb == end || e > stop {
			e = stop
		}
		if !fn(BitmapExtent{Offset: int64(pos), Length: int64(e - pos), Dirty: dirty}) {
			return
		}
		pos, bit = e, nb
	}
}

// mergeFrom ORs src into b. Granularities may differ: every block src marks
// dirty makes dirty every block of b that overlaps it, so the result never
// misses a change (it may only widen it to b's granularity).
func (b *dirtyBitmap) mergeFrom(src *dirtyBitmap) {
	if src.granBits == b.granBits {
		n := min(len(b.words), len(src.words))
		for i := 0; i < n; i++ {
			if w := src.word(uint64(i)); w != 0 {
				atomic.OrUint64(&b.words[i], w)
			}
		}
		b.maskTail()
		return
	}
	src.extents(0, src.size, func(e BitmapExtent) bool {
		if e.Dirty {
			b.setRange(uint64(e.Offset), uint64(e.Length))
		}
		return true
	})
}

// Serialization by clusters: table entry i of a bitmap stored with cluster
// size cs holds bits [i*cs*8, (i+1)*cs*8).

// tableSize is the number of bitmap table entries (data clusters) needed.
func (b *dirtyBitmap) tableSize(clusterSize uint64) uint64 {
	bitsPerCluster := clusterSize * 8
	return (b.nbits + bitsPerCluster - 1) / bitsPerCluster
}

// chunkState tells whether cluster i of the serialization is all clean, all
// dirty (over the bits that exist), or mixed.
func (b *dirtyBitmap) chunkState(i, clusterSize uint64) (allZero, allOnes bool) {
	first := i * clusterSize * 8
	end := min(first+clusterSize*8, b.nbits)
	if first >= end {
		return true, false
	}
	return b.next(first, end, true) == end, b.next(first, end, false) == end
}

// serializeChunk writes cluster i of the serialization into buf (len =
// cluster size); bits past the end of the disk are zero.
func (b *dirtyBitmap) serializeChunk(i uint64, buf []byte) {
	cs := uint64(len(buf))
	w0 := i * cs / 8
	for j := uint64(0); j < cs/8; j++ {
		var w uint64
		if w0+j < uint64(len(b.words)) {
			w = b.word(w0 + j)
		}
		binary.LittleEndian.PutUint64(buf[j*8:], w)
	}
}

// deserializeChunk ORs cluster i of a serialization into the bitmap.
func (b *dirtyBitmap) deserializeChunk(i uint64, buf []byte) {
	cs := uint64(len(buf))
	w0 := i * cs / 8
	for j := uint64(0); j < cs/8 && w0+j < uint64(len(b.words)); j++ {
		if w := binary.LittleEndian.Uint64(buf[j*8:]); w != 0 {
			atomic.OrUint64(&b.words[w0+j], w)
		}
	}
	b.maskTail()
}

// setChunk marks every bit of cluster i dirty (an all-ones table entry).
func (b *dirtyBitmap) setChunk(i, clusterSize uint64) {
	first := i * clusterSize * 8
	end := min(first+clusterSize*8, b.nbits)
	if first < end {
		b.setBits(first, end)
	}
}
