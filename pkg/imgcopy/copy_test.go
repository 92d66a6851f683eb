package imgcopy

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

func run(t *testing.T, tool string, args ...string) {
	t.Helper()
	if out, err := exec.Command(peer.Require(t, tool), args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", tool, args, err, out)
	}
}

// source makes a 24 MiB qcow2 image with qemu: data, a zero cluster, a
// compressed cluster, a run of zero bytes written as data, and holes. It
// returns its path and the image opened read-only until the test ends.
func source(t *testing.T) (string, *qcow2.Image) {
	p := filepath.Join(t.TempDir(), "src.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "24M")
	run(t, "qemu-io", "-c", "write -P 0x11 0 3M", "-c", "write -z 1M 64k",
		"-c", "write -c -P 0x22 8M 64k", "-c", "write -P 0 12M 1M", "-c", "write -P 0x33 23M 512k", p)
	img, err := qcow2.Open(p, qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return p, img
}

// recorder is a Target that checks that writes arrive in source order.
type recorder struct {
	mu      sync.Mutex
	last    int64
	bad     error
	written int64
	zeroed  int64
}

func (r *recorder) note(off, n int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if off < r.last && r.bad == nil {
		r.bad = errors.New("write out of source order")
	}
	r.last = off + n
}

func (r *recorder) WriteAt(p []byte, off int64) (int, error) {
	r.note(off, int64(len(p)))
	r.mu.Lock()
	r.written += int64(len(p))
	r.mu.Unlock()
	return len(p), nil
}

func (r *recorder) WriteZeroes(off, n int64, _ qcow2.ZeroFlags) error {
	r.note(off, n)
	r.mu.Lock()
	r.zeroed += n
	r.mu.Unlock()
	return nil
}

func TestCopyMatchesSource(t *testing.T) {
	src, in := source(t)
	for _, tc := range []struct {
		name string
		o    Options
	}{
		{"plain", Options{}},
		{"workers-sparse", Options{Workers: 4, Sparse: 4096}},
		{"compressed", Options{Workers: 3, Compress: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := filepath.Join(t.TempDir(), "dst.qcow2")
			out, err := qcow2.Create(dst, qcow2.CreateOptions{Size: in.Size(), NoSync: true})
			if err != nil {
				t.Fatal(err)
			}
			err = Copy(out, in, in.Size(), tc.o)
			if cerr := out.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				t.Fatal(err)
			}
			run(t, "qemu-img", "compare", src, dst)
			run(t, "qemu-img", "check", dst)
			// Compressed or not as asked: data read back right proves
			// nothing about how it was stored.
			if got := compressedBytes(t, dst); (got > 0) != tc.o.Compress {
				t.Fatalf("%d bytes stored compressed, with Compress %v", got, tc.o.Compress)
			}
		})
	}
}

// compressedBytes is how much of the image at p is stored compressed.
func compressedBytes(t *testing.T, p string) int64 {
	t.Helper()
	img, err := qcow2.Open(p, qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	var n int64
	for off := int64(0); off < img.Size(); {
		exts, err := img.BlockStatus(off, img.Size()-off)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range exts {
			if e.Compressed {
				n += e.Length
			}
			off = e.Start + e.Length
		}
	}
	return n
}

// The zero-filled megabyte at 12M is data in the source: copied as read by
// default, left out with a sparse granularity.
func TestCopySparseSkipsZeroData(t *testing.T) {
	_, in := source(t)
	want := map[int64]int64{0: 3<<20 - 64<<10 + 64<<10 + 1<<20 + 512<<10, 4096: 3<<20 - 64<<10 + 64<<10 + 512<<10}
	for sparse, n := range want {
		r := &recorder{}
		if err := Copy(r, in, in.Size(), Options{Workers: 4, Sparse: sparse}); err != nil {
			t.Fatal(err)
		}
		if r.bad != nil {
			t.Fatal(r.bad)
		}
		if r.written != n || r.zeroed != 0 {
			t.Errorf("sparse %d: wrote %d bytes, zeroed %d; want %d, 0", sparse, r.written, r.zeroed, n)
		}
	}
}

// An existing target with old data reads as the source afterwards: what is
// zero in the source is zeroed in the target.
func TestCopyIntoExistingRawFile(t *testing.T) {
	src, in := source(t)
	dst := filepath.Join(t.TempDir(), "old.raw")
	if err := os.WriteFile(dst, bytes.Repeat([]byte{0xee}, int(in.Size())), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(dst, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	err = Copy(FileTarget{f}, in, in.Size(), Options{Workers: 2, Sparse: 4096, Existing: true})
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", src, dst)
	if err := Copy(FileTarget{f}, in, in.Size(), Options{Compress: true}); !errors.Is(err, ErrNoCompression) {
		t.Fatalf("compressed copy into a raw file: %v, want ErrNoCompression", err)
	}
}
