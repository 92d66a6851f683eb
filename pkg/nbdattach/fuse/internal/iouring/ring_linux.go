// Package iouring is the little of io_uring(7) the FUSE transport needs:
// a ring of 128-byte submission entries (IORING_SETUP_SQE128, for
// IORING_OP_URING_CMD's 80 bytes of command), one registered file, submit,
// wait and reap. It is not safe for concurrent use: each ring belongs to one
// goroutine (the FUSE transport gives each its own OS thread).
package iouring

import (
	"errors"
	"fmt"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Constants of the kernel's io_uring ABI (include/uapi/linux/io_uring.h).
const (
	setupSQE128 = 1 << 10

	offSQRing = 0
	offCQRing = 0x8000000
	offSQEs   = 0x10000000

	featSingleMmap = 1 << 0

	enterGetEvents = 1 << 0

	registerFiles = 2

	// OpURingCmd is IORING_OP_URING_CMD: a command for the file's driver.
	OpURingCmd = 46
	// SQEFixedFile is IOSQE_FIXED_FILE: SQE.fd indexes the registered files.
	SQEFixedFile = 1 << 0

	// SQESize is the size of one submission entry of a SQE128 ring, and
	// CmdOffset where its command area (80 bytes) starts.
	SQESize   = 128
	CmdOffset = 48
	CmdSize   = SQESize - CmdOffset
)

type sqOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

type cqOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

type params struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFD uint32
	resv                                                                   [3]uint32
	sqOff                                                                  sqOffsets
	cqOff                                                                  cqOffsets
}

// CQE is a completion: the submission's UserData and its result (a negative
// errno on failure).
type CQE struct {
	UserData uint64
	Res      int32
	Flags    uint32
}

// Ring is one io_uring instance.
type Ring struct {
	fd int

	sqRing, cqRing, sqeMem []byte

	sqHead, sqTail, sqMask *uint32
	sqArray                []uint32
	sqEntries              uint32
	cqHead, cqTail, cqMask *uint32
	cqes                   []CQE

	// tail is the submission tail with the queued entries counted;
	// pending is how many of them the kernel has not consumed yet.
	tail, pending uint32
}

// New sets up a ring of at least entries submission entries of SQESize
// bytes. An error wrapping ENOSYS or EPERM means the kernel (or a seccomp
// profile, or kernel.io_uring_disabled) does not let this process use
// io_uring at all.
func New(entries uint32) (*Ring, error) {
	var p params
	p.flags = setupSQE128
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		return nil, fmt.Errorf("io_uring_setup: %w", errno)
	}
	r := &Ring{fd: int(fd), sqEntries: p.sqEntries}
	if err := r.mmap(&p); err != nil {
		r.Close()
		return nil, err
	}
	r.tail = *r.sqTail
	return r, nil
}

func (r *Ring) mmap(p *params) error {
	sqSize := int(p.sqOff.array + p.sqEntries*4)
	cqSize := int(p.cqOff.cqes + p.cqEntries*uint32(unsafe.Sizeof(CQE{})))
	single := p.features&featSingleMmap != 0
	if single {
		sqSize = max(sqSize, cqSize)
	}
	var err error
	if r.sqRing, err = unix.Mmap(r.fd, offSQRing, sqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fmt.Errorf("io_uring: mmap submission ring: %w", err)
	}
	if single {
		r.cqRing = r.sqRing
	} else if r.cqRing, err = unix.Mmap(r.fd, offCQRing, cqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fmt.Errorf("io_uring: mmap completion ring: %w", err)
	}
	if r.sqeMem, err = unix.Mmap(r.fd, offSQEs, int(p.sqEntries)*SQESize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fmt.Errorf("io_uring: mmap submission entries: %w", err)
	}
	u32 := func(b []byte, off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&b[off])) }
	r.sqHead = u32(r.sqRing, p.sqOff.head)
	r.sqTail = u32(r.sqRing, p.sqOff.tail)
	r.sqMask = u32(r.sqRing, p.sqOff.ringMask)
	r.sqArray = unsafe.Slice(u32(r.sqRing, p.sqOff.array), p.sqEntries)
	r.cqHead = u32(r.cqRing, p.cqOff.head)
	r.cqTail = u32(r.cqRing, p.cqOff.tail)
	r.cqMask = u32(r.cqRing, p.cqOff.ringMask)
	r.cqes = unsafe.Slice((*CQE)(unsafe.Pointer(&r.cqRing[p.cqOff.cqes])), p.cqEntries)
	return nil
}

// RegisterFile makes fd the ring's fixed file 0: entries flagged
// SQEFixedFile with fd 0 address it, and the ring holds its own reference,
// so the descriptor may be closed or even reused by the caller.
func (r *Ring) RegisterFile(fd int) error {
	fds := [1]int32{int32(fd)}
	_, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), registerFiles, uintptr(unsafe.Pointer(&fds[0])), 1, 0, 0)
	if errno != 0 {
		return fmt.Errorf("io_uring_register files: %w", errno)
	}
	return nil
}

// ErrFull is returned by Next when every submission entry is queued and
// not yet submitted.
var ErrFull = errors.New("io_uring: submission ring full")

// Next returns the next free submission entry, zeroed, queued for the next
// Submit.
func (r *Ring) Next() ([]byte, error) {
	head := atomic.LoadUint32(r.sqHead)
	if r.tail-head >= r.sqEntries {
		return nil, ErrFull
	}
	idx := r.tail & *r.sqMask
	sqe := r.sqeMem[int(idx)*SQESize : int(idx+1)*SQESize]
	clear(sqe)
	r.sqArray[idx] = idx
	r.tail++
	r.pending++
	return sqe, nil
}

// enter submits what is queued and, when wait > 0, waits for that many
// completions; an interrupted wait returns with none. Errors the kernel
// means as "try again" (EINTR; EAGAIN, EBUSY, ENOMEM: completions must be
// reaped first, or memory is short) are retried, the latter after pauses,
// for up to maxPause; the tail is published again, which is idempotent.
func (r *Ring) enter(wait uint32) (bool, error) {
	var flags uintptr
	if wait > 0 {
		flags = enterGetEvents
	}
	pause, paused := 100*time.Microsecond, time.Duration(0)
	for {
		atomic.StoreUint32(r.sqTail, r.tail)
		n, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(r.pending), uintptr(wait), flags, 0, 0)
		switch errno {
		case 0:
			if n == 0 && r.pending > 0 {
				return false, fmt.Errorf("io_uring_enter: the kernel took none of %d entries", r.pending)
			}
			r.pending -= min(r.pending, uint32(n))
			if r.pending == 0 {
				return true, nil
			}
		case syscall.EINTR:
			if r.pending == 0 {
				return false, nil
			}
		case syscall.EAGAIN, syscall.EBUSY, syscall.ENOMEM:
			if paused >= maxPause {
				return false, fmt.Errorf("io_uring_enter: still %w after %v", errno, paused)
			}
			time.Sleep(pause)
			paused += pause
			pause = min(2*pause, 100*time.Millisecond)
		default:
			return false, fmt.Errorf("io_uring_enter: %w", errno)
		}
	}
}

// maxPause bounds how long enter retries errors meant as "try again".
const maxPause = 5 * time.Second

// SubmitAndWait submits what is queued, then waits for a completion and
// returns it. A wait interrupted by a signal (after the submission, the
// kernel still reports success) waits again. It is for rings with one
// command in flight at a time: more than one completion ready is an error.
func (r *Ring) SubmitAndWait() (CQE, error) {
	for {
		var c CQE
		switch n := r.Reap(func(x CQE) { c = x }); {
		case n == 1:
			return c, nil
		case n > 1:
			return CQE{}, fmt.Errorf("io_uring: %d completions where one command was in flight", n)
		}
		if _, err := r.enter(1); err != nil {
			return CQE{}, err
		}
	}
}

// Reap calls f on every completion ready now, and returns how many.
func (r *Ring) Reap(f func(CQE)) int {
	head := *r.cqHead
	tail := atomic.LoadUint32(r.cqTail)
	n := 0
	for ; head != tail; head++ {
		f(r.cqes[head&*r.cqMask])
		n++
	}
	atomic.StoreUint32(r.cqHead, head)
	return n
}

// Close releases the ring: the kernel cancels what is still in flight.
func (r *Ring) Close() error {
	if r.sqeMem != nil {
		_ = unix.Munmap(r.sqeMem)
	}
	if r.cqRing != nil && (r.sqRing == nil || &r.cqRing[0] != &r.sqRing[0]) {
		_ = unix.Munmap(r.cqRing)
	}
	if r.sqRing != nil {
		_ = unix.Munmap(r.sqRing)
	}
	r.sqeMem, r.cqRing, r.sqRing = nil, nil, nil
	return unix.Close(r.fd)
}
