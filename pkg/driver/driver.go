package driver

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/klog/v2"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// Seams are the driver's dependencies on the outside world, injected so that
// tests can substitute them. Nil fields get the production implementation
// where one exists in this package (Mounter); Images is required.
type Seams struct {
	// Images is the image library (qcow2).
	Images Images
	// Attachers are the attach backends the node may use, in order of
	// preference for --attach-backend=auto (nbd before fuse).
	Attachers []nbdattach.Attacher
	// Mounter formats and mounts (default: k8s.io/mount-utils).
	Mounter Mounter
	// Keys keeps the keys of staged encrypted volumes across a plugin
	// restart (encryption_keys.go). Default: the kernel keyring
	// (KernelKeyring), when this process may use it.
	Keys KeyStore
}

// Driver is the CSI plugin: one value serves the services its Mode selects.
type Driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedControllerServer
	csi.UnimplementedNodeServer

	opts      Options
	pool      *pool
	locks     *opLocks
	images    Images
	attachers []nbdattach.Attacher
	mounter   Mounter
	metrics   *metrics
	keys      KeyStore // nil: keys are not kept across a restart
	keysErr   error    // why keys is nil

	// node state: volumes staged on this node, by ID.
	stagedMu sync.Mutex
	staged   map[string]*stagedVolume
	// devMu serializes device setup and teardown across volumes. Backends
	// pick a free device by scanning the node's devices (/sys/block/nbd*,
	// loop devices), and a scan that meets a device another volume is
	// tearing down fails (seen: ENODEV from /sys/block/nbdN/backend). These
	// calls take milliseconds and are rare; I/O is never under this lock.
	devMu sync.Mutex

	// bases serialises the making and release of each clone base
	// (bases.go); flattens are the background flattens running
	// (flatten.go).
	bases    baseLocks
	flattens flattenRuns
	// groups are the group snapshots prepared on this node (group.go).
	groups groupTxns
	// ledger holds the space claimed by creates and expansions in flight
	// (space.go).
	ledger spaceLedger
	// serving is where Serve listens, for liveness to call back (health.go).
	serving atomic.Pointer[serveState]

	ready    atomic.Bool
	startErr atomic.Pointer[error]
}

// New checks opts and builds a driver. Call Start before serving.
func New(opts Options, s Seams) (*Driver, error) {
	opts.setDefaults()
	if err := opts.validate(); err != nil {
		return nil, err
	}
	if s.Images == nil {
		return nil, errors.New("driver: Seams.Images is required")
	}
	if s.Mounter == nil {
		s.Mounter = NewMounter()
	}
	p, err := openPool(opts.Pool, opts.NodeID)
	if err != nil {
		return nil, err
	}
	d := &Driver{
		opts:      opts,
		pool:      p,
		locks:     newOpLocks(),
		images:    s.Images,
		attachers: withLocalIDs(s.Attachers),
		mounter:   s.Mounter,
		staged:    map[string]*stagedVolume{},
		keys:      s.Keys,
	}
	if d.keys == nil {
		d.keys, d.keysErr = defaultKeyStore(opts.DriverName)
	}
	d.metrics = newMetrics(d)
	return d, nil
}

// Options returns the effective options (defaults filled in).
func (d *Driver) Options() Options { return d.opts }

// Start prepares the driver to serve: it removes what interrupted operations
// left in the pool and, on a node, re-attaches the devices a previous process
// was serving, so that mounted volumes keep working across a plugin restart.
// Probe reports ready only after Start succeeded.
func (d *Driver) Start(ctx context.Context) error {
	logger := klog.FromContext(ctx)
	// Not fatal: failing start would also skip the re-attach below, and
	// every mounted volume would lose its I/O over a mode.
	narrowed, err := d.pool.restrict()
	if len(narrowed) > 0 {
		logger.Info("Warning: pool files were open to other users; narrowed them", "pool", d.pool.dir, "changed", narrowed)
	}
	if err != nil {
		logger.Error(err, "Pool files are open to other users and could not be narrowed", "pool", d.pool.dir)
	}
	removed, err := d.pool.recover()
	if err != nil {
		d.failStart(err)
		return fmt.Errorf("pool %s: recover: %w", d.pool.dir, err)
	}
	if len(removed) > 0 {
		logger.Info("Removed leftovers of interrupted operations from the pool", "pool", d.pool.dir, "files", removed)
	}
	// After the pool's recovery: images without a record are gone, so
	// their references to bases are now stale.
	removed, err = d.pool.recoverBases()
	if err != nil {
		d.failStart(err)
		return fmt.Errorf("pool %s: recover clone bases: %w", d.pool.dir, err)
	}
	if len(removed) > 0 {
		logger.Info("Removed clone bases and references that interrupted operations left", "pool", d.pool.dir, "files", removed)
	}
	if d.opts.Mode.node() {
		if d.keysErr != nil {
			logger.Error(d.keysErr, "The kernel keyring is not usable: a node plugin restart leaves encrypted volumes unusable until they are staged again")
		}
		rctx, cancel := context.WithTimeout(ctx, d.opts.ReattachTimeout)
		err := d.reattachAll(rctx)
		cancel()
		if err != nil {
			d.failStart(err)
			return err
		}
	}
	d.ready.Store(true)
	d.resumeFlattens(ctx)
	logger.Info("Driver ready", "driver", d.opts.DriverName, "mode", d.opts.Mode, "node", d.opts.NodeID, "pool", d.pool.dir)
	return nil
}

func (d *Driver) failStart(err error) { d.startErr.Store(&err) }

// Flush makes the data of every open image durable, leaving images and
// devices as they are. A plugin on its way out calls Shutdown, which also
// closes the images.
func (d *Driver) Flush(ctx context.Context) error {
	d.stagedMu.Lock()
	defer d.stagedMu.Unlock()
	var errs []error
	for _, v := range d.staged {
		if v.image != nil {
			errs = append(errs, v.image.Backend().Flush(ctx))
		}
	}
	return errors.Join(errs...)
}

// Shutdown is what a plugin does before it exits with volumes staged: for
// each, it stops passing device I/O to the image (requests inside finish,
// later ones wait unanswered on nbd, whose kernel requeues them for the
// next process, or fail on fuse, whose device dies with the process), then
// flushes and closes the image, which stores its dirty bitmaps and clears
// their in_use flags: the image is clean on disk and changed block
// tracking stays trusted across the restart. Devices stay attached and
// records stay for Start to re-attach. A volume whose requests do not
// finish before ctx ends is only flushed and left open. Call it after
// Serve has returned.
func (d *Driver) Shutdown(ctx context.Context) error {
	d.flattens.stopAll()
	d.stagedMu.Lock()
	vols := make([]*stagedVolume, 0, len(d.staged))
	for _, v := range d.staged {
		if v.image != nil {
			vols = append(vols, v)
		}
	}
	d.stagedMu.Unlock()
	logger := klog.FromContext(ctx)
	var errs []error
	for _, v := range vols {
		if v.gate != nil {
			if err := v.gate.close(ctx); err != nil {
				logger.Error(err, "Volume left open at shutdown; flushing only", "volumeID", v.ID)
				errs = append(errs, fmt.Errorf("volume %q: %w", v.ID, err), v.image.Backend().Flush(context.Background()))
				continue
			}
		}
		d.stagedMu.Lock()
		img := v.image
		v.image, v.lostReason = nil, errShuttingDown.Error()
		d.stagedMu.Unlock()
		if err := img.Close(); err != nil {
			errs = append(errs, fmt.Errorf("volume %q: close image: %w", v.ID, err))
			continue
		}
		logger.V(2).Info("Image closed at shutdown; device left attached", "volumeID", v.ID, "device", v.DevicePath)
	}
	return errors.Join(errs...)
}

// Close closes every open image without detaching devices, for a driver
// whose devices no longer receive I/O from this process (tests that restart
// a driver in process). A serving plugin exits after Flush instead.
func (d *Driver) Close() error {
	d.flattens.stopAll()
	d.stagedMu.Lock()
	defer d.stagedMu.Unlock()
	var errs []error
	for _, v := range d.staged {
		if v.image != nil {
			errs = append(errs, v.image.Close())
			v.image = nil
		}
	}
	return errors.Join(errs...)
}

// readiness reports nil when the driver can serve every RPC of its mode, or
// what stands in the way (Probe). A full pool is not in the way: deletes,
// which free space, and every RPC but a create still work, and Probe's
// "not ready" is a failed liveness check for the upstream livenessprobe
// sidecar, which would restart the plugin in a loop; /readyz, the volume
// conditions and the metrics say the pool is full (space.go).
func (d *Driver) readiness() error {
	if p := d.startErr.Load(); p != nil {
		return fmt.Errorf("start failed: %w", *p)
	}
	if !d.ready.Load() {
		return errors.New("starting: re-attaching staged volumes")
	}
	if err := d.pool.writable(); err != nil && !noSpace(err) {
		return fmt.Errorf("pool %s is not writable: %w", d.pool.dir, err)
	}
	if d.opts.Mode.node() {
		if _, err := d.attacher(); err != nil {
			return err
		}
	}
	return nil
}

// since is a small helper for latency logs.
func since(t time.Time) string { return time.Since(t).Round(time.Microsecond).String() }
