package driver

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// errShuttingDown answers device I/O that reaches a volume whose image the
// plugin has closed on its way out (fuse: the kernel sees EIO, as it would
// a moment later from the dead process).
var errShuttingDown = errors.New("the node plugin is shutting down")

// gate sits between an attach backend and a staged volume's image, so that
// a plugin that exits can close the image cleanly (dirty bitmaps stored,
// in_use cleared) while the kernel device stays: Shutdown closes the gate,
// waits for the requests inside to finish, then closes the image. Requests
// arriving after that never touch the closed image: with hold (nbd, whose
// kernel requeues unanswered requests for the next process) they wait
// unanswered until their connection ends; otherwise (fuse) they fail.
type gate struct {
	be       nbdattach.Backend
	hold     bool
	mu       sync.Mutex
	closed   bool
	inflight sync.WaitGroup
}

// newGate wraps be, keeping its optional BlockStatuser capability.
func newGate(be nbdattach.Backend, hold bool) (nbdattach.Backend, *gate) {
	g := &gate{be: be, hold: hold}
	if _, ok := be.(nbdattach.BlockStatuser); ok {
		return blockStatusGate{g}, g
	}
	return g, g
}

func (g *gate) enter(ctx context.Context) error {
	g.mu.Lock()
	if !g.closed {
		g.inflight.Add(1)
		g.mu.Unlock()
		return nil
	}
	g.mu.Unlock()
	if g.hold {
		<-ctx.Done()
		return fmt.Errorf("%w: %w", errShuttingDown, ctx.Err())
	}
	return errShuttingDown
}

// close lets no new request in and waits for those inside, or for ctx.
func (g *gate) close(ctx context.Context) error {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
	done := make(chan struct{})
	go func() { g.inflight.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("requests in flight did not finish: %w", ctx.Err())
	}
}

func (g *gate) Size() int64 { return g.be.Size() }

func (g *gate) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := g.enter(ctx); err != nil {
		return err
	}
	defer g.inflight.Done()
	return g.be.ReadAt(ctx, p, off)
}

func (g *gate) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := g.enter(ctx); err != nil {
		return err
	}
	defer g.inflight.Done()
	return g.be.WriteAt(ctx, p, off, fua)
}

func (g *gate) Flush(ctx context.Context) error {
	if err := g.enter(ctx); err != nil {
		return err
	}
	defer g.inflight.Done()
	return g.be.Flush(ctx)
}

func (g *gate) Trim(ctx context.Context, off, length int64) error {
	if err := g.enter(ctx); err != nil {
		return err
	}
	defer g.inflight.Done()
	return g.be.Trim(ctx, off, length)
}

func (g *gate) WriteZeroes(ctx context.Context, off, length int64, flags nbdattach.ZeroFlags) error {
	if err := g.enter(ctx); err != nil {
		return err
	}
	defer g.inflight.Done()
	return g.be.WriteZeroes(ctx, off, length, flags)
}

type blockStatusGate struct{ *gate }

func (g blockStatusGate) BlockStatus(ctx context.Context, off, length int64) ([]nbdattach.Extent, error) {
	if err := g.enter(ctx); err != nil {
		return nil, err
	}
	defer g.inflight.Done()
	return g.be.(nbdattach.BlockStatuser).BlockStatus(ctx, off, length)
}
