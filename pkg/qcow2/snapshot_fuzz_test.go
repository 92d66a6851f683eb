package qcow2

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"
)

// Seeds for FuzzSnapshotTable (fuzz_test.go): testdata/snapshot-table/ holds snapshot tables cut out of images
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

// checkSnapshotRewrite: the table writeSnapshotTable would write for the
// decoded entries decodes to the same snapshots.
func checkSnapshotRewrite(t *testing.T, snaps []snapshotEntry, n uint32) {
	img := &Image{size: 1 << 30}
	list := append([]snapshotEntry(nil), snaps...)
	for i := range list {
		img.normalizeSnapshotEntry(&list[i])
	}
	again, _, err := decodeSnapshotTable(encodeSnapshotTable(list), n, 0, 16, 1<<40)
	if err != nil {
		t.Fatalf("re-decoding our encoding: %v", err)
	}
	for i := range snaps {
		a, b := snaps[i], again[i]
		if a.ID != b.ID || a.Name != b.Name || a.L1TableOffset != b.L1TableOffset || a.L1Size != b.L1Size ||
			a.DateSec != b.DateSec || a.DateNsec != b.DateNsec || a.VMClockNsec != b.VMClockNsec {
			t.Fatalf("entry %d changed: %+v -> %+v", i, a, b)
		}
		if ia, ib := img.snapshotInfo(&a), img.snapshotInfo(&b); ia != ib {
			t.Fatalf("entry %d info changed: %+v -> %+v", i, ia, ib)
		}
		if len(a.ExtraData) >= snapshotExtraLen && !bytes.Equal(a.ExtraData, b.ExtraData) {
			t.Fatalf("entry %d: extra data not preserved", i)
		}
	}
}
