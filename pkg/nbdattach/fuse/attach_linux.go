package fuse

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// fuseFSType is the filesystem type of the backend's mounts in mountinfo.
const fuseFSType = "fuse.qcow2-csi"

// Attacher is the "fuse" attach backend: each device is a file of a FUSE
// filesystem this process serves (one for all devices, server_linux.go),
// whose contents are the Backend, with a loop device bound to that file. It
// works on any kernel with FUSE and loop; its devices cannot outlive the
// process (see Reattach).
type Attacher struct {
	dir         string
	log         *slog.Logger
	passthrough bool
	cache       CacheMode
	uring       bool

	mu      sync.Mutex
	devices map[string]*fuseDevice

	// srvMu guards srv, the shared server while mounted, its count, and
	// closing, the mounts of servers being unmounted.
	srvMu   sync.Mutex
	srv     *fuseServer
	closing map[string]bool

	flusherOnce sync.Once
	flusherErr  error
}

var (
	_ nbdattach.Attacher     = (*Attacher)(nil)
	_ nbdattach.StaleCleaner = (*Attacher)(nil)
)

// NewAttacher returns the fuse backend. It touches nothing until used.
func NewAttacher(opts Options) *Attacher {
	dir := opts.Dir
	if dir == "" {
		dir = DefaultDir
	}
	if abs, err := filepath.Abs(dir); err == nil {
		dir = abs
	}
	cache := opts.Cache
	if cache == "" {
		cache = DefaultCacheMode
	}
	return &Attacher{dir: filepath.Clean(dir), log: opts.Logger, passthrough: opts.Passthrough, cache: cache, uring: opts.Uring, devices: map[string]*fuseDevice{}}
}

// CachesIO says, when the devices' FUSE files are cached (Options.Cache),
// that the kernel serves their I/O ahead of the plugin: reads of cached
// data, and with the writeback cache writes, complete without reaching the
// Backend, so a throttle in the Backend does not hold the device to its
// limits. "" in CacheNone.
func (a *Attacher) CachesIO() string {
	if !a.cache.cached() {
		return ""
	}
	return "the fuse backend runs with --fuse-cache=" + string(a.cache) + ": the kernel serves the device's I/O from its page cache, ahead of the plugin's throttle"
}

// Name is "fuse".
func (a *Attacher) Name() string { return "fuse" }

// Available checks for /dev/fuse, FUSE in the kernel, loop devices, and the
// privilege to mount.
func (a *Attacher) Available() error {
	f, err := os.OpenFile("/dev/fuse", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("%w: open /dev/fuse: %v (the plugin needs the host's /dev and the fuse module)", nbdattach.ErrUnavailable, err)
	}
	f.Close()
	if b, err := os.ReadFile("/proc/filesystems"); err != nil || !strings.Contains(string(b), "\tfuse\n") {
		return fmt.Errorf("%w: the kernel does not list the fuse filesystem in /proc/filesystems (load the fuse module)", nbdattach.ErrUnavailable)
	}
	if err := loopAvailable(); err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("%w: mounting FUSE and binding loop devices needs root (CAP_SYS_ADMIN); run the node plugin privileged", nbdattach.ErrUnavailable)
	}
	return nil
}

// IOFlusher reports whether the process could be marked PR_SET_IO_FLUSHER
// (nil) or why not. It is tried at the first Attach; before that it is nil.
func (a *Attacher) IOFlusher() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.flusherErr
}

// setIOFlusher marks every thread of the process PR_SET_IO_FLUSHER, so that
// memory reclaim from inside the serving path does not wait for writeback to
// the very loop devices it serves (a deadlock under memory pressure). New
// threads inherit the flag from the thread that clones them. It needs
// CAP_SYS_RESOURCE, and AllThreadsSyscall is unavailable in cgo binaries:
// either failure is reported, not fatal, since without memory pressure the
// data path works the same.
func (a *Attacher) setIOFlusher() {
	a.flusherOnce.Do(func() {
		_, _, e := syscall.AllThreadsSyscall(unix.SYS_PRCTL, unix.PR_SET_IO_FLUSHER, 1, 0)
		var err error
		switch {
		case e == 0:
		case e == syscall.ENOTSUP:
			err = errors.New("PR_SET_IO_FLUSHER not set: AllThreadsSyscall is unavailable in a cgo binary (build with CGO_ENABLED=0)")
		case e == syscall.EPERM:
			err = errors.New("PR_SET_IO_FLUSHER not set: the process lacks CAP_SYS_RESOURCE")
		default:
			err = fmt.Errorf("PR_SET_IO_FLUSHER: %w", e)
		}
		a.mu.Lock()
		a.flusherErr = err
		a.mu.Unlock()
		if a.log != nil {
			if err != nil {
				a.log.Warn("fuse attach: serving threads are not IO flushers; heavy memory pressure could stall I/O to fuse-attached devices", "err", err)
			} else {
				a.log.Info("fuse attach: serving threads marked PR_SET_IO_FLUSHER")
			}
		}
	})
}

// fuseDevice is one attached device.
type fuseDevice struct {
	a    *Attacher
	id   string
	srv  *fuseServer
	file string // Dir/srv@<random>/<id>
	node *diskNode
	loop *loopDevice
	// passthrough: the kernel reads and writes the backend's file itself.
	passthrough bool

	mu       sync.Mutex
	detached bool
}

func (d *fuseDevice) Path() string { return d.loop.path }

// devPath is Path for a device that may still be attaching.
func (d *fuseDevice) devPath() string {
	if d.loop == nil {
		return "(attaching)"
	}
	return d.loop.path
}
func (d *fuseDevice) ID() string { return d.id }

// DirectIO reports whether the loop device does direct I/O to the FUSE file
// (no second page cache). Exposed for tests and diagnostics.
func (d *fuseDevice) DirectIO() bool { return d.loop.dio }

// Passthrough reports whether the kernel reads and writes the backend's
// host file directly (FUSE passthrough). Exposed for tests and diagnostics.
func (d *fuseDevice) Passthrough() bool { return d.passthrough }

// Attach serves b as the file Dir/srv@<random>/<id> of the shared FUSE
// filesystem (mounting it if no device is attached) and binds a loop device
// to that file.
func (a *Attacher) Attach(ctx context.Context, id string, b nbdattach.Backend, opts nbdattach.AttachOptions) (nbdattach.Device, error) {
	if err := validFuseID(id); err != nil {
		return nil, err
	}
	if _, err := ParseCacheMode(string(a.cache)); err != nil {
		return nil, err
	}
	size := b.Size()
	// The default is the nbd backend's: 4096 when the size allows, so that a
	// filesystem made under one backend (xfs records its sector size) mounts
	// under the other.
	bs := opts.BlockSize
	if bs == 0 {
		bs = 4096
		if size%4096 != 0 {
			bs = 512
		}
	}
	if bs < 512 || bs > 4096 || bs&(bs-1) != 0 {
		return nil, fmt.Errorf("nbdattach: fuse: block size %d: must be 512, 1024, 2048 or 4096", bs)
	}
	if size <= 0 || size%int64(bs) != 0 {
		return nil, fmt.Errorf("nbdattach: fuse: backend size %d is not a positive multiple of the block size %d", size, bs)
	}
	if err := a.Available(); err != nil {
		return nil, err
	}

	a.mu.Lock()
	if _, ok := a.devices[id]; ok {
		a.mu.Unlock()
		return nil, fmt.Errorf("nbdattach: fuse: %s is attached by this process as %s: %w", id, a.devices[id].devPath(), nbdattach.ErrAlreadyAttached)
	}
	d := &fuseDevice{a: a, id: id}
	a.devices[id] = d // reserve the id while attaching
	a.mu.Unlock()

	dev, err := a.attach(ctx, d, b, opts.ReadOnly, bs)
	if err != nil {
		a.mu.Lock()
		delete(a.devices, id)
		a.mu.Unlock()
		return nil, err
	}
	return dev, nil
}

func (a *Attacher) attach(ctx context.Context, d *fuseDevice, b nbdattach.Backend, readOnly bool, bs uint32) (_ *fuseDevice, err error) {
	a.setIOFlusher()
	// A previous process's mount for this id (the one-mount-per-device
	// layout of earlier versions): clean it if it is dead. Read mountinfo
	// rather than stat the path, which a dead FUSE mount answers with
	// ENOTCONN.
	mounts, err := a.ourMounts()
	if err != nil {
		return nil, fmt.Errorf("nbdattach: fuse: %w", err)
	}
	for _, m := range mounts {
		if filepath.Base(m.Mountpoint) != d.id {
			continue
		}
		if _, err := a.cleanMount(ctx, m.Mountpoint); err != nil {
			return nil, fmt.Errorf("nbdattach: fuse: %s is mounted already and could not be cleaned: %w", m.Mountpoint, err)
		}
	}
	srv, err := a.acquireServer(ctx)
	if err != nil {
		return nil, err
	}
	d.node = &diskNode{b: b, readOnly: readOnly, log: a.log, id: d.id, cached: a.cache.cached()}
	if pt, ok := b.(nbdattach.Passthrougher); ok && a.passthrough {
		d.node.passthrough = pt.PassthroughFile()
	}
	d.node.size.Store(b.Size())
	if err := srv.root.add(d.id, d.node); err != nil {
		_ = a.releaseServer(srv)
		return nil, fmt.Errorf("nbdattach: fuse: %w", err)
	}
	d.srv, d.file = srv, filepath.Join(srv.mnt, d.id)
	defer func() {
		if err != nil {
			// Nothing holds the file (the loop device was not bound).
			srv.root.remove(d.id)
			_ = a.releaseServer(srv)
		}
	}()

	flags := os.O_RDWR
	if readOnly {
		flags = os.O_RDONLY
	}
	backing, err := os.OpenFile(d.file, flags|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("nbdattach: fuse: open %s: %w", d.file, err)
	}
	// The loop device takes its own reference to the open file.
	defer backing.Close()

	// With passthrough the loop device reads and writes the host file
	// through the kernel's FUSE file without direct I/O: direct I/O would
	// pass on to the host file and bypass its page cache, which the raw
	// file is served from otherwise (by pread and pwrite). With a cached
	// FUSE file it is buffered too: that cache is the point.
	d.passthrough = d.node.passthrough != nil && passthroughInEffect(backing, d.node)
	ld, err := bindLoop(loopConfig{
		backing:   backing,
		blockSize: bs,
		readOnly:  readOnly,
		directIO:  !d.passthrough && !d.node.cached,
		name:      loopNameMarker + d.id,
	})
	if err != nil {
		return nil, fmt.Errorf("nbdattach: fuse: %w", err)
	}
	a.mu.Lock() // List and Attach read d.loop of devices being attached
	d.loop = ld
	a.mu.Unlock()
	if a.log != nil {
		a.log.Info("fuse attach: attached", "id", d.id, "device", ld.path, "directIO", ld.dio, "passthrough", d.passthrough, "cache", string(a.cache), "blockSize", bs, "readOnly", readOnly)
	}
	return d, nil
}

// passthroughInEffect reports whether reads of f bypass the server: the
// kernel may refuse passthrough (older than 6.9, no CAP_SYS_ADMIN, a
// backing file it cannot stack on), and go-fuse then serves the open
// normally without saying so. One read tells.
func passthroughInEffect(f *os.File, n *diskNode) bool {
	before := n.reads.Load()
	var b [512]byte
	_, err := f.ReadAt(b[:], 0)
	if (err == nil || errors.Is(err, io.EOF)) && n.reads.Load() == before {
		return true
	}
	// Served the normal way: the probe left a page in the FUSE file's
	// cache, which the loop device's direct I/O does not use (and a cached
	// mode would only read again). Drop it.
	_ = unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
	return false
}

// Resize grows the file to size and has the loop device pick it up. size must
// not exceed what the Backend holds now; shrinking is refused.
func (d *fuseDevice) Resize(ctx context.Context, size int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.detached {
		return fmt.Errorf("nbdattach: fuse: resize %s: %w", d.id, nbdattach.ErrNotAttached)
	}
	cur := d.node.size.Load()
	switch {
	case size < cur:
		return fmt.Errorf("nbdattach: fuse: resize %s to %d: shrinking from %d is refused", d.id, size, cur)
	case size > d.node.b.Size():
		return fmt.Errorf("nbdattach: fuse: resize %s to %d: the backend holds only %d bytes", d.id, size, d.node.b.Size())
	case size%512 != 0:
		return fmt.Errorf("nbdattach: fuse: resize %s to %d: not a multiple of 512", d.id, size)
	}
	d.node.size.Store(size)
	// The kernel must learn the new inode size that LOOP_SET_CAPACITY
	// reads. A truncate to it tells it in every cache mode (Setattr accepts
	// the size the node now has); a stat alone does not with a writeback
	// cache, where the kernel keeps its own size of a regular file. That
	// holds for a read-only device's file too, and truncating it to the
	// size it has changes no byte.
	if err := unix.Truncate(d.file, size); err != nil {
		return fmt.Errorf("nbdattach: fuse: resize %s: truncate: %w", d.id, err)
	}
	var st unix.Stat_t
	if err := unix.Stat(d.file, &st); err != nil {
		return fmt.Errorf("nbdattach: fuse: resize %s: stat: %w", d.id, err)
	}
	if st.Size != size {
		return fmt.Errorf("nbdattach: fuse: resize %s: the kernel sees %d bytes, not %d", d.id, st.Size, size)
	}
	if err := d.loop.setCapacity(); err != nil {
		return fmt.Errorf("nbdattach: fuse: resize %s: %w", d.id, err)
	}
	return nil
}

// Detach refuses while the device is in use (mounted), then flushes, unbinds
// the loop device, removes the FUSE file (unmounting the filesystem after
// the last device) and flushes the Backend.
func (d *fuseDevice) Detach(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.detached {
		return nil
	}
	if d.loop.busy() {
		return fmt.Errorf("nbdattach: fuse: detach %s: %s is mounted or held open exclusively; unmount it first: %w", d.id, d.loop.path, nbdattach.ErrDeviceBusy)
	}
	deadline := time.Now().Add(10 * time.Second)
	if dl, ok := ctx.Deadline(); ok {
		deadline = dl
	}
	flushErr, err := d.loop.release(deadline)
	if err != nil {
		// The backing file is still held: unmounting now would fail, and
		// leaving the mount keeps the device working for whoever holds it.
		return fmt.Errorf("nbdattach: fuse: detach %s: %w", d.id, errors.Join(flushErr, err))
	}
	// A flush that failed (the connection was aborted) is the device's
	// last word, said below; it is unbound all the same.
	errs := []error{flushErr}
	d.srv.root.remove(d.id)
	// Requests still being answered (the kernel has released the file)
	// end before the caller may close the backend.
	d.node.inflight.Lock()
	//lint:ignore SA2001 a barrier: it waits for the requests in flight
	d.node.inflight.Unlock()
	if err := d.a.releaseServer(d.srv); err != nil {
		errs = append(errs, err)
	}
	if !d.node.readOnly {
		if err := d.node.b.Flush(ctx); err != nil {
			errs = append(errs, fmt.Errorf("flush: %w", err))
		}
	}
	d.detached = true
	d.a.mu.Lock()
	delete(d.a.devices, d.id)
	d.a.mu.Unlock()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("nbdattach: fuse: detach %s: %w", d.id, err)
	}
	return nil
}

// Reattach cannot work for this backend: a FUSE connection lives exactly as
// long as the process holding /dev/fuse, so the previous process's devices
// have failed every request since it exited. It says so (ErrUnavailable) for
// a device that exists and ErrNotAttached otherwise; CleanStale releases them.
func (a *Attacher) Reattach(ctx context.Context, id string, b nbdattach.Backend, opts nbdattach.AttachOptions) (nbdattach.Device, error) {
	if err := validFuseID(id); err != nil {
		return nil, err
	}
	infos, err := a.List(ctx)
	if err != nil {
		return nil, err
	}
	for _, in := range infos {
		if in.ID == id {
			return nil, fmt.Errorf("nbdattach: fuse: %s (%s) cannot be taken over: its FUSE connection ended with the process that served it, so its I/O fails until it is unmounted and attached again: %w", id, in.Path, nbdattach.ErrUnavailable)
		}
	}
	return nil, fmt.Errorf("nbdattach: fuse: %s: %w", id, nbdattach.ErrNotAttached)
}

// List returns the loop devices bound to a file of this backend: those this
// process serves (Connected) and those a previous or another process left
// (Connected when their FUSE server still answers).
func (a *Attacher) List(ctx context.Context) ([]nbdattach.DeviceInfo, error) {
	loops, err := scanLoops()
	if err != nil {
		return nil, fmt.Errorf("nbdattach: fuse: %w", err)
	}
	a.mu.Lock()
	mine := map[int]string{}
	for id, d := range a.devices {
		if d.loop != nil {
			mine[d.loop.num] = id
		}
	}
	a.mu.Unlock()
	var out []nbdattach.DeviceInfo
	for _, l := range loops {
		id, ok := a.loopID(l)
		if !ok {
			continue
		}
		info := nbdattach.DeviceInfo{Path: loopPath(l.num), ID: id, Size: l.size}
		if mid, ok := mine[l.num]; ok && mid == id {
			info.Connected = true
		} else {
			// Another process's device, in this Dir or elsewhere: alive if
			// its file answers. One in a mount namespace this process cannot
			// see counts as not connected; unbinding it (CleanStale) is
			// harmless while its server lives, since the server holds the
			// device open and LOOP_CLR_FD then only sets autoclear.
			info.Connected = fuseAlive(ctx, l.backingFile)
		}
		out = append(out, info)
	}
	return out, nil
}

// loopID says whether a bound loop device is one of this backend's and
// which id it serves. The marker in lo_file_name names the backend (and the
// id, truncated to 63 bytes); the backing file's name is the full id. When
// the FUSE server is dead the kernel cannot answer LOOP_GET_STATUS64 (it
// stats the backing file: ENOTCONN), so such a device counts when its backing
// file has the shape of this backend's: Dir/srv@<random>/<id> (or
// Dir/<id>/<id>, the layout of earlier versions), or /<id> once the dead
// mount was detached (CleanStale) and the path is left relative to its root.
func (a *Attacher) loopID(l loopStatus) (string, bool) {
	bf := strings.TrimSuffix(l.backingFile, " (deleted)")
	id := filepath.Base(bf)
	if validFuseID(id) != nil {
		return "", false
	}
	if short, ok := strings.CutPrefix(l.name, loopNameMarker); ok {
		return id, strings.HasPrefix(id, short)
	}
	dead := errors.Is(l.statusErr, unix.ENOTCONN)
	mnt := filepath.Dir(bf)
	inDir := a.dirs()[filepath.Dir(mnt)] && (filepath.Base(mnt) == id || isServerDir(mnt))
	return id, dead && (inDir || bf == "/"+id)
}

// fuseAlive reports whether the FUSE path (a mount or a file in it) answers
// a stat. A dead connection answers ENOTCONN at once; a wedged server would
// block, so the stat runs aside and counts as dead after a few seconds.
func fuseAlive(ctx context.Context, path string) bool {
	done := make(chan error, 1)
	go func() {
		var st unix.Stat_t
		done <- unix.Stat(path, &st)
	}()
	t := time.NewTimer(3 * time.Second)
	defer t.Stop()
	select {
	case err := <-done:
		return err == nil
	case <-t.C:
		return false
	case <-ctx.Done():
		return false
	}
}

// CleanStale releases what dead processes left in Dir: loop devices bound to
// a file there whose FUSE server no longer answers, then the dead mounts.
// Devices and mounts this process serves, or another live process does, are
// left alone. A dead mount whose loop device is already gone (it was not in
// use, so the kernel unbound it when its process died) is reported with an
// empty Path.
func (a *Attacher) CleanStale(ctx context.Context) ([]nbdattach.DeviceInfo, error) {
	infos, err := a.List(ctx)
	if err != nil {
		return nil, err
	}
	var found []nbdattach.DeviceInfo
	var errs []error
	seen := map[string]bool{}
	for _, in := range infos {
		if in.Connected {
			continue
		}
		found = append(found, in)
		seen[in.ID] = true
		var num int
		if _, err := fmt.Sscanf(in.Path, "/dev/loop%d", &num); err != nil {
			continue
		}
		if err := clearLoop(num); err != nil {
			errs = append(errs, err)
		}
	}
	mounts, err := a.ourMounts()
	if err != nil {
		errs = append(errs, err)
	}
	for _, m := range mounts {
		if a.isServer(m.Mountpoint) {
			continue
		}
		dead, err := a.cleanMount(ctx, m.Mountpoint)
		if err != nil {
			errs = append(errs, err)
		}
		// A dead mount of the earlier layout names its device; a dead
		// shared one cannot say which files it held.
		if id := filepath.Base(m.Mountpoint); dead && !isServerDir(m.Mountpoint) && !seen[id] {
			found = append(found, nbdattach.DeviceInfo{ID: id})
			seen[id] = true
		}
	}
	if err := errors.Join(errs...); err != nil {
		return found, fmt.Errorf("nbdattach: fuse: clean stale: %w", err)
	}
	return found, nil
}

// dirs is Dir as given and with its symlinks resolved: mountinfo and sysfs
// show resolved paths.
func (a *Attacher) dirs() map[string]bool {
	dirs := map[string]bool{a.dir: true}
	if real, err := filepath.EvalSymlinks(a.dir); err == nil {
		dirs[real] = true
	}
	return dirs
}

// ourMounts lists this backend's FUSE mounts directly inside Dir.
func (a *Attacher) ourMounts() ([]*mountinfo.Info, error) {
	dirs := a.dirs()
	ms, err := mountinfo.GetMounts(func(m *mountinfo.Info) (skip, stop bool) {
		return m.FSType != fuseFSType || !dirs[filepath.Dir(m.Mountpoint)], false
	})
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	return ms, nil
}

// cleanMount detaches a dead mount of this backend at mnt (Dir/srv@<random>,
// or Dir/<id> of earlier versions) and removes its directory. It reports
// whether it was dead; a live one (another process serving it) is an error,
// left mounted.
func (a *Attacher) cleanMount(ctx context.Context, mnt string) (bool, error) {
	if fuseAlive(ctx, mnt) {
		return false, fmt.Errorf("%s is served by another live process: %w", mnt, nbdattach.ErrAlreadyAttached)
	}
	// Lazy: a loop device bound to the file (a filesystem still mounted on
	// it) keeps the superblock until it lets go, which is the kernel's job.
	if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
		return true, fmt.Errorf("unmount %s: %w", mnt, err)
	}
	if err := os.Remove(mnt); err != nil && !errors.Is(err, os.ErrNotExist) {
		return true, err
	}
	return true, nil
}
