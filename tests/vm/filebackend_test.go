//go:build linux

package vm

import (
	"context"
	"os"

	"golang.org/x/sys/unix"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// fileBackend serves a raw file: the simplest Backend, used where the test
// is about the kernel attach rather than the image format.
type fileBackend struct{ f *os.File }

func openFileBackend(path string) (*fileBackend, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	return &fileBackend{f: f}, nil
}

func (b *fileBackend) Size() int64 {
	st, err := b.f.Stat()
	if err != nil {
		return 0
	}
	return st.Size()
}

func (b *fileBackend) ReadAt(_ context.Context, p []byte, off int64) error {
	_, err := b.f.ReadAt(p, off)
	return err
}

func (b *fileBackend) WriteAt(_ context.Context, p []byte, off int64, fua bool) error {
	if _, err := b.f.WriteAt(p, off); err != nil {
		return err
	}
	if fua {
		return unix.Fdatasync(int(b.f.Fd()))
	}
	return nil
}

func (b *fileBackend) Flush(context.Context) error { return unix.Fdatasync(int(b.f.Fd())) }

func (b *fileBackend) Trim(_ context.Context, off, length int64) error {
	return unix.Fallocate(int(b.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}

func (b *fileBackend) WriteZeroes(_ context.Context, off, length int64, fl nbdattach.ZeroFlags) error {
	mode := uint32(unix.FALLOC_FL_ZERO_RANGE)
	if !fl.NoHole {
		mode = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
	}
	if err := unix.Fallocate(int(b.f.Fd()), mode, off, length); err != nil {
		if fl.Fast {
			return err
		}
		if _, werr := b.f.WriteAt(make([]byte, length), off); werr != nil {
			return werr
		}
	}
	if fl.FUA {
		return unix.Fdatasync(int(b.f.Fd()))
	}
	return nil
}

func (b *fileBackend) Close() error { return b.f.Close() }
