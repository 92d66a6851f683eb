package attachcases

import (
	"context"
	"fmt"
	"os"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// FileBackend is an nbdattach.Backend on a plain (raw) file: the simplest
// backend to attach, and the floor the qcow2 one is compared against.
type FileBackend struct {
	f    *os.File
	size int64
}

var _ nbdattach.Backend = (*FileBackend)(nil)

// CreateFileBackend creates a sparse raw file of size bytes at path.
func CreateFileBackend(path string, size int64) (*FileBackend, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return nil, err
	}
	return &FileBackend{f: f, size: size}, nil
}

// OpenFileBackend opens an existing raw file.
func OpenFileBackend(path string) (*FileBackend, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &FileBackend{f: f, size: st.Size()}, nil
}

func (b *FileBackend) Close() error { return b.f.Close() }
func (b *FileBackend) Size() int64  { return atomic.LoadInt64(&b.size) }

func (b *FileBackend) ReadAt(ctx context.Context, p []byte, off int64) error {
	_, err := b.f.ReadAt(p, off)
	return err
}

func (b *FileBackend) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if _, err := b.f.WriteAt(p, off); err != nil {
		return err
	}
	if fua {
		return unix.Fdatasync(int(b.f.Fd()))
	}
	return nil
}

func (b *FileBackend) Flush(ctx context.Context) error { return unix.Fdatasync(int(b.f.Fd())) }

func (b *FileBackend) Trim(ctx context.Context, off, length int64) error {
	return b.WriteZeroes(ctx, off, length, nbdattach.ZeroFlags{})
}

func (b *FileBackend) WriteZeroes(ctx context.Context, off, length int64, fl nbdattach.ZeroFlags) error {
	mode := uint32(unix.FALLOC_FL_KEEP_SIZE | unix.FALLOC_FL_PUNCH_HOLE)
	if fl.NoHole {
		mode = unix.FALLOC_FL_KEEP_SIZE | unix.FALLOC_FL_ZERO_RANGE
	}
	if err := unix.Fallocate(int(b.f.Fd()), mode, off, length); err != nil {
		return fmt.Errorf("fallocate %#x [%d,+%d): %w", mode, off, length, err)
	}
	if fl.FUA {
		return unix.Fdatasync(int(b.f.Fd()))
	}
	return nil
}
