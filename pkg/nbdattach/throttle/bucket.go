package throttle

import (
	"context"
	"math"
	"sync"
	"time"
)

// bucket is one limit's token bucket. level is the tokens it holds, down
// to a debt (negative) left by a request larger than the whole bucket.
type bucket struct {
	rate  float64 // units per second; 0: this bucket limits nothing
	size  float64
	level float64
}

func newBucket(r Rate) bucket {
	return bucket{rate: float64(r.Avg), size: r.size(), level: r.size()}
}

func (b *bucket) refill(dt float64) {
	if b.rate > 0 {
		b.level = math.Min(b.size, b.level+b.rate*dt)
	}
}

// wait is how long until the bucket holds cost tokens, or is full when cost
// is more than it can hold (such a request goes when it is full, and leaves
// a debt).
func (b *bucket) wait(cost float64) time.Duration {
	need := math.Min(cost, b.size)
	if b.rate == 0 || b.level >= need {
		return 0
	}
	// At least a microsecond: a level a rounding error short must not spin.
	return max(time.Microsecond, time.Duration((need-b.level)/b.rate*float64(time.Second)))
}

// direction is the buckets one kind of request (reads, or writes) passes,
// and the queue of the requests waiting for them. Waiters are served in the
// order they came, as QEMU's throttled_reqs queue does: only the head waits
// on the buckets, and a request arriving while others wait queues behind
// them. Otherwise each waiter would wake on its own timer and snatch the
// tokens as they refill, and a request larger than the bucket, which must
// wait for it to fill, would starve behind a stream of small ones.
type direction struct {
	mu    sync.Mutex
	last  time.Time
	ops   bucket
	bytes bucket
	// queued counts the waiting requests, the head included. turn holds
	// the head's token while no one is head: the receivers of a channel
	// are served first come, first served.
	queued int
	turn   chan struct{}
}

func newDirection(ops, bytes Rate, now time.Time) *direction {
	if ops.Avg == 0 && bytes.Avg == 0 {
		return nil
	}
	d := &direction{last: now, ops: newBucket(ops), bytes: newBucket(bytes), turn: make(chan struct{}, 1)}
	d.turn <- struct{}{}
	return d
}

func (d *direction) refillTo(now time.Time) {
	if dt := now.Sub(d.last).Seconds(); dt > 0 {
		d.ops.refill(dt)
		d.bytes.refill(dt)
		d.last = now
	}
}

// takeFirst admits a request of n bytes at now when none waits before it
// and the buckets allow it.
func (d *direction) takeFirst(now time.Time, n int64) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.queued == 0 && d.takeLocked(now, n) == 0
}

// take admits a request of n bytes at now and returns 0, or returns how long
// to wait before asking again (then nothing is taken). A zero-byte request
// (a trim) takes from the operations bucket only. It does not look at the
// queue: it is the head's.
func (d *direction) take(now time.Time, n int64) time.Duration {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.takeLocked(now, n)
}

func (d *direction) takeLocked(now time.Time, n int64) time.Duration {
	d.refillTo(now)
	w := d.ops.wait(1)
	if n > 0 {
		w = max(w, d.bytes.wait(float64(n)))
	}
	if w > 0 {
		return w
	}
	d.debit(n)
	return 0
}

func (d *direction) debit(n int64) {
	if d.ops.rate > 0 {
		d.ops.level--
	}
	if d.bytes.rate > 0 {
		d.bytes.level -= float64(n)
	}
}

// wait queues a request of n bytes behind the requests waiting already and
// returns true once it took its tokens, or once deadline passed (it then
// takes them all the same, into debt); false when changed is closed (new
// limits: the caller judges the request again under them, having taken
// nothing); or ctx's error.
func (d *direction) wait(ctx context.Context, changed <-chan struct{}, now func() time.Time, n int64, deadline time.Time) (bool, error) {
	d.mu.Lock()
	d.queued++
	d.mu.Unlock()
	defer func() {
		d.mu.Lock()
		d.queued--
		d.mu.Unlock()
	}()
	overdue := time.NewTimer(deadline.Sub(now()))
	defer overdue.Stop()
	select {
	case <-d.turn:
	case <-changed:
		return false, nil
	case <-ctx.Done():
		return false, ctx.Err()
	case <-overdue.C:
		d.force(now(), n)
		return true, nil
	}
	defer func() { d.turn <- struct{}{} }()
	for {
		w := d.take(now(), n)
		if w == 0 {
			return true, nil
		}
		timer := time.NewTimer(w)
		select {
		case <-timer.C:
		case <-overdue.C:
			d.force(now(), n)
			return true, nil
		case <-changed:
			timer.Stop()
			return false, nil
		case <-ctx.Done():
			timer.Stop()
			return false, ctx.Err()
		}
	}
}

// force admits a request of n bytes at now whatever the buckets hold.
func (d *direction) force(now time.Time, n int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.refillTo(now)
	d.debit(n)
}

// inherit carries old's levels into d (a change of limits): never above
// d's sizes, and full where old did not limit that unit.
func (d *direction) inherit(old *direction, now time.Time) {
	if d == nil || old == nil {
		return
	}
	old.mu.Lock()
	old.refillTo(now)
	ops, bytes := old.ops, old.bytes
	old.mu.Unlock()
	if ops.rate > 0 && d.ops.rate > 0 {
		d.ops.level = math.Min(d.ops.size, ops.level)
	}
	if bytes.rate > 0 && d.bytes.rate > 0 {
		d.bytes.level = math.Min(d.bytes.size, bytes.level)
	}
}
