package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"testing"
)

// TestStreamOnline copies a qcow2 and a raw backing file up into their
// overlays while writers keep writing (block-stream with I/O running), then
// drops the backing file: the image stands alone with every byte the model
// says, qemu-img reads the same and check is clean.
func TestStreamOnline(t *testing.T) {
	for _, c := range []struct{ name, baseFmt, opts string }{
		{"qcow2", "qcow2", "cluster_size=64k"},
		{"raw", "raw", "cluster_size=4k"},
		{"extl2", "qcow2", "extended_l2=on"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			const size = 6 << 20
			base := filepath.Join(dir, "base."+c.baseFmt)
			qemu(t, "qemu-img", "create", "-q", "-f", c.baseFmt, base, fmt.Sprint(size))
			qemu(t, "qemu-io", "-f", c.baseFmt, "-c", "write -P 0x5a 0 2M", "-c", "write -P 0x5b 3M 1500k", "-c", "write -z 1M 64k", base)
			top := filepath.Join(dir, "top.qcow2")
			qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", c.opts, "-b", filepath.Base(base), "-F", c.baseFmt, top, fmt.Sprint(size+(1<<20)))
			qemu(t, "qemu-io", "-c", "write -P 0x11 512k 100k", "-c", "write -z 3200k 8k", top)
			ref := ourRaw(t, top)
			img, err := Open(top, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			if err := img.AddBitmap("b0", BitmapOptions{}); err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			var mu sync.Mutex // ref
			errc := make(chan error, 2)
			stop := make(chan struct{})
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := rand.New(rand.NewPCG(7, 9))
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					off := r.Int64N(int64(len(ref)) - 70000)
					p := bytes.Repeat([]byte{byte(0x80 + i%64)}, 1+r.IntN(70000))
					mu.Lock()
					_, err := img.WriteAt(p, off)
					copy(ref[off:], p)
					mu.Unlock()
					if err != nil {
						errc <- err
						return
					}
				}
			}()
			// Stream in small steps, as the driver does, so writes interleave.
			var copied int64
			for off := int64(0); off < img.Size(); off += 256 << 10 {
				n, err := img.Stream(off, min(256<<10, img.Size()-off))
				if err != nil {
					t.Fatalf("Stream at %d: %v", off, err)
				}
				copied += n
			}
			close(stop)
			wg.Wait()
			select {
			case err := <-errc:
				t.Fatal(err)
			default:
			}
			if copied == 0 {
				t.Fatal("nothing was copied up")
			}
			ext, _ := img.BitmapExtents("b0", 0, img.Size())
			if err := img.DetachBacking(); err != nil {
				t.Fatal(err)
			}
			if d := img.BackingDepth(); d != 0 {
				t.Fatalf("BackingDepth after detach = %d", d)
			}
			got := make([]byte, img.Size())
			if _, err := img.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, ref) {
				t.Fatal("data after stream differs from the model")
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			checkClean(t, top)
			if got := qemuRaw(t, top); !bytes.Equal(got, ref) {
				t.Fatal("qemu-img reads different data after stream")
			}
			if info := qemu(t, "qemu-img", "info", "-U", top); bytes.Contains([]byte(info), []byte("backing file")) {
				t.Fatalf("backing file still in the header:\n%s", info)
			}
			// The copy-up is no guest write: the bitmap holds only what the
			// writer wrote (a superset would bloat every backup; a subset
			// is what the writer test in bitmap tests pins).
			var dirty int64
			for _, e := range ext {
				if e.Dirty {
					dirty += e.Length
				}
			}
			if dirty >= img.Size() {
				t.Fatalf("copy-up marked the whole disk dirty (%d bytes)", dirty)
			}
		})
	}
}

// qemuOverlay makes, with qemu-img, an empty 4 MiB overlay over a base
// whose first 3 MiB hold 0x5a, and returns the overlay's path.
func qemuOverlay(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
	qemu(t, "qemu-io", "-c", "write -P 0x5a 0 3M", base)
	top := filepath.Join(dir, "top.qcow2")
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "4M")
	return top
}

// TestStreamSkipsBitmaps: a stream with no writer leaves every bitmap clean.
func TestStreamSkipsBitmaps(t *testing.T) {
	top := qemuOverlay(t)
	img, err := Open(top, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if err := img.AddBitmap("b0", BitmapOptions{}); err != nil {
		t.Fatal(err)
	}
	if n, err := img.Stream(0, img.Size()); err != nil || n != 3<<20 {
		t.Fatalf("Stream = %d, %v; want %d", n, err, 3<<20)
	}
	ext, err := img.BitmapExtents("b0", 0, img.Size())
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ext {
		if e.Dirty {
			t.Fatalf("copy-up marked %+v dirty", e)
		}
	}
	// A second stream finds nothing left.
	if n, err := img.Stream(0, img.Size()); err != nil || n != 0 {
		t.Fatalf("second Stream = %d, %v; want 0", n, err)
	}
}

// TestDetachBackingKeepsSnapshots: a snapshot taken before the stream still
// reads the backing file, so the backing file stays until it is deleted.
func TestDetachBackingKeepsSnapshots(t *testing.T) {
	top := qemuOverlay(t)
	img, err := Open(top, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if err := img.DetachBacking(); !errors.Is(err, ErrBackingNeeded) {
		t.Fatalf("DetachBacking before stream = %v, want ErrBackingNeeded", err)
	}
	s, err := img.CreateSnapshot("s1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.Stream(0, img.Size()); err != nil {
		t.Fatal(err)
	}
	if err := img.DetachBacking(); !errors.Is(err, ErrBackingNeeded) {
		t.Fatalf("DetachBacking with a snapshot reading the base = %v, want ErrBackingNeeded", err)
	}
	if err := img.DeleteSnapshot(s.ID); err != nil {
		t.Fatal(err)
	}
	if err := img.DetachBacking(); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	checkClean(t, top)
	want := bytes.Repeat([]byte{0x5a}, 3<<20)
	if got := qemuRaw(t, top); !bytes.Equal(got[:3<<20], want) || bytes.ContainsFunc(got[3<<20:], func(r rune) bool { return r != 0 }) {
		t.Fatal("qemu-img reads different data after detach")
	}
}
