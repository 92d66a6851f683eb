package qcow2

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// Hostile snapshot tables: a qemu-made image with one snapshot, one field
// broken at a time. Opening must fail with ErrCorrupt naming the field (or,
// for what qemu only checks when a snapshot is used, the snapshot
// operations must), never panic, and never allocate from an absurd count.

func TestHostileSnapshotTables(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
	qemuIOAll(t, base, "write -P 1 0 128k")
	qemu(t, "qemu-img", "snapshot", "-c", "s1", base)
	orig, err := os.ReadFile(base)
	if err != nil {
		t.Fatal(err)
	}
	be := binary.BigEndian
	tbl := int64(be.Uint64(orig[hdrSnapshotsOffset:]))
	type patch func(b []byte) []byte
	put32 := func(at int64, v uint32) patch {
		return func(b []byte) []byte { be.PutUint32(b[at:], v); return b }
	}
	put64 := func(at int64, v uint64) patch {
		return func(b []byte) []byte { be.PutUint64(b[at:], v); return b }
	}
	put16 := func(at int64, v uint16) patch {
		return func(b []byte) []byte { be.PutUint16(b[at:], v); return b }
	}
	cases := []struct {
		name  string
		patch patch
		field string // what the open error must name
	}{
		{"too many snapshots", put32(hdrNbSnapshots, maxSnapshots+1), "nb_snapshots"},
		{"table past end of file", put64(hdrSnapshotsOffset, 1<<40), "snapshot"},
		{"table not aligned", put64(hdrSnapshotsOffset, uint64(tbl+8)), "snapshot"},
		{"more entries than the file holds", put32(hdrNbSnapshots, 5), "snapshot"},
		{"extra data too large", put32(tbl+36, 1025), "extra_data_size"},
		{"L1 table too large", put32(tbl+8, 1<<30), "l1_size"},
		{"L1 table past end of file", put64(tbl, 1<<40), "l1_table_offset"},
		{"L1 table not aligned", put64(tbl, uint64(0x30000+8)), "l1_table_offset"},
		{"ID runs past the table", put16(tbl+12, 0xffff), "snapshot[0]"},
		{"name runs past the table", put16(tbl+14, 0xffff), "snapshot[0]"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "h.qcow2")
			b := c.patch(append([]byte(nil), orig...))
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
			img, err := Open(p, OpenOptions{ReadOnly: true, NoLock: true})
			if err == nil {
				img.Close()
				t.Fatal("Open succeeded")
			}
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), c.field) {
				t.Fatalf("Open: %v; want ErrCorrupt naming %q", err, c.field)
			}
		})
	}

	// A snapshot whose L1 table points at an L2 table outside the file:
	// qemu opens such an image and refuses to use the snapshot; so do we.
	t.Run("snapshot L2 past end of file", func(t *testing.T) {
		p := filepath.Join(t.TempDir(), "h.qcow2")
		b := append([]byte(nil), orig...)
		l1 := int64(be.Uint64(b[tbl:]))
		be.PutUint64(b[l1:], 1<<40)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		img, err := Open(p, OpenOptions{NoLock: true})
		if err != nil {
			t.Fatal(err)
		}
		defer img.Close()
		if _, err := img.OpenSnapshot("s1"); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("OpenSnapshot: %v, want ErrCorrupt", err)
		}
		if err := img.RevertToSnapshot("s1"); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("RevertToSnapshot: %v, want ErrCorrupt", err)
		}
		if err := img.DeleteSnapshot("s1"); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("DeleteSnapshot: %v, want ErrCorrupt", err)
		}
	})

	// 65536 snapshots claimed at the end of a sparse 100 GiB file: the
	// table read stays bounded (qemu's 64 MiB table limit), not the file
	// size.
	t.Run("huge sparse file", func(t *testing.T) {
		p := filepath.Join(t.TempDir(), "h.qcow2")
		b := append([]byte(nil), orig...)
		be.PutUint32(b[hdrNbSnapshots:], maxSnapshots)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p, 100<<30); err != nil {
			t.Skipf("cannot make a sparse 100 GiB file here: %v", err)
		}
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		img, err := Open(p, OpenOptions{ReadOnly: true, NoLock: true})
		runtime.ReadMemStats(&after)
		// All-zero entries past the real one are valid (empty L1
		// tables), as for qemu; what matters is the bound.
		if err == nil {
			if n := len(img.Snapshots()); n != maxSnapshots {
				t.Fatalf("%d snapshots listed, header says %d", n, maxSnapshots)
			}
			img.Close()
		} else if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("Open: %v, want success or ErrCorrupt", err)
		}
		if grew := after.TotalAlloc - before.TotalAlloc; grew > 200<<20 {
			t.Fatalf("Open allocated %d MiB for a hostile snapshot table", grew>>20)
		}
	})
}

// TestSnapshotTableTooBig: a table longer than qemu's 64 MiB limit is
// refused by the decoder (qemu: "Snapshot table is too big").
func TestSnapshotTableTooBig(t *testing.T) {
	const entry = snapshotFixedLen + 16 + 1 + 65535
	n := maxSnapshotsTableBytes/((entry+7)&^7) + 2
	buf := make([]byte, 0, n*((entry+7)&^7))
	e := make([]byte, (entry+7)&^7)
	binary.BigEndian.PutUint32(e[36:], 16)
	binary.BigEndian.PutUint16(e[12:], 1)
	binary.BigEndian.PutUint16(e[14:], 65535)
	for i := 0; i < n; i++ {
		buf = append(buf, e...)
	}
	_, _, err := decodeSnapshotTable(buf, uint32(n), 0x10000, 16, 1<<40)
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "too big") {
		t.Fatalf("decode of a %d MiB table: %v", len(buf)>>20, err)
	}
}
