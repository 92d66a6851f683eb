package attachcases

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Raw is the raw-file format: FileBackend, with the file system's own
// SEEK_DATA/SEEK_HOLE as the allocation oracle.
var Raw = Format{
	Name: "raw",
	Create: func(path string, size int64) (Image, error) {
		return CreateFileBackend(path, size)
	},
	Open: func(path string) (Image, error) { return OpenFileBackend(path) },
	Grow: func(img Image, size int64) error {
		fb, ok := img.(*FileBackend)
		if !ok {
			return fmt.Errorf("raw grow: %T is not a *FileBackend", img)
		}
		return fb.Grow(size)
	},
	Allocated: func(t *testing.T, path string, off, length int64) int64 {
		t.Helper()
		n, err := allocatedBytes(path, off, length)
		if err != nil {
			t.Fatalf("allocation of %s: %v", path, err)
		}
		return n
	},
	Equal: func(t *testing.T, path, ref string) {
		t.Helper()
		if err := sameContents(path, ref); err != nil {
			t.Fatal(err)
		}
	},
}

// Grow enlarges the file; the new size is visible to Size at once.
func (b *FileBackend) Grow(size int64) error {
	if size < b.Size() {
		return fmt.Errorf("raw grow: %d is smaller than %d", size, b.Size())
	}
	if err := b.f.Truncate(size); err != nil {
		return err
	}
	atomic.StoreInt64(&b.size, size)
	return nil
}

// allocatedBytes sums the data extents of a file (SEEK_DATA/SEEK_HOLE)
// inside [start, start+length).
func allocatedBytes(path string, start, length int64) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	fd := int(f.Fd())
	end := min(st.Size(), start+length)
	var total int64
	for off := start; off < end; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			return 0, err
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return 0, err
		}
		if data >= end {
			break
		}
		total += min(hole, end) - data
		off = hole
	}
	return total, nil
}

// sameContents compares two files byte for byte and names the first
// difference.
func sameContents(a, b string) error {
	fa, err := os.Open(a)
	if err != nil {
		return err
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return err
	}
	defer fb.Close()
	ba, bb := make([]byte, 1<<20), make([]byte, 1<<20)
	for off := int64(0); ; {
		na, ea := io.ReadFull(fa, ba)
		nb, eb := io.ReadFull(fb, bb)
		if i := firstDiff(ba[:na], bb[:nb]); i >= 0 {
			return fmt.Errorf("%s and %s differ at byte %d", a, b, off+int64(i))
		}
		if ea != nil || eb != nil {
			if (ea == nil) != (eb == nil) {
				return fmt.Errorf("%s and %s differ in length after %d bytes", a, b, off+int64(na))
			}
			return nil
		}
		off += int64(na)
	}
}

// alignedBuf returns n bytes aligned to 4096, for O_DIRECT.
func alignedBuf(n int) []byte {
	b := make([]byte, n+4096)
	a := int(uintptr(unsafe.Pointer(&b[0])) & 4095)
	if a != 0 {
		a = 4096 - a
	}
	return b[a : a+n]
}

func ioctlPtr[T any](fd int, req uintptr, arg *T) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(arg)))
	if e != 0 {
		return e
	}
	return nil
}
