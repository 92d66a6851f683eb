package nbdattach

import (
	"bytes"
	"context"
	"testing"
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
