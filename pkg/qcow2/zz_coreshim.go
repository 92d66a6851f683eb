package qcow2

// TEMPORARY: copies of the core engineer's definitions (worktree core,
// not yet on main) so this branch compiles; deleted when rebasing on the core.

import (
	"errors"
	"fmt"
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
