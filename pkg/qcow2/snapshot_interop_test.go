package qcow2

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// Interop with qemu 7.2 in both directions: snapshots we make are listed,
// exported and applied by qemu-img exactly as we list, read and revert
// them; snapshots qemu makes (disk-only from qemu-img, and with VM state
// from qemu-system's savevm) are listed, read, applied and deleted by us,
// and a VM state snapshot survives our operations byte for byte. After every
// operation qemu-img check reports no error and no leak.

// qemuSnapshot is one element of "snapshots" in qemu-img info
// --output=json.
type qemuSnapshot struct {
	ID          string `json:"id"`
	Name        string `json:"name"`
	DateSec     uint32 `json:"date-sec"`
	DateNsec    uint32 `json:"date-nsec"`
	VMClockSec  uint64 `json:"vm-clock-sec"`
	VMClockNsec uint64 `json:"vm-clock-nsec"`
	VMStateSize uint64 `json:"vm-state-size"`
	Icount      *int64 `json:"icount"`
}

func qemuSnapshots(t testing.TB, path string) []qemuSnapshot {
	t.Helper()
	var info struct {
		Snapshots   []qemuSnapshot `json:"snapshots"`
		VirtualSize int64          `json:"virtual-size"`
	}
	if err := json.Unmarshal([]byte(qemu(t, "qemu-img", "info", "-U", "--output=json", path)), &info); err != nil {
		t.Fatal(err)
	}
	return info.Snapshots
}

// sameAsQemu compares our listing with qemu-img's, field by field.
func snapshotsSameAsQemu(t testing.TB, ours []SnapshotInfo, theirs []qemuSnapshot) {
	t.Helper()
	if len(ours) != len(theirs) {
		t.Fatalf("we list %d snapshots, qemu-img %d: %+v vs %+v", len(ours), len(theirs), ours, theirs)
	}
	for i, o := range ours {
		q := theirs[i]
		icount := int64(-1)
		if q.Icount != nil {
			icount = *q.Icount
		}
		if o.ID != q.ID || o.Name != q.Name || o.DateSec != q.DateSec || o.DateNsec != q.DateNsec ||
			o.VMClockNsec != q.VMClockSec*1e9+q.VMClockNsec || o.VMStateSize != q.VMStateSize || o.Icount != icount {
			t.Fatalf("snapshot %d: ours %+v, qemu-img %+v (icount %d)", i, o, q, icount)
		}
	}
}

func checkCleanWhen(t testing.TB, path, when string) {
	t.Helper()
	if r, out := qemuCheck(t, path); r.Corruptions != 0 || r.Leaks != 0 || r.CheckErrors != 0 {
		t.Fatalf("%s: qemu-img check: %s", when, out)
	}
}

// qemuSnapshotRaw exports one snapshot with qemu-img convert -l.
func qemuSnapshotRawByID(t testing.TB, path, id string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "snap.raw")
	qemu(t, "qemu-img", "convert", "-U", "-l", "snapshot.id="+id, "-O", "raw", path, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func ourSnapshotRaw(t testing.TB, img *Image, id string) []byte {
	t.Helper()
	v, err := img.OpenSnapshot(id)
	if err != nil {
		t.Fatalf("OpenSnapshot(%s): %v", id, err)
	}
	defer v.Close()
	b := make([]byte, v.Size())
	if _, err := v.ReadAt(b, 0); err != nil {
		t.Fatalf("snapshot %s ReadAt: %v", id, err)
	}
	return b
}

func copyImage(t testing.TB, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func qemuIOAll(t testing.TB, path string, cmds ...string) {
	t.Helper()
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	qemu(t, "qemu-io", append(args, path)...)
}

func TestSnapshotsOursReadByQemu(t *testing.T) {
	cases := []struct {
		name   string
		create []string // qemu-img create -o
		size   string
		cs     string // one cluster, for the compressed write
	}{
		{"v3-64k", []string{"cluster_size=65536"}, "16M", "64k"},
		{"v2-64k", []string{"compat=0.10"}, "16M", "64k"},
		{"v3-512-refcount8", []string{"cluster_size=512", "refcount_bits=8"}, "16M", "512"},
		{"v3-2M-refcount64", []string{"cluster_size=2M", "refcount_bits=64"}, "16M", "2M"},
		{"v3-extl2", []string{"extended_l2=on", "cluster_size=128k"}, "16M", "128k"},
		{"v3-zstd-compressed", []string{"compression_type=zstd"}, "16M", "64k"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "a.qcow2")
			qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", strings.Join(c.create, ","), p, c.size)
			qemuIOAll(t, p, "write -P 0x11 0 1M", "write -P 0x22 3M 100k", "write -c -P 0x33 8M "+c.cs, "write -z 10M 1M")
			img, err := Open(p, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			var want [][]byte
			for i := 0; i < 3; i++ {
				want = append(want, ourRawOpen(t, img))
				if _, err := img.CreateSnapshot(fmt.Sprintf("snap %d", i)); err != nil {
					t.Fatalf("CreateSnapshot: %v", err)
				}
				checkFlushed(t, img, p, "after create")
				buf := bytes.Repeat([]byte{byte(0x40 + i)}, 70000)
				if _, err := img.WriteAt(buf, int64(i)*300000+1000); err != nil {
					t.Fatal(err)
				}
				checkFlushed(t, img, p, "after write")
			}
			snapshotsSameAsQemu(t, img.Snapshots(), qemuSnapshots(t, p))
			for i, s := range img.Snapshots() {
				if got := qemuSnapshotRawByID(t, p, s.ID); !bytes.Equal(got, want[i]) {
					t.Fatalf("qemu-img export of our snapshot %s differs from the disk when taken", s.ID)
				}
				if got := ourSnapshotRaw(t, img, s.ID); !bytes.Equal(got, want[i]) {
					t.Fatalf("our read of snapshot %s differs from the disk when taken", s.ID)
				}
			}
			// Apply with qemu on a copy and with us on the original: the
			// same disk.
			if err := img.Flush(); err != nil {
				t.Fatal(err)
			}
			q := filepath.Join(dir, "q.qcow2")
			copyImage(t, p, q)
			qemu(t, "qemu-img", "snapshot", "-a", "2", q)
			checkCleanWhen(t, q, "qemu applied our snapshot")
			if err := img.RevertToSnapshot("2"); err != nil {
				t.Fatal(err)
			}
			checkFlushed(t, img, p, "after revert")
			if got := ourRawOpen(t, img); !bytes.Equal(got, want[1]) {
				t.Fatal("after our revert the disk differs from the snapshot")
			}
			if got := qemuRaw(t, q); !bytes.Equal(got, want[1]) {
				t.Fatal("after qemu's apply the disk differs from the snapshot")
			}
			// qemu deletes one of ours, we delete the rest.
			qemu(t, "qemu-img", "snapshot", "-d", "snap 0", q)
			checkCleanWhen(t, q, "qemu deleted our snapshot")
			for _, s := range img.Snapshots() {
				if err := img.DeleteSnapshot(s.ID); err != nil {
					t.Fatal(err)
				}
				checkFlushed(t, img, p, "after delete "+s.ID)
			}
			if n := len(qemuSnapshots(t, p)); n != 0 {
				t.Fatalf("qemu-img still lists %d snapshots", n)
			}
		})
	}
}

// ourRawOpen reads the whole active disk of an open image.
func ourRawOpen(t testing.TB, img *Image) []byte {
	t.Helper()
	b := make([]byte, img.Size())
	if _, err := img.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func checkFlushed(t testing.TB, img *Image, path, when string) {
	t.Helper()
	if err := img.Flush(); err != nil {
		t.Fatalf("%s: Flush: %v", when, err)
	}
	checkCleanWhen(t, path, when)
}

// makeVMStateImage makes an image with a qemu snapshot that has VM state
// (savevm in qemu-system-x86_64 with no machine) and a disk-only one.
func makeVMStateImage(t testing.TB, path string) {
	t.Helper()
	sys := peer.Require(t, "qemu-system-x86_64")
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", path, "64M")
	qemuIOAll(t, path, "write -P 0x5a 0 256k", "write -P 0x6b 5M 64k")
	cmd := exec.Command(sys, "-M", "none", "-nodefaults", "-display", "none",
		"-drive", "file="+path+",if=none,id=d0,format=qcow2", "-monitor", "stdio")
	cmd.Stdin = strings.NewReader("savevm vm1\nquit\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("savevm: %v\n%s", err, out)
	}
	qemuIOAll(t, path, "write -P 0x7c 128k 64k")
	qemu(t, "qemu-img", "snapshot", "-c", "disk1", path)
	qemuIOAll(t, path, "write -P 0x7d 192k 64k")
}

// rawSnapshotTable returns the bytes of the snapshot table as on disk.
func rawSnapshotTable(t testing.TB, path string) (entries map[string][]byte, l1s map[string][]byte) {
	t.Helper()
	img, err := Open(path, OpenOptions{ReadOnly: true, NoLock: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	entries, l1s = map[string][]byte{}, map[string][]byte{}
	for _, s := range img.snapshots {
		entries[s.ID] = encodeSnapshotTable([]snapshotEntry{s})
		b := make([]byte, int(s.L1Size)*8)
		if _, err := img.f.ReadAt(b, int64(s.L1TableOffset)); err != nil {
			t.Fatal(err)
		}
		l1s[s.ID] = b
	}
	return entries, l1s
}

func TestSnapshotsQemuMadeReadByUs(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "vm.qcow2")
	makeVMStateImage(t, p)
	entriesBefore, l1Before := rawSnapshotTable(t, p)
	img, err := Open(p, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	snaps := img.Snapshots()
	snapshotsSameAsQemu(t, snaps, qemuSnapshots(t, p))
	if snaps[0].VMStateSize == 0 || snaps[0].Icount != -1 || snaps[1].VMStateSize != 0 {
		t.Fatalf("unexpected qemu snapshots: %+v", snaps)
	}
	for _, s := range snaps {
		if got, want := ourSnapshotRaw(t, img, s.ID), qemuSnapshotRawByID(t, p, s.ID); !bytes.Equal(got, want) {
			t.Fatalf("snapshot %s: our read differs from qemu-img convert -l", s.ID)
		}
	}
	// Our own operations around qemu's snapshots.
	if _, err := img.CreateSnapshot("ours"); err != nil {
		t.Fatal(err)
	}
	checkFlushed(t, img, p, "create next to qemu snapshots")
	if err := img.RevertToSnapshot("disk1"); err != nil {
		t.Fatal(err)
	}
	checkFlushed(t, img, p, "revert to a qemu snapshot")
	if got, want := ourRawOpen(t, img), qemuSnapshotRawByID(t, p, snaps[1].ID); !bytes.Equal(got, want) {
		t.Fatal("after revert the disk differs from qemu's export of the snapshot")
	}
	if err := img.DeleteSnapshot("disk1"); err != nil {
		t.Fatal(err)
	}
	checkFlushed(t, img, p, "delete a qemu snapshot")
	if err := img.DeleteSnapshot("ours"); err != nil {
		t.Fatal(err)
	}
	checkFlushed(t, img, p, "delete ours")
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	// The VM state snapshot is untouched: same entry bytes, same L1 table.
	entriesAfter, l1After := rawSnapshotTable(t, p)
	id := snaps[0].ID
	if !bytes.Equal(entriesBefore[id], entriesAfter[id]) || !bytes.Equal(l1Before[id], l1After[id]) {
		t.Fatalf("VM state snapshot %s changed:\n%x\n%x", id, entriesBefore[id], entriesAfter[id])
	}
	if len(entriesAfter) != 1 {
		t.Fatalf("%d snapshots left, want 1", len(entriesAfter))
	}
	// qemu can still apply it.
	qemu(t, "qemu-img", "snapshot", "-a", "vm1", p)
	checkCleanWhen(t, p, "qemu applied the VM state snapshot after our operations")
}

// TestSnapshotViewBlockStatus: right after a snapshot, the snapshot and the
// active disk have the same tree, so their maps agree; after writes the
// snapshot's map stays what it was.
func TestSnapshotViewBlockStatus(t *testing.T) {
	p := filepath.Join(t.TempDir(), "a.qcow2")
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "16M")
	qemuIOAll(t, p, "write -P 1 0 1M", "write -z 2M 1M", "write -c -P 2 4M 64k")
	img, err := Open(p, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	before, err := img.BlockStatus(0, img.Size())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.CreateSnapshot("s"); err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(bytes.Repeat([]byte{9}, 1<<20), 6<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(bytes.Repeat([]byte{9}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	v, err := img.OpenSnapshot("s")
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	got, err := v.BlockStatus(0, v.Size())
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != fmt.Sprint(before) {
		t.Fatalf("snapshot map\n%v\nwant\n%v", got, before)
	}
	if err := img.DeleteSnapshot("s"); err == nil {
		t.Fatal("deleting a snapshot with an open view succeeded")
	}
}
