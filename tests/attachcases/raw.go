package attachcases

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
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
		// cmp(1) rather than a Go loop: the cases compare whole disks and
		// the tests run under the race detector.
		if out, err := exec.Command(peer.Require(t, "cmp"), path, ref).CombinedOutput(); err != nil {
			t.Fatalf("image %s differs from the device's contents: %v: %s", path, err, out)
		}
	},
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
