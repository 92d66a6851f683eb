package qcow2

import (
	"errors"
	"fmt"
	"syscall"
)

// Sentinel errors. Errors returned by this package wrap one of these (test
// with errors.Is) and add which field, at which offset, was wrong.
var (
	// ErrNotQcow2 means the file does not start with the qcow2 magic.
	ErrNotQcow2 = errors.New("qcow2: not a qcow2 image")
	// ErrCorrupt means the image metadata is inconsistent or out of the
	// limits qemu enforces.
	ErrCorrupt = errors.New("qcow2: image is corrupt")
	// ErrUnsupported means a valid image uses a feature this package does
	// not implement (encryption, external data files, unknown incompatible
	// feature bits, ...).
	ErrUnsupported = errors.New("qcow2: unsupported feature")
	// ErrReadOnly means a write was attempted on an image opened read-only
	// (or opened read-only because it is marked corrupt).
	ErrReadOnly = errors.New("qcow2: image is read-only")
	// ErrNoSpace wraps ENOSPC from the underlying file system.
	ErrNoSpace = fmt.Errorf("qcow2: no space left on device: %w", syscall.ENOSPC)
	// ErrLocked means another process (qemu or us) holds a conflicting
	// image lock.
	ErrLocked = errors.New("qcow2: image is locked")
	// ErrOutOfRange means an I/O request lies beyond the virtual disk.
	ErrOutOfRange = errors.New("qcow2: request beyond end of disk")
	// ErrClosed means the Image was closed.
	ErrClosed = errors.New("qcow2: image is closed")
	// ErrInvalidOption means CreateOptions or OpenOptions are invalid.
	ErrInvalidOption = errors.New("qcow2: invalid option")
)

// FormatError describes a bad field in the image. It unwraps to ErrCorrupt
// or ErrUnsupported (Kind).
type FormatError struct {
	Kind   error  // ErrCorrupt or ErrUnsupported
	Field  string // e.g. "l1_size"
	Offset int64  // byte offset in the file (or -1 when unknown)
	Msg    string // what is wrong, e.g. "4294967295 exceeds limit 4194304"
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

func unsupportedf(field string, off int64, format string, args ...any) error {
	return &FormatError{Kind: ErrUnsupported, Field: field, Offset: off, Msg: fmt.Sprintf(format, args...)}
}

// ioErr wraps an error from the underlying file, mapping ENOSPC to ErrNoSpace.
func ioErr(op string, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, syscall.ENOSPC) {
		return fmt.Errorf("qcow2: %s: %w", op, ErrNoSpace)
	}
	return fmt.Errorf("qcow2: %s: %w", op, err)
}
