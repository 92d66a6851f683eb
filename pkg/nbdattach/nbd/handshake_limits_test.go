package nbd

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// An option header claiming gigabytes of data is refused at once with
// NBD_REP_ERR_TOO_BIG and a hard disconnect, without waiting for (or
// draining) data that may never come: with an hour of handshake time
// left, the client still hears back and the connection ends.
func TestOptionClaimingGigabytesRefusedAtOnce(t *testing.T) {
	for _, n := range []uint32{maxOptionDrain + 1, 1 << 31, 0xffffffff} {
		srv, err := NewServer(ServerOptions{HandshakeTimeout: time.Hour}, &Export{Backend: newMem(1 << 20)})
		if err != nil {
			t.Fatal(err)
		}
		a, b := unixPair(t)
		done := make(chan error, 1)
		go func() { done <- srv.ServeConn(context.Background(), a) }()
		// The guard only keeps a broken server from hanging the test.
		b.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(b, make([]byte, 18)); err != nil {
			t.Fatal(err)
		}
		hdr := binary.BigEndian.AppendUint32(nil, clientFlagFixedNewstyle|clientFlagNoZeroes)
		hdr = binary.BigEndian.AppendUint64(hdr, optMagic)
		hdr = binary.BigEndian.AppendUint32(hdr, optGo)
		hdr = binary.BigEndian.AppendUint32(hdr, n)
		if _, err := b.Write(hdr); err != nil {
			t.Fatal(err)
		}
		c := &optClient{t: t, conn: b}
		if r := c.reply(); r.opt != optGo || r.typ != repErrTooBig {
			t.Fatalf("%d-byte option: reply %+v, want NBD_REP_ERR_TOO_BIG for NBD_OPT_GO", n, r)
		}
		if _, err := b.Read(make([]byte, 1)); err != io.EOF {
			t.Fatalf("%d-byte option: after the refusal the connection gave %v, want EOF (hard disconnect)", n, err)
		}
		if err := <-done; !errors.Is(err, ErrProtocol) {
			t.Fatalf("ServeConn: %v, want ErrProtocol", err)
		}
		b.Close()
	}
}

// The handshake limit defaults to qemu-nbd's 10 s.
func TestHandshakeTimeoutDefault(t *testing.T) {
	srv, err := NewServer(ServerOptions{}, &Export{Backend: newMem(1 << 20)})
	if err != nil {
		t.Fatal(err)
	}
	if got := srv.opts.HandshakeTimeout; got != 10*time.Second {
		t.Fatalf("default handshake timeout %v, want 10s (qemu-nbd's)", got)
	}
}

// With one slot (qemu-nbd -e 1), a client that connects and never
// negotiates is dropped when the handshake time runs out, and the next
// client is served.
func TestIdleClientLosesTheOnlySlot(t *testing.T) {
	srv, err := NewServer(ServerOptions{MaxConnections: 1, HandshakeTimeout: 300 * time.Millisecond}, &Export{Backend: newMem(1 << 20)})
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
	idle, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	idle.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(idle, make([]byte, 18)); err != nil {
		t.Fatal(err)
	}
	next, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer next.Close()
	next.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(next, make([]byte, 18)); err != nil {
		t.Fatalf("next client never greeted: %v", err)
	}
	if _, err := idle.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("idle client: %v, want EOF (dropped at the handshake limit)", err)
	}
	if err := srv.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("Serve: %v", err)
	}
}
