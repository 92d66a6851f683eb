package fuse

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	gofuse "github.com/hanwen/go-fuse/v2/fuse"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// One FUSE filesystem serves every device an Attacher has attached: it is
// mounted at Dir/srv@<random> when the first device attaches, holds one file
// per device (Dir/srv@<random>/<id>), and is unmounted when the last one
// detaches.
//
// Why one and not one per device: a go-fuse server keeps up to
// GOMAXPROCS+1 (at least 3) reader goroutines parked in read(2) on
// /dev/fuse, each an OS thread holding a request buffer of MaxWrite (1 MiB)
// checked out of the server's own pool. Per device that was 3 to 17 threads
// and 3 to 18 MiB of heap for an idle volume; the Go runtime never gives a
// thread back, so the thread count stayed at its high-water mark; and every
// attach allocated a new server's buffers, which the collector got back only
// two cycles after the detach (sync.Pool). Three rounds of 100 volumes left
// a plugin at 818 MB RSS and 308 threads with nothing attached (issue 20).
// Shared, the readers, threads and buffers are a fixed cost of the process,
// bounded by fuseMaxInflight, whatever the number of volumes.

// fuseServerPrefix starts the name of a server's mount directory in Dir. A
// device id never contains '@' (validFuseID), so the name cannot be a
// device's.
const fuseServerPrefix = "srv@"

// fuseMaxInflight bounds the requests the shared server reads and handles
// at once, over all devices. Each holds a request buffer of MaxWrite plus
// headers until it is answered: this bounds the server's buffers (here 64
// MiB) under any load, while leaving more requests in flight than the
// plugin's threads can serve on a large node.
const fuseMaxInflight = 64

// fuseMaxWrite is the largest FUSE request (the kernel's maximum): the loop
// device's direct I/O arrives in requests this large, and reaches the
// Backend in one call.
const fuseMaxWrite = 1 << 20

// fuseServer is the shared filesystem while it is mounted.
type fuseServer struct {
	mnt    string
	root   *fuseRoot
	server *gofuse.Server
	// uring serves the connection's requests over io_uring, when the
	// kernel agreed to it (nil: all of them come over /dev/fuse).
	uring *uringServer
	refs  int // devices attached or attaching; guarded by Attacher.srvMu
}

// acquireServer returns the mounted server, mounting one if none is, and
// counts a device on it: each call is paired with releaseServer.
func (a *Attacher) acquireServer(ctx context.Context) (*fuseServer, error) {
	a.srvMu.Lock()
	defer a.srvMu.Unlock()
	if a.srv != nil && a.srv.uring != nil && a.srv.uring.failed.Load() {
		// The io_uring transport aborted this connection (uringServer.fail):
		// it serves nothing any more. Its devices release it as they are
		// detached; new ones get a new server.
		a.markClosing(a.srv.mnt)
		a.srv = nil
	}
	if a.srv != nil {
		a.srv.refs++
		return a.srv, nil
	}
	// Dead mounts a previous process left (of either layout) would stay in
	// mountinfo for good: the driver runs CleanStale at start, this covers
	// other users of the backend.
	a.cleanDeadMounts(ctx)
	s, err := a.mountServer()
	if err != nil {
		return nil, err
	}
	s.refs = 1
	a.srv = s
	return s, nil
}

// releaseServer uncounts a device and unmounts the server after the last.
func (a *Attacher) releaseServer(s *fuseServer) error {
	a.srvMu.Lock()
	s.refs--
	last := s.refs == 0
	if last {
		if a.srv == s {
			a.srv = nil // the next attach mounts a new one, under another name
		}
		a.markClosing(s.mnt)
	}
	a.srvMu.Unlock()
	if !last {
		return nil
	}
	defer func() {
		a.srvMu.Lock()
		delete(a.closing, s.mnt)
		a.srvMu.Unlock()
	}()
	var err error
	if s.uring != nil {
		// go-fuse does not unmount a connection it was handed as
		// /dev/fd/N; the unmount aborts the connection, which ends the
		// ring entries too.
		// A connection the transport aborted may be unmounted already
		// (EINVAL).
		s.uring.stopping.Store(true)
		if uerr := unix.Unmount(s.mnt, 0); uerr != nil && !errors.Is(uerr, unix.EINVAL) && unix.Unmount(s.mnt, unix.MNT_DETACH) != nil {
			err = fmt.Errorf("unmount %s: %w", s.mnt, uerr)
		}
	} else if uerr := s.server.Unmount(); uerr != nil {
		err = fmt.Errorf("unmount %s: %w", s.mnt, uerr)
		// Nothing of ours uses the mount any more; a lazy unmount frees it
		// when the last reference (a stray opener) goes.
		if unix.Unmount(s.mnt, unix.MNT_DETACH) == nil {
			err = nil
		}
	}
	s.server.Wait()
	if s.uring != nil {
		s.uring.wait()
	}
	if rerr := os.Remove(s.mnt); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		err = errors.Join(err, rerr)
	}
	return err
}

// markClosing records mnt as a server of this attacher being let go, for
// isServer; srvMu must be held.
func (a *Attacher) markClosing(mnt string) {
	if a.closing == nil {
		a.closing = map[string]bool{}
	}
	a.closing[mnt] = true
}

// isServer reports whether mnt is this attacher's server, mounted or being
// unmounted (CleanStale must not take it for another process's).
func (a *Attacher) isServer(mnt string) bool {
	a.srvMu.Lock()
	defer a.srvMu.Unlock()
	return a.srv != nil && a.srv.mnt == mnt || a.closing[mnt]
}

func (a *Attacher) mountServer() (*fuseServer, error) {
	var rnd [8]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return nil, fmt.Errorf("nbdattach: fuse: %w", err)
	}
	mnt := filepath.Join(a.dir, fuseServerPrefix+hex.EncodeToString(rnd[:]))
	if err := os.MkdirAll(mnt, 0o700); err != nil {
		return nil, fmt.Errorf("nbdattach: fuse: %w", err)
	}
	root := &fuseRoot{}
	zero := time.Duration(0)
	logger := log.New(io.Discard, "", 0)
	if a.log != nil {
		logger = slog.NewLogLogger(a.log.Handler(), slog.LevelWarn)
	}
	// One mount for read-write and read-only devices alike: a read-only
	// device's file refuses writes itself (diskNode), and its loop device
	// is bound read-only.
	// Writeback cache is a property of the connection, so of every device
	// this process attaches.
	extraCaps := uint64(gofuse.CAP_ASYNC_DIO)
	if a.cache == CacheWriteback {
		extraCaps |= gofuse.CAP_WRITEBACK_CACHE
	}
	var mflags uintptr = syscall.MS_NOSUID | syscall.MS_NODEV | syscall.MS_NOEXEC | syscall.MS_NOATIME
	fsopts := &fs.Options{
		MountOptions: gofuse.MountOptions{
			FsName: "qcow2-csi",
			Name:   "qcow2-csi",
			// The loop worker threads are kernel threads, not this process:
			// allow them in, and let default_permissions keep everyone but
			// root out (the files are 0600 root).
			AllowOther:        true,
			Options:           []string{"default_permissions"},
			DirectMount:       true,
			DirectMountStrict: true,
			DirectMountFlags:  mflags,
			// 1 MiB requests and many in flight: loop direct I/O is
			// asynchronous and issues in parallel. The requests being read
			// and handled at once are bounded (see fuseMaxInflight).
			MaxWrite:                fuseMaxWrite,
			MaxBackground:           128,
			MaxInflightRequestBytes: fuseMaxInflight * (fuseMaxWrite + 64<<10),
			ExtraCapabilities:       extraCaps,
			// With automatic invalidation the kernel asks for the
			// attributes before every cached read (the attribute timeout
			// is 0): a round trip per request, which is what the cache is
			// there to save. Nothing but the file's own writes changes its
			// contents, and its size changes by truncate (Resize).
			DisabledCapabilities: gofuse.CAP_AUTO_INVAL_DATA,
			// Replies carry our own buffers (ReadResultData), never a file
			// to splice from; with splice on, go-fuse still fetched a pipe
			// and wrote each read reply's header into it before falling
			// back to writev (and, for 1 MiB reads, logged that the pipe
			// could not grow that far).
			DisableSplice:        true,
			DisableXAttrs:        true,
			IgnoreSecurityLabels: true,
			Logger:               logger,
		},
		// Entries are looked up again at every open: a device detached
		// and attached again under the same id is a new inode, which the
		// kernel must not take for the old one.
		EntryTimeout: &zero,
		// Attributes are asked on every stat, so that Resize's stat
		// refreshes the size the kernel reads in LOOP_SET_CAPACITY.
		AttrTimeout:     &zero,
		NegativeTimeout: &zero,
		Logger:          logger,
	}
	rawFS := fs.NewNodeFS(root, fsopts)
	if a.uring {
		server, us, err := a.mountUring(mnt, rawFS, fsopts.MountOptions)
		if err == nil {
			return &fuseServer{mnt: mnt, root: root, server: server, uring: us}, nil
		}
		if errors.Is(err, errUringStuck) {
			return nil, fmt.Errorf("nbdattach: fuse: %w", err)
		}
		if a.log != nil {
			a.log.Warn("fuse attach: FUSE over io_uring not used, serving over /dev/fuse", "err", err)
		}
	}
	server, err := gofuse.NewServer(rawFS, mnt, &fsopts.MountOptions)
	if err == nil {
		go server.Serve()
		err = server.WaitMount()
	}
	if err != nil {
		_ = os.Remove(mnt)
		return nil, fmt.Errorf("nbdattach: fuse: mount %s: %w", mnt, err)
	}
	return &fuseServer{mnt: mnt, root: root, server: server}, nil
}

// uringReadyTimeout bounds how long mountUring waits for the kernel to
// answer a request once the ring entries are registered (a variable for
// tests).
var uringReadyTimeout = 10 * time.Second

// mountUring mounts the filesystem at mnt itself and serves it with go-fuse
// over /dev/fuse (INIT, FORGET, INTERRUPT, notifications) and with ring
// entries for everything else (uring_linux.go). It returns an error, and
// leaves nothing mounted, when io_uring is unusable, or when the kernel
// did not switch the connection to it: the caller then mounts the usual way.
func (a *Attacher) mountUring(mnt string, rawFS gofuse.RawFileSystem, mo gofuse.MountOptions) (_ *gofuse.Server, _ *uringServer, err error) {
	if err := uringUsable(); err != nil {
		return nil, nil, err
	}
	dev, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("open /dev/fuse: %w", err)
	}
	if dev < 3 {
		// go-fuse takes /dev/fd/N for a descriptor only from 3 up.
		nd, err := unix.FcntlInt(uintptr(dev), unix.F_DUPFD_CLOEXEC, 3)
		_ = unix.Close(dev)
		if err != nil {
			return nil, nil, fmt.Errorf("dup /dev/fuse: %w", err)
		}
		dev = nd
	}
	// The kernel's payload buffer size for the connection: the largest
	// request (max_write, max_pages) and at least FUSE_MIN_READ_BUFFER.
	us, err := newUringServer(rawFS, dev, max(fuseMaxWrite, 8192), a.log)
	if err != nil {
		_ = unix.Close(dev)
		return nil, nil, err
	}
	mounted, devOwned := false, true
	var server *gofuse.Server
	defer func() {
		if err == nil {
			return
		}
		us.stopping.Store(true)
		if mounted {
			// Once INIT asked for io_uring, the kernel holds every
			// request until the ring is ready: abort the connection, so
			// that a request waiting (our stat) fails and the mount can
			// go. Should nothing abort it, waiting for its server would
			// hold srvMu for good: leave it, and say so.
			if aerr := abortConn(mnt, us.conn); aerr != nil {
				err = fmt.Errorf("%w: %w (%v); %s is left mounted", errUringStuck, err, aerr, mnt)
				return
			}
			_ = unix.Unmount(mnt, unix.MNT_DETACH)
		}
		if server != nil {
			server.Wait()
		}
		if devOwned {
			_ = unix.Close(dev)
		}
		us.wait()
	}()
	// The mount(2) go-fuse's DirectMount makes, with the descriptor kept:
	// the ring entries send their commands on it.
	opts := append([]string{fmt.Sprintf("fd=%d,rootmode=%o,user_id=%d,group_id=%d,max_read=%d",
		dev, syscall.S_IFDIR, os.Geteuid(), os.Getegid(), mo.MaxWrite)}, mo.Options...)
	if mo.AllowOther {
		opts = append(opts, "allow_other")
	}
	if err := unix.Mount(mo.FsName, mnt, fuseFSType, mo.DirectMountFlags, strings.Join(opts, ",")); err != nil {
		return nil, nil, fmt.Errorf("mount %s: %w", mnt, err)
	}
	mounted = true
	us.mnt = mnt
	// Not a stat of mnt: the kernel holds every request until INIT is
	// answered (below).
	if ms, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(mnt)); err == nil && len(ms) == 1 {
		us.conn = strconv.Itoa(ms[0].Minor)
	}
	mo.ExtraCapabilities |= gofuse.CAP_OVER_IO_URING
	// go-fuse tries a direct mount before it looks for /dev/fd/N: it
	// would mount a second filesystem on /dev/fuse itself.
	mo.DirectMount, mo.DirectMountStrict = false, false
	// NewServer answers INIT before it returns, and owns the descriptor
	// from here on (it closes it when serving ends, or on its errors).
	devOwned = false
	if server, err = gofuse.NewServer(rawFS, fmt.Sprintf("/dev/fd/%d", dev), &mo); err != nil {
		return nil, nil, fmt.Errorf("serve %s: %w", mnt, err)
	}
	go server.Serve()
	if server.KernelSettings().Flags64()&gofuse.CAP_OVER_IO_URING == 0 {
		return nil, nil, errors.New("the kernel did not offer io_uring at INIT")
	}
	us.start()
	// Once INIT agreed to io_uring, the kernel holds every request until
	// each queue has an entry: a stat of the root tells when that is, and
	// which path answered it.
	done := make(chan error, 1)
	go func() {
		var st unix.Stat_t
		done <- unix.Stat(mnt, &st)
	}()
	select {
	case err := <-done:
		if err != nil {
			return nil, nil, fmt.Errorf("stat %s: %w", mnt, err)
		}
	case err := <-us.regErr:
		return nil, nil, err
	case <-time.After(uringReadyTimeout):
		return nil, nil, fmt.Errorf("no answer from %s within %v of registering the ring entries", mnt, uringReadyTimeout)
	}
	if us.served.Load() == 0 {
		return nil, nil, errors.New("the kernel did not hand the ring entries a request (dmesg may say why)")
	}
	if err := runPollProbe(mnt); err != nil {
		return nil, nil, err
	}
	if a.log != nil {
		a.log.Info("fuse attach: serving over io_uring", "entries", len(us.ents))
	}
	if a.cache == CacheWriteback {
		if err := liftDirtyLimit(us.conn); err != nil {
			if a.log != nil {
				a.log.Warn("fuse attach: the FUSE device's dirty limit stays", "err", err)
			}
		} else if a.log != nil {
			a.log.Info("fuse attach: dirty limit of the FUSE device lifted", "bdi", "0:"+us.conn)
		}
	}
	return server, us, nil
}

// liftDirtyLimit lets the writeback cache of the mount with fusectl name
// conn hold dirty pages as a disk's does. The kernel marks every FUSE
// device strict_limit with max_ratio 1 (% of the dirty threshold), so that
// an unprivileged daemon cannot pin much of memory in dirty pages it never
// writes back; that limit (tens of MB) starts writeback within a few 1 MiB
// writes, and large writes then run at the plugin's pace (0.24-0.36x of the
// loop floor, docs/fuse-attach.md). This daemon is the node plugin, trusted,
// which writes back as the kernel asks. Done only with the io_uring
// transport, where it was measured to pay (over /dev/fuse it did not).
func liftDirtyLimit(conn string) error {
	if conn == "" {
		return errors.New("the mount's device is not known")
	}
	dir := "/sys/class/bdi/0:" + conn
	for _, w := range []struct{ file, value string }{{"max_ratio", "100"}, {"strict_limit", "0"}} {
		if err := os.WriteFile(dir+"/"+w.file, []byte(w.value), 0); err != nil {
			return fmt.Errorf("%s/%s = %s: %w", dir, w.file, w.value, err)
		}
	}
	return nil
}

// cleanDeadMounts detaches the dead mounts of this backend in Dir, logging
// what it cannot clean: a live one is another process's, left alone.
func (a *Attacher) cleanDeadMounts(ctx context.Context) {
	mounts, err := a.ourMounts()
	if err != nil && a.log != nil {
		a.log.Warn("fuse attach: looking for dead mounts", "err", err)
	}
	for _, m := range mounts {
		if dead, err := a.cleanMount(ctx, m.Mountpoint); dead && err != nil && a.log != nil {
			a.log.Warn("fuse attach: dead mount not cleaned", "mount", m.Mountpoint, "err", err)
		}
	}
}

// isServerDir reports whether a mount directory's name is a shared
// server's (not a device id: the layout of earlier versions).
func isServerDir(mnt string) bool { return strings.HasPrefix(filepath.Base(mnt), fuseServerPrefix) }
