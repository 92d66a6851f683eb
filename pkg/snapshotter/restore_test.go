package snapshotter

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// restoreFixture writes an image in dir with snapshots s1, s2 and more
// writes after s2, closes it, and returns its path and s1's content.
func restoreFixture(t *testing.T, dir string) (string, []byte) {
	t.Helper()
	path := filepath.Join(dir, "src.qcow2")
	img, err := qcow2.Create(path, qcow2.CreateOptions{Size: testDisk})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	w := func(b byte, off int64, n int) {
		if _, err := img.WriteAt(bytes.Repeat([]byte{b}, n), off); err != nil {
			t.Fatal(err)
		}
	}
	w(1, 0, 100<<10)
	w(2, 3<<20, 5000)
	if _, err := Take(img, "s1", 1); err != nil {
		t.Fatal(err)
	}
	want, err := readSnapshot(img, "s1")
	if err != nil {
		t.Fatal(err)
	}
	w(3, 50<<10, 200<<10)
	if _, err := Take(img, "s2", 2); err != nil {
		t.Fatal(err)
	}
	w(4, 0, 10)
	return path, want
}

func checkRestored(t *testing.T, path string, want []byte, size int64) {
	t.Helper()
	img, err := qcow2.Open(path, qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if img.Size() != size {
		t.Fatalf("restored size %d, want %d", img.Size(), size)
	}
	if n := len(img.Snapshots()); n != 0 {
		t.Fatalf("restored image has %d snapshots", n)
	}
	if n := len(img.Bitmaps()); n != 0 {
		t.Fatalf("restored image has %d bitmaps", n)
	}
	got := make([]byte, size)
	if _, err := img.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:len(want)], want) || !bytes.Equal(got[len(want):], make([]byte, size-int64(len(want)))) {
		t.Fatal("restored data differs from the snapshot")
	}
	if q, err := exec.LookPath("qemu-img"); err == nil {
		if out, err := exec.Command(q, "check", path).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img check: %v\n%s", err, out)
		}
	}
}

func restoreIn(t *testing.T, dir string, wantMethod Method) {
	path, want := restoreFixture(t, dir)
	for _, size := range []int64{0, 2 * testDisk} {
		src, err := qcow2.Open(path, qcow2.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		dst := filepath.Join(dir, "dst.qcow2")
		os.Remove(dst)
		m, err := Restore(src, "s1", dst, RestoreOptions{Size: size, SourceClosed: true})
		src.Close()
		if err != nil {
			t.Fatal(err)
		}
		if m != wantMethod {
			t.Fatalf("method %s, want %s", m, wantMethod)
		}
		checkRestored(t, dst, want, max(size, testDisk))
		// A restored volume holds a disk's data: its owner's only, as
		// the pool's other files are.
		if fi, err := os.Stat(dst); err != nil {
			t.Fatal(err)
		} else if fi.Mode().Perm() != 0o600 {
			t.Fatalf("restored image mode %v, want 0600", fi.Mode())
		}
	}
}

func TestRestoreCopy(t *testing.T) {
	peer.Require(t, "qemu-img")
	// The test's temporary directory is on the host's ext4 (no reflink).
	restoreIn(t, t.TempDir(), MethodCopy)
}

// TestRestoreReflink runs on an xfs with reflink=1 on a loop device.
func TestRestoreReflink(t *testing.T) {
	peer.Root(t)
	peer.Require(t, "mkfs.xfs")
	peer.Require(t, "qemu-img")
	restoreIn(t, xfsMount(t), MethodReflink)
}

// xfsMount mounts a new 512 MiB xfs with reflink=1 from a loop device for
// the test and returns its mount point.
func xfsMount(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	fsimg := filepath.Join(dir, "xfs.img")
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	run := func(name string, args ...string) {
		t.Helper()
		if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, out)
		}
	}
	if err := os.WriteFile(fsimg, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(fsimg, 512<<20); err != nil {
		t.Fatal(err)
	}
	run("mkfs.xfs", "-q", "-m", "reflink=1", fsimg)
	run("mount", "-o", "loop", fsimg, mnt)
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	return mnt
}

func TestRestoreRefusals(t *testing.T) {
	dir := t.TempDir()
	path, _ := restoreFixture(t, dir)
	src, err := qcow2.Open(path, qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if _, err := Restore(src, "s1", path, RestoreOptions{}); !errorsIs(err, ErrExists) {
		t.Fatalf("existing destination: %v", err)
	}
	if _, err := Restore(src, "s1", filepath.Join(dir, "x"), RestoreOptions{Size: testDisk / 2}); !errorsIs(err, ErrInvalid) {
		t.Fatalf("smaller size: %v", err)
	}
	if _, err := Restore(src, "nope", filepath.Join(dir, "y"), RestoreOptions{}); !errorsIs(err, ErrNotFound) {
		t.Fatalf("unknown snapshot: %v", err)
	}
}
func errorsIs(err, target error) bool { return errors.Is(err, target) }

// TestRestoreOpenCurrent: a restore of the current disk of an open image
// (a staged volume) copies it from a temporary snapshot, which is gone
// afterwards, also when the restore fails, and leaves the checkpoint
// bitmaps as they were.
func TestRestoreOpenCurrent(t *testing.T) {
	peer.Require(t, "qemu-img")
	for _, tc := range []struct {
		name    string
		stale   bool  // a temporary snapshot a crash left
		exists  bool  // the destination exists
		size    int64 // requested size
		wantErr error
	}{
		{name: "copy"},
		{name: "copy grown", size: 2 * testDisk},
		{name: "stale temporary dropped", stale: true},
		{name: "destination exists", exists: true, wantErr: ErrExists},
		{name: "smaller size", size: testDisk / 2, wantErr: ErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path, _ := restoreFixture(t, dir)
			src, err := qcow2.Open(path, qcow2.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer src.Close()
			if tc.stale {
				if _, err := src.CreateSnapshot(TempPrefix + "1"); err != nil {
					t.Fatal(err)
				}
			}
			want := make([]byte, testDisk)
			if _, err := src.ReadAt(want, 0); err != nil {
				t.Fatal(err)
			}
			bitmaps := src.Bitmaps()
			dst := filepath.Join(dir, "dst.qcow2")
			if tc.exists {
				if err := os.WriteFile(dst, []byte("x"), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			m, err := Restore(src, "", dst, RestoreOptions{Size: tc.size})
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil) != (err == nil) {
				t.Fatalf("Restore: %v, want %v", err, tc.wantErr)
			}
			var names []string
			for _, s := range src.Snapshots() {
				names = append(names, s.Name)
			}
			if len(names) != 2 || names[0] != "s1" || names[1] != "s2" {
				t.Fatalf("snapshots after the restore %q, want [s1 s2]", names)
			}
			if got := src.Bitmaps(); len(got) != len(bitmaps) || got[0] != bitmaps[0] || got[1] != bitmaps[1] {
				t.Fatalf("bitmaps %+v, were %+v", got, bitmaps)
			}
			if err := src.Flush(); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command("qemu-img", "check", "-U", path).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img check source: %v\n%s", err, out)
			}
			if tc.wantErr != nil {
				return
			}
			if m != MethodCopy {
				t.Fatalf("method %s", m)
			}
			checkRestored(t, dst, want, max(tc.size, testDisk))
		})
	}
}
