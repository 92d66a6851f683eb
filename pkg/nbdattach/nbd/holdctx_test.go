package nbd

import (
	"context"
	"testing"
	"time"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// holdingBackend holds every write back in its hold context, as a throttle
// does, and tells how the hold ended.
type holdingBackend struct {
	*memBackend
	entered chan struct{}
	release chan struct{}
	ended   chan string
}

func (h *holdingBackend) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	h.entered <- struct{}{}
	select {
	case <-nbdattach.HoldContext(ctx).Done():
		if ctx.Err() != nil {
			h.ended <- "the I/O context ended too"
		} else {
			h.ended <- "dropped"
		}
		return nbdattach.HoldContext(ctx).Err()
	case <-h.release:
		h.ended <- "released"
		return h.memBackend.WriteAt(ctx, p, off, fua)
	}
}

// A request held back before its I/O is dropped when the client closes the
// connection (the kernel's I/O timeout): its stale write never runs. After
// a DISC, what was sent is still served.
func TestServeTransmissionDropsHeldRequests(t *testing.T) {
	for _, tc := range []struct {
		name string
		end  func(c *rawClient)
		want string
	}{
		{"close", func(c *rawClient) { c.conn.Close() }, "dropped"},
		{"disc", func(c *rawClient) { c.send(0, nbdCmdDisc, 2, 0, 0, nil) }, "released"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			be := &holdingBackend{newMem(1 << 20), make(chan struct{}, 1), make(chan struct{}), make(chan string, 1)}
			c, wait := startTransmission(t, &Export{Backend: be, MinBlock: 512})
			c.send(0, nbdCmdWrite, 1, 0, 4096, pattern(4096, 1))
			<-be.entered
			tc.end(c)
			select {
			case got := <-be.ended:
				if got != tc.want {
					t.Fatalf("the held write was %s, want %s", got, tc.want)
				}
			case <-time.After(time.Second):
				if tc.want != "released" {
					t.Fatal("the held write is still held a second after the client closed the connection")
				}
				close(be.release)
				if got := <-be.ended; got != tc.want {
					t.Fatalf("the held write was %s, want %s", got, tc.want)
				}
			}
			if err := wait(); err != nil && tc.name == "disc" {
				t.Fatalf("ServeTransmission: %v", err)
			}
		})
	}
}
