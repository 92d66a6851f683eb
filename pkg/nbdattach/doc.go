// Package nbdattach serves a Backend over the NBD protocol and attaches it to
// the kernel as a block device.
//
// # The server
//
// An Export is a Backend plus how it is advertised (name, read-only, block
// sizes, multi-connection). A Server negotiates fixed newstyle NBD with
// clients that haggle options (qemu-img, qemu-io, nbdinfo, nbdcopy, fio's nbd
// engine): EXPORT_NAME, ABORT, LIST, INFO and GO (NAME, DESCRIPTION,
// BLOCK_SIZE), STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT;
// other options are answered with ERR_UNSUP. Metadata contexts are
// base:allocation (from an optional BlockStatuser) and whatever a
// MetaContextProvider offers (qemu:allocation-depth, qemu:dirty-bitmap:NAME),
// with the context IDs qemu-nbd uses on the wire.
//
// Each connection runs a receiver, one goroutine per request in flight
// (bounded by Export.MaxInFlight) and a sender. The receiver validates every
// request (magic, flags, bounds, alignment, payload size, read-only) before
// anything is allocated or dispatched; a refused WRITE's payload is drained
// in bounded chunks. The sender writes replies as the I/O completes, in any
// order, and flushes its buffer only when no other reply is waiting, so
// replies batch under load. Payload buffers come from size-class pools.
// Backend errors map to NBD errors through the sentinels in errno.go (or a
// syscall.Errno); anything else is EIO.
//
// # The kernel's side: ServeTransmission
//
// The kernel's nbd driver never negotiates: the attach code hands it one end
// of a socketpair over netlink and serves the other end with
//
//	err := ServeTransmission(ctx, conn, exp)
//
// which starts directly in the transmission phase with simple replies only
// and enforces exp.MinBlock alignment (set it to the kernel block size). Pass
// exp.TransmissionFlags() as NBD_ATTR_SERVER_FLAGS so the kernel sends exactly
// the commands the server accepts, and exp.Backend.Size() as the size. Several
// connections may serve the same Export at once. ServeTransmission returns
// nil when the kernel disconnects (NBD_CMD_DISC or EOF), ctx's error when ctx
// ends (requests already received are answered first), and an error wrapping
// ErrProtocol on garbage; conn is always closed on return.
//
// # Attach
//
// Attacher and Device are the contract of the two attach backends: the kernel
// NBD driver over generic netlink, and FUSE plus a loop device.
package nbdattach
