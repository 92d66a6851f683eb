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
	"strings"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	gofuse "github.com/hanwen/go-fuse/v2/fuse"
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
	refs   int // devices attached or attaching; guarded by Attacher.srvMu
}

// acquireServer returns the mounted server, mounting one if none is, and
// counts a device on it: each call is paired with releaseServer.
func (a *Attacher) acquireServer(ctx context.Context) (*fuseServer, error) {
	a.srvMu.Lock()
	defer a.srvMu.Unlock()
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
		a.srv = nil // the next attach mounts a new one, under another name
		if a.closing == nil {
			a.closing = map[string]bool{}
		}
		a.closing[s.mnt] = true
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
	if uerr := s.server.Unmount(); uerr != nil {
		err = fmt.Errorf("unmount %s: %w", s.mnt, uerr)
		// Nothing of ours uses the mount any more; a lazy unmount frees it
		// when the last reference (a stray opener) goes.
		if unix.Unmount(s.mnt, unix.MNT_DETACH) == nil {
			err = nil
		}
	}
	s.server.Wait()
	if rerr := os.Remove(s.mnt); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		err = errors.Join(err, rerr)
	}
	return err
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
	server, err := fs.Mount(mnt, root, fsopts)
	if err != nil {
		_ = os.Remove(mnt)
		return nil, fmt.Errorf("nbdattach: fuse: mount %s: %w", mnt, err)
	}
	return &fuseServer{mnt: mnt, root: root, server: server}, nil
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
