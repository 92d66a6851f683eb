package nbdattach

import "context"

// Attacher turns a Backend into a kernel block device. Two implementations
// exist: "nbd" (the kernel NBD driver over generic netlink, the default) and
// "fuse" (a FUSE-served file behind a loop device, for kernels without nbd).
// The driver picks one per node and hands the device path to the same
// format/mount/publish code.
type Attacher interface {
	// Name is "nbd" or "fuse".
	Name() string
	// Available reports nil when this node can attach with this backend, or an
	// error (wrapping ErrUnavailable) that says what is missing and what to do.
	Available() error
	// Attach exposes b as a new block device. id is the caller's stable
	// identifier (the volume ID); it is recorded with the device so that a
	// restarted process can find the device again (Reattach, List).
	Attach(ctx context.Context, id string, b Backend, opts AttachOptions) (Device, error)
	// Reattach finds the device a previous process attached for id and serves
	// it from b in this process, before I/O to it fails. It returns an error
	// wrapping ErrNotAttached when no such device exists, and one wrapping
	// ErrUnavailable when the backend cannot survive its serving process.
	Reattach(ctx context.Context, id string, b Backend, opts AttachOptions) (Device, error)
	// List returns the devices attached by this backend on this node, by any
	// process, with their identifiers, so that stale ones can be found.
	List(ctx context.Context) ([]DeviceInfo, error)
}

// Device is an attached block device.
type Device interface {
	// Path is the device node, e.g. /dev/nbd3 or /dev/loop7.
	Path() string
	// ID is the identifier given to Attach.
	ID() string
	// Resize tells the kernel the backend's new size (online expansion).
	Resize(ctx context.Context, size int64) error
	// Detach flushes, disconnects the device and stops serving it. It does not
	// close the Backend: the caller owns it.
	Detach(ctx context.Context) error
}

// AttachOptions tune a device. Zero values mean sensible defaults.
type AttachOptions struct {
	ReadOnly bool
	// BlockSize is the logical block size the kernel uses (512 or 4096).
	BlockSize uint32
	// Connections is the number of sockets handed to the kernel (nbd only).
	Connections int
}

// DeviceInfo describes an attached device found on the node.
type DeviceInfo struct {
	Path string
	ID   string
	// Size in bytes as the kernel sees it.
	Size int64
	// Connected is false when the device exists but nothing serves it.
	Connected bool
}

// Disconnecter is implemented by attach backends whose devices outlive
// their serving process (nbd). Disconnect ends the device a previous, dead
// process attached for id without serving it: the kernel fails at once the
// I/O queued in it and any sent to it later, instead of holding that I/O
// for a server until its timeouts run out. For a device whose backend
// cannot be served any more (its image cannot be opened): nothing is read
// or written. A device this process serves is refused with
// ErrAlreadyAttached (Detach it); no device for id is ErrNotAttached.
type Disconnecter interface {
	Disconnect(ctx context.Context, id string) error
}

// StaleCleaner is implemented by attach backends whose devices cannot be
// taken over by a new process (fuse): the caller runs CleanStale once at
// start, before attaching anything.
type StaleCleaner interface {
	// CleanStale finds the devices and mounts a previous, dead process left
	// behind and releases what it safely can: loop devices no one uses are
	// unbound, loop devices still mounted are set to unbind when unmounted,
	// dead FUSE mounts are detached. It returns what it found (Connected is
	// false for each; Path is empty for a dead mount whose device the kernel
	// released already) and the errors it met, joined.
	CleanStale(ctx context.Context) ([]DeviceInfo, error)
}
