package driver

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// blockingBackend's WriteAt waits for release; ReadAt returns at once.
type blockingBackend struct {
	entered, release chan struct{}
}

func (b *blockingBackend) Size() int64                                 { return 1 << 20 }
func (b *blockingBackend) ReadAt(context.Context, []byte, int64) error { return nil }
func (b *blockingBackend) Flush(context.Context) error                 { return nil }
func (b *blockingBackend) Trim(context.Context, int64, int64) error    { return nil }
func (b *blockingBackend) BlockStatus(context.Context, int64, int64) ([]nbdattach.Extent, error) {
	return nil, nil
}
func (b *blockingBackend) WriteZeroes(context.Context, int64, int64, nbdattach.ZeroFlags) error {
	return nil
}
func (b *blockingBackend) WriteAt(context.Context, []byte, int64, bool) error {
	b.entered <- struct{}{}
	<-b.release
	return nil
}

// A closing gate waits for the request inside, then keeps every later one
// away from the backend: held until its context ends (nbd) or refused (fuse).
func TestGate(t *testing.T) {
	for _, hold := range []bool{true, false} {
		inner := &blockingBackend{entered: make(chan struct{}), release: make(chan struct{})}
		be, g := newGate(inner, hold)
		if _, ok := be.(nbdattach.BlockStatuser); !ok {
			t.Fatal("the gate hides the backend's BlockStatus")
		}
		wrote := make(chan error, 1)
		go func() { wrote <- be.WriteAt(context.Background(), nil, 0, false) }()
		<-inner.entered
		closed := make(chan error, 1)
		go func() { closed <- g.close(context.Background()) }()
		select {
		case err := <-closed:
			t.Fatalf("close returned %v with a write inside", err)
		case <-time.After(50 * time.Millisecond):
		}
		short, cancel := context.WithTimeout(context.Background(), time.Millisecond)
		if err := g.close(short); err == nil {
			t.Error("close with a write inside and an ended context: no error")
		}
		cancel()
		close(inner.release)
		if err := <-wrote; err != nil {
			t.Fatal(err)
		}
		if err := <-closed; err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		read := make(chan error, 1)
		go func() { read <- be.ReadAt(ctx, nil, 0) }()
		if hold {
			select {
			case err := <-read:
				t.Fatalf("held request answered: %v", err)
			case <-time.After(50 * time.Millisecond):
			}
		}
		cancel()
		if err := <-read; !errors.Is(err, errShuttingDown) {
			t.Errorf("hold %v: request after close: %v", hold, err)
		}
	}
}

// A pausing gate (group snapshots) waits for the request inside, holds
// later ones until resume, refuses a second pause, and gives up (resumed)
// when its context ends before the request inside finishes.
func TestGatePause(t *testing.T) {
	inner := &blockingBackend{entered: make(chan struct{}), release: make(chan struct{})}
	be, g := newGate(inner, true)
	wrote := make(chan error, 1)
	go func() { wrote <- be.WriteAt(context.Background(), nil, 0, false) }()
	<-inner.entered
	short, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	if err := g.pause(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("pause with a write inside past its context: %v", err)
	}
	cancel()
	// Given up: not paused, a read goes through.
	if err := be.ReadAt(context.Background(), nil, 0); err != nil {
		t.Fatalf("read after a pause gave up: %v", err)
	}
	paused := make(chan error, 1)
	go func() { paused <- g.pause(context.Background()) }()
	select {
	case err := <-paused:
		t.Fatalf("pause returned %v with a write inside", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(inner.release)
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	if err := <-paused; err != nil {
		t.Fatal(err)
	}
	if err := g.pause(context.Background()); err == nil {
		t.Error("a second pause of a paused gate: no error")
	}
	read := make(chan error, 1)
	go func() { read <- be.ReadAt(context.Background(), nil, 0) }()
	select {
	case err := <-read:
		t.Fatalf("read went through a paused gate: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	g.resume()
	if err := <-read; err != nil {
		t.Fatalf("held read after resume: %v", err)
	}
	g.resume() // a no-op
	ctx, cancel := context.WithCancel(context.Background())
	if err := g.pause(ctx); err != nil {
		t.Fatal(err)
	}
	go func() { read <- be.ReadAt(ctx, nil, 0) }()
	cancel()
	if err := <-read; !errors.Is(err, context.Canceled) {
		t.Errorf("held read whose context ended: %v", err)
	}
	g.resume()
}

type nopBackend struct{ blockingBackend }

func (*nopBackend) WriteAt(context.Context, []byte, int64, bool) error { return nil }

// BenchmarkGate: what the gate adds to each device request, from parallel
// callers (the nbd server and FUSE serve requests concurrently).
func BenchmarkGate(b *testing.B) {
	for _, gated := range []bool{false, true} {
		var be nbdattach.Backend = &nopBackend{}
		if gated {
			be, _ = newGate(be, true)
		}
		b.Run(map[bool]string{false: "direct", true: "gated"}[gated], func(b *testing.B) {
			ctx := context.Background()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					be.WriteAt(ctx, nil, 0, false)
				}
			})
		})
	}
}

// zeroBackend knows every range reads as zeroes.
type zeroBackend struct{ nopBackend }

func (*zeroBackend) KnownZero(int64, int64) bool { return true }

// The gate passes the zero-read look through while it lets requests in, and
// answers false while paused or closed, so such a read waits like any other.
func TestGateKnownZero(t *testing.T) {
	be, g := newGate(&zeroBackend{}, true)
	zp, ok := be.(nbdattach.ZeroProber)
	if !ok {
		t.Fatal("the gate hides the ZeroProber capability")
	}
	if !zp.KnownZero(0, 4096) {
		t.Fatal("open gate: the backend's answer did not come through")
	}
	if err := g.pause(context.Background()); err != nil {
		t.Fatal(err)
	}
	if zp.KnownZero(0, 4096) {
		t.Fatal("paused gate answered a zero read past the pause")
	}
	g.resume()
	if !zp.KnownZero(0, 4096) {
		t.Fatal("resumed gate: the backend's answer did not come through")
	}
	if err := g.close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if zp.KnownZero(0, 4096) {
		t.Fatal("closed gate answered a zero read")
	}
	if plain, _ := newGate(&nopBackend{}, true); plain.(nbdattach.ZeroProber).KnownZero(0, 4096) {
		t.Fatal("a backend without the capability was said to read as zeroes")
	}
}
