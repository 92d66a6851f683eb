package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// ctxBackend adds the meta contexts qemu-nbd serves for a qcow2 image with
// -A and -B, with fixed answers.
type ctxBackend struct {
	*memBackend
}

func (ctxBackend) MetaContexts() []string {
	return []string{nbdattach.ContextAllocationDepth, nbdattach.ContextDirtyBitmapPrefix + "b1", nbdattach.ContextDirtyBitmapPrefix + "b2"}
}

func (ctxBackend) MetaContextStatus(_ context.Context, name string, off, n int64) ([]nbdattach.Extent, error) {
	switch name {
	case nbdattach.ContextAllocationDepth:
		return []nbdattach.Extent{{Length: 4096, Flags: 1}, {Length: 1 << 40, Flags: 0}}, nil
	case nbdattach.ContextDirtyBitmapPrefix + "b1":
		return []nbdattach.Extent{{Length: 8192, Flags: 0}, {Length: 1 << 40, Flags: 1}}, nil
	}
	return []nbdattach.Extent{{Length: n}}, nil
}

func (ctxBackend) BlockStatus(_ context.Context, off, n int64) ([]nbdattach.Extent, error) {
	return []nbdattach.Extent{{Length: 4096}, {Length: 4096, Flags: 3}, {Length: 1 << 40, Flags: 3}}, nil
}

// optClient drives the handshake by hand.
type optClient struct {
	t    *testing.T
	conn net.Conn
}

func startServer(t *testing.T, exps ...*Export) *optClient {
	t.Helper()
	srv, err := NewServer(ServerOptions{HandshakeTimeout: 10 * time.Second}, exps...)
	if err != nil {
		t.Fatal(err)
	}
	a, b := unixPair(t)
	done := make(chan error, 1)
	go func() { done <- srv.ServeConn(context.Background(), a) }()
	t.Cleanup(func() {
		b.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("ServeConn did not return")
		}
	})
	c := &optClient{t: t, conn: b}
	b.SetDeadline(time.Now().Add(10 * time.Second))
	var greet [18]byte
	if _, err := io.ReadFull(b, greet[:]); err != nil {
		t.Fatal(err)
	}
	if binary.BigEndian.Uint64(greet[0:]) != nbdMagic || binary.BigEndian.Uint64(greet[8:]) != optMagic ||
		binary.BigEndian.Uint16(greet[16:]) != flagFixedNewstyle|flagNoZeroes {
		t.Fatalf("greeting %x", greet)
	}
	b.Write(binary.BigEndian.AppendUint32(nil, clientFlagFixedNewstyle|clientFlagNoZeroes))
	return c
}

func (c *optClient) option(opt uint32, data []byte) {
	b := binary.BigEndian.AppendUint64(nil, optMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	if _, err := c.conn.Write(append(b, data...)); err != nil {
		c.t.Fatal(err)
	}
}

type optReply struct {
	opt, typ uint32
	data     []byte
}

func (c *optClient) reply() optReply {
	c.t.Helper()
	var h [20]byte
	if _, err := io.ReadFull(c.conn, h[:]); err != nil {
		c.t.Fatalf("reading option reply: %v", err)
	}
	if binary.BigEndian.Uint64(h[0:]) != optReplyMagic {
		c.t.Fatalf("option reply magic %x", h[:8])
	}
	r := optReply{opt: binary.BigEndian.Uint32(h[8:]), typ: binary.BigEndian.Uint32(h[12:])}
	r.data = make([]byte, binary.BigEndian.Uint32(h[16:]))
	if _, err := io.ReadFull(c.conn, r.data); err != nil {
		c.t.Fatal(err)
	}
	return r
}

func metaData(export string, queries ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	b = append(b, export...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

func goData(export string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	b = append(b, export...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

func TestHandshakeOptions(t *testing.T) {
	exp := &Export{Name: "disk", Description: "d", Backend: ctxBackend{newMem(1 << 20)}}
	type step struct {
		opt      uint32
		data     []byte
		wantType []uint32 // reply types in order
	}
	cases := []struct {
		name  string
		steps []step
	}{
		{"unknown option", []step{{opt: 99, wantType: []uint32{repErrUnsup}}}},
		{"starttls unsupported", []step{{opt: optStartTLS, wantType: []uint32{repErrUnsup}}}},
		{"list", []step{{opt: optList, wantType: []uint32{repServer, repAck}}}},
		{"list with data", []step{{opt: optList, data: []byte{1}, wantType: []uint32{repErrInvalid}}}},
		{"info unknown export", []step{{opt: optInfo, data: goData("nope"), wantType: []uint32{repErrUnknown}}}},
		{"info malformed", []step{{opt: optInfo, data: []byte{0, 0, 0, 9, 'x'}, wantType: []uint32{repErrInvalid}}}},
		{"info name length lies", []step{{opt: optInfo, data: append(goData("disk"), 0), wantType: []uint32{repErrInvalid}}}},
		{"info", []step{{opt: optInfo, data: goData("disk", infoName, infoDescription, infoBlockSize),
			wantType: []uint32{repInfo, repInfo, repInfo, repInfo, repAck}}}},
		{"meta before structured", []step{{opt: optListMetaContext, data: metaData("disk"), wantType: []uint32{repErrInvalid}}}},
		{"structured twice", []step{
			{opt: optStructuredReply, wantType: []uint32{repAck}},
			{opt: optStructuredReply, wantType: []uint32{repErrInvalid}}}},
		{"list all contexts", []step{
			{opt: optStructuredReply, wantType: []uint32{repAck}},
			{opt: optListMetaContext, data: metaData("disk"), wantType: []uint32{repMetaContext, repMetaContext, repMetaContext, repMetaContext, repAck}}}},
		{"list bitmaps", []step{
			{opt: optStructuredReply, wantType: []uint32{repAck}},
			{opt: optListMetaContext, data: metaData("disk", "qemu:dirty-bitmap:"), wantType: []uint32{repMetaContext, repMetaContext, repAck}}}},
		{"too many queries", []step{
			{opt: optStructuredReply, wantType: []uint32{repAck}},
			{opt: optSetMetaContext, data: binary.BigEndian.AppendUint32(metaData("disk")[:8], 1<<30), wantType: []uint32{repErrInvalid}}}},
		{"oversized option", []step{{opt: optInfo, data: make([]byte, maxOptionSize+1), wantType: []uint32{repErrTooBig}}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := startServer(t, exp)
			for _, s := range tc.steps {
				c.option(s.opt, s.data)
				for i, w := range s.wantType {
					r := c.reply()
					if r.opt != s.opt || r.typ != w {
						t.Fatalf("option %d reply %d: opt %d type %#x, want %#x (%q)", s.opt, i, r.opt, r.typ, w, r.data)
					}
				}
			}
			c.option(optAbort, nil)
			if r := c.reply(); r.typ != repAck {
				t.Fatalf("abort: reply %#x", r.typ)
			}
		})
	}
}

// TestMetaContextIDs checks the IDs qemu-nbd uses on the wire: 0 for
// base:allocation, 1 for qemu:allocation-depth, 2.. for bitmaps, and the
// extents each context returns through BLOCK_STATUS.
func TestMetaContextIDs(t *testing.T) {
	exp := &Export{Name: "disk", Backend: ctxBackend{newMem(1 << 20)}}
	c := startServer(t, exp)
	c.option(optStructuredReply, nil)
	c.reply()
	c.option(optSetMetaContext, metaData("disk", "base:allocation", "qemu:dirty-bitmap:b1", "qemu:allocation-depth", "qemu:nope"))
	var got []string
	for {
		r := c.reply()
		if r.typ == repAck {
			break
		}
		got = append(got, fmt.Sprintf("%d=%s", binary.BigEndian.Uint32(r.data), r.data[4:]))
	}
	want := []string{"0=base:allocation", "2=qemu:dirty-bitmap:b1", "1=qemu:allocation-depth"}
	if len(got) != len(want) {
		t.Fatalf("contexts %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("contexts %v, want %v", got, want)
		}
	}
	c.option(optGo, goData("disk"))
	for r := c.reply(); r.typ != repAck; r = c.reply() {
	}
	rc := &rawClient{t: t, conn: c.conn}
	rc.send(0, nbdCmdBlockStatus, 9, 0, 16384, nil)
	type ext struct{ id, n, fl uint32 }
	var exts []ext
	for done := false; !done; {
		var h [20]byte
		if _, err := io.ReadFull(c.conn, h[:]); err != nil {
			t.Fatal(err)
		}
		if binary.BigEndian.Uint32(h[0:]) != structuredMagic || binary.BigEndian.Uint16(h[6:]) != replyTypeBlockStatus || binary.BigEndian.Uint64(h[8:]) != 9 {
			t.Fatalf("chunk header %x", h)
		}
		done = binary.BigEndian.Uint16(h[4:])&replyFlagDone != 0
		p := make([]byte, binary.BigEndian.Uint32(h[16:]))
		io.ReadFull(c.conn, p)
		id := binary.BigEndian.Uint32(p)
		for p = p[4:]; len(p) >= 8; p = p[8:] {
			exts = append(exts, ext{id, binary.BigEndian.Uint32(p), binary.BigEndian.Uint32(p[4:])})
		}
	}
	want2 := []ext{{0, 4096, 0}, {0, 12288, 3}, {2, 8192, 0}, {2, 8192, 1}, {1, 4096, 1}, {1, 12288, 0}}
	if len(exts) != len(want2) {
		t.Fatalf("extents %v, want %v", exts, want2)
	}
	for i := range want2 {
		if exts[i] != want2[i] {
			t.Fatalf("extents %v, want %v", exts, want2)
		}
	}
	// REQ_ONE: one extent per context.
	rc.send(cmdFlagReqOne, nbdCmdBlockStatus, 10, 0, 16384, nil)
	n := 0
	for done := false; !done; n++ {
		var h [20]byte
		io.ReadFull(c.conn, h[:])
		done = binary.BigEndian.Uint16(h[4:])&replyFlagDone != 0
		if l := binary.BigEndian.Uint32(h[16:]); l != 12 {
			t.Fatalf("REQ_ONE chunk of %d bytes, want 12", l)
		}
		io.ReadFull(c.conn, make([]byte, 12))
	}
	if n != 3 {
		t.Fatalf("%d chunks, want 3", n)
	}
	rc.send(0, nbdCmdDisc, 0, 0, 0, nil)
	rc.expectClosed()
}

func TestHandshakeHostile(t *testing.T) {
	exp := &Export{Backend: newMem(1 << 20)}
	cases := []struct {
		name string
		send []byte
	}{
		{"bad client flags", binary.BigEndian.AppendUint32(nil, 1<<7)},
		{"bad option magic", append(binary.BigEndian.AppendUint32(nil, 3), bytes.Repeat([]byte{0xff}, 16)...)},
		{"half option header", append(binary.BigEndian.AppendUint32(nil, 3), 0x49, 0x48)},
		{"unknown export name", func() []byte {
			b := binary.BigEndian.AppendUint32(nil, 3)
			b = binary.BigEndian.AppendUint64(b, optMagic)
			b = binary.BigEndian.AppendUint32(b, optExportName)
			b = binary.BigEndian.AppendUint32(b, 4)
			return append(b, "nope"...)
		}()},
		{"option length lies", func() []byte {
			b := binary.BigEndian.AppendUint32(nil, 3)
			b = binary.BigEndian.AppendUint64(b, optMagic)
			b = binary.BigEndian.AppendUint32(b, optGo)
			return binary.BigEndian.AppendUint32(b, 1<<31)
		}()},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv, err := NewServer(ServerOptions{HandshakeTimeout: 5 * time.Second}, exp)
			if err != nil {
				t.Fatal(err)
			}
			a, b := unixPair(t)
			done := make(chan error, 1)
			go func() { done <- srv.ServeConn(context.Background(), a) }()
			b.SetDeadline(time.Now().Add(10 * time.Second))
			io.ReadFull(b, make([]byte, 18))
			b.Write(tc.send)
			b.(*net.UnixConn).CloseWrite()
			select {
			case err := <-done:
				if !errors.Is(err, ErrProtocol) && !errors.Is(err, ErrUnknownExport) {
					t.Fatalf("ServeConn: %v, want a protocol error", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("ServeConn hung")
			}
			b.Close()
		})
	}
}

// TestExportNameOption covers the oldest way in: NBD_OPT_EXPORT_NAME.
func TestExportNameOption(t *testing.T) {
	mem := newMem(1 << 20)
	c := startServer(t, &Export{Name: "x", Backend: mem})
	c.option(optExportName, []byte("x"))
	var b [10]byte
	if _, err := io.ReadFull(c.conn, b[:]); err != nil {
		t.Fatal(err)
	}
	if binary.BigEndian.Uint64(b[:]) != 1<<20 || binary.BigEndian.Uint16(b[8:]) != (&Export{}).TransmissionFlags() {
		t.Fatalf("export reply %x", b)
	}
	rc := &rawClient{t: t, conn: c.conn}
	rc.send(0, nbdCmdWrite, 1, 0, 3, []byte("abc"))
	if e, _, _ := rc.simpleReply(0); e != 0 {
		t.Fatalf("write errno %d", e)
	}
	rc.send(0, nbdCmdDisc, 0, 0, 0, nil)
	rc.expectClosed()
	if string(mem.data[:3]) != "abc" {
		t.Fatal("write lost")
	}
}

// slowBackend holds reads until released, to have requests in flight.
type slowBackend struct {
	*memBackend
	started chan struct{}
	release chan struct{}
}

func (s slowBackend) ReadAt(ctx context.Context, p []byte, off int64) error {
	s.started <- struct{}{}
	<-s.release
	return s.memBackend.ReadAt(ctx, p, off)
}

// Shutdown answers the requests in flight, then closes the connection.
func TestShutdownAnswersInFlight(t *testing.T) {
	be := slowBackend{newMem(1 << 20), make(chan struct{}, 8), make(chan struct{})}
	srv, err := NewServer(ServerOptions{}, &Export{Backend: be})
	if err != nil {
		t.Fatal(err)
	}
	a, b := unixPair(t)
	defer b.Close()
	go srv.ServeConn(context.Background(), a)
	b.SetDeadline(time.Now().Add(10 * time.Second))
	io.ReadFull(b, make([]byte, 18))
	c := &optClient{t: t, conn: b}
	b.Write(binary.BigEndian.AppendUint32(nil, clientFlagFixedNewstyle|clientFlagNoZeroes))
	c.option(optExportName, nil)
	io.ReadFull(b, make([]byte, 10))
	rc := &rawClient{t: t, conn: b}
	rc.send(0, nbdCmdRead, 1, 0, 512, nil)
	rc.send(0, nbdCmdRead, 2, 512, 512, nil)
	<-be.started
	<-be.started
	shut := make(chan error, 1)
	go func() { shut <- srv.Shutdown(context.Background()) }()
	time.Sleep(50 * time.Millisecond) // let Shutdown stop the receiver first
	close(be.release)
	got := map[uint64]bool{}
	for range 2 {
		e, ck, _ := rc.simpleReply(512)
		if e != 0 {
			t.Fatalf("cookie %d errno %d", ck, e)
		}
		got[ck] = true
	}
	if !got[1] || !got[2] {
		t.Fatalf("replies %v", got)
	}
	rc.expectClosed()
	if err := <-shut; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}

// With MaxConnections 1 a second client waits in the backlog until the first
// leaves, as with qemu-nbd -e 1.
func TestMaxConnections(t *testing.T) {
	srv, err := NewServer(ServerOptions{MaxConnections: 1}, &Export{Backend: newMem(1 << 20)})
	if err != nil {
		t.Fatal(err)
	}
	sock := t.TempDir() + "/s"
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(context.Background(), ln) }()
	greet := func(c net.Conn, d time.Duration) error {
		c.SetReadDeadline(time.Now().Add(d))
		_, err := io.ReadFull(c, make([]byte, 18))
		return err
	}
	c1, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	if err := greet(c1, 10*time.Second); err != nil {
		t.Fatalf("first client: %v", err)
	}
	c2, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if err := greet(c2, 200*time.Millisecond); err == nil {
		t.Fatal("second client served while the first is connected")
	}
	c1.Close()
	if err := greet(c2, 10*time.Second); err != nil {
		t.Fatalf("second client after the first left: %v", err)
	}
	if err := srv.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("Serve: %v", err)
	}
}

type chunkRead struct {
	flags, typ uint16
	cookie     uint64
	payload    []byte
}

func readChunk(t *testing.T, c net.Conn) chunkRead {
	t.Helper()
	var h [20]byte
	if _, err := io.ReadFull(c, h[:]); err != nil {
		t.Fatal(err)
	}
	if m := binary.BigEndian.Uint32(h[0:]); m != structuredMagic {
		t.Fatalf("chunk magic %#x", m)
	}
	r := chunkRead{flags: binary.BigEndian.Uint16(h[4:]), typ: binary.BigEndian.Uint16(h[6:]), cookie: binary.BigEndian.Uint64(h[8:])}
	r.payload = make([]byte, binary.BigEndian.Uint32(h[16:]))
	if _, err := io.ReadFull(c, r.payload); err != nil {
		t.Fatal(err)
	}
	return r
}

// Structured reads: holes as OFFSET_HOLE, data as OFFSET_DATA, DF as one
// data chunk, errors as an ERROR chunk with the errno and a message.
func TestStructuredReads(t *testing.T) {
	mem := newMem(1 << 20)
	copy(mem.data[4096:8192], pattern(4096, 5))
	mem.failAt, mem.failErr = 900000, fmt.Errorf("boom: %w", nbdattach.ErrNoSpace)
	c := startServer(t, &Export{Backend: ctxBackend{mem}})
	c.option(optStructuredReply, nil)
	c.reply()
	c.option(optGo, goData(""))
	for r := c.reply(); r.typ != repAck; r = c.reply() {
	}
	rc := &rawClient{t: t, conn: c.conn}

	// ctxBackend: [0,4096) data, [4096, ...) hole|zero. 128 KiB read.
	rc.send(0, nbdCmdRead, 1, 0, 128<<10, nil)
	ch := readChunk(t, c.conn)
	if ch.typ != replyTypeOffsetData || ch.flags != 0 || binary.BigEndian.Uint64(ch.payload) != 0 || len(ch.payload) != 8+4096 {
		t.Fatalf("first chunk type %d flags %d len %d", ch.typ, ch.flags, len(ch.payload))
	}
	ch = readChunk(t, c.conn)
	if ch.typ != replyTypeOffsetHole || ch.flags != replyFlagDone ||
		binary.BigEndian.Uint64(ch.payload) != 4096 || binary.BigEndian.Uint32(ch.payload[8:]) != 128<<10-4096 {
		t.Fatalf("hole chunk type %d flags %d payload %x", ch.typ, ch.flags, ch.payload)
	}

	// DF: one data chunk with every byte, holes included.
	rc.send(cmdFlagDF, nbdCmdRead, 2, 0, 128<<10, nil)
	ch = readChunk(t, c.conn)
	if ch.typ != replyTypeOffsetData || ch.flags != replyFlagDone || len(ch.payload) != 8+128<<10 ||
		!bytes.Equal(ch.payload[8+4096:8+8192], pattern(4096, 5)) {
		t.Fatalf("DF chunk type %d flags %d len %d", ch.typ, ch.flags, len(ch.payload))
	}

	// Small reads: zeroes as one hole chunk (the backend is not asked for
	// block status), data as data, and with DF the zeroes themselves.
	for _, tc := range []struct {
		flags  uint16
		off    uint64
		hole   bool
		cookie uint64
	}{{0, 8192, true, 10}, {0, 4096, false, 11}, {cmdFlagDF, 8192, false, 12}} {
		rc.send(tc.flags, nbdCmdRead, tc.cookie, tc.off, 4096, nil)
		ch = readChunk(t, c.conn)
		if ch.cookie != tc.cookie || ch.flags != replyFlagDone || binary.BigEndian.Uint64(ch.payload) != tc.off {
			t.Fatalf("4k read at %d flags %d: chunk %+v", tc.off, tc.flags, ch)
		}
		switch {
		case tc.hole && (ch.typ != replyTypeOffsetHole || len(ch.payload) != 12 || binary.BigEndian.Uint32(ch.payload[8:]) != 4096):
			t.Fatalf("4k read of zeroes at %d: chunk type %d payload %x, want one hole of 4096", tc.off, ch.typ, ch.payload)
		case !tc.hole && (ch.typ != replyTypeOffsetData || !bytes.Equal(ch.payload[8:], mem.data[tc.off:tc.off+4096])):
			t.Fatalf("4k read at %d flags %d: chunk type %d len %d, want the data", tc.off, tc.flags, ch.typ, len(ch.payload))
		}
	}

	// A backend error: ERROR chunk, ENOSPC, with a message.
	rc.send(0, nbdCmdRead, 3, 899840, 4096, nil)
	ch = readChunk(t, c.conn)
	if ch.typ != replyTypeError || ch.flags != replyFlagDone || ch.cookie != 3 ||
		binary.BigEndian.Uint32(ch.payload) != nbdENOSPC ||
		int(binary.BigEndian.Uint16(ch.payload[4:])) != len(ch.payload)-6 || !bytes.Contains(ch.payload, []byte("boom")) {
		t.Fatalf("error chunk type %#x flags %d payload %q", ch.typ, ch.flags, ch.payload)
	}
	// Other commands: one NONE chunk.
	rc.send(0, nbdCmdFlush, 4, 0, 0, nil)
	if ch = readChunk(t, c.conn); ch.typ != replyTypeNone || ch.flags != replyFlagDone || len(ch.payload) != 0 {
		t.Fatalf("flush chunk %+v", ch)
	}
	rc.send(0, nbdCmdDisc, 0, 0, 0, nil)
	rc.expectClosed()
}
