package qcow2

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"
)

// Seeds in testdata/snapshot-table/ are snapshot tables cut out of images
// made by qemu 7.2 (qemu-img snapshot -c on compat 1.1 and 0.10 images, and
// `savevm` in qemu-system-x86_64 for an entry with VM state): a 4-byte
// big-endian entry count followed by the table bytes.

func snapshotTableSeeds(t testing.TB) [][]byte {
	files, err := filepath.Glob("testdata/snapshot-table/*.bin")
	if err != nil || len(files) == 0 {
		t.Fatalf("no snapshot table seeds: %v", err)
	}
	var out [][]byte
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, b)
	}
	// An entry as qemu before 1.1 wrote it: no extra data at all.
	old := make([]byte, 4+snapshotFixedLen+1+2)
	binary.BigEndian.PutUint32(old, 1)
	e := old[4:]
	binary.BigEndian.PutUint64(e, 0x30000)
	binary.BigEndian.PutUint32(e[8:], 1)
	binary.BigEndian.PutUint16(e[12:], 1)
	binary.BigEndian.PutUint16(e[14:], 2)
	copy(e[snapshotFixedLen:], "1s1")
	out = append(out, old)
	return out
}

func FuzzSnapshotTable(f *testing.F) {
	for _, s := range snapshotTableSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < 4 {
			return
		}
		n := binary.BigEndian.Uint32(data)
		table := data[4:]
		const clusterBits = 16
		fileSize := int64(1 << 30)
		snaps, _, err := decodeSnapshotTable(table, n, 0x10000, clusterBits, fileSize)
		if err != nil {
			return
		}
		if len(snaps) != int(n) {
			t.Fatalf("decoded %d entries, header says %d", len(snaps), n)
		}
		// What we write must decode to the same entries, with the
		// extra data qemu writes (at least 24 bytes) filled in.
		img := &Image{size: 1 << 30}
		list := append([]snapshotEntry(nil), snaps...)
		for i := range list {
			img.normalizeSnapshotEntry(&list[i])
		}
		enc := encodeSnapshotTable(list)
		again, _, err := decodeSnapshotTable(enc, n, 0x10000, clusterBits, fileSize)
		if err != nil {
			t.Fatalf("re-decoding our encoding: %v", err)
		}
		for i := range snaps {
			a, b := snaps[i], again[i]
			if a.ID != b.ID || a.Name != b.Name || a.L1TableOffset != b.L1TableOffset || a.L1Size != b.L1Size ||
				a.DateSec != b.DateSec || a.DateNsec != b.DateNsec || a.VMClockNsec != b.VMClockNsec {
				t.Fatalf("entry %d changed: %+v -> %+v", i, a, b)
			}
			ia, ib := img.snapshotInfo(&a), img.snapshotInfo(&b)
			if ia != ib {
				t.Fatalf("entry %d info changed: %+v -> %+v", i, ia, ib)
			}
			if len(a.ExtraData) >= snapshotExtraLen && !bytes.Equal(a.ExtraData, b.ExtraData) {
				t.Fatalf("entry %d: extra data not preserved", i)
			}
		}
	})
}
