package nbdattach

import (
	"context"
	"os"
)

// Backend is the block device an export serves: the NBD server, the kernel
// attach and the fallback (FUSE + loop) attach all speak to it and nothing
// else. Package imagebackend adapts a qcow2 image to it; tests use a plain
// file (FileBackend).
//
// Implementations must be safe for concurrent use: the server issues requests
// from many goroutines at once. Offsets and lengths passed in are already
// validated against Size. Errors should wrap the sentinels in errors.go (or a
// syscall.Errno) so that each maps to the right NBD errno.
type Backend interface {
	// Size is the current size of the device in bytes. It may grow while the
	// device is served (online expansion).
	Size() int64
	// ReadAt fills p from offset off.
	ReadAt(ctx context.Context, p []byte, off int64) error
	// WriteAt writes p at offset off. With fua set the data must be durable
	// when it returns.
	WriteAt(ctx context.Context, p []byte, off int64, fua bool) error
	// Flush makes every completed write durable.
	Flush(ctx context.Context) error
	// Trim tells the backend the range is no longer needed; reads of it may
	// then return anything (qcow2: the clusters are discarded).
	Trim(ctx context.Context, off, length int64) error
	// WriteZeroes makes the range read as zeroes.
	WriteZeroes(ctx context.Context, off, length int64, flags ZeroFlags) error
}

// ZeroFlags qualify a WriteZeroes request, as the NBD flags of the same names.
type ZeroFlags struct {
	// NoHole: the range must stay allocated (no deallocation/punching).
	NoHole bool
	// Fast: fail with ErrNotSupported unless zeroing is faster than writing.
	Fast bool
	// FUA: durable on return.
	FUA bool
}

// Passthrougher is an optional Backend capability: a backend whose bytes are
// those of one host file at the same offsets, read and written with nothing
// but pread and pwrite (a raw image). The fuse backend hands that file to the
// kernel (FUSE passthrough, Linux 6.9 and later), which then reads and writes
// it without a round trip through this process; flush, discard and
// write-zeroes still reach the Backend. A backend that must see every write
// (tracking, gating) does not implement it.
type Passthrougher interface {
	// PassthroughFile returns the open host file, owned by the backend.
	PassthroughFile() *os.File
}

// BlockStatuser is an optional Backend capability: allocation status for the
// base:allocation metadata context (and qemu:allocation-depth).
type BlockStatuser interface {
	// BlockStatus describes [off, off+length) as consecutive extents starting
	// at off. It may describe less than asked (at least one extent) or more.
	BlockStatus(ctx context.Context, off, length int64) ([]Extent, error)
}

// ZeroProber is an optional Backend capability: a look, from what the
// backend holds in memory, at whether a range reads as zeroes (space never
// written). The NBD server asks it on its receiving goroutine and answers
// such reads there, without a hand-off to a worker. A decorator passes the
// look through, and answers false while it must see every read (a throttle
// with a read limit, a paused gate).
type ZeroProber interface {
	// KnownZero reports whether [off, off+length) reads as zeroes now. It
	// must not wait, for I/O or for a lock held elsewhere: false whenever
	// the answer is not at hand.
	KnownZero(off, length int64) bool
}

// MetaContextProvider is an optional Backend capability: named metadata
// contexts beyond base:allocation, such as "qemu:dirty-bitmap:NAME" and
// "qemu:allocation-depth", served exactly as qemu-nbd serves them.
type MetaContextProvider interface {
	// MetaContexts lists the context names the backend can serve.
	MetaContexts() []string
	// MetaContextStatus describes [off, off+length) in the named context as
	// consecutive extents starting at off; Flags carry that context's bits.
	MetaContextStatus(ctx context.Context, name string, off, length int64) ([]Extent, error)
}

// Extent is one run of equal status. For base:allocation, Flags are the NBD
// state bits (1 hole, 2 zero); for other contexts, that context's values.
type Extent struct {
	Length int64
	Flags  uint32
}

// Block status flags of base:allocation.
const (
	// StateHole: the extent is not allocated.
	StateHole uint32 = 1 << 0
	// StateZero: the extent reads as zeroes.
	StateZero uint32 = 1 << 1
)

// Metadata context names, and the context IDs qemu-nbd gives them on the
// wire (base:allocation 0, qemu:allocation-depth 1, dirty bitmaps from 2 in
// the order the export lists them), so that traces compare line by line.
const (
	ContextBaseAllocation  = "base:allocation"
	ContextAllocationDepth = "qemu:allocation-depth"
	// ContextDirtyBitmapPrefix is followed by the bitmap name. A dirty extent
	// has flag 1.
	ContextDirtyBitmapPrefix = "qemu:dirty-bitmap:"
)
