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
			e, err := decodeBitmapsExt(ext, int64(pos+8), clusterSize)
			if err != nil {
				t.Fatal(err)
			}
			return ext, img[e.DirOffset : e.DirOffset+e.DirSize], clusterSize, size
		}
		pos += 8 + (n+7)&^7
	}
	t.Fatalf("%s: no bitmaps extension", path)
	return
}

func TestDecodeBitmapDirectoryQemu(t *testing.T) {
	ext, dir, cs, _ := rawBitmapDir(t, filepath.Join("testdata", "bitmap", "bitmaps-c512.qcow2"))
	e, _ := decodeBitmapsExt(ext, 0, cs)
	entries, err := decodeBitmapDirectory(dir, e.NbBitmaps, int64(e.DirOffset), 9, 1<<20)
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
		g = append(g, got{x.Name, x.GranularityBits, x.Flags})
	}
	want := []got{{"auto64k", 16, bitmapFlagAuto}, {"fine", 9, bitmapFlagAuto}, {"frozen", 12, 0}}
	if !reflect.DeepEqual(g, want) {
		t.Fatalf("entries %+v, want %+v", g, want)
	}
	if enc := encodeBitmapDirectory(entries); !reflect.DeepEqual(enc, dir) {
		t.Fatalf("encode(decode(dir)) differs from qemu's directory")
	}
}

func validEntry(name string, off uint64) bitmapDirEntry {
	return bitmapDirEntry{TableOffset: off, TableSize: 1, Flags: bitmapFlagAuto, Type: 1, GranularityBits: 16, Name: name}
}

func TestDecodeBitmapDirectoryHostile(t *testing.T) {
	const clusterBits, fileSize, dirOff = 16, 1 << 30, 0x10000
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
		{"truncated", enc(validEntry("a", 0x20000))[:20], 1, "runs past the end"},
		{"name-past-end", patch(enc(validEntry("a", 0x20000)), 18, 0x03, 0xff), 1, "runs past the end"},
		{"extra-past-end", patch(enc(validEntry("a", 0x20000)), 20, 0, 0, 0x10, 0), 1, "extra_data_size at offset 65556: 4096 exceeds"},
		{"zero-name", patch(enc(validEntry("a", 0x20000)), 18, 0, 0), 1, "name_size at offset 65554: is 0"},
		{"reserved-flags", patch(enc(validEntry("a", 0x20000)), 12, 0, 0, 0, 0x0a), 1, "reserved bits 0x8 set"},
		{"type", patch(enc(validEntry("a", 0x20000)), 16, 2), 1, "type at offset 65552: 2 is not"},
		{"gran-low", patch(enc(validEntry("a", 0x20000)), 17, 8), 1, "granularity_bits at offset 65553: 8 is outside 9..31"},
		{"gran-high", patch(enc(validEntry("a", 0x20000)), 17, 32), 1, "32 is outside"},
		{"table-misaligned", enc(validEntry("a", 0x20200)), 1, "0x20200 is not aligned"},
		{"table-past-eof", enc(validEntry("a", 1<<30)), 1, "extends past end of file"},
		{"table-zero-size", patch(enc(validEntry("a", 0x20000)), 8, 0, 0, 0, 0), 1, "bitmap_table_size at offset 65544: is 0"},
		{"table-huge", patch(enc(validEntry("a", 0x20000)), 8, 0x10, 0, 0, 0), 1, "exceeds limit 134217728"},
		{"table-phys", patch(enc(validEntry("a", 0x20000)), 8, 0, 0, 0x20, 1), 1, "exceed limit 536870912 bytes"},
		{"dup-names", enc(validEntry("a", 0x20000), validEntry("a", 0x30000)), 2, "\"a\" is also the name of bitmap[0]"},
		{"table-on-header", enc(validEntry("a", 0x0)), 1, "is 0 (overlaps the header)"},
		{"table-on-dir", enc(validEntry("a", dirOff)), 1, "overlaps the bitmap directory"},
		{"tables-overlap", enc(validEntry("a", 0x20000), validEntry("b", 0x20000)), 2, "overlaps the table of bitmap[0]"},
		{"too-many", enc(validEntry("a", 0x20000)), maxBitmaps + 1, "exceeds limit 65535"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := decodeBitmapDirectory(tc.dir, tc.nb, dirOff, clusterBits, fileSize)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want ErrCorrupt containing %q", err, tc.want)
			}
		})
	}
}

func TestDecodeBitmapsExt(t *testing.T) {
	good := encodeBitmapsExt(&bitmapsExt{NbBitmaps: 2, DirSize: 64, DirOffset: 0x30000})
	patch := func(at int, v ...byte) []byte { b := append([]byte(nil), good...); copy(b[at:], v); return b }
	for _, tc := range []struct {
		name string
		data []byte
		want string
	}{
		{"ok", good, ""},
		{"short", good[:20], "shorter than 24"},
		{"reserved", patch(4, 0, 0, 0, 1), "reserved at offset 104: 0x1 is not zero"},
		{"zero-bitmaps", patch(0, 0, 0, 0, 0), "nb_bitmaps at offset 100: is 0"},
		{"too-many", patch(0, 0, 1, 0, 0), "65536 exceeds limit 65535"},
		{"dir-too-big", patch(8, 0, 0, 0, 0, 0x10, 0, 0, 0), "exceeds limit 67107840"},
		{"dir-misaligned", patch(16, 0, 0, 0, 0, 0, 3, 0, 1), "0x30001 is not a cluster-aligned"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, err := decodeBitmapsExt(tc.data, 100, 65536)
			if tc.want == "" {
				if err != nil || !reflect.DeepEqual(encodeBitmapsExt(e), tc.data) {
					t.Fatalf("round trip: %v", err)
				}
				return
			}
			if err == nil || !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}

func TestExtraDataPreserved(t *testing.T) {
	e := validEntry("x", 0x20000)
	e.ExtraData = []byte{1, 2, 3}
	dir := encodeBitmapDirectory([]bitmapDirEntry{e})
	got, err := decodeBitmapDirectory(dir, 1, 0x10000, 16, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got[0].ExtraData, e.ExtraData) || got[0].usable() {
		t.Fatalf("extra %v usable %v: want preserved and unusable", got[0].ExtraData, got[0].usable())
	}
	got[0].Flags |= bitmapFlagExtraComp
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
			buf := binary.BigEndian.AppendUint64(make([]byte, 8), tc.e)
			tab, err := decodeBitmapTable(buf, 3, 0x10000, cs)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				if !reflect.DeepEqual(encodeBitmapTable(tab), buf) {
					t.Fatal("table did not round-trip")
				}
				return
			}
			if err == nil || !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "bitmap[3].bitmap_table[1] at offset 65544: entry ") || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}

func TestCheckBitmapRequest(t *testing.T) {
	for _, tc := range []struct {
		name     string
		bm       string
		gran     int64
		size     int64
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

func FuzzBitmapDirectoryChecks(f *testing.F) {
	_, dir, _, _ := rawBitmapDir(f, filepath.Join("testdata", "bitmap", "bitmaps-c512.qcow2"))
	f.Add(dir, uint32(3), uint8(9))
	f.Add(encodeBitmapDirectory([]bitmapDirEntry{validEntry("a", 0x20000), validEntry("b", 0x30000)}), uint32(2), uint8(16))
	f.Fuzz(func(t *testing.T, dir []byte, nb uint32, clusterBits uint8) {
		if clusterBits < 9 || clusterBits > 21 || len(dir) > maxBitmapDirSize {
			return
		}
		base := int64(16) << clusterBits
		es, err := decodeBitmapDirectory(dir, nb, base, uint32(clusterBits), 1<<40)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error not wrapping ErrCorrupt: %v", err)
			}
			return
		}
		// What parses re-encodes to the same bytes apart from padding, and
		// re-parses identically.
		es2, err := decodeBitmapDirectory(encodeBitmapDirectory(es), nb, base, uint32(clusterBits), 1<<40)
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
		tab, err := decodeBitmapTable(buf, 0, 0x10000, 1<<clusterBits)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error not wrapping ErrCorrupt: %v", err)
			}
			return
		}
		if !reflect.DeepEqual(encodeBitmapTable(tab), buf) && len(buf) != 0 {
			t.Fatal("table did not round-trip")
		}
	})
}

// Hostile bitmap metadata in an otherwise good qemu-made image: Open fails
// with ErrCorrupt naming the field, never panics or trusts the bitmap.
func TestOpenHostileBitmaps(t *testing.T) {
	src := filepath.Join("testdata", "bitmap", "bitmaps-c512.qcow2")
	orig, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	ext, dir, _, _ := rawBitmapDir(t, src)
	e, _ := decodeBitmapsExt(ext, 0, 512)
	dirOff := int64(e.DirOffset)
	tableOff := int64(binary.BigEndian.Uint64(dir[0:]))
	for _, tc := range []struct {
		name  string
		patch func(b []byte)
		want  string
	}{
		{"table-entry-reserved", func(b []byte) { b[tableOff+7] |= 0x02 }, "bitmap[0].bitmap_table[0]"},
		{"table-entry-bit8", func(b []byte) { binary.BigEndian.PutUint64(b[tableOff:], 0x10100) }, "reserved bits 0x100 set"},
		{"table-entry-past-eof", func(b []byte) { binary.BigEndian.PutUint64(b[tableOff:], 1<<30) }, "past the end of the file"},
		{"table-size-wrong", func(b []byte) { binary.BigEndian.PutUint32(b[dirOff+8:], 2) }, "bitmap[0].bitmap_table_size"},
		{"dir-granularity", func(b []byte) { b[dirOff+17] = 40 }, "granularity_bits"},
		{"dir-name-size", func(b []byte) { binary.BigEndian.PutUint16(b[dirOff+18:], 0xffff) }, "runs past the end of the bitmap directory"},
		{"dir-flags", func(b []byte) { b[dirOff+15] |= 0x80 }, "reserved bits"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := append([]byte(nil), orig...)
			tc.patch(b)
			p := filepath.Join(t.TempDir(), "h.qcow2")
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
			img, err := Open(p, OpenOptions{ReadOnly: true})
			if err == nil {
				img.Close()
				t.Fatal("hostile bitmap metadata accepted")
			}
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want ErrCorrupt mentioning %q", err, tc.want)
			}
		})
	}
}
