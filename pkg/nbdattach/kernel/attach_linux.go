//go:build linux

package kernel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/nbd"
)

// Available implements Attacher: nil when the kernel's nbd generic netlink
// family answers.
func (a *Attacher) Available() error {
	c, err := genetlink.Dial(nil)
	if err != nil {
		return fmt.Errorf("%w: nbd: open generic netlink: %v", nbdattach.ErrUnavailable, err)
	}
	defer c.Close()
	_, err = a.family(c)
	return err
}

// unavailableHint is the part of the "no nbd" error that says what to do.
const unavailableHint = "load it on the node with `modprobe nbd` (it ships in the kernel's modules package, " +
	"e.g. linux-image-* on Debian or linux-modules-extra-$(uname -r) on Ubuntu), or use the fuse attach backend"

func (a *Attacher) family(c *genetlink.Conn) (genetlink.Family, error) {
	f, err := c.GetFamily(nlFamilyName)
	if err == nil {
		return f, nil
	}
	if errors.Is(err, os.ErrNotExist) {
		mod := "not loaded"
		if _, serr := os.Stat(filepath.Join(a.opts.SysfsRoot, "module", "nbd")); serr == nil {
			mod = "loaded, yet its netlink family is missing (a kernel older than 4.12?)"
		}
		return f, fmt.Errorf("%w: the kernel has no nbd driver (generic netlink family %q not found; nbd module %s): %s",
			nbdattach.ErrUnavailable, nlFamilyName, mod, unavailableHint)
	}
	return f, fmt.Errorf("%w: nbd: look up generic netlink family %q: %v", nbdattach.ErrUnavailable, nlFamilyName, err)
}

// execute sends one nbd netlink command and returns the replies. ctx bounds
// the exchange: its deadline becomes the socket's, and its end interrupts a
// send or receive in progress. The kernel handles a command within the send,
// so an error after ctx ended does not say whether the command took effect.
func (a *Attacher) execute(ctx context.Context, cmd uint8, attrs []byte) ([]genetlink.Message, error) {
	if ctx.Err() != nil {
		return nil, fmt.Errorf("nbd: %s: %w", nlCmdName(cmd), context.Cause(ctx))
	}
	c, err := genetlink.Dial(nil)
	if err != nil {
		return nil, fmt.Errorf("%w: nbd: open generic netlink: %v", nbdattach.ErrUnavailable, err)
	}
	defer c.Close()
	release, err := bindContext(ctx, c)
	if err != nil {
		return nil, fmt.Errorf("nbd: %s: %w", nlCmdName(cmd), err)
	}
	defer release()
	f, err := a.family(c)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("nbd: %s: %w (%v)", nlCmdName(cmd), context.Cause(ctx), err)
		}
		return nil, err
	}
	msgs, err := c.Execute(genetlink.Message{
		Header: genetlink.Header{Command: cmd, Version: nlVersion},
		Data:   attrs,
	}, f.ID, netlink.Request|netlink.Acknowledge)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("nbd: %s: %w (%v)", nlCmdName(cmd), context.Cause(ctx), err)
		}
		if errors.Is(err, syscall.EPERM) {
			return nil, fmt.Errorf("nbd: %s: %w (configuring nbd devices needs CAP_SYS_ADMIN)", nlCmdName(cmd), err)
		}
		return nil, fmt.Errorf("nbd: %s: %w (the kernel log says why)", nlCmdName(cmd), err)
	}
	return msgs, nil
}

// bindContext makes ctx's deadline c's, and ctx's end interrupt whatever
// c is blocked in (a deadline in the past wakes a pending read or write).
// release stops watching ctx.
func bindContext(ctx context.Context, c *genetlink.Conn) (release func() bool, err error) {
	if dl, ok := ctx.Deadline(); ok {
		if err := c.SetDeadline(dl); err != nil {
			return nil, fmt.Errorf("set netlink socket deadline: %w", err)
		}
	}
	return context.AfterFunc(ctx, func() { c.SetDeadline(aLongTimeAgo) }), nil
}

// aLongTimeAgo is a deadline that has passed: setting it interrupts I/O.
var aLongTimeAgo = time.Unix(1, 0)

func nlCmdName(cmd uint8) string {
	switch cmd {
	case nlCmdConnect:
		return "CONNECT"
	case nlCmdDisconnect:
		return "DISCONNECT"
	case nlCmdReconfigure:
		return "RECONFIGURE"
	case nlCmdStatus:
		return "STATUS"
	}
	return "command " + strconv.Itoa(int(cmd))
}

// status asks the kernel which devices hold a configuration. index < 0
// asks for all devices.
func (a *Attacher) status(ctx context.Context, index int) ([]nlStatus, error) {
	ae := netlink.NewAttributeEncoder()
	if index >= 0 {
		ae.Uint32(nlAttrIndex, uint32(index))
	}
	attrs, err := ae.Encode()
	if err != nil {
		return nil, err
	}
	msgs, err := a.execute(ctx, nlCmdStatus, attrs)
	if err != nil {
		return nil, err
	}
	var out []nlStatus
	for _, m := range msgs {
		st, err := decodeStatus(m.Data)
		if err != nil {
			return nil, err
		}
		out = append(out, st...)
	}
	return out, nil
}

// Attach implements Attacher.
func (a *Attacher) Attach(ctx context.Context, id string, b nbdattach.Backend, opts nbdattach.AttachOptions) (nbdattach.Device, error) {
	if err := validBackendID(id); err != nil {
		return nil, err
	}
	if b == nil {
		return nil, errors.New("nbd: attach: nil backend")
	}
	devs, err := readSysDevices(a.opts.SysfsRoot)
	if err != nil {
		return nil, err
	}
	if d, ok := findByBackendID(devs, id); ok {
		return nil, fmt.Errorf("nbd: %q: %w as /dev/nbd%d", id, nbdattach.ErrAlreadyAttached, d.index)
	}
	size := b.Size()
	bs, err := chooseBlockSize(size, opts.BlockSize)
	if err != nil {
		return nil, err
	}
	exp := kernelExport(b, opts.ReadOnly, bs)
	if err := exp.Validate(); err != nil {
		return nil, err
	}
	flags := exp.TransmissionFlags()
	n := opts.Connections
	if n <= 0 {
		n = 1
	}
	if n > 1 && flags&kernelFlagCanMultiConn == 0 {
		return nil, fmt.Errorf("nbd: %d connections asked, but the export does not advertise CAN_MULTI_CONN", n)
	}
	if n > maxConnections {
		return nil, fmt.Errorf("nbd: %d connections exceed the limit of %d", n, maxConnections)
	}

	d := a.newDevice(-1, id, b, exp)
	kfds, err := d.startConns(n)
	if err != nil {
		d.abort()
		return nil, err
	}
	attrs, err := nlConfig{
		index:           -1,
		size:            uint64(size),
		blockSize:       uint64(bs),
		timeout:         a.opts.IOTimeout,
		deadConnTimeout: a.opts.DeadConnTimeout,
		serverFlags:     uint64(flags),
		sockets:         kfds,
		backendID:       id,
	}.encode()
	var msgs []genetlink.Message
	if err == nil {
		msgs, err = a.execute(ctx, nlCmdConnect, attrs)
	}
	closeFDs(kfds)
	if err != nil {
		if ctx.Err() != nil {
			// Cut off after the send, the kernel may have configured the
			// device all the same: undo that, or its identifier would
			// stay taken by a device nobody serves.
			if sd, ok := a.findSys(id); ok {
				_, _ = a.execute(context.WithoutCancel(ctx), nlCmdDisconnect, indexAttr(sd.index))
			}
		}
		d.abort()
		return nil, err
	}
	index := -1
	for _, m := range msgs {
		if i, derr := decodeIndex(m.Data); derr == nil {
			index = i
		}
	}
	if index < 0 {
		// The kernel configured some device but did not say which: find it
		// by identifier so that it is not left behind.
		if sd, ok := a.findSys(id); ok {
			index = sd.index
		} else {
			d.abort()
			return nil, errors.New("nbd: CONNECT reply has no device index")
		}
	}
	if err := a.register(d, index); err != nil {
		_, _ = a.execute(context.WithoutCancel(ctx), nlCmdDisconnect, indexAttr(index))
		d.abort()
		return nil, err
	}
	return d, nil
}

// Reattach implements Attacher: it finds the device recorded with id and
// hands the kernel fresh sockets served from b in this process. The kernel
// takes a socket only in place of a dead one, so a device still served by a
// live process is refused rather than silently shared.
func (a *Attacher) Reattach(ctx context.Context, id string, b nbdattach.Backend, opts nbdattach.AttachOptions) (nbdattach.Device, error) {
	if err := validBackendID(id); err != nil {
		return nil, err
	}
	if b == nil {
		return nil, errors.New("nbd: reattach: nil backend")
	}
	sd, ok := a.findSys(id)
	if !ok {
		return nil, fmt.Errorf("nbd: %q: %w (no /sys/block/nbd*/backend names it)", id, nbdattach.ErrNotAttached)
	}
	a.mu.Lock()
	_, mine := a.served[sd.index]
	a.mu.Unlock()
	if mine {
		return nil, fmt.Errorf("nbd: %q: %w as /dev/nbd%d, served by this process", id, nbdattach.ErrAlreadyAttached, sd.index)
	}
	// The kernel keeps the block size it was given at CONNECT; requests
	// are checked against it as before the restart.
	bs, err := readSysInt(filepath.Join(a.opts.SysfsRoot, "block", "nbd"+strconv.Itoa(sd.index), "queue", "logical_block_size"))
	if err != nil {
		return nil, err
	}
	if bs < 512 || bs > 4096 || bs&(bs-1) != 0 {
		return nil, fmt.Errorf("nbd: /dev/nbd%d: logical_block_size %d is not a power of two between 512 and 4096", sd.index, bs)
	}
	exp := kernelExport(b, opts.ReadOnly, uint32(bs))
	if err := exp.Validate(); err != nil {
		return nil, err
	}
	n := opts.Connections
	if n <= 0 {
		n = 1
	}
	if n > maxConnections {
		return nil, fmt.Errorf("nbd: %d connections exceed the limit of %d", n, maxConnections)
	}
	d := a.newDevice(sd.index, id, b, exp)
	cfg := nlConfig{
		index:           sd.index,
		timeout:         a.opts.IOTimeout,
		deadConnTimeout: a.opts.DeadConnTimeout,
		backendID:       id,
	}
	if size := b.Size(); size > sd.size {
		// The backend grew while nobody served it: tell the kernel now.
		cfg.size = uint64(size)
	}
	// The kernel notices a dead socket when its receive thread reads EOF,
	// which follows the old process's exit closely but not atomically:
	// retry briefly before concluding that a live process still serves.
	deadline := time.Now().Add(reattachGrace)
	for {
		taken, err := d.reconnect(ctx, cfg, n)
		if err != nil {
			d.abort()
			return nil, err
		}
		if taken > 0 {
			break
		}
		if time.Now().After(deadline) {
			d.abort()
			return nil, fmt.Errorf("nbd: %q: /dev/nbd%d has no dead connection to replace: another process (pid %d) still serves it",
				id, sd.index, sd.pid)
		}
		select {
		case <-ctx.Done():
			d.abort()
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	if err := a.register(d, sd.index); err != nil {
		d.abort()
		return nil, err
	}
	return d, nil
}

// Disconnect implements nbdattach.Disconnecter: DISCONNECT, with no socket
// handed to the kernel. On a device whose sockets are dead the kernel marks
// it disconnected, wakes the requests waiting for a reconnect and fails
// them, and fails every later request; the device is freed once the last
// opener (a mount) lets it go.
func (a *Attacher) Disconnect(ctx context.Context, id string) error {
	if err := validBackendID(id); err != nil {
		return err
	}
	sd, ok := a.findSys(id)
	if !ok {
		return fmt.Errorf("nbd: %q: %w (no /sys/block/nbd*/backend names it)", id, nbdattach.ErrNotAttached)
	}
	a.mu.Lock()
	_, mine := a.served[sd.index]
	a.mu.Unlock()
	if mine {
		return fmt.Errorf("nbd: %q: %w as /dev/nbd%d, served by this process: detach it", id, nbdattach.ErrAlreadyAttached, sd.index)
	}
	if _, err := a.execute(ctx, nlCmdDisconnect, indexAttr(sd.index)); err != nil {
		return fmt.Errorf("nbd: disconnect /dev/nbd%d (%q): %w", sd.index, id, err)
	}
	return nil
}

// reattachGrace bounds how long Reattach waits for the kernel to notice
// that the previous server's sockets are closed.
const reattachGrace = 3 * time.Second

// maxConnections bounds the sockets per device (the kernel has no limit;
// each one is a goroutine and a kernel receive thread).
const maxConnections = 16

// List implements Attacher: every configured nbd device on the node, with
// the identifier recorded when it was attached.
func (a *Attacher) List(ctx context.Context) ([]nbdattach.DeviceInfo, error) {
	sts, err := a.status(ctx, -1)
	if err != nil {
		return nil, err
	}
	configured := map[int]bool{}
	for _, st := range sts {
		configured[st.index] = st.connected
	}
	devs, err := readSysDevices(a.opts.SysfsRoot)
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []nbdattach.DeviceInfo
	for _, d := range devs {
		if !configured[d.index] {
			continue
		}
		_, mine := a.served[d.index]
		out = append(out, nbdattach.DeviceInfo{
			Path:      devPath(d.index),
			ID:        d.backendID,
			Size:      d.size,
			Connected: mine || processAlive(d.pid),
		})
	}
	return out, nil
}

// processAlive reports whether pid names a running process. The kernel's
// pid file names the process that sent CONNECT (RECONFIGURE does not update
// it); it is in the initial pid namespace, so a plugin in its own pid
// namespace sees every device it did not serve itself as not connected,
// which errs toward reattaching.
func processAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

func (a *Attacher) findSys(id string) (sysDevice, bool) {
	devs, err := readSysDevices(a.opts.SysfsRoot)
	if err != nil {
		return sysDevice{}, false
	}
	return findByBackendID(devs, id)
}

func (a *Attacher) register(d *kernelDevice, index int) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, dup := a.served[index]; dup {
		return fmt.Errorf("nbd: /dev/nbd%d is already served by this process", index)
	}
	d.setIndex(index)
	a.served[index] = d
	return nil
}

func (a *Attacher) unregister(d *kernelDevice) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.served[d.index] == d {
		delete(a.served, d.index)
	}
}

func indexAttr(index int) []byte {
	b, _ := nlConfig{index: index}.encode()
	return b
}

func devPath(index int) string { return "/dev/nbd" + strconv.Itoa(index) }

// chooseBlockSize picks the logical block size: the one asked, else 4096
// (fewer, larger requests for the filesystems on top) when the size allows,
// else 512. The kernel truncates the device to a multiple of it, so a size
// that is not one is refused rather than silently shortened.
func chooseBlockSize(size int64, asked uint32) (uint32, error) {
	if size <= 0 {
		return 0, fmt.Errorf("nbd: backend size %d is not positive", size)
	}
	bs := asked
	if bs == 0 {
		bs = 4096
		if size%4096 != 0 {
			bs = 512
		}
	}
	if bs < 512 || bs > 4096 || bs&(bs-1) != 0 {
		return 0, fmt.Errorf("nbd: block size %d is not a power of two between 512 and 4096", bs)
	}
	if size%int64(bs) != 0 {
		return 0, fmt.Errorf("nbd: backend size %d is not a multiple of the block size %d", size, bs)
	}
	return bs, nil
}

// kernelDevice is one /dev/nbdN served by this process.
type kernelDevice struct {
	a   *Attacher
	id  string
	b   nbdattach.Backend
	exp *nbd.Export

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	// ready is closed once the device index is known (or the attach
	// failed): connection supervisors wait for it before reconnecting.
	ready     chan struct{}
	readyOnce sync.Once

	mu        sync.Mutex
	index     int
	stopping  bool
	conns     map[net.Conn]struct{}
	detached  bool
	detachErr error
}

func (a *Attacher) newDevice(index int, id string, b nbdattach.Backend, exp *nbd.Export) *kernelDevice {
	ctx, cancel := context.WithCancel(context.Background())
	return &kernelDevice{
		a: a, id: id, b: b, exp: exp, index: index,
		ctx: ctx, cancel: cancel, ready: make(chan struct{}),
		conns: map[net.Conn]struct{}{},
	}
}

// Path implements Device.
func (d *kernelDevice) Path() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return devPath(d.index)
}

// ID implements Device.
func (d *kernelDevice) ID() string { return d.id }

func (d *kernelDevice) setIndex(i int) {
	d.mu.Lock()
	d.index = i
	d.mu.Unlock()
	d.readyOnce.Do(func() { close(d.ready) })
}

// startConns makes n socketpairs, serves one end of each and returns the
// other ends for the kernel. The caller closes the returned fds once the
// kernel holds them.
func (d *kernelDevice) startConns(n int) ([]int, error) {
	var kfds []int
	for i := 0; i < n; i++ {
		kfd, conn, err := socketPair()
		if err != nil {
			closeFDs(kfds)
			return nil, err
		}
		kfds = append(kfds, kfd)
		if !d.track(conn) {
			closeFDs(kfds)
			return nil, errors.New("nbd: device is detaching")
		}
		d.wg.Add(1)
		go d.supervise(conn)
	}
	return kfds, nil
}

// track records a live server-side conn so that abort and Detach can close
// it; false when the device is already stopping.
func (d *kernelDevice) track(c net.Conn) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.stopping {
		c.Close()
		return false
	}
	d.conns[c] = struct{}{}
	return true
}

func (d *kernelDevice) untrack(c net.Conn) {
	d.mu.Lock()
	delete(d.conns, c)
	d.mu.Unlock()
	c.Close()
}

func (d *kernelDevice) isStopping() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.stopping
}

// stop marks the device as going away and closes every server conn.
func (d *kernelDevice) stop() {
	d.mu.Lock()
	d.stopping = true
	conns := d.conns
	d.conns = map[net.Conn]struct{}{}
	d.mu.Unlock()
	for c := range conns {
		c.Close()
	}
	d.cancel()
	d.readyOnce.Do(func() { close(d.ready) })
}

// abort undoes a failed Attach or Reattach.
func (d *kernelDevice) abort() {
	d.stop()
	d.wg.Wait()
}

// supervise serves conn until the kernel drops it. A drop that is not a
// Detach (the kernel timed a request out and shut the socket, or the server
// hit a protocol error) is answered by handing the kernel a fresh socket,
// the same way Reattach does after a restart.
func (d *kernelDevice) supervise(conn net.Conn) {
	defer d.wg.Done()
	// The serving thread writes to the backend on behalf of the kernel's
	// writeback. See ioFlusher for why it must not be throttled or recurse
	// into reclaim; if the flag could not be set process-wide, pin this
	// goroutine to its thread and set it there. The thread is never unlocked,
	// so it exits with the goroutine instead of carrying the flag elsewhere.
	if err := ioFlusherAllThreads(); err != nil {
		runtime.LockOSThread()
		if err := unix.Prctl(unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0); err != nil {
			d.a.opts.Logger.Warn("nbd: PR_SET_IO_FLUSHER refused; writeback under memory pressure may stall on this device",
				"device", d.Path(), "error", err)
		}
	}
	for {
		err := nbd.ServeTransmission(d.ctx, conn, d.exp)
		d.untrack(conn)
		if d.isStopping() {
			return
		}
		<-d.ready
		if d.isStopping() {
			return
		}
		d.a.opts.Logger.Warn("nbd: kernel socket closed; handing the kernel a fresh one",
			"device", d.Path(), "id", d.id, "error", err)
		conn = d.replace()
		if conn == nil {
			return
		}
	}
}

// replace hands the kernel one fresh socket in place of a dead one,
// retrying while the device exists, and returns the server end (nil when
// the device is going away or the kernel no longer knows it).
func (d *kernelDevice) replace() net.Conn {
	delay := 50 * time.Millisecond
	for !d.isStopping() {
		kfd, conn, err := socketPair()
		if err == nil {
			var attrs []byte
			attrs, err = nlConfig{index: d.indexNow(), sockets: []int{kfd}, backendID: d.id}.encode()
			if err == nil {
				_, err = d.a.execute(d.ctx, nlCmdReconfigure, attrs)
			}
			unix.Close(kfd)
			if err == nil && socketTaken(conn) && d.track(conn) {
				return conn
			}
			conn.Close()
			if err != nil && errors.Is(err, syscall.EINVAL) {
				// Disconnected by someone else, or the identifier changed:
				// there is nothing left to serve.
				d.a.opts.Logger.Warn("nbd: device gone; stop serving it", "device", d.Path(), "id", d.id, "error", err)
				return nil
			}
		}
		select {
		case <-d.ctx.Done():
			return nil
		case <-time.After(delay):
		}
		if delay < time.Second {
			delay *= 2
		}
	}
	return nil
}

func (d *kernelDevice) indexNow() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.index
}

// reconnect sends RECONFIGURE with n fresh sockets and serves those the
// kernel took; it returns how many it took.
func (d *kernelDevice) reconnect(ctx context.Context, cfg nlConfig, n int) (int, error) {
	var kfds []int
	var conns []net.Conn
	for i := 0; i < n; i++ {
		kfd, conn, err := socketPair()
		if err != nil {
			closeFDs(kfds)
			for _, c := range conns {
				c.Close()
			}
			return 0, err
		}
		kfds = append(kfds, kfd)
		conns = append(conns, conn)
	}
	cfg.sockets = kfds
	attrs, err := cfg.encode()
	if err == nil {
		_, err = d.a.execute(ctx, nlCmdReconfigure, attrs)
	}
	closeFDs(kfds)
	taken := 0
	for _, c := range conns {
		if err != nil || !socketTaken(c) || !d.track(c) {
			c.Close()
			continue
		}
		taken++
		d.wg.Add(1)
		go d.supervise(c)
	}
	return taken, err
}

// Resize implements Device: it tells the kernel the device's new size
// (RECONFIGURE with NBD_ATTR_SIZE_BYTES) once the backend has grown.
func (d *kernelDevice) Resize(ctx context.Context, size int64) error {
	if bs := d.b.Size(); size > bs {
		return fmt.Errorf("nbd: resize %s to %d bytes: the backend has only %d", d.Path(), size, bs)
	}
	sd, err := readSysDevice(d.a.opts.SysfsRoot, d.indexNow())
	if err != nil {
		return err
	}
	bs := int64(512)
	if b, err := readSysInt(filepath.Join(d.a.opts.SysfsRoot, "block", "nbd"+strconv.Itoa(sd.index), "queue", "logical_block_size")); err == nil && b > 0 {
		bs = b
	}
	if size%bs != 0 {
		return fmt.Errorf("nbd: resize %s to %d bytes: not a multiple of its block size %d", d.Path(), size, bs)
	}
	attrs, err := nlConfig{index: sd.index, size: uint64(size), backendID: d.id}.encode()
	if err != nil {
		return err
	}
	if _, err := d.a.execute(ctx, nlCmdReconfigure, attrs); err != nil {
		return fmt.Errorf("nbd: resize %s: %w", d.Path(), err)
	}
	after, err := readSysDevice(d.a.opts.SysfsRoot, sd.index)
	if err != nil {
		return err
	}
	if after.size != size {
		return fmt.Errorf("nbd: resize %s to %d bytes: the kernel reports %d (does this kernel take NBD_ATTR_SIZE_BYTES on RECONFIGURE?)",
			d.Path(), size, after.size)
	}
	return nil
}

// Detach implements Device: flush the device's page cache through to the
// backend, disconnect, wait for the serving goroutines, flush the backend.
// A mounted device is refused with ErrDeviceBusy: disconnecting it would
// fail the filesystem's I/O.
func (d *kernelDevice) Detach(ctx context.Context) error {
	d.mu.Lock()
	if d.detached {
		err := d.detachErr
		d.mu.Unlock()
		return err
	}
	d.mu.Unlock()
	path := d.Path()
	// O_EXCL on a block device fails with EBUSY while it is mounted or
	// otherwise claimed; fsync writes its dirty pages and sends FLUSH.
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.EROFS) || errors.Is(err, unix.EACCES) {
		// A read-only device has no dirty pages; the exclusive open
		// still tells whether it is mounted.
		fd, err = unix.Open(path, unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	}
	switch {
	case errors.Is(err, unix.EBUSY):
		return fmt.Errorf("nbd: detach %s: %w (mounted or held open exclusively; unmount it first)", path, nbdattach.ErrDeviceBusy)
	case err == nil:
		ferr := unix.Fsync(fd)
		unix.Close(fd)
		if ferr != nil {
			return fmt.Errorf("nbd: detach %s: flush: %w", path, ferr)
		}
	case errors.Is(err, unix.ENOENT):
		// No device node (no devtmpfs in this mount namespace): nothing
		// can have dirty pages on it through this path.
	default:
		return fmt.Errorf("nbd: detach %s: open: %w", path, err)
	}
	d.mu.Lock()
	d.stopping = true
	d.mu.Unlock()
	// The device is going away whatever ctx says: DISCONNECT is not cut
	// off by it, or the kernel would keep a device nobody serves.
	_, derr := d.a.execute(context.WithoutCancel(ctx), nlCmdDisconnect, indexAttr(d.indexNow()))
	// The kernel sends NBD_CMD_DISC and shuts its ends; the serving
	// goroutines return. Wait for them, but no longer than ctx allows.
	done := make(chan struct{})
	go func() { d.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		d.stop()
		<-done
	}
	d.stop()
	d.a.unregister(d)
	ferr := d.b.Flush(ctx)
	err = errors.Join(derr, ferr)
	if err != nil {
		err = fmt.Errorf("nbd: detach %s: %w", path, err)
	}
	d.mu.Lock()
	d.detached, d.detachErr = true, err
	d.mu.Unlock()
	return err
}

// socketPair returns the kernel's end as a raw fd and ours as a net.Conn.
func socketPair() (int, net.Conn, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, nil, fmt.Errorf("nbd: socketpair: %w", err)
	}
	f := os.NewFile(uintptr(fds[1]), "nbd-server")
	conn, err := net.FileConn(f)
	f.Close()
	if err != nil {
		unix.Close(fds[0])
		return -1, nil, fmt.Errorf("nbd: socketpair: %w", err)
	}
	return fds[0], conn, nil
}

// socketTaken reports whether the kernel holds the peer of conn. It is
// called after our copy of the kernel's end was closed: if the kernel did
// not keep a reference (RECONFIGURE found no dead socket to replace), the
// peer is gone and a peek reads EOF at once.
func socketTaken(conn net.Conn) bool {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	taken := false
	cerr := rc.Control(func(fd uintptr) {
		var b [1]byte
		n, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		taken = n > 0 || errors.Is(err, unix.EAGAIN)
	})
	return cerr == nil && taken
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// prepareProcess sets what the serving threads need before any device is
// served (ioFlusherAllThreads); supervise falls back per thread if it fails.
func prepareProcess() { _ = ioFlusherAllThreads() }

// ioFlusherAllThreads sets PR_SET_IO_FLUSHER on every thread of the process,
// once. The threads that serve /dev/nbdN write to the backend file while the
// kernel may be writing back dirty pages of a filesystem on /dev/nbdN to
// free memory; if those threads were themselves throttled by writeback or
// entered direct reclaim that waits on the same device, nothing would make
// progress. PR_SET_IO_FLUSHER (PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE) exempts
// them. Go moves goroutines between threads, so the flag is set on all
// threads at once (threads made later inherit it from their creator); this
// needs a cgo-free binary (AllThreadsSyscall refuses under cgo, e.g. -race)
// and CAP_SYS_RESOURCE. When it fails, supervise falls back to the one
// locked thread per connection.
//
// The first call must come before this process serves any device, which is
// why NewAttacher makes it (prepareProcess): AllThreadsSyscall stops the
// world until every thread has taken a signal, and a thread blocked
// uninterruptibly on a device this process is about to serve (a Detach's
// fsync right after a Reattach) takes it only once its I/O completes. The
// server goroutine that would complete it is stopped with the world, so
// both waited for the kernel to time the request out (its I/O timeout,
// then the dead-connection timeout: 2.5 minutes) and fail it with EIO.
var ioFlusherAllThreads = sync.OnceValue(func() error {
	_, _, e := syscall.AllThreadsSyscall(unix.SYS_PRCTL, unix.PR_SET_IO_FLUSHER, 1, 0)
	if e != 0 {
		return e
	}
	return nil
})
