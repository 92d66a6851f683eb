package nbdattach

import "errors"

// Errors a Backend returns (wrapped with %w) to choose the error its client
// sees: the NBD server (package nbd) sends the NBD error of that name, the
// fuse backend the errno. Any other error is reported as EIO. A
// syscall.Errno anywhere in the chain is mapped as well, so a file-backed
// Backend can pass os errors through.
var (
	// ErrNoSpace: the backing store is full (ENOSPC).
	ErrNoSpace = errors.New("no space left on backing store")
	// ErrInvalid: the request is malformed (EINVAL).
	ErrInvalid = errors.New("invalid request")
	// ErrPermission: the export refuses the operation, e.g. a write to a
	// read-only export (EPERM).
	ErrPermission = errors.New("operation not permitted")
	// ErrOverflow: the request is larger than the server will serve (EOVERFLOW).
	ErrOverflow = errors.New("request too large")
	// ErrNotSupported: the backend cannot do this, e.g. a fast zero that would
	// be slow (ENOTSUP).
	ErrNotSupported = errors.New("operation not supported")
	// ErrShutdown: the server is shutting down (ESHUTDOWN).
	ErrShutdown = errors.New("server shutting down")
)

// Sentinel errors shared by the attach backends.
var (
	// ErrUnavailable: this node cannot attach with the backend (no nbd
	// module, no /dev/fuse, no loop devices). The wrapping error says what to do.
	ErrUnavailable = errors.New("attach backend unavailable")
	// ErrNotAttached: no device is attached for the identifier.
	ErrNotAttached = errors.New("not attached")
)

// Errors of the kernel attach.
var (
	// ErrAlreadyAttached: a device is already attached for the identifier
	// (the error names it); Reattach or Detach it instead.
	ErrAlreadyAttached = errors.New("already attached")
	// ErrDeviceBusy: the device is mounted or held open exclusively, so it
	// cannot be detached; unmount it first.
	ErrDeviceBusy = errors.New("device busy")
)
