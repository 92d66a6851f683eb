package nbd

import (
	"context"
	"encoding/binary"
	"io"
	"testing"
)

// benchTransmission pipelines qd requests of bs bytes over a socketpair and
// measures the server's turnaround (the client is minimal, so the profile is
// the server's).
func benchTransmission(b *testing.B, typ uint16, bs, qd int) {
	mem := newMem(64 << 20)
	a, c := unixPair(b)
	go ServeTransmission(context.Background(), a, &Export{Backend: mem})
	defer c.Close()
	blocks := int64(len(mem.data) / bs)
	req := make([]byte, 28+bs)
	send := func(i int) {
		binary.BigEndian.PutUint32(req[0:], requestMagic)
		binary.BigEndian.PutUint16(req[6:], typ)
		binary.BigEndian.PutUint64(req[8:], uint64(i))
		binary.BigEndian.PutUint64(req[16:], uint64((int64(i)*7919)%blocks)*uint64(bs))
		binary.BigEndian.PutUint32(req[24:], uint32(bs))
		n := 28
		if typ == nbdCmdWrite {
			n += bs
		}
		if _, err := c.Write(req[:n]); err != nil {
			b.Fatal(err)
		}
	}
	done := make(chan error, 1)
	go func() {
		hdr := make([]byte, 16)
		data := make([]byte, bs)
		for range b.N {
			if _, err := io.ReadFull(c, hdr); err != nil {
				done <- err
				return
			}
			if typ == nbdCmdRead {
				if _, err := io.ReadFull(c, data); err != nil {
					done <- err
					return
				}
			}
		}
		done <- nil
	}()
	b.SetBytes(int64(bs))
	b.ResetTimer()
	// Keep qd requests outstanding: the reader's progress is not visible
	// here, so send in windows of qd and let the socket buffer the rest.
	for i := range b.N {
		send(i)
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	_ = qd
}

func BenchmarkTransmissionRead4k(b *testing.B)  { benchTransmission(b, nbdCmdRead, 4096, 32) }
func BenchmarkTransmissionWrite4k(b *testing.B) { benchTransmission(b, nbdCmdWrite, 4096, 32) }
func BenchmarkTransmissionRead1M(b *testing.B)  { benchTransmission(b, nbdCmdRead, 1<<20, 8) }
