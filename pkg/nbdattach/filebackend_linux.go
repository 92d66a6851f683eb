package nbdattach

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// FileBackend serves a plain file (or block device) as a Backend: the raw
// format of `qcow2-csi nbd -f raw` and the backend of the server's tests.
type FileBackend struct {
	f        *os.File
	size     atomic.Int64
	readOnly bool
}

// OpenFile opens path as a FileBackend. The size is the file's size at open;
// Resize changes it.
func OpenFile(path string, readOnly bool) (*FileBackend, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, err
	}
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("nbd file backend %s: size: %w", path, err)
	}
	b := &FileBackend{f: f, readOnly: readOnly}
	b.size.Store(size)
	return b, nil
}

// PassthroughFile implements Passthrougher: reads and writes are plain
// pread and pwrite of the file.
func (b *FileBackend) PassthroughFile() *os.File { return b.f }

// Close closes the file.
func (b *FileBackend) Close() error { return b.f.Close() }

// Size implements Backend.
func (b *FileBackend) Size() int64 { return b.size.Load() }

// Resize grows or shrinks the file to size.
func (b *FileBackend) Resize(size int64) error {
	if err := b.f.Truncate(size); err != nil {
		return err
	}
	b.size.Store(size)
	return nil
}

// ReadAt implements Backend; bytes past the end of a shorter file read as zero.
func (b *FileBackend) ReadAt(_ context.Context, p []byte, off int64) error {
	n, err := b.f.ReadAt(p, off)
	if err == io.EOF {
		clear(p[n:])
		return nil
	}
	return err
}

// WriteAt implements Backend.
func (b *FileBackend) WriteAt(_ context.Context, p []byte, off int64, fua bool) error {
	if _, err := b.f.WriteAt(p, off); err != nil {
		return err
	}
	if fua {
		return unix.Fdatasync(int(b.f.Fd()))
	}
	return nil
}

// Flush implements Backend.
func (b *FileBackend) Flush(context.Context) error {
	return unix.Fdatasync(int(b.f.Fd()))
}

// Trim implements Backend by punching a hole; a file system that cannot is
// not an error (a trim is advisory).
func (b *FileBackend) Trim(_ context.Context, off, length int64) error {
	err := unix.Fallocate(int(b.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	if errors.Is(err, unix.EOPNOTSUPP) {
		return nil
	}
	return err
}

// WriteZeroes implements Backend: a punched hole, or with NoHole an
// allocated zeroed range; it writes zeroes where the file system can do
// neither, unless Fast forbids that.
func (b *FileBackend) WriteZeroes(ctx context.Context, off, length int64, fl ZeroFlags) error {
	mode := uint32(unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE)
	if fl.NoHole {
		mode = unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE
	}
	err := unix.Fallocate(int(b.f.Fd()), mode, off, length)
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
		if fl.Fast {
			return fmt.Errorf("%w: the file system cannot zero quickly", ErrNotSupported)
		}
		err = b.writeZeroes(off, length)
	}
	if err == nil && fl.FUA {
		err = unix.Fdatasync(int(b.f.Fd()))
	}
	return err
}

// zeroBlock is what writeZeroes writes where the file system cannot zero a
// range itself; it is only ever read.
var zeroBlock [1 << 20]byte

func (b *FileBackend) writeZeroes(off, length int64) error {
	for length > 0 {
		n := min(length, int64(len(zeroBlock)))
		if _, err := b.f.WriteAt(zeroBlock[:n], off); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}

// BlockStatus implements BlockStatuser from the file's holes (SEEK_DATA and
// SEEK_HOLE): a hole is StateHole|StateZero, like qemu's raw driver.
func (b *FileBackend) BlockStatus(_ context.Context, off, length int64) ([]Extent, error) {
	fd := int(b.f.Fd())
	end := off + length
	var out []Extent
	for off < end {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			data = end // only a hole up to the end of the file
		} else if err != nil {
			if len(out) > 0 {
				return out, nil
			}
			return []Extent{{Length: length}}, nil // no hole support: all data
		}
		if data > off {
			l := min(data, end) - off
			out = append(out, Extent{Length: l, Flags: StateHole | StateZero})
			off += l
			continue
		}
		hole, err := unix.Seek(fd, off, unix.SEEK_HOLE)
		if err != nil {
			hole = end
		}
		l := min(hole, end) - off
		if l <= 0 {
			l = end - off
		}
		out = append(out, Extent{Length: l})
		off += l
	}
	return out, nil
}
