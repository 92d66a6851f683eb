package nbdattach

import "errors"

// Sentinel errors shared by the attach backends. The NBD server's own request
// errors (ENOSPC, EINVAL, ...) are defined next to the server.
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
