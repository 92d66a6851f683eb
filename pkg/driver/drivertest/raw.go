// Package drivertest holds test doubles for the driver's seams: raw image
// files standing in for qcow2 images, and an attach backend on loop devices.
// They let the driver's own logic (pool, locks, idempotency, mounts) be tested
// on any Linux host with real mkfs and mounts, independently of the qcow2
// library and of nbd. They are not for production.
package drivertest

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// RawImages implements driver.Images with sparse raw files, locked with OFD
// locks the way qemu locks images (one exclusive writer).
type RawImages struct{}

var _ driver.Images = RawImages{}

func (RawImages) Create(_ context.Context, path string, size int64, opts driver.ImageCreateOptions) error {
	if opts.Passphrase != nil {
		return fmt.Errorf("image %s: raw images cannot be encrypted: %w", path, driver.ErrInvalid)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o640)
	if err != nil {
		return err
	}
	err = f.Truncate(size)
	if err == nil && (opts.Preallocation == "falloc" || opts.Preallocation == "full") {
		err = unix.Fallocate(int(f.Fd()), 0, 0, size)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
	}
	return err
}

// lock takes an OFD lock on the file's first byte: exclusive for writers,
// shared for readers. It fails at once when another open holds a conflicting
// lock.
func lock(f *os.File, write bool) error {
	lk := unix.Flock_t{Type: unix.F_RDLCK, Whence: 0, Start: 0, Len: 1}
	if write {
		lk.Type = unix.F_WRLCK
	}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
		return fmt.Errorf("image %s is locked by another user: %w", f.Name(), driver.ErrInUse)
	}
	return nil
}

func open(path string, readOnly bool) (*os.File, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("image %s: %w", path, driver.ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	if err := lock(f, !readOnly); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

func (RawImages) Open(_ context.Context, path string, o driver.ImageOpenOptions) (driver.Image, error) {
	readOnly := o.ReadOnly
	f, err := open(path, readOnly)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &RawImage{f: f, size: st.Size(), readOnly: readOnly}, nil
}

func (RawImages) Size(_ context.Context, path string) (int64, error) {
	st, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, fmt.Errorf("image %s: %w", path, driver.ErrNotFound)
	}
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

func (RawImages) Resize(_ context.Context, path string, size int64) error {
	f, err := open(path, false)
	if err != nil {
		return err
	}
	defer f.Close()
	return resize(f, size)
}

func resize(f *os.File, size int64) error {
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if size < st.Size() {
		return fmt.Errorf("shrinking %s from %d to %d: %w", f.Name(), st.Size(), size, driver.ErrOutOfRange)
	}
	return f.Truncate(size)
}

// RawImage is an open raw image.
type RawImage struct {
	mu       sync.Mutex
	f        *os.File
	size     int64
	readOnly bool
}

// Encrypted is false: raw images are never encrypted.
func (i *RawImage) Encrypted() bool { return false }

func (i *RawImage) Size() int64 {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.size
}

func (i *RawImage) Resize(_ context.Context, size int64) error {
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.readOnly {
		return fmt.Errorf("image %s is open read-only: %w", i.f.Name(), driver.ErrPrecondition)
	}
	if err := resize(i.f, size); err != nil {
		return err
	}
	i.size = size
	return nil
}

func (i *RawImage) Backend() nbdattach.Backend { return &fileBackend{img: i} }

func (i *RawImage) Close() error {
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.f == nil {
		return nil
	}
	err := i.f.Sync()
	if i.readOnly {
		err = nil
	}
	if cerr := i.f.Close(); err == nil {
		err = cerr
	}
	i.f = nil
	return err
}

// Path is the image file (the loop attacher attaches it directly).
func (i *RawImage) Path() string { return i.f.Name() }

// fileBackend serves a raw image as an nbdattach.Backend.
type fileBackend struct{ img *RawImage }

// FilePath lets LoopAttacher attach the file itself.
func (b *fileBackend) FilePath() string { return b.img.Path() }

func (b *fileBackend) Size() int64 { return b.img.Size() }
func (b *fileBackend) ReadAt(_ context.Context, p []byte, off int64) error {
	_, err := b.img.f.ReadAt(p, off)
	return err
}
func (b *fileBackend) WriteAt(_ context.Context, p []byte, off int64, fua bool) error {
	if _, err := b.img.f.WriteAt(p, off); err != nil {
		return err
	}
	if fua {
		return b.img.f.Sync()
	}
	return nil
}
func (b *fileBackend) Flush(context.Context) error { return b.img.f.Sync() }
func (b *fileBackend) Trim(_ context.Context, off, length int64) error {
	return unix.Fallocate(int(b.img.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}
func (b *fileBackend) WriteZeroes(ctx context.Context, off, length int64, _ nbdattach.ZeroFlags) error {
	return b.Trim(ctx, off, length)
}
