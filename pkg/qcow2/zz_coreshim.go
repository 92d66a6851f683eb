package qcow2

// TEMPORARY: copies of the core engineer's definitions (worktree core,
// not yet on main) so this branch compiles; deleted when rebasing on the core.

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
)

var (
	ErrCorrupt     = errors.New("qcow2: image is corrupt")
	ErrUnsupported = errors.New("qcow2: unsupported feature")
	ErrReadOnly    = errors.New("qcow2: image is read-only")
)

const (
	maxBitmaps        = 65535
	maxBitmapDirSize  = 1024 * maxBitmaps
	maxBitmapNameSize = 1023
	extBitmaps        = 0x23852875
	AutoclearBitmaps  = 1 << 0
)

type FormatError struct {
	Kind   error
	Field  string
	Offset int64
	Msg    string
}

func (e *FormatError) Error() string {
	if e.Offset >= 0 {
		return fmt.Sprintf("qcow2: %s at offset %d: %s", e.Field, e.Offset, e.Msg)
	}
	return fmt.Sprintf("qcow2: %s: %s", e.Field, e.Msg)
}

func (e *FormatError) Unwrap() error { return e.Kind }

func corruptf(field string, off int64, format string, args ...any) error {
	return &FormatError{Kind: ErrCorrupt, Field: field, Offset: off, Msg: fmt.Sprintf(format, args...)}
}

func checkTable(field string, at int64, off, n, clusterSize uint64, fileSize int64) error {
	if off%clusterSize != 0 {
		return corruptf(field, at, "%#x is not aligned to the cluster size %d", off, clusterSize)
	}
	if off == 0 {
		return corruptf(field, at, "is 0 (overlaps the header)")
	}
	if off > uint64(fileSize) || n > uint64(fileSize)-off {
		return corruptf(field, at, "table at %#x of %d bytes extends past end of file (%d bytes)", off, n, fileSize)
	}
	return nil
}

type bitmapsExt struct {
	NbBitmaps uint32
	DirSize   uint64
	DirOffset uint64
}

func alignUp(x, a int64) int64 { return (x + a - 1) &^ (a - 1) }

// --- fake Image surface used by bitmap_image.go (core's image.go replaces it)

type header struct {
	Version   uint32
	Size      uint64
	Autoclear uint64
	Bitmaps   *bitmapsExt
}

type Image struct {
	f              *os.File
	path           string
	readOnly       bool
	log            *slog.Logger
	clusterBits    uint32
	clusterSize    int64
	drain          sync.RWMutex
	mu             sync.Mutex
	closed         bool
	hdr            *header
	size           int64
	bitmapDir      []bitmapDirEntry
	bitmapsTracked bool
	writeHooks     []func(off, n int64)
	bms            bitmapSet
}

func (img *Image) logger() *slog.Logger                        { return slog.Default() }
func (img *Image) allocClusters(n int64) (int64, error)        { panic("core") }
func (img *Image) freeNow(off, n int64) error                  { panic("core") }
func (img *Image) checkOverlap(off, n int64, k metaKind) error { panic("core") }
func (img *Image) writeHeader() error                          { panic("core") }
func (img *Image) fsync() error                                { panic("core") }
func (img *Image) syncRefcounts(sync bool) error               { panic("core") }
func (img *Image) buildMetaMap()                               { panic("core") }
func (img *Image) checkOpen() error                            { return nil }

type metaKind uint8

const (
	metaBitmapDir metaKind = iota + 8
	metaBitmapTable
)

var ErrOutOfRange = errors.New("qcow2: request beyond end of disk")

func (img *Image) getRefcount(ci int64) (uint64, error) { panic("core") }
func ioErr(op string, err error) error                  { return fmt.Errorf("qcow2: %s: %w", op, err) }
