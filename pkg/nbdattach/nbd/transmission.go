package nbd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime/debug"
	"sync"
	"sync/atomic"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// ServeTransmission serves exp on conn, starting directly in the transmission
// phase with simple replies only: the way the Linux kernel's nbd driver talks
// once a socket was handed to it over netlink (it never negotiates). Offsets
// and lengths must be multiples of exp.MinBlock (the kernel block size).
//
// It returns nil when the client sends NBD_CMD_DISC or closes the
// connection, ctx's error when ctx ends, and an error wrapping ErrProtocol
// when the client breaks the protocol. In every case the requests already
// received have been answered (as far as the socket allows) and conn is
// closed on return.
func ServeTransmission(ctx context.Context, conn net.Conn, exp *Export) error {
	if err := exp.Validate(); err != nil {
		conn.Close()
		return err
	}
	c := newTransmission(conn, exp, bufio.NewReaderSize(conn, readBufSize), nil)
	c.minBlock = exp.minBlock()
	return c.serve(ctx)
}

const (
	readBufSize  = 256 << 10
	writeBufSize = 256 << 10
	// Requests carrying more than largePayload bytes each also take one of
	// maxBigInFlight slots, so that a connection holds at most about
	// maxBigInFlight*MaxPayload + MaxInFlight*largePayload bytes of buffers
	// (160 MiB with the defaults) however the client mixes its requests.
	largePayload   = 1 << 20
	maxBigInFlight = 4
	// sparseReadMin: structured reads from this length on are split into
	// data and hole chunks; smaller ones are sent whole, where a block
	// status lookup would cost more than the zeroes it saves.
	sparseReadMin = 64 << 10
)

// transmission is one connection in the transmission phase. The receiver
// (serve) reads and validates requests and hands them to a pool of workers,
// bounded by slots; each worker writes its own reply as soon as the I/O
// completes, and the last of the workers waiting to write flushes, so that
// replies batch under load without a hand-off to a sender goroutine.
type transmission struct {
	conn       net.Conn
	exp        *Export
	be         nbdattach.Backend
	log        *slog.Logger
	br         *bufio.Reader
	structured bool
	meta       []metaContext
	minBlock   uint32
	maxPayload uint32
	readOnly   bool
	zp         nbdattach.ZeroProber // nil: every read goes to a worker

	slots chan struct{}
	big   chan struct{} // bounds the large payloads in flight
	work  chan *request
	wg    sync.WaitGroup
	disc  bool // the client sent DISC: the requests before it are served

	// The reply side: wmu serialises writers; pending counts the replies
	// queued for wmu, so that only the last one flushes.
	wmu     sync.Mutex
	bw      *bufio.Writer
	werr    error
	pending atomic.Int32
	// unflushed: the receiver wrote replies of its own without flushing;
	// it flushes before it next waits on the client (receiver only).
	unflushed bool
}

func newTransmission(conn net.Conn, exp *Export, br *bufio.Reader, log *slog.Logger) *transmission {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	n := exp.maxInFlight()
	zp, _ := exp.Backend.(nbdattach.ZeroProber)
	return &transmission{
		zp:         zp,
		conn:       conn,
		exp:        exp,
		be:         exp.Backend,
		log:        log,
		br:         br,
		minBlock:   1,
		maxPayload: exp.maxPayload(),
		readOnly:   exp.ReadOnly,
		slots:      make(chan struct{}, n),
		big:        make(chan struct{}, maxBigInFlight),
		work:       make(chan *request, n),
		bw:         bufio.NewWriterSize(conn, writeBufSize),
	}
}

// request is one command from receipt to reply; pooled.
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	off    uint64
	length uint32

	buf  *[]byte // pooled payload (write data in, read data out)
	data []byte
	big  bool // holds a c.big slot

	err    error
	errno  uint32
	chunks []chunk // structured read: data/hole pieces, in order
	status []contextExtents
}

type chunk struct {
	off  uint64
	data []byte // nil for a hole
	n    uint32
}

type contextExtents struct {
	id      uint32
	extents []nbdattach.Extent
}

var requestPool = sync.Pool{New: func() any { return new(request) }}

func getRequest() *request { return requestPool.Get().(*request) }

func putRequest(r *request) {
	if r.buf != nil {
		putBuf(r.buf)
	}
	*r = request{chunks: r.chunks[:0], status: r.status[:0]}
	requestPool.Put(r)
}

// Payload buffers come from size classes (4 KiB .. 32 MiB, powers of two) so
// that no request allocates in the steady state.
var bufPools [14]sync.Pool

func bufClass(n int) int {
	c := 0
	for s := 4096; s < n; s <<= 1 {
		c++
	}
	return c
}

func getBuf(n int) *[]byte {
	c := bufClass(n)
	if c >= len(bufPools) {
		b := make([]byte, n)
		return &b
	}
	if p, ok := bufPools[c].Get().(*[]byte); ok {
		return p
	}
	b := make([]byte, 4096<<c)
	return &b
}

func putBuf(p *[]byte) {
	c := bufClass(cap(*p))
	if c < len(bufPools) && cap(*p) == 4096<<c {
		bufPools[c].Put(p)
	}
}

// serve runs the receiver on the calling goroutine, the workers beside it.
func (c *transmission) serve(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	// A fixed pool of workers, one per slot: a request never waits for a
	// worker, and workers keep their grown stacks across requests (a fresh
	// goroutine per request spent a sixth of the CPU growing its stack
	// through the qcow2 call chain).
	// Requests already received finish even when ctx ends: a shutdown stops
	// reading, not the I/O in flight.
	ioCtx := context.WithoutCancel(ctx)
	// A request a backend still holds back before its I/O (a throttle) is
	// dropped once the client is gone: nothing was done, and the kernel,
	// which closes the connection on its I/O timeout, may send it again.
	hold, dropHeld := context.WithCancel(ioCtx)
	defer dropHeld()
	ioCtx = nbdattach.WithHoldContext(ioCtx, hold)
	for range cap(c.slots) {
		go func() {
			for r := range c.work {
				c.handle(ioCtx, r)
			}
		}()
	}
	defer close(c.work)

	// Ending ctx unblocks the receiver through the socket deadline.
	stop := context.AfterFunc(ctx, func() { c.conn.SetReadDeadline(aLongTimeAgo) })
	defer stop()

	rerr := c.receiveRecovering(ctx)
	if ctx.Err() == nil && !c.disc {
		// The client closed the connection (or broke the stream) without
		// a DISC: no one will read the replies.
		dropHeld()
	}

	// Everything received is answered before the connection closes.
	c.wg.Wait()
	c.wmu.Lock()
	serr := c.werr
	if serr == nil {
		serr = c.bw.Flush()
	}
	c.wmu.Unlock()
	if serr != nil {
		serr = fmt.Errorf("nbd: writing reply: %w", serr)
	}
	c.conn.Close()
	switch {
	case serr != nil:
		return serr // the socket broke: the receiver's error is a symptom
	case ctx.Err() != nil && (rerr == nil || isClosedErr(rerr)):
		return context.Cause(ctx)
	}
	return rerr
}

// receiveRecovering is receive with a panic (in the request validation,
// say) turned into an error: the stream can no longer be trusted, so the
// connection ends, but the requests in flight are answered and the process
// lives on.
func (c *transmission) receiveRecovering(ctx context.Context) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = panicError(c.log, "receiving requests", p)
		}
	}()
	return c.receive(ctx)
}

// receive reads requests until DISC, EOF or an error.
func (c *transmission) receive(ctx context.Context) error {
	var hdr [requestHeaderSize]byte
	for {
		if c.br.Buffered() < requestHeaderSize {
			c.flushOwnReplies()
		}
		if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
			if err == io.EOF {
				return nil // client closed between requests
			}
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("%w: reading request header: %v", ErrProtocol, err)
		}
		magic := binary.BigEndian.Uint32(hdr[0:])
		if magic != requestMagic {
			return fmt.Errorf("%w: request magic %#08x, want %#08x", ErrProtocol, magic, requestMagic)
		}
		r := getRequest()
		r.flags = binary.BigEndian.Uint16(hdr[4:])
		r.typ = binary.BigEndian.Uint16(hdr[6:])
		r.cookie = binary.BigEndian.Uint64(hdr[8:])
		r.off = binary.BigEndian.Uint64(hdr[16:])
		r.length = binary.BigEndian.Uint32(hdr[24:])

		if r.typ == nbdCmdDisc {
			c.disc = true
			putRequest(r)
			return nil
		}
		r.errno = c.validate(r)
		if r.errno == 0 && r.length > largePayload && (r.typ == nbdCmdWrite || r.typ == nbdCmdRead) {
			select {
			case c.big <- struct{}{}:
				r.big = true
			case <-ctx.Done():
				putRequest(r)
				return nil
			}
		}
		if r.typ == nbdCmdWrite {
			if err := c.readPayload(r); err != nil {
				putRequest(r)
				return err
			}
		}
		// Bounded in flight: wait for a slot before starting the request.
		select {
		case c.slots <- struct{}{}:
		default:
			c.flushOwnReplies() // the workers are busy: do not sit on these
			select {
			case c.slots <- struct{}{}:
			case <-ctx.Done():
				putRequest(r)
				return nil
			}
		}
		c.wg.Add(1)
		if r.errno != 0 {
			c.reply(r)
			continue
		}
		if c.zeroRead(r) {
			c.replyOwn(r)
			continue
		}
		c.work <- r
	}
}

// zeroRead answers a read of space that reads as zeroes (never written, on
// a fresh image) on the receiving goroutine when the backend can tell from
// memory: one hole chunk for a structured reply, shared zeroes for a simple
// one. A worker would do the same at the price of a hand-off and a wake-up
// per request, which is most of the cost of such a read.
func (c *transmission) zeroRead(r *request) bool {
	if r.typ != nbdCmdRead || r.length == 0 || c.zp == nil {
		return false
	}
	structured := c.structured && r.flags&cmdFlagDF == 0
	if !structured && int(r.length) > len(zeroes) {
		return false
	}
	if !c.zp.KnownZero(int64(r.off), int64(r.length)) {
		return false
	}
	if structured {
		r.appendChunk(r.off, nil, r.length)
	} else {
		r.data = zeroes[:r.length] // read-only; r.buf stays nil
	}
	return true
}

// readPayload reads a WRITE's data into a pooled buffer, or drains it when
// the request was refused, so that the stream stays in step without
// allocating what a hostile client announces.
func (c *transmission) readPayload(r *request) error {
	n := int64(r.length)
	if r.errno != 0 {
		if int64(c.br.Buffered()) < n {
			c.flushOwnReplies()
		}
		if _, err := io.CopyN(io.Discard, c.br, n); err != nil {
			return fmt.Errorf("%w: draining %d-byte write payload: %v", ErrProtocol, n, err)
		}
		return nil
	}
	r.buf = getBuf(int(n))
	r.data = (*r.buf)[:n]
	if int64(c.br.Buffered()) < n {
		c.flushOwnReplies()
	}
	if _, err := io.ReadFull(c.br, r.data); err != nil {
		return fmt.Errorf("%w: reading %d-byte write payload: %v", ErrProtocol, n, err)
	}
	return nil
}

// validate checks a request before it is dispatched, returning the NBD error
// to answer with, or 0.
func (c *transmission) validate(r *request) uint32 {
	const known = cmdFlagFUA | cmdFlagNoHole | cmdFlagDF | cmdFlagReqOne | cmdFlagFastZero
	if r.flags&^known != 0 {
		return nbdEINVAL
	}
	switch r.typ {
	case nbdCmdRead, nbdCmdWrite, nbdCmdCache, nbdCmdTrim, nbdCmdWriteZeroes, nbdCmdBlockStatus:
	case nbdCmdFlush:
		if r.off != 0 || r.length != 0 {
			return nbdEINVAL
		}
		return 0
	default:
		return nbdEINVAL
	}
	// Flags that belong to other commands.
	if r.flags&cmdFlagDF != 0 && (r.typ != nbdCmdRead || !c.structured) {
		return nbdEINVAL
	}
	if r.flags&cmdFlagReqOne != 0 && r.typ != nbdCmdBlockStatus {
		return nbdEINVAL
	}
	if r.flags&(cmdFlagNoHole|cmdFlagFastZero) != 0 && r.typ != nbdCmdWriteZeroes {
		return nbdEINVAL
	}
	if r.typ == nbdCmdBlockStatus && (!c.structured || len(c.meta) == 0 || r.length == 0) {
		return nbdEINVAL
	}
	if (r.typ == nbdCmdRead || r.typ == nbdCmdWrite) && r.length > c.maxPayload {
		return nbdEOVERFLOW
	}
	if c.readOnly && (r.typ == nbdCmdWrite || r.typ == nbdCmdTrim || r.typ == nbdCmdWriteZeroes) {
		return nbdEPERM
	}
	if m := uint64(c.minBlock); m > 1 && (r.off%m != 0 || uint64(r.length)%m != 0) {
		return nbdEINVAL
	}
	size := c.be.Size()
	if size < 0 || r.off > uint64(size) || uint64(r.length) > uint64(size)-r.off {
		if r.typ == nbdCmdWrite || r.typ == nbdCmdWriteZeroes {
			return nbdENOSPC
		}
		return nbdEINVAL
	}
	return 0
}

// handle runs one validated request against the backend and queues its reply.
func (c *transmission) handle(ctx context.Context, r *request) {
	if err := c.dispatch(ctx, r); err != nil {
		r.err = err
		r.errno = nbdErrno(err)
		c.log.Debug("nbd request failed", "cmd", r.typ, "offset", r.off, "length", r.length, "err", err)
	}
	c.reply(r)
}

// errBackendPanic: the backend (or this package) panicked; the request,
// or the connection where no one request is to blame, fails with it (EIO).
var errBackendPanic = errors.New("nbd backend panicked")

// panicError logs a recovered panic with its stack and returns it as an
// error wrapping errBackendPanic.
func panicError(log *slog.Logger, while string, p any) error {
	log.Error("nbd: panic while "+while, "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
	return fmt.Errorf("%w while %s: %v", errBackendPanic, while, p)
}

// dispatch runs r against the backend. A panic there, a bug met by one
// request, fails that request with EIO: the client sees an I/O error on a
// few sectors, instead of the process dying with every device it serves.
func (c *transmission) dispatch(ctx context.Context, r *request) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = panicError(c.log.With("cmd", r.typ, "offset", r.off, "length", r.length), "serving a request (it fails with EIO)", p)
		}
	}()
	off, n := int64(r.off), int64(r.length)
	fua := r.flags&cmdFlagFUA != 0
	switch r.typ {
	case nbdCmdRead:
		err = c.read(ctx, r)
	case nbdCmdWrite:
		err = c.be.WriteAt(ctx, r.data, off, fua)
	case nbdCmdFlush:
		err = c.be.Flush(ctx)
	case nbdCmdTrim:
		if c.exp.NoUnmap {
			break
		}
		if err = c.be.Trim(ctx, off, n); err == nil && fua {
			err = c.be.Flush(ctx)
		}
	case nbdCmdWriteZeroes:
		err = c.be.WriteZeroes(ctx, off, n, nbdattach.ZeroFlags{
			NoHole: r.flags&cmdFlagNoHole != 0 || c.exp.NoUnmap,
			Fast:   r.flags&cmdFlagFastZero != 0,
			FUA:    fua,
		})
	case nbdCmdCache:
		err = c.cache(ctx, off, n)
	case nbdCmdBlockStatus:
		err = c.blockStatus(ctx, r)
	}
	return err
}

// read fills r.data, and for structured replies with holes, r.chunks.
func (c *transmission) read(ctx context.Context, r *request) error {
	off, n := int64(r.off), int(r.length)
	if c.structured && r.flags&cmdFlagDF == 0 && n >= sparseReadMin {
		if bs, ok := c.be.(nbdattach.BlockStatuser); ok {
			return c.sparseRead(ctx, bs, r)
		}
	}
	r.buf = getBuf(n)
	r.data = (*r.buf)[:n]
	if err := c.be.ReadAt(ctx, r.data, off); err != nil {
		return err
	}
	// A small structured read that came back all zeroes (space never
	// written, on a fresh image) is answered as one hole chunk: 12 bytes
	// on the wire instead of the zeroes, as qemu-nbd answers it after a
	// block status lookup, here for the price of a compare. The spec
	// makes OFFSET_HOLE mean "reads as zeroes", allocated or not.
	if c.structured && r.flags&cmdFlagDF == 0 && n > 0 && n <= len(zeroes) && bytes.Equal(r.data, zeroes[:n]) {
		r.appendChunk(r.off, nil, r.length)
	}
	return nil
}

// zeroes is what small reads are compared with (sparseReadMin bytes).
var zeroes = make([]byte, sparseReadMin)

// sparseRead reads only the data extents and describes the zero ones as
// holes, as qemu-nbd does for structured reads without DF.
func (c *transmission) sparseRead(ctx context.Context, bs nbdattach.BlockStatuser, r *request) error {
	off, n := int64(r.off), int64(r.length)
	r.buf = getBuf(int(n))
	r.data = (*r.buf)[:n]
	pos := int64(0)
	for pos < n {
		exts, err := bs.BlockStatus(ctx, off+pos, n-pos)
		if err != nil {
			return err
		}
		if len(exts) == 0 {
			return fmt.Errorf("%w: block status at %d returned no extents", nbdattach.ErrInvalid, off+pos)
		}
		for _, e := range exts {
			if pos >= n {
				break
			}
			l := min(e.Length, n-pos)
			if l <= 0 {
				return fmt.Errorf("block status at %d returned an empty extent", off+pos)
			}
			if e.Flags&nbdattach.StateZero != 0 {
				r.appendChunk(uint64(off+pos), nil, uint32(l))
			} else {
				if err := c.be.ReadAt(ctx, r.data[pos:pos+l], off+pos); err != nil {
					return err
				}
				r.appendChunk(uint64(off+pos), r.data[pos:pos+l], uint32(l))
			}
			pos += l
		}
	}
	return nil
}

// appendChunk adds a piece, merging it with the previous one of its kind.
func (r *request) appendChunk(off uint64, data []byte, n uint32) {
	if k := len(r.chunks); k > 0 {
		last := &r.chunks[k-1]
		if (last.data == nil) == (data == nil) && last.off+uint64(last.n) == off {
			last.n += n
			if data != nil {
				last.data = last.data[:len(last.data)+len(data)]
			}
			return
		}
	}
	r.chunks = append(r.chunks, chunk{off: off, data: data, n: n})
}

// cache reads the range into the backend's caches and throws the data away.
func (c *transmission) cache(ctx context.Context, off, n int64) error {
	const step = 1 << 20
	b := getBuf(step)
	defer putBuf(b)
	for n > 0 {
		l := min(n, step)
		if err := c.be.ReadAt(ctx, (*b)[:l], off); err != nil {
			return err
		}
		off += l
		n -= l
	}
	return nil
}

// blockStatus gathers the extents of every selected context.
func (c *transmission) blockStatus(ctx context.Context, r *request) error {
	off, n := int64(r.off), int64(r.length)
	for _, m := range c.meta {
		var exts []nbdattach.Extent
		var err error
		switch {
		case m.name == nbdattach.ContextBaseAllocation:
			if bs, ok := c.be.(nbdattach.BlockStatuser); ok {
				exts, err = bs.BlockStatus(ctx, off, n)
			} else {
				exts = []nbdattach.Extent{{Length: n}}
			}
		default:
			p, ok := c.be.(nbdattach.MetaContextProvider)
			if !ok {
				return fmt.Errorf("%w: context %q has no provider", nbdattach.ErrInvalid, m.name)
			}
			exts, err = p.MetaContextStatus(ctx, m.name, off, n)
		}
		if err != nil {
			return err
		}
		exts, err = clipExtents(exts, n, r.flags&cmdFlagReqOne != 0)
		if err != nil {
			return fmt.Errorf("context %s at %d: %w", m.name, off, err)
		}
		r.status = append(r.status, contextExtents{id: m.id, extents: exts})
	}
	return nil
}

// clipExtents drops what lies past the requested length, merges adjacent
// extents with the same flags and bounds the count, so that a reply never
// describes bytes the client did not ask about.
func clipExtents(exts []nbdattach.Extent, n int64, one bool) ([]nbdattach.Extent, error) {
	out := exts[:0]
	var total int64
	for _, e := range exts {
		if total >= n {
			break
		}
		if e.Length <= 0 {
			return nil, fmt.Errorf("%w: extent of length %d", nbdattach.ErrInvalid, e.Length)
		}
		l := min(e.Length, n-total, 1<<32-1<<20)
		if k := len(out); k > 0 && out[k-1].Flags == e.Flags && out[k-1].Length+l <= 1<<32-1<<20 {
			out[k-1].Length += l
		} else {
			if len(out) == maxExtentsPerReply {
				break
			}
			out = append(out, nbdattach.Extent{Length: l, Flags: e.Flags})
		}
		total += l
		if one {
			break
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w: no extents", nbdattach.ErrInvalid)
	}
	return out, nil
}

// reply writes r's reply and releases r. A write error ends the
// connection: the receiver is stopped and later replies are dropped.
func (c *transmission) reply(r *request) { c.writeAndRelease(r, true) }

// replyOwn is reply for a request the receiver answered itself: the flush
// waits until the receiver runs out of requests to read (flushOwnReplies),
// so that a burst of such replies leaves in one write.
func (c *transmission) replyOwn(r *request) {
	c.unflushed = true
	c.writeAndRelease(r, false)
}

// flushOwnReplies flushes what replyOwn left in the buffer, before the
// receiver waits on the client or on a worker.
func (c *transmission) flushOwnReplies() {
	if !c.unflushed {
		return
	}
	c.unflushed = false
	c.wmu.Lock()
	if c.werr == nil {
		if c.werr = c.bw.Flush(); c.werr != nil {
			c.conn.SetReadDeadline(aLongTimeAgo)
		}
	}
	c.wmu.Unlock()
}

// writeAndRelease writes r's reply, flushing when flush is set and no other
// writer is queued behind it, and releases r.
func (c *transmission) writeAndRelease(r *request, flush bool) {
	c.pending.Add(1)
	c.wmu.Lock()
	if c.werr == nil {
		c.werr = c.writeReply(c.bw, r)
		// Decrement after writing: a writer that queued meanwhile flushes
		// instead, and one that queues later sees no one to rely on.
		if last := c.pending.Add(-1) == 0; c.werr == nil && last && flush {
			c.werr = c.bw.Flush()
		}
		if c.werr != nil {
			// Unblock the receiver; it will see an error and stop.
			c.conn.SetReadDeadline(aLongTimeAgo)
		}
	} else {
		c.pending.Add(-1)
	}
	c.wmu.Unlock()
	if r.big {
		<-c.big
	}
	putRequest(r)
	<-c.slots
	c.wg.Done()
}

func (c *transmission) writeReply(bw *bufio.Writer, r *request) error {
	if !c.structured {
		return writeSimple(bw, r)
	}
	b, err := wire(bw)
	if err != nil {
		return err
	}
	if r.errno != 0 {
		msg := ""
		if r.err != nil {
			msg = r.err.Error()
			if len(msg) > 256 {
				msg = msg[:256]
			}
		}
		b = chunkHeader(b, replyFlagDone, replyTypeError, r.cookie, uint32(6+len(msg)))
		b = binary.BigEndian.AppendUint32(b, r.errno)
		b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
		bw.Write(b)
		_, err := bw.WriteString(msg)
		return err
	}
	switch r.typ {
	case nbdCmdRead:
		if len(r.chunks) == 0 {
			if r.length == 0 {
				_, err := bw.Write(chunkHeader(b, replyFlagDone, replyTypeNone, r.cookie, 0))
				return err
			}
			r.chunks = append(r.chunks, chunk{off: r.off, data: r.data, n: r.length})
		}
		for i, ch := range r.chunks {
			var fl uint16
			if i == len(r.chunks)-1 {
				fl = replyFlagDone
			}
			if b, err = wire(bw); err != nil {
				return err
			}
			if ch.data == nil {
				b = chunkHeader(b, fl, replyTypeOffsetHole, r.cookie, 12)
				b = binary.BigEndian.AppendUint64(b, ch.off)
				b = binary.BigEndian.AppendUint32(b, ch.n)
				bw.Write(b)
				continue
			}
			b = chunkHeader(b, fl, replyTypeOffsetData, r.cookie, 8+ch.n)
			bw.Write(binary.BigEndian.AppendUint64(b, ch.off))
			if _, err := bw.Write(ch.data); err != nil {
				return err
			}
		}
		return nil
	case nbdCmdBlockStatus:
		for i, cs := range r.status {
			var fl uint16
			if i == len(r.status)-1 {
				fl = replyFlagDone
			}
			if b, err = wire(bw); err != nil {
				return err
			}
			b = chunkHeader(b, fl, replyTypeBlockStatus, r.cookie, uint32(4+8*len(cs.extents)))
			bw.Write(binary.BigEndian.AppendUint32(b, cs.id))
			for _, e := range cs.extents {
				if b, err = wire(bw); err != nil {
					return err
				}
				b = binary.BigEndian.AppendUint32(b, uint32(e.Length))
				bw.Write(binary.BigEndian.AppendUint32(b, e.Flags))
			}
		}
		return nil
	default:
		_, err := bw.Write(chunkHeader(b, replyFlagDone, replyTypeNone, r.cookie, 0))
		return err
	}
}

// wire returns an empty slice of bw's free space, at least 64 bytes, to
// append a small header to and Write at once: replies allocate nothing.
func wire(bw *bufio.Writer) ([]byte, error) {
	if bw.Available() < 64 {
		if err := bw.Flush(); err != nil {
			return nil, err
		}
	}
	return bw.AvailableBuffer(), nil
}

func writeSimple(bw *bufio.Writer, r *request) error {
	b, err := wire(bw)
	if err != nil {
		return err
	}
	b = binary.BigEndian.AppendUint32(b, simpleMagic)
	b = binary.BigEndian.AppendUint32(b, r.errno)
	b = binary.BigEndian.AppendUint64(b, r.cookie)
	_, err = bw.Write(b)
	if err == nil && r.errno == 0 && r.typ == nbdCmdRead {
		_, err = bw.Write(r.data)
	}
	return err
}

// chunkHeader appends a structured reply chunk header.
func chunkHeader(b []byte, flags, typ uint16, cookie uint64, n uint32) []byte {
	b = binary.BigEndian.AppendUint32(b, structuredMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	return binary.BigEndian.AppendUint32(b, n)
}

func isClosedErr(err error) bool {
	var ne net.Error
	return errors.Is(err, net.ErrClosed) || errors.Is(err, io.ErrUnexpectedEOF) || (errors.As(err, &ne) && ne.Timeout())
}
