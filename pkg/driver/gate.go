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
//
// A group snapshot quiesces the volume at the same place (pause): the
// requests inside finish, new ones wait, on nbd and fuse alike, until
// resume. Every attach path passes the gate (stagedVolume.gated), so this
// is the one quiesce of the driver.
type gate struct {
	be   nbdattach.Backend
	hold bool

	mu     sync.Mutex
	closed bool
	// paused is non-nil while the gate is paused; resume closes it.
	paused chan struct{}
	// inside counts the requests past the gate; idle, when non-nil, is
	// closed when it drops to zero (a sync.WaitGroup may not be reused
	// while a Wait that gave up is still pending, and pause gives up).
	inside int
	idle   chan struct{}
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
	for {
		g.mu.Lock()
		paused := g.paused
		if !g.closed && paused == nil {
			g.inside++
			g.mu.Unlock()
			return nil
		}
		closed := g.closed
		g.mu.Unlock()
		if closed {
			break
		}
		select {
		case <-paused:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if g.hold {
		<-ctx.Done()
		return fmt.Errorf("%w: %w", errShuttingDown, ctx.Err())
	}
	return errShuttingDown
}

func (g *gate) leave() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.inside--; g.inside == 0 && g.idle != nil {
		close(g.idle)
		g.idle = nil
	}
}

// drain waits until no request is inside, or for ctx.
func (g *gate) drain(ctx context.Context) error {
	g.mu.Lock()
	if g.inside == 0 {
		g.mu.Unlock()
		return nil
	}
	if g.idle == nil {
		g.idle = make(chan struct{})
	}
	idle := g.idle
	g.mu.Unlock()
	select {
	case <-idle:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("requests in flight did not finish: %w", ctx.Err())
	}
}

// close lets no new request in and waits for those inside, or for ctx.
func (g *gate) close(ctx context.Context) error {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
	return g.drain(ctx)
}

// pause holds new requests and waits for those inside to finish, or for
// ctx (the gate is then resumed before the error returns). The caller
// calls resume once done, whatever happens.
func (g *gate) pause(ctx context.Context) error {
	g.mu.Lock()
	if g.paused != nil {
		g.mu.Unlock()
		return errors.New("the volume's I/O is already held (a group snapshot in progress)")
	}
	g.paused = make(chan struct{})
	g.mu.Unlock()
	if err := g.drain(ctx); err != nil {
		g.resume()
		return err
	}
	return nil
}

// resume lets the held requests in; it is a no-op on a gate not paused.
func (g *gate) resume() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.paused != nil {
		close(g.paused)
		g.paused = nil
	}
}

func (g *gate) Size() int64 { return g.be.Size() }

func (g *gate) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := g.enter(ctx); err != nil {
		return err
	}
	defer g.leave()
	return g.be.ReadAt(ctx, p, off)
}

func (g *gate) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := g.enter(ctx); err != nil {
		return err
	}
	defer g.leave()
	return g.be.WriteAt(ctx, p, off, fua)
}

func (g *gate) Flush(ctx context.Context) error {
	if err := g.enter(ctx); err != nil {
		return err
	}
	defer g.leave()
	return g.be.Flush(ctx)
}

func (g *gate) Trim(ctx context.Context, off, length int64) error {
	if err := g.enter(ctx); err != nil {
		return err
	}
	defer g.leave()
	return g.be.Trim(ctx, off, length)
}

func (g *gate) WriteZeroes(ctx context.Context, off, length int64, flags nbdattach.ZeroFlags) error {
	if err := g.enter(ctx); err != nil {
		return err
	}
	defer g.leave()
	return g.be.WriteZeroes(ctx, off, length, flags)
}

// KnownZero implements nbdattach.ZeroProber: the backend's look, while the
// gate lets requests in. A paused or closed gate answers false, so the read
// goes the way every request goes, and waits at the gate.
func (g *gate) KnownZero(off, length int64) bool {
	zp, ok := g.be.(nbdattach.ZeroProber)
	if !ok || !g.mu.TryLock() {
		return false
	}
	open := !g.closed && g.paused == nil
	g.mu.Unlock()
	return open && zp.KnownZero(off, length)
}

type blockStatusGate struct{ *gate }

func (g blockStatusGate) BlockStatus(ctx context.Context, off, length int64) ([]nbdattach.Extent, error) {
	if err := g.enter(ctx); err != nil {
		return nil, err
	}
	defer g.leave()
	return g.be.(nbdattach.BlockStatuser).BlockStatus(ctx, off, length)
}
