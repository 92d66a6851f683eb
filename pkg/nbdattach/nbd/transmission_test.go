package nbd

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"syscall"
	"testing"

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
