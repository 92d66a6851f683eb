package fuse

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	gofuse "github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/fuse/internal/iouring"
)

// FUSE over io_uring (Linux 6.14+, fs/fuse/dev_uring.c): once the server
// has registered a ring entry on every queue, the kernel stops queueing
// requests on /dev/fuse and hands each to a waiting entry instead: it copies
// the request into the entry's buffers and completes the entry's pending
// IORING_OP_URING_CMD; the server writes its reply into the same buffers and
// submits one command that both commits the reply and waits for the next
// request. One system call per request, where /dev/fuse takes a read and a
// write, and no request buffer to pass between a reader and a handler.
//
// What stays on /dev/fuse: INIT (the connection is negotiated there, and
// asks for io_uring), FORGET and INTERRUPT, and the server's notifications.
// go-fuse serves them as before; the ring threads call the same
// RawFileSystem for everything else, so both paths share one inode table.
//
// Queues: the kernel has one per possible CPU and puts a request on the
// queue of the CPU its caller runs on; a queue with no entry would hold its
// requests forever, which is why the kernel waits until every queue has one
// before it switches. Each entry here is a ring of its own, served by one
// OS thread that handles the request inline (as a /dev/fuse reader thread
// does), so a queue serves as many requests at once as it has entries.

// Sizes of the kernel's ring entry (include/uapi/linux/fuse.h: struct
// fuse_uring_req_header: the in/out header, the op's own header, then
// struct fuse_uring_ent_in_out).
const (
	uringInOutOff  = 0
	uringOpInOff   = 128
	uringOpInSize  = 128
	uringEntOff    = 256
	uringHeaderLen = 288
	// uringIovOff is where, in the same page, the entry keeps the two
	// iovecs (header, payload) its REGISTER command points at.
	uringIovOff = 512

	// struct fuse_uring_cmd_req, in the command area of the SQE.
	uringCmdRegister       = 1
	uringCmdCommitAndFetch = 2

	inHeaderSize  = int(unsafe.Sizeof(gofuse.InHeader{}))
	outHeaderSize = 16
)

// uringEntriesPerQueue is how many requests a queue serves at once. The
// kernel puts a request on its caller's CPU's queue, and loop devices,
// readahead and writeback issue from few CPUs, so a queue needs more than
// one; on a large node the queues alone give the parallelism.
func uringEntriesPerQueue(queues int) int { return max(2, 8/queues) }

// uringMaxQueues bounds the queues (possible CPUs) the transport serves:
// each entry is a thread and a 1 MiB buffer, so beyond it the connection
// stays on /dev/fuse, whose readers are bounded (fuseMaxInflight).
const uringMaxQueues = 64

// uringEnabledParam is the module parameter that lets FUSE offer io_uring
// (off by default; writable by root).
const uringEnabledParam = "/sys/module/fuse/parameters/enable_uring"

// uringUsable reports why this process cannot serve FUSE over io_uring, or
// nil: the kernel must offer it, and io_uring must be allowed (a seccomp
// profile or kernel.io_uring_disabled may refuse it).
func uringUsable() error {
	b, err := os.ReadFile(uringEnabledParam)
	if err != nil {
		return fmt.Errorf("the kernel has no FUSE over io_uring (%s: %w; needs Linux 6.14+ with CONFIG_FUSE_IO_URING)", uringEnabledParam, err)
	}
	if v := strings.TrimSpace(string(b)); v != "Y" && v != "1" {
		return fmt.Errorf("FUSE over io_uring is off in this kernel (%s is %s; root may write Y)", uringEnabledParam, v)
	}
	r, err := iouring.New(2)
	if err != nil {
		return fmt.Errorf("io_uring is not allowed to this process: %w", err)
	}
	return r.Close()
}

// possibleCPUs is the number of queues the kernel makes: num_possible_cpus.
func possibleCPUs() (int, error) {
	b, err := os.ReadFile("/sys/devices/system/cpu/possible")
	if err != nil {
		return 0, err
	}
	n := 0
	for _, part := range strings.Split(strings.TrimSpace(string(b)), ",") {
		lo, hi, found := strings.Cut(part, "-")
		a, err := strconv.Atoi(lo)
		if err != nil {
			return 0, fmt.Errorf("possible CPUs %q: %w", b, err)
		}
		z := a
		if found {
			if z, err = strconv.Atoi(hi); err != nil || z < a {
				return 0, fmt.Errorf("possible CPUs %q: bad range %q", b, part)
			}
		}
		n += z - a + 1
	}
	if n == 0 {
		return 0, fmt.Errorf("possible CPUs %q: none", b)
	}
	return n, nil
}

// uringServer serves one FUSE connection's requests over io_uring.
type uringServer struct {
	fs  gofuse.RawFileSystem
	log *slog.Logger
	// cancel is closed when the server stops: the requests' cancel channel.
	cancel chan struct{}
	ents   []*uringEntry
	wg     sync.WaitGroup
	// served counts the requests answered over the rings; stopping ends
	// the entries still waiting to register.
	served   atomic.Int64
	stopping atomic.Bool
	// panics counts the requests whose handling panicked (answered EIO).
	panics atomic.Int64
	// failed: fail aborted the connection; the server serves nothing.
	failed atomic.Bool
	// conn is the connection's name in the fusectl filesystem and in
	// /sys/class/bdi (the minor number of the mount's device), and mnt
	// where it is mounted; both set once mounted.
	conn, mnt string
	// regErr receives the REGISTER commands the kernel refused.
	regErr chan error
}

// Test hooks: the command an entry registers with (an unknown one is
// refused before the kernel looks at the ring), a queue left without
// entries (the kernel then never switches), and a queue id the entries
// commit with (one out of range fails the commit).
var (
	uringRegisterCmd uint32 = uringCmdRegister
	uringSkipQueue          = -1
	uringCommitQID   atomic.Int32
)

func init() { uringCommitQID.Store(-1) }

// uringEntry is one ring entry: its ring, its buffers and the thread that
// serves it.
type uringEntry struct {
	srv  *uringServer
	qid  uint16
	ring *iouring.Ring
	// hdr is the entry's page: the kernel's fuse_uring_req_header, then
	// the iovecs. payload is the request's and the reply's arguments.
	hdr, payload []byte
	// in is the request as /dev/fuse would have carried it (InHeader then
	// the op's header), which go-fuse's input types overlay.
	in [(inHeaderSize + uringOpInSize + 7) / 8]uint64
}

// newUringServer makes every entry of every queue, with its ring and
// buffers, before anything is registered: once the kernel has agreed to
// io_uring, a queue left without an entry would hold its requests.
func newUringServer(fs gofuse.RawFileSystem, devFD int, maxPayload int, log *slog.Logger) (_ *uringServer, err error) {
	queues, err := possibleCPUs()
	if err != nil {
		return nil, err
	}
	if queues > uringMaxQueues {
		return nil, fmt.Errorf("%d possible CPUs: the kernel makes a queue per CPU, and this transport serves at most %d", queues, uringMaxQueues)
	}
	per := uringEntriesPerQueue(queues)
	s := &uringServer{fs: fs, log: log, cancel: make(chan struct{}), regErr: make(chan error, queues*per)}
	defer func() {
		if err != nil {
			s.free()
		}
	}()
	for q := 0; q < queues; q++ {
		for range per {
			e := &uringEntry{srv: s, qid: uint16(q)}
			s.ents = append(s.ents, e)
			if e.ring, err = iouring.New(2); err != nil {
				return nil, err
			}
			if err = e.ring.RegisterFile(devFD); err != nil {
				return nil, err
			}
			if e.hdr, err = unix.Mmap(-1, 0, os.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS); err != nil {
				return nil, fmt.Errorf("io_uring entry header: %w", err)
			}
			if e.payload, err = unix.Mmap(-1, 0, maxPayload, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS); err != nil {
				return nil, fmt.Errorf("io_uring entry payload: %w", err)
			}
			iov := (*[2]unix.Iovec)(unsafe.Pointer(&e.hdr[uringIovOff]))
			iov[0].Base, iov[0].Len = &e.hdr[0], uringHeaderLen
			iov[1].Base, iov[1].Len = &e.payload[0], uint64(len(e.payload))
		}
	}
	return s, nil
}

// start registers every entry and serves them, each on its own thread.
func (s *uringServer) start() {
	for _, e := range s.ents {
		s.wg.Add(1)
		go e.serve()
	}
}

// wait returns once every entry's thread has ended (the connection is
// gone), and frees the rings and buffers.
func (s *uringServer) wait() {
	s.wg.Wait()
	close(s.cancel)
	s.free()
}

func (s *uringServer) free() {
	for _, e := range s.ents {
		if e.ring != nil {
			_ = e.ring.Close()
		}
		for _, m := range [][]byte{e.hdr, e.payload} {
			if m != nil {
				_ = unix.Munmap(m)
			}
		}
		e.ring, e.hdr, e.payload = nil, nil, nil
	}
}

// queue puts the entry's command on its ring: REGISTER, or COMMIT_AND_FETCH
// of the request commitID.
func (e *uringEntry) queue(op uint32, commitID uint64) error {
	sqe, err := e.ring.Next()
	if err != nil {
		return err
	}
	sqe[0] = iouring.OpURingCmd
	sqe[1] = iouring.SQEFixedFile
	// fd (offset 4) is 0: the registered /dev/fuse.
	*(*uint32)(unsafe.Pointer(&sqe[8])) = op
	*(*uint64)(unsafe.Pointer(&sqe[16])) = uint64(uintptr(unsafe.Pointer(&e.hdr[uringIovOff])))
	*(*uint32)(unsafe.Pointer(&sqe[24])) = 2 // iovecs
	cmd := sqe[iouring.CmdOffset:]
	*(*uint64)(unsafe.Pointer(&cmd[8])) = commitID
	qid := e.qid
	if q := uringCommitQID.Load(); q >= 0 && op == uringCmdCommitAndFetch {
		qid = uint16(q)
	}
	*(*uint16)(unsafe.Pointer(&cmd[16])) = qid
	return nil
}

func (e *uringEntry) serve() {
	defer e.srv.wg.Done()
	// The kernel copies each request into the buffers in the context of
	// the task that submitted the entry's command (task work): keep that
	// one thread, and keep it on its queue's CPU where the cpuset allows.
	// The thread is never unlocked, so it ends with the goroutine: a thread
	// going back to the scheduler with a command in flight could block in
	// a system call that waits on the very request whose task work it
	// would have to run.
	runtime.LockOSThread()
	var set unix.CPUSet
	set.Set(int(e.qid))
	_ = unix.SchedSetaffinity(0, &set)

	if int(e.qid) == uringSkipQueue {
		return
	}
	op, commitID := uringRegisterCmd, uint64(0)
	for backoff := time.Millisecond; ; {
		if err := e.queue(op, commitID); err != nil {
			e.srv.fail("queue", err)
			return
		}
		cqe, err := e.ring.SubmitAndWait()
		if err != nil {
			e.srv.fail("submit", err)
			return
		}
		res := cqe.Res
		switch {
		case res == -int32(syscall.EAGAIN) && op != uringCmdCommitAndFetch && !e.srv.stopping.Load():
			// The connection is not initialised yet (INIT is answered on
			// /dev/fuse by go-fuse, concurrently). mountUring gives up
			// on the whole connection if this lasts.
			time.Sleep(backoff)
			backoff = min(2*backoff, 50*time.Millisecond)
			continue
		case res < 0:
			// ENOTCONN, ECONNABORTED, ECANCELED: the connection is gone
			// (unmounted or aborted). Anything else is a refusal at
			// REGISTER, which mountUring hears of, or a failed commit.
			errno := syscall.Errno(-res)
			switch {
			case errno == syscall.ENOTCONN || errno == syscall.ECONNABORTED || errno == syscall.ECANCELED:
			case op != uringCmdCommitAndFetch:
				// Refused: mountUring gives the connection up (the
				// kernel may still hold its requests for the ring).
				e.srv.regErr <- fmt.Errorf("io_uring entry of queue %d refused: %w", e.qid, errno)
			default:
				e.srv.fail("commit", errno)
			}
			return
		}
		op, commitID = uringCmdCommitAndFetch, e.handle()
		e.srv.served.Add(1)
	}
}

// fail ends the connection after an entry stopped while it lived. The
// kernel would go on giving requests to the entry's queue, and the one it
// had given the entry would never be answered: I/O to every device would
// hang. Aborted, it fails at once (as when the plugin dies), and the
// devices can be detached and attached again.
func (s *uringServer) fail(what string, err error) {
	s.failed.Store(true)
	if s.log != nil {
		s.log.Error("fuse attach: io_uring entry failed; aborting the FUSE connection", "at", what, "err", err, "mount", s.mnt)
	}
	if aerr := abortConn(s.mnt, s.conn); aerr != nil && s.log != nil {
		s.log.Error("fuse attach: the FUSE connection could not be aborted; its devices hang until the plugin exits", "err", aerr)
	}
}

// errUringStuck: a connection that asked for io_uring could neither be
// served nor aborted.
var errUringStuck = errors.New("fuse over io_uring: connection stuck")

// abortConn aborts the FUSE connection mounted at mnt, whose fusectl name
// is conn: every request, waiting or to come, then fails with ENOTCONN,
// whatever holds the mount. First by a forced unmount (MNT_FORCE: FUSE
// aborts before the unmount checks whether the mount is busy, so EBUSY
// after it is fine), which needs no fusectl, which a plugin's container
// may lack; then, where that is refused (EPERM outside the host's user
// namespace on older kernels) or the path no longer names the mount (a
// lazy unmount, a mount on top), by fusectl's abort file.
func abortConn(mnt, conn string) error {
	var errs []error
	if mnt != "" {
		err := unix.Unmount(mnt, unix.MNT_FORCE)
		if err == nil || errors.Is(err, unix.EBUSY) {
			return nil
		}
		errs = append(errs, fmt.Errorf("forced unmount of %s: %w", mnt, err))
	}
	if conn != "" {
		err := os.WriteFile("/sys/fs/fuse/connections/"+conn+"/abort", []byte("1"), 0)
		if err == nil {
			return nil
		}
		errs = append(errs, err)
	}
	if len(errs) == 0 {
		return errors.New("neither the mount point nor the connection is known")
	}
	return errors.Join(errs...)
}

// handle serves the request in the entry's buffers, writes the reply there,
// and returns the commit id to send it with.
func (e *uringEntry) handle() uint64 {
	ent := e.hdr[uringEntOff:]
	commitID := *(*uint64)(unsafe.Pointer(&ent[8]))
	reqLen := int(*(*uint32)(unsafe.Pointer(&ent[16])))
	inBuf := unsafe.Slice((*byte)(unsafe.Pointer(&e.in[0])), len(e.in)*8)
	copy(inBuf, e.hdr[uringInOutOff:uringInOutOff+inHeaderSize])
	copy(inBuf[inHeaderSize:], e.hdr[uringOpInOff:uringOpInOff+uringOpInSize])
	hdr := (*gofuse.InHeader)(unsafe.Pointer(&e.in[0]))
	unique := hdr.Unique
	n, st := e.dispatchSafe(hdr, reqLen)
	if st != gofuse.OK {
		n = 0
	}
	out := e.hdr[uringInOutOff:]
	*(*uint32)(unsafe.Pointer(&out[0])) = uint32(outHeaderSize + n)
	*(*int32)(unsafe.Pointer(&out[4])) = -int32(st)
	*(*uint64)(unsafe.Pointer(&out[8])) = unique
	*(*uint32)(unsafe.Pointer(&ent[16])) = uint32(n)
	return commitID
}

// dispatchSafe checks the request's payload length and dispatches it. A
// panic in the filesystem fails the request with EIO, says so, and leaves
// the entry serving: the process holds every attached volume.
func (e *uringEntry) dispatchSafe(hdr *gofuse.InHeader, reqLen int) (n int, st gofuse.Status) {
	if reqLen > len(e.payload) {
		return 0, gofuse.EINVAL
	}
	defer func() {
		if p := recover(); p != nil {
			e.srv.panics.Add(1)
			if e.srv.log != nil {
				e.srv.log.Error("fuse attach: request panicked", "opcode", hdr.Opcode, "node", hdr.NodeId, "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
			}
			n, st = 0, gofuse.EIO
		}
	}()
	return e.dispatch(hdr, e.payload[:reqLen])
}

// The opcodes served over the ring (include/uapi/linux/fuse.h).
const (
	opLookup      = 1
	opGetattr     = 3
	opSetattr     = 4
	opOpen        = 14
	opRead        = 15
	opWrite       = 16
	opStatfs      = 17
	opRelease     = 18
	opFsync       = 20
	opFlush       = 25
	opOpendir     = 27
	opReaddir     = 28
	opReleasedir  = 29
	opFsyncdir    = 30
	opPoll        = 40
	opAccess      = 34
	opDestroy     = 38
	opFallocate   = 43
	opReaddirplus = 44
)

// outArg overlays the reply's fixed-size argument on the payload.
func outArg[T any](p []byte) (*T, int) {
	var z T
	sz := int(unsafe.Sizeof(z))
	clear(p[:sz])
	return (*T)(unsafe.Pointer(&p[0])), sz
}

// dispatch calls the filesystem for the request: its header and op header
// in e.in, its remaining arguments in req (the payload). The reply's
// arguments go to the payload; it returns their length.
func (e *uringEntry) dispatch(hdr *gofuse.InHeader, req []byte) (int, gofuse.Status) {
	fs, cancel, p := e.srv.fs, e.srv.cancel, e.payload
	in := unsafe.Pointer(&e.in[0])
	if hdr.NodeId == pollProbeInode || hdr.Opcode == opLookup && hdr.NodeId == gofuse.FUSE_ROOT_ID && string(req) == pollProbeName+"\x00" {
		return pollProbe(hdr, p)
	}
	switch hdr.Opcode {
	case opLookup:
		name, ok := cString(req)
		if !ok {
			return 0, gofuse.EINVAL
		}
		out, n := outArg[gofuse.EntryOut](p)
		return n, fs.Lookup(cancel, hdr, name, out)
	case opGetattr:
		out, n := outArg[gofuse.AttrOut](p)
		return n, fs.GetAttr(cancel, (*gofuse.GetAttrIn)(in), out)
	case opSetattr:
		out, n := outArg[gofuse.AttrOut](p)
		return n, fs.SetAttr(cancel, (*gofuse.SetAttrIn)(in), out)
	case opOpen:
		out, n := outArg[gofuse.OpenOut](p)
		return n, fs.Open(cancel, (*gofuse.OpenIn)(in), out)
	case opOpendir:
		out, n := outArg[gofuse.OpenOut](p)
		return n, fs.OpenDir(cancel, (*gofuse.OpenIn)(in), out)
	case opRead:
		rin := (*gofuse.ReadIn)(in)
		if int(rin.Size) > len(p) {
			return 0, gofuse.EINVAL
		}
		buf := p[:rin.Size]
		res, st := fs.Read(cancel, rin, buf)
		if st != gofuse.OK {
			return 0, st
		}
		defer res.Done()
		return e.replyDataTo(res.Bytes(buf))
	case opWrite:
		win := (*gofuse.WriteIn)(in)
		if int(win.Size) != len(req) {
			return 0, gofuse.EINVAL
		}
		written, st := fs.Write(cancel, win, req)
		if st != gofuse.OK {
			return 0, st
		}
		out, n := outArg[gofuse.WriteOut](p)
		out.Size = written
		return n, gofuse.OK
	case opStatfs:
		out, n := outArg[gofuse.StatfsOut](p)
		return n, fs.StatFs(cancel, hdr, out)
	case opRelease:
		fs.Release(cancel, (*gofuse.ReleaseIn)(in))
		return 0, gofuse.OK
	case opReleasedir:
		fs.ReleaseDir((*gofuse.ReleaseIn)(in))
		return 0, gofuse.OK
	case opFsync:
		return 0, fs.Fsync(cancel, (*gofuse.FsyncIn)(in))
	case opFsyncdir:
		return 0, fs.FsyncDir(cancel, (*gofuse.FsyncIn)(in))
	case opFlush:
		return 0, fs.Flush(cancel, (*gofuse.FlushIn)(in))
	case opAccess:
		return 0, fs.Access(cancel, (*gofuse.AccessIn)(in))
	case opFallocate:
		return 0, fs.Fallocate(cancel, (*gofuse.FallocateIn)(in))
	case opReaddir, opReaddirplus:
		rin := (*gofuse.ReadIn)(in)
		if int(rin.Size) > len(p) {
			return 0, gofuse.EINVAL
		}
		buf := p[:rin.Size]
		l := gofuse.NewDirEntryList(buf, rin.Offset)
		var st gofuse.Status
		if hdr.Opcode == opReaddir {
			st = fs.ReadDir(cancel, rin, l)
		} else {
			st = fs.ReadDirPlus(cancel, rin, l)
		}
		if st != gofuse.OK {
			return 0, st
		}
		return e.replyDataTo(l.Bytes(), gofuse.OK)
	case opDestroy:
		return 0, gofuse.OK
	}
	// Everything else (xattrs, links, locks, ioctl, lseek, ...): the files
	// of this filesystem do not have it, and the kernel remembers ENOSYS
	// for the calls that allow it.
	return 0, gofuse.ENOSYS
}

// The poll probe. Go's runtime registers every file it opens with its
// epoll instance, and for a FUSE file that is a POLL request, waited for
// inside a system call during which the goroutine keeps its scheduler slot
// (P). Should the threads serving the ring need that slot (a stop of the
// world, or every slot taken), nothing answers. The kernel stops asking
// once a POLL was answered ENOSYS, so mountUring opens the probe file (with
// a plain open(2), not registered) and polls it, before anything else opens
// a file. go-fuse does the same on /dev/fuse mounts (its pollHack), and
// skips the probe's inode when it is forgotten. The name cannot be a
// device's ('@').
const (
	pollProbeName  = "poll@probe"
	pollProbeInode = ^uint64(0)
)

func pollProbe(hdr *gofuse.InHeader, p []byte) (int, gofuse.Status) {
	attr := gofuse.Attr{Ino: pollProbeInode, Mode: syscall.S_IFREG | 0o400, Nlink: 1}
	switch hdr.Opcode {
	case opLookup:
		out, n := outArg[gofuse.EntryOut](p)
		out.NodeId, out.Attr = pollProbeInode, attr
		return n, gofuse.OK
	case opOpen:
		out, n := outArg[gofuse.OpenOut](p)
		out.Fh = pollProbeInode
		return n, gofuse.OK
	case opGetattr:
		out, n := outArg[gofuse.AttrOut](p)
		out.Attr = attr
		return n, gofuse.OK
	case opFlush, opRelease, opAccess:
		return 0, gofuse.OK
	case opPoll:
		return 0, gofuse.ENOSYS
	}
	// Not ENOSYS, which the kernel would remember for every file.
	return 0, gofuse.Status(syscall.ERANGE)
}

// runPollProbe has the kernel ask POLL once, answered ENOSYS (pollProbe).
func runPollProbe(mnt string) error {
	fd, err := unix.Open(mnt+"/"+pollProbeName, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("poll probe: %w", err)
	}
	defer unix.Close(fd)
	_, err = unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLOUT}}, 0)
	if err != nil {
		return fmt.Errorf("poll probe: %w", err)
	}
	return nil
}

// replyDataTo makes data, a reply's arguments of variable length, the
// payload's: the filesystem may have written them there already, or not.
func (e *uringEntry) replyDataTo(data []byte, st gofuse.Status) (int, gofuse.Status) {
	if st != gofuse.OK {
		return 0, st
	}
	if len(data) > len(e.payload) {
		return 0, gofuse.EIO
	}
	if len(data) > 0 && &data[0] != &e.payload[0] {
		copy(e.payload, data)
	}
	return len(data), gofuse.OK
}

// cString is the NUL-terminated string at the start of b.
func cString(b []byte) (string, bool) {
	i := 0
	for i < len(b) && b[i] != 0 {
		i++
	}
	if i == len(b) {
		return "", false
	}
	return string(b[:i]), true
}
