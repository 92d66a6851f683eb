package throttle

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// Throttle is an nbdattach.Backend that passes requests to another once the
// limits allow them. It is safe for concurrent use, and Set may be called
// while requests run.
type Throttle struct {
	be nbdattach.Backend
	// state is nil while unlimited: the requests' fast path.
	state atomic.Pointer[state]
	setMu sync.Mutex // orders Set calls
	now   func() time.Time
	// maxHold is the longest a request is held back (MaxHold).
	maxHold time.Duration

	reads, writes counters
}

// state is one setting of the limits. changed is closed when a later Set
// replaces it, waking the requests waiting under it.
type state struct {
	limits      Limits
	read, write *direction // nil: that direction is unlimited
	changed     chan struct{}
}

type counters struct {
	throttled atomic.Uint64 // requests that had to wait
	waited    atomic.Int64  // nanoseconds they waited, in all
}

// Stats are a Throttle's limits and what it has held back since it was made.
type Stats struct {
	Limits Limits
	// ReadsThrottled and WritesThrottled count requests that had to wait.
	ReadsThrottled, WritesThrottled uint64
	// ReadWait and WriteWait are the time those requests waited, summed.
	ReadWait, WriteWait time.Duration
}

// ErrCompiledOut is returned by Set on the nil Throttle that Wrap gives in a
// build with the nothrottle tag (or where no request passes a backend).
var ErrCompiledOut = errors.New("I/O limits are not available for this device")

// New puts be behind a Throttle without limits.
func New(be nbdattach.Backend) *Throttle {
	return &Throttle{be: be, now: time.Now, maxHold: MaxHold}
}

// MaxHold is the longest a request is held back, however many wait before
// it: then it goes, and its cost is a debt that the requests after it wait
// for. The kernel's NBD driver gives up on a request after its I/O timeout
// (30 s by default, kernel.DefaultIOTimeout) and closes the connection,
// and its queue holds some 128 requests per connection: under limits that
// low (128 requests over 30 s is about 4 IOPS; 128 requests of 1 MiB over
// 30 s about 4 MiB/s) a full queue would otherwise outlast the timeout.
// Such limits then hold on average over the long run, not per request.
const MaxHold = 20 * time.Second

// Set replaces the limits; the zero Limits lifts them all. Requests waiting
// now are judged again under the new limits at once.
func (t *Throttle) Set(l Limits) error {
	if err := l.Check(); err != nil {
		return err
	}
	if t == nil {
		if l.Unlimited() {
			return nil
		}
		return ErrCompiledOut
	}
	t.setMu.Lock()
	defer t.setMu.Unlock()
	old := t.state.Load()
	var next *state
	if !l.Unlimited() {
		now := t.now()
		next = &state{
			limits:  l,
			read:    newDirection(l.ReadIOPS, l.ReadBytes, now),
			write:   newDirection(l.WriteIOPS, l.WriteBytes, now),
			changed: make(chan struct{}),
		}
		if old != nil {
			next.read.inherit(old.read, now)
			next.write.inherit(old.write, now)
		}
	}
	t.state.Store(next)
	if old != nil {
		close(old.changed)
	}
	return nil
}

// Limits are the limits in force.
func (t *Throttle) Limits() Limits {
	if t == nil {
		return Limits{}
	}
	if s := t.state.Load(); s != nil {
		return s.limits
	}
	return Limits{}
}

// Stats reports the limits in force and the counters.
func (t *Throttle) Stats() Stats {
	if t == nil {
		return Stats{}
	}
	return Stats{
		Limits:          t.Limits(),
		ReadsThrottled:  t.reads.throttled.Load(),
		WritesThrottled: t.writes.throttled.Load(),
		ReadWait:        time.Duration(t.reads.waited.Load()),
		WriteWait:       time.Duration(t.writes.waited.Load()),
	}
}

// admit returns when a request of n bytes may go (write tells the
// direction), or with an error when ctx's hold context ends
// (nbdattach.HoldContext): no I/O has started yet, so the request may be
// dropped even where its I/O may not be cut off.
func (t *Throttle) admit(ctx context.Context, s *state, write bool, n int64) error {
	ctx = nbdattach.HoldContext(ctx)
	c := &t.reads
	if write {
		c = &t.writes
	}
	var waitedSince, deadline time.Time
	defer func() {
		if !waitedSince.IsZero() {
			c.waited.Add(int64(t.now().Sub(waitedSince)))
		}
	}()
	for s != nil {
		d := s.read
		if write {
			d = s.write
		}
		if d == nil {
			return nil
		}
		now := t.now()
		if d.takeFirst(now, n) {
			return nil
		}
		if waitedSince.IsZero() {
			waitedSince, deadline = now, now.Add(t.maxHold)
			c.throttled.Add(1)
		}
		ok, err := d.wait(ctx, s.changed, t.now, n, deadline)
		if err != nil {
			return fmt.Errorf("waiting for the volume's I/O limits: %w", err)
		}
		if ok {
			return nil
		}
		s = t.state.Load()
	}
	return nil
}

// Size implements nbdattach.Backend.
func (t *Throttle) Size() int64 { return t.be.Size() }

// ReadAt implements nbdattach.Backend.
func (t *Throttle) ReadAt(ctx context.Context, p []byte, off int64) error {
	if s := t.state.Load(); s != nil {
		if err := t.admit(ctx, s, false, int64(len(p))); err != nil {
			return err
		}
	}
	return t.be.ReadAt(ctx, p, off)
}

// KnownZero implements nbdattach.ZeroProber: the backend's look while reads
// are unlimited; false while they are limited, since a read answered
// without the throttle would not be counted against the limit.
func (t *Throttle) KnownZero(off, length int64) bool {
	if s := t.state.Load(); s != nil && s.read != nil {
		return false
	}
	zp, ok := t.be.(nbdattach.ZeroProber)
	return ok && zp.KnownZero(off, length)
}

// WriteAt implements nbdattach.Backend.
func (t *Throttle) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if s := t.state.Load(); s != nil {
		if err := t.admit(ctx, s, true, int64(len(p))); err != nil {
			return err
		}
	}
	return t.be.WriteAt(ctx, p, off, fua)
}

// Flush implements nbdattach.Backend. Flushes are never held back: they
// carry no data of their own (QEMU does not throttle them either).
func (t *Throttle) Flush(ctx context.Context) error { return t.be.Flush(ctx) }

// Trim implements nbdattach.Backend: one write operation, no bytes.
func (t *Throttle) Trim(ctx context.Context, off, length int64) error {
	if s := t.state.Load(); s != nil {
		if err := t.admit(ctx, s, true, 0); err != nil {
			return err
		}
	}
	return t.be.Trim(ctx, off, length)
}

// WriteZeroes implements nbdattach.Backend: one write operation, no bytes.
func (t *Throttle) WriteZeroes(ctx context.Context, off, length int64, flags nbdattach.ZeroFlags) error {
	if s := t.state.Load(); s != nil {
		if err := t.admit(ctx, s, true, 0); err != nil {
			return err
		}
	}
	return t.be.WriteZeroes(ctx, off, length, flags)
}

// blockStatusThrottle keeps the wrapped backend's BlockStatuser capability
// (block status is metadata: never held back).
type blockStatusThrottle struct{ *Throttle }

func (t blockStatusThrottle) BlockStatus(ctx context.Context, off, length int64) ([]nbdattach.Extent, error) {
	return t.be.(nbdattach.BlockStatuser).BlockStatus(ctx, off, length)
}

// Wrap puts be behind a new Throttle without limits and returns what to
// attach, keeping be's BlockStatuser capability. Built with the nothrottle
// tag it returns be itself and a nil *Throttle, whose Set refuses limits.
func Wrap(be nbdattach.Backend) (nbdattach.Backend, *Throttle) {
	if !Enabled {
		return be, nil
	}
	t := New(be)
	if _, ok := be.(nbdattach.BlockStatuser); ok {
		return blockStatusThrottle{t}, t
	}
	return t, t
}
