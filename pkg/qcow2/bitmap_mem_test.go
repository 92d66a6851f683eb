package qcow2

import (
	"math/rand/v2"
	"reflect"
	"testing"
)

// naiveBitmap is the obviously-correct model dirtyBitmap is checked against.
type naiveBitmap struct {
	gran uint64
	size uint64
	bits []bool
}

func newNaive(size uint64, granBits uint) *naiveBitmap {
	return &naiveBitmap{gran: 1 << granBits, size: size, bits: make([]bool, bitCount(size, granBits))}
}

func (m *naiveBitmap) set(off, n uint64) {
	for i := range m.bits {
		s, e := uint64(i)*m.gran, uint64(i+1)*m.gran
		if n > 0 && off < m.size && off < e && off+n > s {
			m.bits[i] = true
		}
	}
}

func (m *naiveBitmap) extents(off, n uint64) []BitmapExtent {
	var out []BitmapExtent
	end := min(off+n, m.size)
	for pos := off; pos < end; {
		d := m.bits[pos/m.gran]
		e := pos
		for e < end && m.bits[e/m.gran] == d {
			e = min((e/m.gran+1)*m.gran, end)
		}
		out = append(out, BitmapExtent{Offset: int64(pos), Length: int64(e - pos), Dirty: d})
		pos = e
	}
	return out
}

func collect(b *dirtyBitmap, off, n uint64) []BitmapExtent {
	var out []BitmapExtent
	b.extents(off, n, func(e BitmapExtent) bool { out = append(out, e); return true })
	return out
}

func TestDirtyBitmapAgainstModel(t *testing.T) {
	for _, tc := range []struct {
		name     string
		size     uint64
		granBits uint
	}{
		{"aligned", 1 << 20, 9},
		{"unaligned-size", 1<<20 + 4097, 12},
		{"one-word-edge", 64 * 512, 9},
		{"big-granularity", 3<<20 + 1, 16},
		{"tiny", 1, 9},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := rand.New(rand.NewPCG(uint64(tc.size), uint64(tc.granBits)))
			b := newDirtyBitmap(tc.size, tc.granBits)
			m := newNaive(tc.size, tc.granBits)
			for i := 0; i < 200; i++ {
				off := r.Uint64N(tc.size + 1000)
				n := r.Uint64N(tc.size/8 + 2)
				b.setRange(off, n)
				m.set(off, n)
				qo := r.Uint64N(tc.size)
				qn := r.Uint64N(tc.size-qo) + 1
				if got, want := collect(b, qo, qn), m.extents(qo, qn); !reflect.DeepEqual(got, want) {
					t.Fatalf("step %d extents(%d,%d):\n got %v\nwant %v", i, qo, qn, got, want)
				}
			}
			if got, want := collect(b, 0, tc.size), m.extents(0, tc.size); !reflect.DeepEqual(got, want) {
				t.Fatalf("full extents:\n got %v\nwant %v", got, want)
			}
			var n uint64
			for _, v := range m.bits {
				if v {
					n++
				}
			}
			if b.countDirty() != n {
				t.Fatalf("countDirty = %d, want %d", b.countDirty(), n)
			}
		})
	}
}

func TestDirtyBitmapSerializeRoundTrip(t *testing.T) {
	const cs = 512
	b := newDirtyBitmap(10<<20+3, 9) // 20481 bits: 5 chunks of 4096 bits, last partial
	b.setRange(0, 1)
	b.setRange(4096*512, 4096*512) // exactly chunk 1: all ones
	b.setRange(10<<20, 100)        // the tail
	if got := b.tableSize(cs); got != 6 {
		t.Fatalf("tableSize = %d, want 6", got)
	}
	states := [][2]bool{}
	for i := uint64(0); i < 6; i++ {
		z, o := b.chunkState(i, cs)
		states = append(states, [2]bool{z, o})
	}
	want := [][2]bool{{false, false}, {false, true}, {true, false}, {true, false}, {true, false}, {false, true}}
	if !reflect.DeepEqual(states, want) {
		t.Fatalf("chunk states %v, want %v", states, want)
	}
	c := newDirtyBitmap(b.size, 9)
	buf := make([]byte, cs)
	for i := uint64(0); i < 6; i++ {
		b.serializeChunk(i, buf)
		c.deserializeChunk(i, buf)
	}
	if !reflect.DeepEqual(b.words, c.words) {
		t.Fatal("serialize/deserialize did not round-trip")
	}
	d := newDirtyBitmap(b.size, 9)
	d.setChunk(5, cs)
	if got := collect(d, 0, d.size); !reflect.DeepEqual(got, []BitmapExtent{{0, 10 << 20, false}, {10 << 20, 3, true}}) {
		t.Fatalf("all-ones tail chunk: %v", got)
	}
	// Hostile data with bits past the end of the disk must not show up.
	e := newDirtyBitmap(b.size, 9)
	for i := range buf {
		buf[i] = 0xff
	}
	e.deserializeChunk(5, buf)
	if e.countDirty() != 1 {
		t.Fatalf("bits past the end survived: %d dirty", e.countDirty())
	}
}

func TestDirtyBitmapMergeGranularities(t *testing.T) {
	const size = 1 << 20
	for _, tc := range []struct {
		name          string
		dstBits, srcB uint
	}{{"same", 12, 12}, {"finer-src", 16, 9}, {"coarser-src", 9, 16}} {
		t.Run(tc.name, func(t *testing.T) {
			r := rand.New(rand.NewPCG(1, uint64(tc.dstBits)))
			dst, src := newDirtyBitmap(size, tc.dstBits), newDirtyBitmap(size, tc.srcB)
			md := newNaive(size, tc.dstBits)
			for i := 0; i < 50; i++ {
				o, n := r.Uint64N(size), r.Uint64N(20000)
				dst.setRange(o, n)
				md.set(o, n)
				o, n = r.Uint64N(size), r.Uint64N(20000)
				src.setRange(o, n)
			}
			// The union is: dst's bits plus every dst block that overlaps a
			// dirty src block.
			for _, e := range collect(src, 0, size) {
				if e.Dirty {
					md.set(uint64(e.Offset), uint64(e.Length))
				}
			}
			dst.mergeFrom(src)
			if got, want := collect(dst, 0, size), md.extents(0, size); !reflect.DeepEqual(got, want) {
				t.Fatalf("merge:\n got %v\nwant %v", got, want)
			}
		})
	}
}

func TestDirtyBitmapResize(t *testing.T) {
	b := newDirtyBitmap(1<<20, 9)
	b.setRange(0, 1<<20)
	b.setSize(1<<19 + 100)
	if got := collect(b, 0, 1<<20); !reflect.DeepEqual(got, []BitmapExtent{{0, 1<<19 + 100, true}}) {
		t.Fatalf("after shrink: %v", got)
	}
	b.setSize(1 << 21)
	want := []BitmapExtent{{0, 1<<19 + 512, true}, {1<<19 + 512, 1<<21 - (1<<19 + 512), false}}
	if got := collect(b, 0, 1<<21); !reflect.DeepEqual(got, want) {
		t.Fatalf("after grow: %v, want %v", got, want)
	}
}

func BenchmarkBitmapExtents1TiB(b *testing.B) {
	// 1 TiB at 64 KiB granularity: 16 Mi bits, 2 MiB of words, with a
	// sprinkling of dirty runs as a CBT bitmap after a day of writes has.
	const size = 1 << 40
	bm := newDirtyBitmap(size, 16)
	r := rand.New(rand.NewPCG(7, 7))
	for i := 0; i < 10000; i++ {
		bm.setRange(r.Uint64N(size), r.Uint64N(1<<22))
	}
	b.SetBytes(int64(len(bm.words) * 8))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		n := 0
		bm.extents(0, size, func(BitmapExtent) bool { n++; return true })
		if n == 0 {
			b.Fatal("no extents")
		}
	}
}

func TestDirtyBitmapRunStart(t *testing.T) {
	b := newDirtyBitmap(1000, 0) // 1000 bits
	b.setBits(10, 20)
	b.setBits(60, 200)
	for _, c := range []struct{ end, floor, want uint64 }{
		{20, 0, 10},     // the whole run
		{15, 0, 10},     // inside a run
		{10, 0, 10},     // bit 9 clean: empty run
		{25, 0, 25},     // bit 24 clean
		{200, 0, 60},    // a run across words
		{200, 100, 100}, // floor stops the look back
		{130, 0, 60},
		{0, 0, 0},
	} {
		if got := b.runStart(c.end, c.floor); got != c.want {
			t.Errorf("runStart(%d, %d) = %d, want %d", c.end, c.floor, got, c.want)
		}
	}
	full := newDirtyBitmap(128, 0)
	full.setBits(0, 128)
	if got := full.runStart(128, 0); got != 0 {
		t.Errorf("runStart over a full bitmap = %d, want 0", got)
	}
}

// orShadowChunk expands coarse units into exact bits, clipped to the chunk
// and to the disk.
func TestOrShadowChunk(t *testing.T) {
	exact := newDirtyBitmap(10<<20, 16)  // 160 bits of 64 KiB
	shadow := newDirtyBitmap(10<<20, 20) // 10 units of 1 MiB
	shadow.setBits(1, 2)
	shadow.setBits(9, 10)
	exact.setBits(3, 4)
	buf := make([]byte, 512) // 4096 bits per chunk: one chunk
	exact.serializeChunk(0, buf)
	orShadowChunk(buf, 0, exact, shadow)
	got := newDirtyBitmap(10<<20, 16)
	got.deserializeChunk(0, buf)
	want := newDirtyBitmap(10<<20, 16)
	want.setBits(3, 4)
	want.setBits(16, 32)
	want.setBits(144, 160)
	for i := uint64(0); i < 160; i++ {
		if got.next(i, i+1, true) != want.next(i, i+1, true) {
			t.Fatalf("bit %d differs after expansion", i)
		}
	}
	for _, w := range buf[160/8:] {
		if w != 0 {
			t.Fatal("bits past the disk end were set")
		}
	}
}
