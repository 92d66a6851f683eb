package attachcases

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// Raw is the raw-file format: nbdattach.FileBackend, with the file system's
// own SEEK_DATA/SEEK_HOLE as the allocation oracle.
var Raw = Format{
	Name: "raw",
	Create: func(path string, size int64) (Image, error) {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return nil, err
		}
		err = f.Truncate(size)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, err
		}
		return nbdattach.OpenFile(path, false)
	},
	Open: func(path string) (Image, error) { return nbdattach.OpenFile(path, false) },
	Grow: func(img Image, size int64) error {
		fb, ok := img.(*nbdattach.FileBackend)
		if !ok {
			return fmt.Errorf("raw grow: %T is not a *nbdattach.FileBackend", img)
		}
		if size < fb.Size() {
			return fmt.Errorf("raw grow: %d is smaller than %d", size, fb.Size())
		}
		return fb.Resize(size)
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
			t.Fatalf("image %s differs from the device's contents: %v", path, err)
		}
	},
}

// sameContents reports where files a and b first differ, in 1 MiB chunks
// compared with bytes.Equal (assembly): neither a byte loop under the race
// detector nor busybox's byte-at-a-time cmp (in the VM guest) is fast
// enough for whole disks.
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
		if !bytes.Equal(ba[:min(na, nb)], bb[:min(na, nb)]) {
			return fmt.Errorf("byte %d differs", off+int64(firstDiff(ba[:na], bb[:nb])))
		}
		if na != nb {
			return fmt.Errorf("sizes differ: one ends at byte %d", off+int64(min(na, nb)))
		}
		off += int64(na)
		endA := errors.Is(ea, io.EOF) || errors.Is(ea, io.ErrUnexpectedEOF)
		if ea != nil && !endA {
			return ea
		}
		if eb != nil && !errors.Is(eb, io.EOF) && !errors.Is(eb, io.ErrUnexpectedEOF) {
			return eb
		}
		if endA {
			return nil
		}
	}
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
