package fuse

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	gofuse "github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// The FUSE filesystem of the attached devices: a root directory holding one
// regular file per device, whose contents are its Backend. Only the loop
// devices (and the plugin itself, to open them) ever touch the files, so the
// filesystem implements exactly what the loop driver calls:
//
//	read/write      -> ReadAt / WriteAt
//	fsync           -> Flush                (loop: REQ_OP_FLUSH, REQ_FUA)
//	fallocate PUNCH_HOLE -> WriteZeroes      (loop: discard, and write-zeroes
//	                                         that may unmap)
//	fallocate ZERO_RANGE -> WriteZeroes NoHole (loop: write-zeroes REQ_NOUNMAP)
//
// A punched hole must read back as zeroes (loop relies on it for
// REQ_OP_WRITE_ZEROES, and ext4 zeroes its inode tables that way), while
// Backend.Trim allows any contents afterwards: so punching maps to
// WriteZeroes with deallocation allowed, which a qcow2 backend serves by
// freeing the clusters, exactly what a discard wants.

// diskNode is the file. Its size is the device's size, changed only by Resize.
type diskNode struct {
	fs.Inode
	b        nbdattach.Backend
	size     atomic.Int64
	readOnly bool
	log      *slog.Logger
	id       string
	// passthrough is the host file the kernel reads and writes directly
	// when the backend is a Passthrougher (nil otherwise).
	passthrough *os.File
	// cached: the kernel keeps a page cache of the file (Options.Cache).
	cached bool
	// reads counts the reads that reached Read: attach probes with one
	// whether passthrough took effect.
	reads atomic.Int64
	// inflight is held (shared) by every request that uses b, and taken
	// once by Detach after the loop device let go of the file: no request
	// is still on b when Detach returns and the caller closes it. The
	// kernel orders them already (the file is released only after its
	// requests are answered); this says so in Go, where the race detector
	// can see it through io_uring's replies, which are system calls.
	inflight sync.RWMutex
}

// passthroughHandle is the file handle of an open with passthrough: go-fuse
// registers its descriptor as the backing file of the open. Everything
// else still goes to the node.
type passthroughHandle struct{ f *os.File }

var _ fs.FilePassthroughFder = passthroughHandle{}

func (h passthroughHandle) PassthroughFd() (int, bool) { return int(h.f.Fd()), true }

var (
	_ fs.NodeGetattrer  = (*diskNode)(nil)
	_ fs.NodeSetattrer  = (*diskNode)(nil)
	_ fs.NodeOpener     = (*diskNode)(nil)
	_ fs.NodeReader     = (*diskNode)(nil)
	_ fs.NodeWriter     = (*diskNode)(nil)
	_ fs.NodeFsyncer    = (*diskNode)(nil)
	_ fs.NodeAllocater  = (*diskNode)(nil)
	_ fs.NodeStatfser   = (*diskNode)(nil)
	_ fs.NodeGetattrer  = (*fuseRoot)(nil)
	_ fs.NodeStatfser   = (*fuseRoot)(nil)
	_ fs.InodeEmbedder  = (*fuseRoot)(nil)
	_ fs.NodeReaddirer  = (*fuseRoot)(nil)
	_ fs.NodeLookuper   = (*fuseRoot)(nil)
	_ fs.NodeOpendirer  = (*fuseRoot)(nil)
	_ fs.NodeAccesser   = (*diskNode)(nil)
	_ fs.NodeReleaser   = (*diskNode)(nil)
	_ fs.NodeFlusher    = (*diskNode)(nil)
	_ fs.NodeGetxattrer = (*diskNode)(nil)
)

// statfsBlockSize is f_bsize: the loop driver uses it as the discard
// granularity of the device.
const statfsBlockSize = 4096

func (n *diskNode) mode() uint32 {
	if n.readOnly {
		return syscall.S_IFREG | 0o400
	}
	return syscall.S_IFREG | 0o600
}

func (n *diskNode) Getattr(ctx context.Context, f fs.FileHandle, out *gofuse.AttrOut) syscall.Errno {
	size := n.size.Load()
	out.Mode = n.mode()
	out.Nlink = 1
	out.Size = uint64(size)
	out.Blocks = uint64(size+511) / 512
	out.Blksize = statfsBlockSize
	return 0
}

// Setattr accepts what open(2) and the loop driver may send (times, a size
// equal to the current one) and refuses resizing: the device size changes
// only through Device.Resize, never from the file side.
func (n *diskNode) Setattr(ctx context.Context, f fs.FileHandle, in *gofuse.SetAttrIn, out *gofuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok && int64(sz) != n.size.Load() {
		return syscall.EPERM
	}
	if _, ok := in.GetMode(); ok {
		return syscall.EPERM
	}
	return n.Getattr(ctx, f, out)
}

func (n *diskNode) Access(ctx context.Context, mask uint32) syscall.Errno {
	if n.readOnly && mask&unix.W_OK != 0 {
		return syscall.EROFS
	}
	return 0
}

// Open answers, in CacheNone, with direct I/O so that the kernel keeps no
// page cache of the file, and with parallel direct writes so that FUSE does
// not serialise writes on the inode lock. In the cached modes it asks the
// kernel to keep the file's page cache across opens: only this file's
// descriptors change its contents (see the coherence note in
// docs/fuse-attach.md), so what is cached stays true.
func (n *diskNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if n.readOnly && flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return nil, 0, syscall.EROFS
	}
	if flags&syscall.O_TRUNC != 0 {
		return nil, 0, syscall.EPERM
	}
	if n.passthrough != nil {
		// Not with FOPEN_DIRECT_IO, which overrides passthrough for reads
		// and writes. Should the kernel refuse passthrough, the loop
		// device still does direct I/O (see Attacher.attach).
		return passthroughHandle{n.passthrough}, 0, 0
	}
	if n.cached {
		return nil, gofuse.FOPEN_KEEP_CACHE, 0
	}
	return nil, gofuse.FOPEN_DIRECT_IO | gofuse.FOPEN_PARALLEL_DIRECT_WRITES, 0
}

func (n *diskNode) Read(ctx context.Context, f fs.FileHandle, dest []byte, off int64) (gofuse.ReadResult, syscall.Errno) {
	n.inflight.RLock()
	defer n.inflight.RUnlock()
	n.reads.Add(1)
	size := n.size.Load()
	if off < 0 {
		return nil, syscall.EINVAL
	}
	if off >= size {
		return gofuse.ReadResultData(nil), 0
	}
	if int64(len(dest)) > size-off {
		dest = dest[:size-off]
	}
	if err := n.b.ReadAt(ctx, dest, off); err != nil {
		return nil, n.errno("read", err)
	}
	return gofuse.ReadResultData(dest), 0
}

func (n *diskNode) Write(ctx context.Context, f fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	n.inflight.RLock()
	defer n.inflight.RUnlock()
	if n.readOnly {
		return 0, syscall.EROFS
	}
	size := n.size.Load()
	if off < 0 || off > size || int64(len(data)) > size-off {
		// The file is the device: it never grows by writing.
		return 0, syscall.ENOSPC
	}
	if err := n.b.WriteAt(ctx, data, off, false); err != nil {
		return 0, n.errno("write", err)
	}
	return uint32(len(data)), 0
}

func (n *diskNode) Fsync(ctx context.Context, f fs.FileHandle, flags uint32) syscall.Errno {
	n.inflight.RLock()
	defer n.inflight.RUnlock()
	if n.readOnly {
		return 0
	}
	if err := n.b.Flush(ctx); err != nil {
		return n.errno("flush", err)
	}
	return 0
}

// Flush is close(2) of a descriptor, not a durability request: the loop
// driver sends fsync when it means it.
func (n *diskNode) Flush(ctx context.Context, f fs.FileHandle) syscall.Errno { return 0 }

func (n *diskNode) Release(ctx context.Context, f fs.FileHandle) syscall.Errno { return 0 }

// Getxattr answers "no such attribute" so that security modules probing the
// file get a quick answer instead of ENOSYS round trips.
func (n *diskNode) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	return 0, syscall.ENODATA
}

func (n *diskNode) Allocate(ctx context.Context, f fs.FileHandle, off, length uint64, mode uint32) syscall.Errno {
	n.inflight.RLock()
	defer n.inflight.RUnlock()
	if n.readOnly {
		return syscall.EROFS
	}
	size := uint64(n.size.Load())
	const supported = unix.FALLOC_FL_KEEP_SIZE | unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_ZERO_RANGE
	if mode&^supported != 0 || mode&unix.FALLOC_FL_KEEP_SIZE == 0 && mode&unix.FALLOC_FL_PUNCH_HOLE != 0 {
		return syscall.EOPNOTSUPP
	}
	if off >= size || length == 0 {
		return 0
	}
	length = min(length, size-off)
	var flags nbdattach.ZeroFlags
	switch {
	case mode&unix.FALLOC_FL_PUNCH_HOLE != 0:
		// may deallocate
	case mode&unix.FALLOC_FL_ZERO_RANGE != 0:
		flags.NoHole = true
	default:
		// Plain preallocation of a range inside the file: every byte of the
		// device exists already.
		return 0
	}
	err := n.b.WriteZeroes(ctx, int64(off), int64(length), flags)
	if errors.Is(err, nbdattach.ErrNotSupported) || errors.Is(err, syscall.EOPNOTSUPP) {
		// The kernel has promised zeroes to whoever asked: write them.
		err = n.writeZeroBuffers(ctx, int64(off), int64(length))
	}
	if err != nil {
		return n.errno("write-zeroes", err)
	}
	return 0
}

var zeroChunk [1 << 20]byte

func (n *diskNode) writeZeroBuffers(ctx context.Context, off, length int64) error {
	for length > 0 {
		c := min(length, int64(len(zeroChunk)))
		if err := n.b.WriteAt(ctx, zeroChunk[:c], off, false); err != nil {
			return err
		}
		off += c
		length -= c
	}
	return nil
}

func (n *diskNode) Statfs(ctx context.Context, out *gofuse.StatfsOut) syscall.Errno {
	fillStatfs(out, n.size.Load())
	return 0
}

func fillStatfs(out *gofuse.StatfsOut, size int64) {
	out.Bsize = statfsBlockSize
	out.Frsize = statfsBlockSize
	out.Blocks = uint64(size) / statfsBlockSize
	out.NameLen = 255
}

// errno maps a Backend error to what the loop driver passes up as the
// request's status: the sentinels of package nbdattach and errnos keep
// their meaning (ENOSPC reaches the filesystem as BLK_STS_NOSPC); anything
// else is EIO.
func (n *diskNode) errno(op string, err error) syscall.Errno {
	if n.log != nil {
		n.log.Warn("fuse attach: backend error", "id", n.id, "op", op, "err", err)
	}
	var e syscall.Errno
	switch {
	case errors.Is(err, nbdattach.ErrNoSpace):
		return syscall.ENOSPC
	case errors.Is(err, nbdattach.ErrInvalid):
		return syscall.EINVAL
	case errors.Is(err, nbdattach.ErrPermission):
		return syscall.EPERM
	case errors.Is(err, nbdattach.ErrNotSupported):
		return syscall.EOPNOTSUPP
	case errors.As(err, &e):
		return e
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return syscall.EINTR
	default:
		return syscall.EIO
	}
}

// fuseRoot is the mount's root directory: it holds a file per device,
// named by its id.
type fuseRoot struct {
	fs.Inode
	// lastIno numbers the files: never reused, since go-fuse takes two
	// inodes with one number for the same file (a hard link).
	lastIno atomic.Uint64
}

// add makes disk the file name. The inode is not persistent: go-fuse drops
// it (and with it the Backend) once it is removed and the kernel forgets it.
func (r *fuseRoot) add(name string, disk *diskNode) error {
	ino := r.lastIno.Add(1) + 1 // 1 is the root's
	ch := r.NewInode(context.Background(), disk, fs.StableAttr{Mode: syscall.S_IFREG, Ino: ino})
	if !r.AddChild(name, ch, false) {
		return fmt.Errorf("a file named %s is served already", name)
	}
	return nil
}

// remove takes the file name away, and has the kernel drop its entry (and
// then forget the inode) now rather than under memory pressure.
func (r *fuseRoot) remove(name string) {
	r.RmChild(name)
	_ = r.NotifyEntry(name)
}

func (r *fuseRoot) Getattr(ctx context.Context, f fs.FileHandle, out *gofuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFDIR | 0o700
	out.Nlink = 2
	return 0
}

func (r *fuseRoot) Statfs(ctx context.Context, out *gofuse.StatfsOut) syscall.Errno {
	fillStatfs(out, 0)
	return 0
}

func (r *fuseRoot) Opendir(ctx context.Context) syscall.Errno { return 0 }

func (r *fuseRoot) Lookup(ctx context.Context, name string, out *gofuse.EntryOut) (*fs.Inode, syscall.Errno) {
	ch := r.GetChild(name)
	if ch == nil {
		return nil, syscall.ENOENT
	}
	disk, ok := ch.Operations().(*diskNode)
	if !ok {
		return nil, syscall.ENOENT
	}
	var ao gofuse.AttrOut
	disk.Getattr(ctx, nil, &ao)
	out.Attr = ao.Attr
	return ch, 0
}

func (r *fuseRoot) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	var ents []gofuse.DirEntry
	for name, ch := range r.Children() {
		ents = append(ents, gofuse.DirEntry{Name: name, Mode: syscall.S_IFREG, Ino: ch.StableAttr().Ino})
	}
	return fs.NewListDirStream(ents), 0
}
