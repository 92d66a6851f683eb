package nbd

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// memBackend is an in-memory Backend with injectable errors.
type memBackend struct {
	mu      sync.Mutex
	data    []byte
	flushes int
	failAt  int64 // reads/writes touching this offset fail with failErr
	failErr error
}

func newMem(size int) *memBackend { return &memBackend{data: make([]byte, size), failAt: -1} }

func (m *memBackend) Size() int64 { m.mu.Lock(); defer m.mu.Unlock(); return int64(len(m.data)) }

func (m *memBackend) fail(off int64, n int) error {
	if m.failAt >= off && m.failAt < off+int64(n) {
		return m.failErr
	}
	return nil
}

func (m *memBackend) ReadAt(_ context.Context, p []byte, off int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.fail(off, len(p)); err != nil {
		return err
	}
	copy(p, m.data[off:])
	return nil
}

func (m *memBackend) WriteAt(_ context.Context, p []byte, off int64, _ bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.fail(off, len(p)); err != nil {
		return err
	}
	copy(m.data[off:], p)
	return nil
}

func (m *memBackend) Flush(context.Context) error {
	m.mu.Lock()
	m.flushes++
	m.mu.Unlock()
	return nil
}

func (m *memBackend) Trim(ctx context.Context, off, n int64) error {
	return m.WriteZeroes(ctx, off, n, nbdattach.ZeroFlags{})
}

func (m *memBackend) WriteZeroes(_ context.Context, off, n int64, fl nbdattach.ZeroFlags) error {
	if fl.Fast {
		return nbdattach.ErrNotSupported
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+n])
	return nil
}

// rawClient speaks the transmission phase by hand, so tests can send what no
// real client would.
type rawClient struct {
	t    testing.TB
	conn net.Conn
}

func (c *rawClient) send(flags, typ uint16, cookie, off uint64, length uint32, payload []byte) {
	c.t.Helper()
	var h [28]byte
	binary.BigEndian.PutUint32(h[0:], requestMagic)
	binary.BigEndian.PutUint16(h[4:], flags)
	binary.BigEndian.PutUint16(h[6:], typ)
	binary.BigEndian.PutUint64(h[8:], cookie)
	binary.BigEndian.PutUint64(h[16:], off)
	binary.BigEndian.PutUint32(h[24:], length)
	c.conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.conn.Write(append(h[:], payload...)); err != nil {
		c.t.Fatalf("send: %v", err)
	}
}

// simpleReply reads one simple reply, and n data bytes when it succeeded.
func (c *rawClient) simpleReply(n int) (errno uint32, cookie uint64, data []byte) {
	c.t.Helper()
	c.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	var h [16]byte
	if _, err := io.ReadFull(c.conn, h[:]); err != nil {
		c.t.Fatalf("reading reply: %v", err)
	}
	if m := binary.BigEndian.Uint32(h[0:]); m != simpleMagic {
		c.t.Fatalf("reply magic %#x", m)
	}
	errno = binary.BigEndian.Uint32(h[4:])
	cookie = binary.BigEndian.Uint64(h[8:])
	if errno == 0 && n > 0 {
		data = make([]byte, n)
		if _, err := io.ReadFull(c.conn, data); err != nil {
			c.t.Fatalf("reading data: %v", err)
		}
	}
	return errno, cookie, data
}

// expectClosed asserts that the server closes the connection (EOF) without
// sending anything more, within a deadline.
func (c *rawClient) expectClosed() {
	c.t.Helper()
	c.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := io.ReadAll(c.conn)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		c.t.Fatalf("server did not close the connection (hang)")
	}
	if len(b) != 0 {
		c.t.Fatalf("server sent %d unexpected bytes before closing: %x", len(b), b[:min(len(b), 32)])
	}
}

// unixPair returns two connected unix stream sockets, as the kernel attach
// uses them.
func unixPair(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	mk := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "sock")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	return mk(fds[0]), mk(fds[1])
}

// startTransmission serves exp on one end of a socketpair and returns a raw
// client on the other, and a function that waits for the server to return.
func startTransmission(t testing.TB, exp *Export) (*rawClient, func() error) {
	t.Helper()
	a, b := unixPair(t)
	errc := make(chan error, 1)
	go func() { errc <- ServeTransmission(context.Background(), a, exp) }()
	t.Cleanup(func() { b.Close() })
	return &rawClient{t: t, conn: b}, func() error {
		select {
		case err := <-errc:
			return err
		case <-time.After(10 * time.Second):
			t.Fatal("ServeTransmission did not return")
			return nil
		}
	}
}

func tempFile(t testing.TB, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	return p
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) + seed
	}
	return b
}
