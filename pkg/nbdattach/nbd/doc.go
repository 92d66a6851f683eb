// Package nbd serves an nbdattach.Backend over the NBD protocol. It uses the
// standard library only.
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
// Each connection runs a receiver and a fixed pool of workers, one per
// request slot (Export.MaxInFlight). The receiver validates every request
// (magic, flags, bounds, alignment, payload size, read-only) before anything
// is allocated or dispatched, and stops reading the socket while every slot
// is taken; a refused WRITE's payload is drained in bounded chunks. Each
// worker writes its own reply as soon as its I/O completes, in any order,
// and the last of the workers waiting to write flushes the buffer, so
// replies batch under load without a hand-off to a sender goroutine. A
// read the backend knows to read as zeroes (an nbdattach.ZeroProber that
// can tell from memory, without waiting: space never written) is answered
// by the receiver itself, a hole chunk or shared zeroes, and the receiver
// flushes its own replies once before it next waits on the client.
// Payload buffers come from size-class pools. Backend errors map to NBD
// errors through the sentinels of package nbdattach (or a syscall.Errno);
// anything else is EIO.
//
// # The kernel's side: ServeTransmission
//
// The kernel's nbd driver never negotiates: the attach code (package
// kernel) hands it one end of a socketpair over netlink and serves the other
// end with
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
package nbd
