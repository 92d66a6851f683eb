package qcow2

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"
)

func seedFiles(f *testing.F) [][]byte {
	paths, _ := filepath.Glob("testdata/*.qcow2")
	var out [][]byte
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		out = append(out, b)
	}
	if len(out) == 0 {
		f.Fatal("no seed images in testdata")
	}
	return out
}

// FuzzHeader: the header and extension decoder never panics, and what it
// accepts re-encodes to something it decodes the same way.
func FuzzHeader(f *testing.F) {
	for _, b := range seedFiles(f) {
		f.Add(b[:min(len(b), 4096)])
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := decodeHeader(b, int64(len(b))+1<<30)
		if err != nil {
			return
		}
		enc, err := h.encode()
		if err != nil {
			return
		}
		enc = append(enc, make([]byte, max(0, int(headerV3FullLen)-len(enc)))...)
		h2, err := decodeHeader(enc, int64(len(enc))+1<<30)
		if err != nil {
			t.Fatalf("re-decode: %v", err)
		}
		if h2.Size != h.Size || h2.ClusterBits != h.ClusterBits || h2.L1Size != h.L1Size ||
			h2.BackingFile != h.BackingFile || h2.BackingFormat != h.BackingFormat || len(h2.Unknown) != len(h.Unknown) {
			t.Fatalf("round trip changed the header: %+v -> %+v", h, h2)
		}
	})
}

// FuzzOpen: opening and reading a hostile image never panics and stays
// within bounded memory (tables are capped by qemu's limits).
func FuzzOpen(f *testing.F) {
	for _, b := range seedFiles(f) {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		p := filepath.Join(t.TempDir(), "f.qcow2")
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		img, err := Open(p, OpenOptions{ReadOnly: true, NoLock: true, NoBacking: true})
		if err != nil {
			return
		}
		defer img.Close()
		n := min(img.Size(), 1<<20)
		buf := make([]byte, n)
		_, _ = img.ReadAt(buf, 0)
		_, _ = img.ReadAt(buf, max(0, img.Size()-n))
		_, _ = img.BlockStatus(0, min(img.Size(), 64<<20))
		img.mu.Lock()
		_, _ = img.countReferences(func(string, error) {})
		img.mu.Unlock()
	})
}

// FuzzL2Entry: entry decoding (plain, extended, compressed) never panics
// and compressed ranges stay inside what the descriptor can express.
func FuzzL2Entry(f *testing.F) {
	f.Add(uint64(0x8000000000050000), uint64(0), uint8(16), true)
	f.Add(uint64(0x4000000000012345), uint64(0), uint8(12), false)
	f.Add(uint64(0x8000000000010000), uint64(0xffff0000ffff), uint8(16), true)
	f.Fuzz(func(t *testing.T, e, bm uint64, cb uint8, ext bool) {
		cb = minClusterBits + cb%(maxClusterBits-minClusterBits+1)
		img := &Image{clusterBits: uint32(cb), clusterSize: 1 << cb, extL2: ext, fileEnd: 1 << 40, hdr: &header{Version: 3}}
		k, err := img.classify(l2Entry(e), l2Bitmap(bm), int(bm%32), func() string { return "x" })
		if err == nil && k == kindCompressed {
			off, size := l2Entry(e).compressedRange(uint32(cb))
			if off < 0 || size <= 0 || size > int64(1)<<(cb+1)+512 {
				t.Fatalf("compressed range %d+%d for %#x", off, size, e)
			}
		}
		_ = l2Entry(e).String()
		_ = l1Entry(e).String()
		_ = l2Bitmap(bm).String()
	})
}

// FuzzRefcountBlock: refcount entries of every width read back what was
// written and never touch neighbours.
func FuzzRefcountBlock(f *testing.F) {
	for _, b := range seedFiles(f) {
		if len(b) >= 3*4096 {
			f.Add(b[2*4096:3*4096], uint8(4), uint16(3), uint64(7))
		}
	}
	f.Fuzz(func(t *testing.T, blk []byte, order uint8, idx uint16, v uint64) {
		order %= 7
		if len(blk) < 512 {
			return
		}
		blk = blk[:512]
		ents := int64(512*8) >> order
		i := int64(idx) % ents
		v &= 1<<(uint(1)<<order) - 1
		if order == 6 {
			v = binary.BigEndian.Uint64(append(make([]byte, 0, 8), blk[:8]...))
		}
		before := bytes.Clone(blk)
		setRefEntry(blk, uint32(order), i, v)
		if got := getRefEntry(blk, uint32(order), i); got != v {
			t.Fatalf("order %d idx %d: wrote %d read %d", order, i, v, got)
		}
		for j := int64(0); j < ents; j++ {
			if j != i && getRefEntry(blk, uint32(order), j) != getRefEntry(before, uint32(order), j) {
				t.Fatalf("order %d: writing %d changed entry %d", order, i, j)
			}
		}
	})
}

// FuzzSnapshotTable and FuzzBitmapDirectory: decoders never panic and
// round-trip.
// FuzzSnapshotTable decodes arbitrary snapshot tables. Seeds: tables cut
// out of qemu-made images (testdata/snapshot-table: qemu-img snapshot -c on
// compat 1.1 and 0.10, savevm with VM state) and a pre-1.1 entry without
// extra data. What we write back (with the extra data qemu writes filled
// in) must decode to the same snapshots, and extra data of 24 bytes or
// more (VM state entries, unknown fields) must survive byte for byte.
func FuzzSnapshotTable(f *testing.F) {
	f.Add(encodeSnapshotTable([]snapshotEntry{{L1TableOffset: 65536, L1Size: 1, ID: "1", Name: "s", DiskSize: 1 << 20}}), uint32(1))
	for _, s := range snapshotTableSeeds(f) {
		f.Add(s[4:], binary.BigEndian.Uint32(s))
	}
	f.Fuzz(func(t *testing.T, b []byte, n uint32) {
		n %= 64
		s, _, err := decodeSnapshotTable(b, n, 0, 16, 1<<40)
		if err != nil {
			return
		}
		s2, _, err := decodeSnapshotTable(encodeSnapshotTable(s), n, 0, 16, 1<<40)
		if err != nil || len(s2) != len(s) {
			t.Fatalf("round trip: %v", err)
		}
		for i := range s {
			if s[i].Name != s2[i].Name || s[i].ID != s2[i].ID || s[i].L1TableOffset != s2[i].L1TableOffset {
				t.Fatalf("round trip changed entry %d", i)
			}
		}
		checkSnapshotRewrite(t, s, n)
	})
}

func FuzzBitmapDirectory(f *testing.F) {
	f.Add(encodeBitmapDirectory([]bitmapDirEntry{{TableOffset: 65536, TableSize: 1, Type: 1, GranularityBits: 16, Name: "b"}}), uint32(1))
	f.Fuzz(func(t *testing.T, b []byte, n uint32) {
		n %= 64
		d, err := decodeBitmapDirectory(b, n, 0, 16, 1<<40)
		if err != nil {
			return
		}
		d2, err := decodeBitmapDirectory(encodeBitmapDirectory(d), n, 0, 16, 1<<40)
		if err != nil || len(d2) != len(d) {
			t.Fatalf("round trip: %v", err)
		}
	})
}
