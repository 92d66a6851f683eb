package throttle

import (
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

// direction is the buckets one kind of request (reads, or writes) passes.
type direction struct {
	mu    sync.Mutex
	last  time.Time
	ops   bucket
	bytes bucket
}

func newDirection(ops, bytes Rate, now time.Time) *direction {
	if ops.Avg == 0 && bytes.Avg == 0 {
		return nil
	}
	return &direction{last: now, ops: newBucket(ops), bytes: newBucket(bytes)}
}

func (d *direction) refillTo(now time.Time) {
	if dt := now.Sub(d.last).Seconds(); dt > 0 {
		d.ops.refill(dt)
		d.bytes.refill(dt)
		d.last = now
	}
}

// take admits a request of n bytes at now and returns 0, or returns how long
// to wait before asking again (then nothing is taken). A zero-byte request
// (a trim) takes from the operations bucket only.
func (d *direction) take(now time.Time, n int64) time.Duration {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.refillTo(now)
	w := d.ops.wait(1)
	if n > 0 {
		w = max(w, d.bytes.wait(float64(n)))
	}
	if w > 0 {
		return w
	}
	if d.ops.rate > 0 {
		d.ops.level--
	}
	if d.bytes.rate > 0 {
		d.bytes.level -= float64(n)
	}
	return 0
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
