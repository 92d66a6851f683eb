package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

func TestServeTransmissionCommands(t *testing.T) {
	mem := newMem(1 << 20)
	exp := &Export{Backend: mem, MinBlock: 512}
	c, wait := startTransmission(t, exp)

	data := pattern(8192, 3)
	c.send(0, nbdCmdWrite, 1, 4096, 8192, data)
	if e, ck, _ := c.simpleReply(0); e != 0 || ck != 1 {
		t.Fatalf("write: errno %d cookie %d", e, ck)
	}
	c.send(0, nbdCmdRead, 2, 4096, 8192, nil)
	if e, ck, got := c.simpleReply(8192); e != 0 || ck != 2 || !bytes.Equal(got, data) {
		t.Fatalf("read: errno %d cookie %d equal %v", e, ck, bytes.Equal(got, data))
	}
	c.send(0, nbdCmdFlush, 3, 0, 0, nil)
	if e, _, _ := c.simpleReply(0); e != 0 {
		t.Fatalf("flush: errno %d", e)
	}
	c.send(0, nbdCmdWriteZeroes, 4, 4096, 4096, nil)
	if e, _, _ := c.simpleReply(0); e != 0 {
		t.Fatalf("write zeroes: errno %d", e)
	}
	c.send(0, nbdCmdRead, 5, 4096, 8192, nil)
	_, _, got := c.simpleReply(8192)
	if !bytes.Equal(got[:4096], make([]byte, 4096)) || !bytes.Equal(got[4096:], data[4096:]) {
		t.Fatalf("after write zeroes: wrong data")
	}
	c.send(0, nbdCmdDisc, 6, 0, 0, nil)
	if err := wait(); err != nil {
		t.Fatalf("ServeTransmission: %v", err)
	}
	c.expectClosed()
	if mem.flushes != 1 {
		t.Fatalf("flushes %d, want 1", mem.flushes)
	}
}

func TestServeTransmissionErrors(t *testing.T) {
	size := int64(1 << 20)
	cases := []struct {
		name     string
		readOnly bool
		flags    uint16
		typ      uint16
		off      uint64
		length   uint32
		payload  bool
		failErr  error
		want     uint32
	}{
		{name: "read past end", typ: nbdCmdRead, off: uint64(size) - 512, length: 1024, want: nbdEINVAL},
		{name: "read offset overflow", typ: nbdCmdRead, off: 1<<64 - 512, length: 1024, want: nbdEINVAL},
		{name: "write past end", typ: nbdCmdWrite, off: uint64(size), length: 512, payload: true, want: nbdENOSPC},
		{name: "write zeroes past end", typ: nbdCmdWriteZeroes, off: uint64(size), length: 512, want: nbdENOSPC},
		{name: "misaligned offset", typ: nbdCmdRead, off: 100, length: 512, want: nbdEINVAL},
		{name: "misaligned length", typ: nbdCmdWrite, off: 0, length: 100, payload: true, want: nbdEINVAL},
		{name: "read over max payload", typ: nbdCmdRead, off: 0, length: 64 << 20, want: nbdEOVERFLOW},
		{name: "unknown command", typ: 99, want: nbdEINVAL},
		{name: "unknown flag", flags: 1 << 9, typ: nbdCmdRead, length: 512, want: nbdEINVAL},
		{name: "DF without structured replies", flags: cmdFlagDF, typ: nbdCmdRead, length: 512, want: nbdEINVAL},
		{name: "block status without structured replies", typ: nbdCmdBlockStatus, length: 512, want: nbdEINVAL},
		{name: "flush with length", typ: nbdCmdFlush, length: 512, want: nbdEINVAL},
		{name: "write on read-only", readOnly: true, typ: nbdCmdWrite, length: 512, payload: true, want: nbdEPERM},
		{name: "trim on read-only", readOnly: true, typ: nbdCmdTrim, length: 512, want: nbdEPERM},
		{name: "backend ENOSPC", typ: nbdCmdWrite, length: 512, payload: true, failErr: fmt.Errorf("grow: %w", syscall.ENOSPC), want: nbdENOSPC},
		{name: "backend sentinel", typ: nbdCmdWrite, length: 512, payload: true, failErr: fmt.Errorf("x: %w", nbdattach.ErrNoSpace), want: nbdENOSPC},
		{name: "backend other error", typ: nbdCmdRead, length: 512, failErr: errors.New("disk on fire"), want: nbdEIO},
		{name: "fast zero unsupported", flags: cmdFlagFastZero, typ: nbdCmdWriteZeroes, length: 512, want: nbdENOTSUP},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			mem := newMem(int(size))
			if tc.failErr != nil {
				mem.failAt, mem.failErr = 0, tc.failErr
			}
			c, wait := startTransmission(t, &Export{Backend: mem, MinBlock: 512, ReadOnly: tc.readOnly})
			var payload []byte
			if tc.payload {
				payload = make([]byte, tc.length)
			}
			c.send(tc.flags, tc.typ, 77, tc.off, tc.length, payload)
			e, ck, _ := c.simpleReply(0)
			if e != tc.want || ck != 77 {
				t.Fatalf("errno %d cookie %d, want errno %d cookie 77", e, ck, tc.want)
			}
			// The connection stays usable after a refused request.
			c.send(0, nbdCmdRead, 78, 4096, 512, nil)
			if e, ck, _ := c.simpleReply(512); e != 0 || ck != 78 {
				t.Fatalf("follow-up read: errno %d cookie %d", e, ck)
			}
			c.send(0, nbdCmdDisc, 0, 0, 0, nil)
			if err := wait(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestServeTransmissionOversizedWriteIsDrained(t *testing.T) {
	mem := newMem(1 << 20)
	c, wait := startTransmission(t, &Export{Backend: mem, MaxPayload: 64 << 10})
	big := pattern(128<<10, 1)
	go c.send(0, nbdCmdWrite, 5, 0, uint32(len(big)), big)
	if e, ck, _ := c.simpleReply(0); e != nbdEOVERFLOW || ck != 5 {
		t.Fatalf("errno %d cookie %d, want EOVERFLOW", e, ck)
	}
	if !bytes.Equal(mem.data[:len(big)], make([]byte, len(big))) {
		t.Fatal("oversized write reached the backend")
	}
	c.send(0, nbdCmdDisc, 0, 0, 0, nil)
	if err := wait(); err != nil {
		t.Fatal(err)
	}
}

func TestServeTransmissionHostile(t *testing.T) {
	cases := []struct {
		name string
		send func(c *rawClient)
	}{
		{"garbage magic", func(c *rawClient) { c.conn.Write(bytes.Repeat([]byte{0xde, 0xad}, 14)) }},
		{"half-sent header", func(c *rawClient) {
			c.conn.Write([]byte{0x25, 0x60, 0x95})
			c.conn.(interface{ CloseWrite() error }).CloseWrite()
		}},
		{"half-sent write payload", func(c *rawClient) {
			c.send(0, nbdCmdWrite, 1, 0, 4096, make([]byte, 100))
			c.conn.(interface{ CloseWrite() error }).CloseWrite()
		}},
		{"4 GiB write announced then EOF", func(c *rawClient) {
			c.send(0, nbdCmdWrite, 1, 0, 1<<32-1, nil)
			c.conn.(interface{ CloseWrite() error }).CloseWrite()
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, wait := startTransmission(t, &Export{Backend: newMem(1 << 20)})
			tc.send(c)
			err := wait()
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("ServeTransmission returned %v, want ErrProtocol", err)
			}
			c.expectClosed()
		})
	}
}

func TestServeTransmissionConcurrent(t *testing.T) {
	mem := newMem(4 << 20)
	c, wait := startTransmission(t, &Export{Backend: mem, MaxInFlight: 4})
	const n = 200
	go func() {
		for i := range n {
			c.send(0, nbdCmdWrite, uint64(i), uint64(i)*4096, 4096, pattern(4096, byte(i)))
		}
	}()
	seen := map[uint64]bool{}
	for range n {
		e, ck, _ := c.simpleReply(0)
		if e != 0 || seen[ck] || ck >= n {
			t.Fatalf("reply errno %d cookie %d (seen %v)", e, ck, seen[ck])
		}
		seen[ck] = true
	}
	for i := range n {
		if !bytes.Equal(mem.data[i*4096:(i+1)*4096], pattern(4096, byte(i))) {
			t.Fatalf("block %d wrong", i)
		}
	}
	c.send(0, nbdCmdDisc, 0, 0, 0, nil)
	if err := wait(); err != nil {
		t.Fatal(err)
	}
}

func TestTransmissionFlags(t *testing.T) {
	rw := (&Export{MultiConn: true}).TransmissionFlags()
	want := tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendDF | tflagSendCache | tflagSendTrim | tflagSendWriteZeroes | tflagSendFastZero | tflagCanMultiConn
	if rw != want {
		t.Fatalf("read-write flags %#x, want %#x", rw, want)
	}
	ro := (&Export{ReadOnly: true}).TransmissionFlags()
	if want := tflagHasFlags | tflagReadOnly | tflagSendFlush | tflagSendFUA | tflagSendDF | tflagSendCache; ro != want {
		t.Fatalf("read-only flags %#x, want %#x", ro, want)
	}
}

// Many large requests at once: all answered, none lost, while the number of
// large buffers in flight stays bounded (the test would deadlock otherwise).
func TestServeTransmissionLargeRequests(t *testing.T) {
	mem := newMem(64 << 20)
	c, wait := startTransmission(t, &Export{Backend: mem})
	const n = 12
	go func() {
		for i := range n {
			if i%2 == 0 {
				c.send(0, nbdCmdWrite, uint64(i), uint64(i)<<22, 4<<20, pattern(4<<20, byte(i)))
			} else {
				c.send(0, nbdCmdRead, uint64(i), uint64(i-1)<<22, 4<<20, nil)
			}
		}
	}()
	for range n {
		e, ck, _ := c.simpleReply(0)
		if e != 0 {
			t.Fatalf("cookie %d errno %d", ck, e)
		}
		if ck%2 == 1 {
			if _, err := io.ReadFull(c.conn, make([]byte, 4<<20)); err != nil {
				t.Fatal(err)
			}
		}
	}
	c.send(0, nbdCmdDisc, 0, 0, 0, nil)
	if err := wait(); err != nil {
		t.Fatal(err)
	}
}

// zeroProbeMem is a memBackend that knows which of its ranges were never
// written (the first half) and counts the reads that reach ReadAt.
type zeroProbeMem struct {
	*memBackend
	mu    sync.Mutex
	reads int
}

func (z *zeroProbeMem) KnownZero(off, n int64) bool { return off+n <= int64(len(z.data))/2 }

func (z *zeroProbeMem) ReadAt(ctx context.Context, p []byte, off int64) error {
	z.mu.Lock()
	z.reads++
	z.mu.Unlock()
	return z.memBackend.ReadAt(ctx, p, off)
}

func (z *zeroProbeMem) readCount() int { z.mu.Lock(); defer z.mu.Unlock(); return z.reads }

// Reads the backend knows to be zeroes are answered by the receiver
// without reaching ReadAt: one hole chunk for a structured reply, the
// zeroes for a simple one; every reply reaches the client at once (a reply
// left unflushed in the buffer would hang these one-at-a-time exchanges).
func TestZeroReadsAnsweredByReceiver(t *testing.T) {
	const size = 1 << 20
	be := &zeroProbeMem{memBackend: newMem(size)}
	copy(be.data[size/2:], pattern(size/2, 3))

	// Simple replies (the kernel's client).
	rc, wait := startTransmission(t, &Export{Backend: be})
	for i := range 3 {
		rc.send(0, nbdCmdRead, uint64(i), uint64(i)*4096, 4096, nil)
		if e, ck, data := rc.simpleReply(4096); e != 0 || ck != uint64(i) || !bytes.Equal(data, make([]byte, 4096)) {
			t.Fatalf("simple zero read %d: errno %d cookie %d zeroes %v", i, e, ck, bytes.Equal(data, make([]byte, 4096)))
		}
	}
	// Larger than the shared zeroes: the backend reads it.
	rc.send(0, nbdCmdRead, 9, 0, 128<<10, nil)
	if e, _, data := rc.simpleReply(128 << 10); e != 0 || !bytes.Equal(data, make([]byte, 128<<10)) {
		t.Fatalf("128 KiB simple zero read: errno %d", e)
	}
	if n := be.readCount(); n != 1 {
		t.Fatalf("backend saw %d reads, want 1 (the 128 KiB one)", n)
	}
	rc.send(0, nbdCmdDisc, 0, 0, 0, nil)
	if err := wait(); err != nil {
		t.Fatal(err)
	}

	// Structured replies: a hole, of any length; DF still gets the data.
	be.reads = 0
	c := startServer(t, &Export{Backend: be})
	c.option(optStructuredReply, nil)
	c.reply()
	c.option(optGo, goData(""))
	for r := c.reply(); r.typ != repAck; r = c.reply() {
	}
	rc = &rawClient{t: t, conn: c.conn}
	for i, n := range []uint32{4096, 256 << 10} {
		rc.send(0, nbdCmdRead, uint64(i), 8192, n, nil)
		ch := readChunk(t, c.conn)
		if ch.typ != replyTypeOffsetHole || ch.flags != replyFlagDone || ch.cookie != uint64(i) ||
			binary.BigEndian.Uint64(ch.payload) != 8192 || binary.BigEndian.Uint32(ch.payload[8:]) != n {
			t.Fatalf("structured zero read of %d: chunk type %d flags %d cookie %d, %d payload bytes", n, ch.typ, ch.flags, ch.cookie, len(ch.payload))
		}
	}
	if n := be.readCount(); n != 0 {
		t.Fatalf("backend saw %d reads of known zeroes", n)
	}
	rc.send(cmdFlagDF, nbdCmdRead, 7, 8192, 4096, nil)
	if ch := readChunk(t, c.conn); ch.typ != replyTypeOffsetData || len(ch.payload) != 8+4096 || !bytes.Equal(ch.payload[8:], make([]byte, 4096)) {
		t.Fatalf("DF zero read: chunk type %d len %d", ch.typ, len(ch.payload))
	}
	rc.send(0, nbdCmdDisc, 0, 0, 0, nil)
	rc.expectClosed()
}

// A pipelined mix of reads the receiver answers and requests the workers
// serve: every request is answered once, with the right bytes, whatever the
// interleaving of the two kinds of writers of the reply stream.
func TestZeroReadsMixedWithWorkerReplies(t *testing.T) {
	const size = 4 << 20
	be := &zeroProbeMem{memBackend: newMem(size)}
	c, wait := startTransmission(t, &Export{Backend: be, MaxInFlight: 8})
	const n = 600
	half := uint64(size / 2)
	go func() {
		for i := range n {
			switch i % 3 {
			case 0: // never written: answered by the receiver
				c.send(0, nbdCmdRead, uint64(i), uint64(i)*4096%half, 4096, nil)
			case 1: // written: a worker
				c.send(0, nbdCmdWrite, uint64(i), half+uint64(i/3)*4096, 4096, pattern(4096, byte(i/3)))
			default: // data: a worker
				c.send(0, nbdCmdRead, uint64(i), half+uint64(i/3)*4096, 4096, nil)
			}
		}
	}()
	seen := map[uint64]bool{}
	for range n {
		// The cookie tells how many data bytes follow: reads carry 4096.
		c.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		var h [16]byte
		if _, err := io.ReadFull(c.conn, h[:]); err != nil {
			t.Fatalf("after %d replies: %v", len(seen), err)
		}
		ck := binary.BigEndian.Uint64(h[8:])
		if e := binary.BigEndian.Uint32(h[4:]); e != 0 || ck >= n || seen[ck] {
			t.Fatalf("reply to %d: errno %d (seen before: %v)", ck, e, seen[ck])
		}
		seen[ck] = true
		if ck%3 == 1 {
			continue
		}
		data := make([]byte, 4096)
		if _, err := io.ReadFull(c.conn, data); err != nil {
			t.Fatal(err)
		}
		// A data read may run before the write just ahead of it: either
		// the old zeroes or the new pattern, never anything else.
		if ck%3 == 0 && !bytes.Equal(data, make([]byte, 4096)) ||
			ck%3 == 2 && !bytes.Equal(data, make([]byte, 4096)) && !bytes.Equal(data, pattern(4096, byte(ck/3))) {
			t.Fatalf("read %d returned wrong bytes", ck)
		}
	}
	c.send(0, nbdCmdDisc, 0, 0, 0, nil)
	if err := wait(); err != nil {
		t.Fatal(err)
	}
}
