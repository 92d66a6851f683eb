package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"testing"
	"time"
)

// panicBackend panics on a read or write at offset 0 (a bug in the image
// code, say) and serves every other request from memory.
type panicBackend struct{ *memBackend }

func (b panicBackend) ReadAt(ctx context.Context, p []byte, off int64) error {
	if off == 0 {
		var m map[int]int
		m[1] = 1
	}
	return b.memBackend.ReadAt(ctx, p, off)
}

func (b panicBackend) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if off == 0 {
		panic("write bug")
	}
	return b.memBackend.WriteAt(ctx, p, off, fua)
}

// A backend panic fails that request with EIO; the connection goes on
// serving the requests after it, and ends normally on DISC.
func TestBackendPanicFailsOneRequest(t *testing.T) {
	exp := &Export{Backend: panicBackend{newMem(1 << 20)}}
	c, wait := startTransmission(t, exp)
	data := pattern(4096, 7)
	for i, step := range []struct {
		typ     uint16
		off     uint64
		payload []byte
		errno   uint32
	}{
		{nbdCmdRead, 0, nil, nbdEIO},
		{nbdCmdWrite, 0, data, nbdEIO},
		{nbdCmdWrite, 4096, data, 0},
		{nbdCmdRead, 0, nil, nbdEIO},
	} {
		c.send(0, step.typ, uint64(i), step.off, 4096, step.payload)
		if e, ck, _ := c.simpleReply(0); e != step.errno || ck != uint64(i) {
			t.Fatalf("request %d (cmd %d at %d): errno %d cookie %d, want errno %d", i, step.typ, step.off, e, ck, step.errno)
		}
	}
	c.send(0, nbdCmdRead, 9, 4096, 4096, nil)
	if e, _, got := c.simpleReply(4096); e != 0 || !bytes.Equal(got, data) {
		t.Fatalf("read after the panics: errno %d, data equal %v", e, bytes.Equal(got, data))
	}
	c.send(0, nbdCmdDisc, 10, 0, 0, nil)
	if err := wait(); err != nil {
		t.Fatalf("ServeTransmission: %v", err)
	}
	c.expectClosed()
}

// sizePanicBackend panics in Size, which the handshake and the request
// validation call outside any one request's I/O.
type sizePanicBackend struct{ *memBackend }

func (sizePanicBackend) Size() int64 { panic("size bug") }

// A panic where no single request can take the blame (the handshake, the
// request validation) ends that connection with an error, not the process.
func TestBackendPanicOutsideARequestEndsTheConnection(t *testing.T) {
	exp := &Export{Backend: sizePanicBackend{newMem(1 << 20)}}
	c, wait := startTransmission(t, exp)
	c.send(0, nbdCmdRead, 1, 0, 4096, nil)
	if err := wait(); !errors.Is(err, errBackendPanic) {
		t.Fatalf("ServeTransmission: %v, want errBackendPanic", err)
	}
	c.expectClosed()

	srv, err := NewServer(ServerOptions{}, exp)
	if err != nil {
		t.Fatal(err)
	}
	a, b := unixPair(t)
	defer b.Close()
	done := make(chan error, 1)
	go func() { done <- srv.ServeConn(context.Background(), a) }()
	b.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(b, make([]byte, 18)); err != nil {
		t.Fatal(err)
	}
	msg := binary.BigEndian.AppendUint32(nil, clientFlagFixedNewstyle|clientFlagNoZeroes)
	msg = binary.BigEndian.AppendUint64(msg, optMagic)
	msg = binary.BigEndian.AppendUint32(msg, optGo)
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(goData(""))))
	b.Write(append(msg, goData("")...))
	if err := <-done; !errors.Is(err, errBackendPanic) {
		t.Fatalf("ServeConn: %v, want errBackendPanic", err)
	}
}
