package qcow2

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// hostileLayout is where the entries a reserved-bit damage patches live in
// the image makeCheckBase builds, read with this package before the damage.
type hostileLayout struct {
	rawHeader
	snapTable, bitmapTable int64
}

// makeHostileBase is a qemu-made image with data, a compressed cluster, and
// either an internal snapshot or a persistent bitmap with data. Not both:
// qemu-img 7.2 check -r (leaks or all) on an image holding both drops the
// snapshot and frees its clusters, so its repairs of such an image are no
// verdict to compare with.
func makeHostileBase(t *testing.T, dir string, bitmap bool) string {
	p := filepath.Join(dir, "base.qcow2")
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "64M")
	qemu(t, "qemu-io", "-c", "write -P 0xa1 0 1M", "-c", "write -P 0xa2 8M 256k", p)
	if bitmap {
		qemu(t, "qemu-img", "bitmap", "--add", p, "cbt")
	} else {
		qemu(t, "qemu-img", "snapshot", "-c", "s1", p)
	}
	qemu(t, "qemu-io", "-c", "write -P 0xb1 64k 128k", "-c", "write -c -P 0xb2 2M 64k", p)
	return p
}

func readHostileLayout(t *testing.T, p string) hostileLayout {
	t.Helper()
	img, err := Open(p, OpenOptions{ReadOnly: true, NoLock: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	lay := hostileLayout{rawHeader: rawHeader{clusterSize: img.clusterSize, l1Off: int64(img.hdr.L1TableOffset), refTableOff: int64(img.hdr.RefcountTableOffset)}}
	if len(img.snapshots) > 0 {
		lay.snapTable = int64(img.hdr.SnapshotsOffset)
	}
	if len(img.bitmapDir) > 0 {
		lay.bitmapTable = int64(img.bitmapDir[0].TableOffset)
	}
	return lay
}

// orAt sets bits in the 64-bit entry at off.
func orAt(t *testing.T, f *os.File, off int64, bits uint64) {
	put64(t, f, off, get64(t, f, off)|bits)
}

// reservedBitDamages set bits the format reserves, or offset bits no file
// can reach, in one entry of each table type. openErr is the field a plain
// Open must name when it refuses the image ("" when Open may accept it:
// qemu ignores reserved L2 bits when it reads, and only check flags them).
var reservedBitDamages = []struct {
	name    string
	openErr string
	bitmap  bool // damage the bitmap base, not the snapshot one
	// qemuRepairFails: qemu-img 7.2 check -r all fails on this image
	// (its rebuild trips its own overlap check on the refcount block the
	// bad entry still names, and it exits 1); ours must repair it to an
	// image qemu-img check finds clean.
	qemuRepairFails bool
	patch           func(t *testing.T, f *os.File, h hostileLayout)
}{
	{name: "reftable-bit63", openErr: "refcount_table[0]", patch: func(t *testing.T, f *os.File, h hostileLayout) { orAt(t, f, h.refTableOff, 1<<63) }},
	{name: "reftable-bits56-63", openErr: "refcount_table[0]", patch: func(t *testing.T, f *os.File, h hostileLayout) { orAt(t, f, h.refTableOff, 0xff<<56) }},
	{name: "reftable-bit56", openErr: "refcount_table[0]", patch: func(t *testing.T, f *os.File, h hostileLayout) { orAt(t, f, h.refTableOff, 1<<56) }},
	{name: "reftable-bit0", openErr: "refcount_table[0]", qemuRepairFails: true, patch: func(t *testing.T, f *os.File, h hostileLayout) { orAt(t, f, h.refTableOff, 1) }},
	{name: "reftable-unused-entry-bit63", openErr: "refcount_table[1]", patch: func(t *testing.T, f *os.File, h hostileLayout) { put64(t, f, h.refTableOff+8, 1<<63) }},
	{name: "l1-bit62", openErr: "l1[0]", patch: func(t *testing.T, f *os.File, h hostileLayout) { orAt(t, f, h.l1Off, 1<<62) }},
	{name: "l1-bit0", openErr: "l1[0]", patch: func(t *testing.T, f *os.File, h hostileLayout) { orAt(t, f, h.l1Off, 1) }},
	{name: "l2-bit56", openErr: "", patch: func(t *testing.T, f *os.File, h hostileLayout) {
		l2 := firstL2(t, f, h.rawHeader)
		orAt(t, f, l2, 1<<56)
	}},
	{name: "l2-bit1", openErr: "", patch: func(t *testing.T, f *os.File, h hostileLayout) {
		l2 := firstL2(t, f, h.rawHeader)
		orAt(t, f, l2, 2)
	}},
	{name: "snapshot-l1-offset-bit63", openErr: "snapshot[0].l1_table_offset", patch: func(t *testing.T, f *os.File, h hostileLayout) { orAt(t, f, h.snapTable, 1<<63) }},
	{name: "bitmap-table-entry-bit63", openErr: "bitmap[0].bitmap_table[0]", bitmap: true, patch: func(t *testing.T, f *os.File, h hostileLayout) { orAt(t, f, h.bitmapTable, 1<<63) }},
	{name: "bitmap-table-entry-bit1", openErr: "bitmap[0].bitmap_table[0]", bitmap: true, patch: func(t *testing.T, f *os.File, h hostileLayout) { orAt(t, f, h.bitmapTable, 2) }},
}

// ourCheckCode is what `img check` with mode exits with on p: the command
// exits 1 when the image cannot be opened for the check or the check fails.
func ourCheckCode(t *testing.T, p string, mode RepairMode) (int, *CheckResult) {
	t.Helper()
	img, err := OpenForCheck(p, OpenOptions{ReadOnly: mode == RepairNone})
	if err != nil {
		t.Logf("OpenForCheck: %v", err)
		return 1, nil
	}
	res, err := img.Check(mode)
	if cerr := img.Close(); err == nil && mode != RepairNone {
		err = cerr
	}
	if err != nil {
		t.Logf("Check: %v", err)
		return 1, res
	}
	return res.ExitCode(), res
}

// Entries with reserved or unreachable offset bits: a plain open refuses
// the image as corrupt, naming the entry (it never accepts it and fails
// writes later), and every -r mode of check reaches qemu-img check's
// verdict on the same file without panicking.
func TestCheckReservedBitsEveryModeAgainstQemu(t *testing.T) {
	bases := map[bool]string{false: makeHostileBase(t, t.TempDir(), false), true: makeHostileBase(t, t.TempDir(), true)}
	modes := []struct {
		flag string
		mode RepairMode
	}{{"", RepairNone}, {"leaks", RepairLeaks}, {"all", RepairAll}}
	for _, d := range reservedBitDamages {
		t.Run(d.name, func(t *testing.T) {
			dir := t.TempDir()
			damaged := filepath.Join(dir, "damaged.qcow2")
			copyFile(t, bases[d.bitmap], damaged)
			lay := readHostileLayout(t, damaged)
			f, err := os.OpenFile(damaged, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			d.patch(t, f, lay)
			f.Close()

			img, err := Open(damaged, OpenOptions{NoLock: true})
			switch {
			case d.openErr == "" && err != nil:
				t.Errorf("Open refused an image qemu reads: %v", err)
			case d.openErr == "":
				img.Close()
			case err == nil:
				img.Close()
				t.Errorf("Open accepted the image; want ErrCorrupt naming %s", d.openErr)
			default:
				var fe *FormatError
				if !errors.Is(err, ErrCorrupt) || !errors.As(err, &fe) || !strings.HasPrefix(fe.Field, d.openErr) {
					t.Errorf("Open: %v; want a FormatError wrapping ErrCorrupt naming %s", err, d.openErr)
				}
			}

			for _, m := range modes {
				t.Run("r="+m.flag, func(t *testing.T) {
					qp := filepath.Join(t.TempDir(), "q.qcow2")
					op := filepath.Join(t.TempDir(), "o.qcow2")
					copyFile(t, damaged, qp)
					copyFile(t, damaged, op)
					qcode, qrep := qemuCheckJSON(t, qp, m.flag)
					code, res := ourCheckCode(t, op, m.mode)
					if d.qemuRepairFails && m.mode == RepairAll {
						if qcode != 1 {
							t.Errorf("qemu-img check -r all exits %d here now, not 1: compare verdicts again", qcode)
						}
						qcode = 0
					}
					if code != qcode {
						var msgs []string
						if res != nil {
							msgs = res.Messages
						}
						t.Fatalf("exit %d, qemu-img check %s exits %d (%v)\nour messages: %s", code, m.flag, qcode, qrep, strings.Join(msgs, "\n"))
					}
					if m.mode == RepairAll && qcode == 0 {
						if c, rep := qemuCheckJSON(t, op, ""); c != 0 {
							t.Fatalf("after our -r all, qemu-img check exits %d: %v", c, rep)
						}
					}
				})
			}
		})
	}
}

// The refcount table entry decoder (open and check alike) never turns an
// entry into a negative or unaligned offset.
func TestRefTableEntryOffsetRange(t *testing.T) {
	for _, e := range []uint64{1 << 63, 0xff << 56, 1 << 56, ^uint64(0), 0x10000 | 1} {
		t.Run(fmt.Sprintf("%#x", e), func(t *testing.T) {
			off, ok := refTableEntry(e).hostOffset()
			if ok && (off < 0 || off&0x1ff != 0) {
				t.Fatalf("hostOffset(%#x) = %#x, accepted", e, off)
			}
			if e&refTableReservedMask == 0 && e < 1<<56 && !ok {
				t.Fatalf("hostOffset(%#x) refused a reachable offset", e)
			}
		})
	}
}
