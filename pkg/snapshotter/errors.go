package snapshotter

import "errors"

// Sentinel errors; returned errors wrap one of these or a pkg/qcow2 one.
var (
	// ErrNotFound: the snapshot does not exist in the image.
	ErrNotFound = errors.New("snapshotter: snapshot not found")
	// ErrUntrusted: the changed block tracking across the requested span
	// cannot be trusted (a bitmap is inconsistent or missing); the caller
	// must fall back to a full backup.
	ErrUntrusted = errors.New("snapshotter: changed block tracking cannot be trusted")
	// ErrInvalid: an argument is malformed (sequence order, ranges).
	ErrInvalid = errors.New("snapshotter: invalid argument")
	// ErrOutOfRange: an offset lies beyond the snapshot's disk.
	ErrOutOfRange = errors.New("snapshotter: offset beyond end of disk")
	// ErrExists: the destination of a restore already exists.
	ErrExists = errors.New("snapshotter: destination exists")
)
