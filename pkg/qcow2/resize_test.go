package qcow2

import (
	"bytes"
	"encoding/json"
	"errors"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

func qemuVirtualSize(t testing.TB, path string) int64 {
	t.Helper()
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal([]byte(qemu(t, "qemu-img", "info", "-U", "--output=json", path)), &info); err != nil {
		t.Fatal(err)
	}
	return info.VirtualSize
}

// TestResizeLikeQemu resizes the same image with qemu-img resize (on a copy)
// and with Resize, and compares sizes and contents; both must check clean.
func TestResizeLikeQemu(t *testing.T) {
	cases := []struct {
		name    string
		create  string // qemu-img create -o
		size    string
		io      []string
		newSize int64
		shrink  bool
		bitmap  bool // a persistent bitmap that must follow the size
	}{
		{"grow within L1", "cluster_size=65536", "64M", []string{"write -P 1 0 1M"}, 100 << 20, false, false},
		{"grow to 1T relocates L1", "cluster_size=65536", "64M", []string{"write -P 1 60M 1M"}, 1 << 40, false, false},
		{"grow 4k clusters many L1 entries", "cluster_size=4096", "1M", []string{"write -P 2 0 1M"}, 3<<30 + 512, false, false},
		{"grow unaligned size", "cluster_size=65536", "1000448", []string{"write -P 3 0 1000448"}, 5000192, false, false},
		{"shrink frees the tail", "cluster_size=65536", "64M", []string{"write -P 4 0 1M", "write -P 5 40M 8M"}, 20 << 20, true, false},
		{"shrink drops whole L2 tables", "cluster_size=4096", "64M", []string{"write -P 4 0 1M", "write -P 5 40M 8M", "write -c -P 6 63M 4k"}, 3 << 20, true, false},
		{"shrink to unaligned", "cluster_size=65536", "8M", []string{"write -P 7 0 8M"}, 1000448, true, false},
		{"shrink v2", "compat=0.10", "64M", []string{"write -P 8 0 64M"}, 1 << 20, true, false},
		{"shrink extended L2", "extended_l2=on,cluster_size=65536", "64M", []string{"write -P 9 30M 2M"}, 31 << 20, true, false},
		{"grow with a bitmap", "cluster_size=65536", "64M", []string{"write -P 1 0 1M"}, 200 << 20, false, true},
		{"shrink with a bitmap", "cluster_size=65536", "64M", []string{"write -P 1 0 1M"}, 16 << 20, true, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "a.qcow2")
			qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", c.create, p, c.size)
			qemuIOAll(t, p, c.io...)
			if c.bitmap {
				qemu(t, "qemu-img", "bitmap", "--add", p, "b0")
			}
			q := filepath.Join(dir, "q.qcow2")
			copyImage(t, p, q)
			args := []string{"resize", "-q"}
			if c.shrink {
				args = append(args, "--shrink")
			}
			qemu(t, "qemu-img", append(args, q, strconv.FormatInt(c.newSize, 10))...)

			img, err := Open(p, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if err := img.Resize(c.newSize, ResizeOptions{Shrink: c.shrink}); err != nil {
				t.Fatalf("Resize: %v", err)
			}
			if got := img.Size(); got != c.newSize {
				t.Fatalf("Size() = %d, want %d", got, c.newSize)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			checkCleanWhen(t, p, "after Resize")
			checkCleanWhen(t, q, "after qemu-img resize")
			if got := qemuVirtualSize(t, p); got != c.newSize {
				t.Fatalf("qemu-img info: virtual size %d, want %d", got, c.newSize)
			}
			// qemu-img compare reads both through qemu, block status
			// first, so terabyte sizes cost nothing.
			qemu(t, "qemu-img", "compare", "-U", p, q)
			if c.bitmap {
				// qemu loads the bitmap (it refuses one of the wrong
				// size) and copies it.
				out := filepath.Join(dir, "copy.qcow2")
				qemu(t, "qemu-img", "convert", "-U", "--bitmaps", "-O", "qcow2", p, out)
				checkCleanWhen(t, out, "bitmap copied by qemu")
			}
		})
	}
}

func TestResizeRefusals(t *testing.T) {
	dir := t.TempDir()
	mk := func(name, opts string) string {
		p := filepath.Join(dir, name)
		qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, p, "64M")
		return p
	}
	v2snap := mk("v2snap.qcow2", "compat=0.10")
	qemu(t, "qemu-img", "snapshot", "-c", "s", v2snap)
	plain := mk("plain.qcow2", "cluster_size=65536")
	small := mk("small.qcow2", "cluster_size=512")
	inuse := mk("inuse.qcow2", "cluster_size=65536")
	qemu(t, "qemu-img", "bitmap", "--add", inuse, "b0")
	// Leave the bitmap in use, as a crashed qemu would.
	qemuAbort(t, inuse)

	cases := []struct {
		name    string
		path    string
		size    int64
		shrink  bool
		wantErr error
	}{
		{"shrink without the option", plain, 32 << 20, false, ErrShrinkNotAllowed},
		{"not a multiple of 512", plain, 64<<20 + 1, false, ErrInvalidOption},
		{"zero size", plain, 0, true, ErrInvalidOption},
		{"v2 with snapshots", v2snap, 128 << 20, false, ErrUnsupported},
		{"beyond the L1 limit", small, 1 << 50, false, ErrTooLarge},
		{"inconsistent bitmap", inuse, 128 << 20, false, ErrBitmapInconsistent},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			img, err := Open(c.path, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			before := img.Size()
			err = img.Resize(c.size, ResizeOptions{Shrink: c.shrink})
			if !errors.Is(err, c.wantErr) {
				t.Fatalf("Resize(%d): %v, want %v", c.size, err, c.wantErr)
			}
			if img.Size() != before {
				t.Fatalf("size changed to %d on a refused resize", img.Size())
			}
		})
	}
}

// qemuAbort opens the image read-write in qemu-io and aborts, leaving it as
// a crashed qemu would (bitmaps in use, dirty with lazy refcounts).
func qemuAbort(t testing.TB, path string) {
	t.Helper()
	p := peer.Require(t, "qemu-io")
	cmd := exec.Command(p, "-f", "qcow2", "-c", "write 0 64k", "-c", "abort", path)
	_ = cmd.Run() // abort() kills qemu-io with SIGABRT
}

// TestSnapshotsKeepTheirSize: snapshots keep the disk size they were taken
// at; reverting restores it (and the data), as qemu-img snapshot -a does.
func TestSnapshotsKeepTheirSize(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "a.qcow2")
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", p, "8M")
	qemuIOAll(t, p, "write -P 1 0 1M", "write -P 2 7M 1M")
	img, err := Open(p, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	want8 := ourRawOpen(t, img)
	if _, err := img.CreateSnapshot("at8M"); err != nil {
		t.Fatal(err)
	}
	// 4k clusters: 96M needs a larger L1 table.
	if err := img.Resize(96<<20, ResizeOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(bytes.Repeat([]byte{3}, 1<<20), 90<<20); err != nil {
		t.Fatal(err)
	}
	want96 := ourRawOpen(t, img)
	if _, err := img.CreateSnapshot("at96M"); err != nil {
		t.Fatal(err)
	}
	if err := img.Resize(4<<20, ResizeOptions{Shrink: true}); err != nil {
		t.Fatal(err)
	}
	checkFlushed(t, img, p, "after shrink with snapshots")
	snapshotsSameAsQemu(t, img.Snapshots(), qemuSnapshots(t, p))
	for _, c := range []struct {
		id   string
		want []byte
	}{{"at8M", want8}, {"at96M", want96}, {"at8M", want8}} {
		if err := img.RevertToSnapshot(c.id); err != nil {
			t.Fatal(err)
		}
		checkFlushed(t, img, p, "after revert to "+c.id)
		if img.Size() != int64(len(c.want)) {
			t.Fatalf("after revert to %s: size %d, want %d", c.id, img.Size(), len(c.want))
		}
		if !bytes.Equal(ourRawOpen(t, img), c.want) {
			t.Fatalf("after revert to %s: data differs", c.id)
		}
		if got := qemuVirtualSize(t, p); got != int64(len(c.want)) {
			t.Fatalf("qemu-img info after revert to %s: %d", c.id, got)
		}
		if got := qemuRaw(t, p); !bytes.Equal(got, c.want) {
			t.Fatalf("qemu's read after revert to %s differs", c.id)
		}
	}
}

// TestResizeOverlayLikeQemu: growing an overlay shorter than its backing
// file shows zeroes where the backing file has data past the old end, as
// qemu-img resize does; our grown overlay and qemu's read the same.
func TestResizeOverlayLikeQemu(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "6M")
	qemu(t, "qemu-io", "-c", "write -P 0x5a 0 6M", base)
	ours, theirs := filepath.Join(dir, "ours.qcow2"), filepath.Join(dir, "theirs.qcow2")
	for _, p := range []string{ours, theirs} {
		qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p, "4M")
		qemu(t, "qemu-io", "-c", "write -P 0x11 1M 64k", p)
	}
	qemu(t, "qemu-img", "resize", "-q", theirs, "8M")
	img, err := Open(ours, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Resize(8<<20, ResizeOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	checkClean(t, ours)
	got, want := qemuRaw(t, ours), qemuRaw(t, theirs)
	if !bytes.Equal(got, want) {
		t.Fatal("our grown overlay reads differently from qemu-img resize's")
	}
	if !bytes.Equal(got[4<<20:], make([]byte, 4<<20)) {
		t.Fatal("the grown part shows the backing file's data")
	}
}
