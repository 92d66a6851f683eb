package throttle

import (
	"strings"
	"testing"
	"time"
)

// The bucket arithmetic on a clock the test moves: exact waits.
func TestDirectionTake(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	type step struct {
		at   time.Duration
		n    int64
		wait time.Duration // 0: admitted
	}
	tests := []struct {
		name       string
		ops, bytes Rate
		steps      []step
	}{
		{"iops without burst: a tenth of a second's worth, at least one", Rate{Avg: 10}, Rate{}, []step{
			{0, 4096, 0},
			{0, 4096, 100 * time.Millisecond},
			{50 * time.Millisecond, 4096, 50 * time.Millisecond},
			{100 * time.Millisecond, 4096, 0},
			{100 * time.Millisecond, 4096, 100 * time.Millisecond},
		}},
		{"iops with a burst of five", Rate{Avg: 10, Burst: 5}, Rate{}, []step{
			{0, 1, 0}, {0, 1, 0}, {0, 1, 0}, {0, 1, 0}, {0, 1, 0},
			{0, 1, 100 * time.Millisecond},
			// A second of quiet refills ten, kept to five.
			{1100 * time.Millisecond, 1, 0}, {1100 * time.Millisecond, 1, 0}, {1100 * time.Millisecond, 1, 0},
			{1100 * time.Millisecond, 1, 0}, {1100 * time.Millisecond, 1, 0},
			{1100 * time.Millisecond, 1, 100 * time.Millisecond},
		}},
		{"bytes: a request larger than the bucket goes when it is full and leaves a debt", Rate{}, Rate{Avg: 1000}, []step{
			{0, 50, 0},
			{0, 500, 50 * time.Millisecond}, // bucket holds 50 of 100: wait until full
			{50 * time.Millisecond, 500, 0}, // now full: admitted, 400 in debt
			{50 * time.Millisecond, 1, 401 * time.Millisecond},
			{451 * time.Millisecond, 1, 0},
		}},
		{"a zero-byte request (trim) takes no bytes and needs none", Rate{}, Rate{Avg: 1000}, []step{
			{0, 1000, 0}, // the bucket holds 100: 900 in debt
			{0, 0, 0},
			{0, 1, 901 * time.Millisecond},
		}},
		{"both units: the longer wait decides", Rate{Avg: 100, Burst: 100}, Rate{Avg: 1 << 20}, []step{
			// The bytes bucket holds 0.1 MiB: 0.9 MiB in debt, and 4 KiB
			// more to wait for; the ops bucket has 99 left.
			{0, 1 << 20, 0},
			{0, 4096, time.Duration((0.9*(1<<20) + 4096) / (1 << 20) * float64(time.Second))},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := newDirection(tc.ops, tc.bytes, t0)
			for i, s := range tc.steps {
				got := d.take(at(s.at), s.n)
				// Float rounding may add a nanosecond or two.
				if diff := got - s.wait; diff < -2 || diff > 2 {
					t.Fatalf("step %d (at %v, %d bytes): wait %v, want %v", i, s.at, s.n, got, s.wait)
				}
			}
		})
	}
}

func TestNewDirectionUnlimited(t *testing.T) {
	if d := newDirection(Rate{}, Rate{}, time.Now()); d != nil {
		t.Fatalf("a direction without limits is %+v, want nil (no waiting path)", d)
	}
}

// A change of limits keeps what the buckets held (no free burst), cut to
// the new sizes; a unit newly limited starts full.
func TestDirectionInherit(t *testing.T) {
	t0 := time.Unix(1000, 0)
	old := newDirection(Rate{Avg: 100, Burst: 100}, Rate{}, t0)
	for range 90 {
		if w := old.take(t0, 1); w != 0 {
			t.Fatalf("burst refused: %v", w)
		}
	}
	next := newDirection(Rate{Avg: 1000}, Rate{Avg: 1 << 20}, t0)
	next.inherit(old, t0)
	if next.ops.level != 10 {
		t.Errorf("ops level after a change %v, want the 10 the old bucket held", next.ops.level)
	}
	if next.bytes.level != next.bytes.size {
		t.Errorf("bytes level %v, want full (%v): bytes were not limited before", next.bytes.level, next.bytes.size)
	}
	small := newDirection(Rate{Avg: 20}, Rate{}, t0) // size 2
	small.inherit(old, t0)
	if small.ops.level != 2 {
		t.Errorf("ops level %v, want the new size 2", small.ops.level)
	}
}

func TestRateCheck(t *testing.T) {
	tests := []struct {
		r    Rate
		want string // "" valid
	}{
		{Rate{}, ""},
		{Rate{Avg: 200}, ""},
		{Rate{Avg: 200, Burst: 200}, ""},
		{Rate{Avg: MaxValue, Burst: MaxValue}, ""},
		{Rate{Avg: -1}, "writeIOPS=-1 is not in [0, 1000000000000000]"},
		{Rate{Avg: MaxValue + 1}, "writeIOPS=1000000000000001 is not in [0, 1000000000000000]"},
		{Rate{Avg: 1, Burst: -1}, "writeIOPSBurst=-1 is not in"},
		{Rate{Burst: 10}, "writeIOPSBurst=10 needs writeIOPS"},
		// A bucket smaller than a second's average, as the default one is.
		{Rate{Avg: 100, Burst: 99}, ""},
		{Rate{Avg: 100, Burst: 1}, ""},
	}
	for _, tc := range tests {
		err := tc.r.Check("writeIOPS")
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%+v: %v", tc.r, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%+v: error %v, want one saying %q", tc.r, err, tc.want)
		}
	}
}
