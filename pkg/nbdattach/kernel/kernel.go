package kernel

import (
	"log/slog"
	"sync"
	"time"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// Defaults for Options.
const (
	// DefaultIOTimeout is how long the kernel waits for one request before
	// it gives up on the socket and resends the request on another (or a
	// reconnected) socket. It must be non-zero: with no timeout the kernel
	// never resends a request that was in flight when the serving process
	// died, and a Reattach could not save it.
	DefaultIOTimeout = 30 * time.Second
	// DefaultDeadConnTimeout is how long the kernel holds I/O while no
	// socket is alive, waiting for Reattach (or the automatic reconnect)
	// to hand it a fresh one, before it fails that I/O. It is the window a
	// node plugin restart must fit in.
	DefaultDeadConnTimeout = 120 * time.Second
)

// Options configure the "nbd" Attacher.
type Options struct {
	// IOTimeout is the kernel's per-request timeout (NBD_ATTR_TIMEOUT), in
	// whole seconds. Zero means DefaultIOTimeout.
	IOTimeout time.Duration
	// DeadConnTimeout is how long the kernel waits for a new socket when
	// all are dead (NBD_ATTR_DEAD_CONN_TIMEOUT). Zero means
	// DefaultDeadConnTimeout.
	DeadConnTimeout time.Duration
	// SysfsRoot is where sysfs is mounted; "" means "/sys". Tests point it
	// at a fake tree.
	SysfsRoot string
	// Logger receives the few events worth a line (a socket the kernel
	// dropped and we replaced, PR_SET_IO_FLUSHER refused). nil: silent.
	Logger *slog.Logger
}

func (o Options) withDefaults() Options {
	if o.IOTimeout <= 0 {
		o.IOTimeout = DefaultIOTimeout
	}
	if o.DeadConnTimeout <= 0 {
		o.DeadConnTimeout = DefaultDeadConnTimeout
	}
	if o.SysfsRoot == "" {
		o.SysfsRoot = "/sys"
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return o
}

// Attacher is the "nbd" Attacher: it hands the Linux kernel's NBD
// driver one or more socketpairs over generic netlink and serves the other
// ends from this process, starting directly in the transmission phase (the
// kernel never negotiates, and only ever gets simple replies).
//
// Each device records the caller's identifier as the kernel's backend
// identifier (/sys/block/nbdN/backend), and a dead-connection timeout, so a
// restarted process can find its devices and hand the kernel fresh sockets
// (Reattach) while the kernel holds their I/O.
type Attacher struct {
	opts Options

	mu sync.Mutex
	// served maps a device index to the device this process serves.
	served map[int]*kernelDevice
}

// NewAttacher returns the "nbd" Attacher. It also prepares the process's
// threads for serving devices (PR_SET_IO_FLUSHER on all of them, once per
// process), which must happen before any device is served: make it early,
// at start.
func NewAttacher(opts Options) *Attacher {
	prepareProcess()
	return &Attacher{opts: opts.withDefaults(), served: map[int]*kernelDevice{}}
}

// Name implements Attacher.
func (a *Attacher) Name() string { return "nbd" }

var _ nbdattach.Attacher = (*Attacher)(nil)
