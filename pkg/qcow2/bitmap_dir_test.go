package qcow2

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// rawBitmapDir digs the bitmaps extension and directory out of a qemu-made
// image with nothing but the header layout, so the decoder's seeds do not
// depend on the decoder.
func rawBitmapDir(t testing.TB, path string) (ext []byte, dir []byte, clusterSize, size uint64) {
	t.Helper()
	img, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	clusterSize = 1 << binary.BigEndian.Uint32(img[20:])
	size = binary.BigEndian.Uint64(img[24:])
	pos := int(binary.BigEndian.Uint32(img[100:]))
	for pos+8 <= len(img) {
		typ, n := binary.BigEndian.Uint32(img[pos:]), int(binary.BigEndian.Uint32(img[pos+4:]))
		if typ == 0 {
			break
		}
		if typ == 0x23852875 {
			ext = img[pos+8 : pos+8+n]
			e, err := decodeBitmapsExt(ext, clusterSize)
			if err != nil {
				t.Fatal(err)
			}
			return ext, img[e.dirOffset : e.dirOffset+e.dirSize], clusterSize, size
		}
		pos += 8 + (n+7)&^7
	}
	t.Fatalf("%s: no bitmaps extension", path)
	return
}

func TestDecodeBitmapDirectoryQemu(t *testing.T) {
	ext, dir, cs, size := rawBitmapDir(t, filepath.Join("testdata", "bitmap", "bitmaps-c512.qcow2"))
	e, _ := decodeBitmapsExt(ext, cs)
	entries, err := decodeBitmapDirectory(dir, e.dirOffset, e.nbBitmaps, cs, size)
	if err != nil {
		t.Fatal(err)
	}
	type got struct {
		name     string
		granBits uint8
		flags    uint32
	}
	var g []got
	for _, x := range entries {
		g = append(g, got{x.name, x.granBits, x.flags})
	}
	want := []got{{"auto64k", 16, bmeFlagAuto}, {"fine", 9, bmeFlagAuto}, {"frozen", 12, 0}}
	if !reflect.DeepEqual(g, want) {
		t.Fatalf("entries %+v, want %+v", g, want)
	}
	if enc := encodeBitmapDirectory(entries); !reflect.DeepEqual(enc, dir) {
		t.Fatalf("encode(decode(dir)) differs from qemu's directory")
	}
}

func validEntry(name string, off uint64) bitmapDirEntry {
	return bitmapDirEntry{tableOffset: off, tableSize: 1, flags: bmeFlagAuto, typ: 1, granBits: 16, name: name}
}

func TestDecodeBitmapDirectoryHostile(t *testing.T) {
	const cs, size, dirOff = 65536, 1 << 30, 0x10000
	enc := func(es ...bitmapDirEntry) []byte { return encodeBitmapDirectory(es) }
	patch := func(b []byte, at int, v ...byte) []byte { copy(b[at:], v); return b }
	for _, tc := range []struct {
		name string
		dir  []byte
		nb   uint32
		want string
	}{
		{"ok", enc(validEntry("a", 0x20000), validEntry("b", 0x30000)), 2, ""},
		{"more-than-nb", enc(validEntry("a", 0x20000), validEntry("b", 0x30000)), 1, "more entries than nb_bitmaps 1"},
		{"fewer-than-nb", enc(validEntry("a", 0x20000)), 2, "holds 1 entries, nb_bitmaps says 2"},
		{"truncated", enc(validEntry("a", 0x20000))[:20], 1, "is truncated"},
		{"name-past-end", patch(enc(validEntry("a", 0x20000)), 18, 0x03, 0xff), 1, "runs past the directory end"},
		{"extra-past-end", patch(enc(validEntry("a", 0x20000)), 20, 0, 0, 0x10, 0), 1, "extra_data_size 4096 exceeds"},
		{"zero-name", patch(enc(validEntry("a", 0x20000)), 18, 0, 0), 1, "name_size is 0"},
		{"reserved-flags", patch(enc(validEntry("a", 0x20000)), 12, 0, 0, 0, 0x0a), 1, "reserved bits 0x8 set"},
		{"type", patch(enc(validEntry("a", 0x20000)), 16, 2), 1, "type 2 is not"},
		{"gran-low", patch(enc(validEntry("a", 0x20000)), 17, 8), 1, "granularity_bits 8 outside 9..31"},
		{"gran-high", patch(enc(validEntry("a", 0x20000)), 17, 32), 1, "granularity_bits 32 outside"},
		{"table-misaligned", enc(validEntry("a", 0x20200)), 1, "bitmap_table_offset 0x20200 is not a cluster-aligned"},
		{"table-zero-size", patch(enc(validEntry("a", 0x20000)), 8, 0, 0, 0, 0), 1, "bitmap_table_size is 0"},
		{"table-huge", patch(enc(validEntry("a", 0x20000)), 8, 0x10, 0, 0, 0), 1, "exceeds limit 134217728"},
		{"too-small-for-disk", patch(enc(validEntry("a", 0x20000)), 17, 9), 1, "less than the disk size"},
		{"dup-names", enc(validEntry("a", 0x20000), validEntry("a", 0x30000)), 2, "both named \"a\""},
		{"table-on-header", enc(validEntry("a", 0x0)), 1, "not a cluster-aligned offset"},
		{"table-on-dir", enc(validEntry("a", dirOff)), 1, "overlaps the bitmap directory"},
		{"tables-overlap", enc(validEntry("a", 0x20000), validEntry("b", 0x20000)), 2, "overlaps the table of bitmap \"a\""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := decodeBitmapDirectory(tc.dir, dirOff, tc.nb, cs, size)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !errors.Is(err, ErrBitmapFormat) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want ErrBitmapFormat containing %q", err, tc.want)
			}
		})
	}
}

func TestDecodeBitmapDirectoryInUseMayBeShort(t *testing.T) {
	e := validEntry("a", 0x20000)
	e.granBits = 9
	e.flags |= bmeFlagInUse
	if _, err := decodeBitmapDirectory(encodeBitmapDirectory([]bitmapDirEntry{e}), 0x10000, 1, 65536, 1<<30); err != nil {
		t.Fatalf("an in-use bitmap too small for the disk must load (as inconsistent): %v", err)
	}
}

func TestExtraDataPreserved(t *testing.T) {
	e := validEntry("x", 0x20000)
	e.extra = []byte{1, 2, 3}
	dir := encodeBitmapDirectory([]bitmapDirEntry{e})
	got, err := decodeBitmapDirectory(dir, 0x10000, 1, 65536, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got[0].extra, e.extra) || got[0].usable() {
		t.Fatalf("extra %v usable %v: want preserved and unusable", got[0].extra, got[0].usable())
	}
	got[0].flags |= bmeFlagExtraDataCompatible
	if !got[0].usable() {
		t.Fatal("extra_data_compatible bitmap must be usable")
	}
}

func TestBitmapTableEntries(t *testing.T) {
	const cs = 65536
	for _, tc := range []struct {
		name string
		e    uint64
		want string
	}{
		{"zeroes", 0, ""},
		{"ones", 1, ""},
		{"data", 0x50000, ""},
		{"reserved-low", 0x2, "reserved bits"},
		{"reserved-high", 1 << 60, "reserved bits"},
		{"offset-and-ones", 0x50001, "both an offset and the all-ones bit"},
		{"misaligned", 0x50200, "not cluster aligned"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			buf := binary.BigEndian.AppendUint64(nil, tc.e)
			tab, err := decodeBitmapTable(buf, 0x10000, cs)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				if !reflect.DeepEqual(encodeBitmapTable(tab), buf) {
					t.Fatal("table did not round-trip")
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}

func TestCheckBitmapRequest(t *testing.T) {
	for _, tc := range []struct {
		name     string
		bm       string
		gran     uint64
		size     uint64
		wantBits uint8
		wantErr  string
	}{
		{"default", "b", 65536, 1 << 30, 16, ""},
		{"min", "b", 512, 1 << 30, 9, ""},
		{"max", "b", 1 << 31, 1 << 40, 31, ""},
		{"under", "b", 256, 1 << 30, 0, "under minimum"},
		{"over", "b", 1 << 32, 1 << 30, 0, "exceeds maximum"},
		{"not-pow2", "b", 3 << 10, 1 << 30, 0, "not a power of two"},
		{"name-long", strings.Repeat("n", 1024), 65536, 1 << 30, 0, "exceeds maximum (1023"},
		{"name-max", strings.Repeat("n", 1023), 65536, 1 << 30, 16, ""},
		{"too-big", "b", 512, 1 << 45, 0, "too much space"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			gb, err := checkBitmapRequest(tc.bm, tc.gran, tc.size, 65536)
			if tc.wantErr != "" {
				if err == nil || !errors.Is(err, ErrBitmapInvalid) || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || gb != tc.wantBits {
				t.Fatalf("= %d, %v; want %d", gb, err, tc.wantBits)
			}
		})
	}
}

func FuzzBitmapDirectory(f *testing.F) {
	_, dir, _, _ := rawBitmapDir(f, filepath.Join("testdata", "bitmap", "bitmaps-c512.qcow2"))
	f.Add(dir, uint32(3), uint8(9), uint64(4<<20))
	f.Add(encodeBitmapDirectory([]bitmapDirEntry{validEntry("a", 0x20000), validEntry("b", 0x30000)}), uint32(2), uint8(16), uint64(1<<30))
	f.Fuzz(func(t *testing.T, dir []byte, nb uint32, clusterBits uint8, size uint64) {
		if clusterBits < 9 || clusterBits > 21 || len(dir) > maxBitmapDirSize {
			return
		}
		cs := uint64(1) << clusterBits
		es, err := decodeBitmapDirectory(dir, 16*cs, nb, cs, size)
		if err != nil {
			if !errors.Is(err, ErrBitmapFormat) {
				t.Fatalf("error not wrapping ErrBitmapFormat: %v", err)
			}
			return
		}
		// What parses re-encodes to the same bytes apart from padding, and
		// re-parses identically.
		enc := encodeBitmapDirectory(es)
		es2, err := decodeBitmapDirectory(enc, 16*cs, nb, cs, size)
		if err != nil || !reflect.DeepEqual(es, es2) {
			t.Fatalf("re-decode: %v", err)
		}
	})
}

func FuzzBitmapTable(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}, uint8(16))
	f.Fuzz(func(t *testing.T, buf []byte, clusterBits uint8) {
		if clusterBits < 9 || clusterBits > 21 {
			return
		}
		tab, err := decodeBitmapTable(buf, 0x10000, 1<<clusterBits)
		if err != nil {
			if !errors.Is(err, ErrBitmapFormat) {
				t.Fatalf("error not wrapping ErrBitmapFormat: %v", err)
			}
			return
		}
		if !reflect.DeepEqual(encodeBitmapTable(tab), buf) && len(buf) != 0 {
			t.Fatal("table did not round-trip")
		}
	})
}
