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
