package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"testing"
	"time"
)

// fuzzConn is a net.Conn over fixed input; whatever the server writes is
// dropped. Reads end with EOF, so every session ends.
type fuzzConn struct {
	r *bytes.Reader
}

func (c *fuzzConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c *fuzzConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c *fuzzConn) Close() error                     { return nil }
func (c *fuzzConn) LocalAddr() net.Addr              { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (c *fuzzConn) RemoteAddr() net.Addr             { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (c *fuzzConn) SetDeadline(time.Time) error      { return nil }
func (c *fuzzConn) SetReadDeadline(time.Time) error  { return nil }
func (c *fuzzConn) SetWriteDeadline(time.Time) error { return nil }

func seedSession() []byte {
	b := binary.BigEndian.AppendUint32(nil, clientFlagFixedNewstyle|clientFlagNoZeroes)
	opt := func(o uint32, data []byte) {
		b = binary.BigEndian.AppendUint64(b, optMagic)
		b = binary.BigEndian.AppendUint32(b, o)
		b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
		b = append(b, data...)
	}
	opt(optList, nil)
	opt(optStructuredReply, nil)
	opt(optListMetaContext, metaData("", "qemu:"))
	opt(optSetMetaContext, metaData("", "base:allocation", "qemu:allocation-depth"))
	opt(optGo, goData("", infoBlockSize))
	req := func(flags, typ uint16, off uint64, n uint32, payload []byte) {
		var h [28]byte
		binary.BigEndian.PutUint32(h[0:], requestMagic)
		binary.BigEndian.PutUint16(h[4:], flags)
		binary.BigEndian.PutUint16(h[6:], typ)
		binary.BigEndian.PutUint64(h[16:], off)
		binary.BigEndian.PutUint32(h[24:], n)
		b = append(append(b, h[:]...), payload...)
	}
	req(0, nbdCmdWrite, 512, 8, []byte("abcdefgh"))
	req(0, nbdCmdRead, 0, 4096, nil)
	req(cmdFlagReqOne, nbdCmdBlockStatus, 0, 65536, nil)
	req(cmdFlagNoHole, nbdCmdWriteZeroes, 0, 4096, nil)
	req(0, nbdCmdTrim, 4096, 4096, nil)
	req(0, nbdCmdFlush, 0, 0, nil)
	req(0, nbdCmdDisc, 0, 0, nil)
	return b
}

// FuzzServeConn feeds arbitrary client bytes to the whole server (options,
// then requests): it must end without panicking or hanging.
func FuzzServeConn(f *testing.F) {
	f.Add(seedSession())
	f.Add([]byte{0, 0, 0, 3})
	exp := &Export{Backend: ctxBackend{newMem(1 << 20)}, MaxPayload: 1 << 20}
	srv, err := NewServer(ServerOptions{}, exp)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		srv.ServeConn(context.Background(), &fuzzConn{r: bytes.NewReader(in)})
	})
}

// FuzzTransmission feeds arbitrary requests to ServeTransmission.
func FuzzTransmission(f *testing.F) {
	s := seedSession()
	f.Add(s[bytes.Index(s, binary.BigEndian.AppendUint32(nil, requestMagic)):])
	exp := &Export{Backend: newMem(1 << 20), MaxPayload: 1 << 20, MinBlock: 1}
	f.Fuzz(func(t *testing.T, in []byte) {
		ServeTransmission(context.Background(), &fuzzConn{r: bytes.NewReader(in)}, exp)
	})
}

// FuzzParseMetaRequest checks the meta context decoder: it never reads past
// its input and what it accepts re-encodes to the same bytes.
func FuzzParseMetaRequest(f *testing.F) {
	f.Add(metaData("disk", "base:allocation", "qemu:dirty-bitmap:b"))
	f.Add(metaData(""))
	f.Fuzz(func(t *testing.T, in []byte) {
		r, err := parseMetaRequest(in)
		if err != nil {
			return
		}
		if got := metaData(r.export, r.queries...); !bytes.Equal(got, in) {
			t.Fatalf("round trip %x != %x", got, in)
		}
	})
}
