package throttle_test

import (
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/throttle"
)

// recorder is a backend that notes when each request reached it.
type recorder struct {
	mu             sync.Mutex
	reads, writes  []time.Time
	trims, flushes int
}

func (r *recorder) Size() int64 { return 1 << 30 }
func (r *recorder) ReadAt(_ context.Context, p []byte, _ int64) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.reads = append(r.reads, time.Now())
	return nil
}
func (r *recorder) WriteAt(context.Context, []byte, int64, bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.writes = append(r.writes, time.Now())
	return nil
}
func (r *recorder) Flush(context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.flushes++
	return nil
}
func (r *recorder) Trim(context.Context, int64, int64) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.trims++
	r.writes = append(r.writes, time.Now())
	return nil
}
func (r *recorder) WriteZeroes(context.Context, int64, int64, nbdattach.ZeroFlags) error {
	return r.Trim(context.Background(), 0, 0)
}

type statusRecorder struct{ *recorder }

func (statusRecorder) BlockStatus(context.Context, int64, int64) ([]nbdattach.Extent, error) {
	return []nbdattach.Extent{{Length: 1, Flags: 3}}, nil
}

// checkRate asserts the token bucket's promise on the times requests
// reached the backend: by t seconds after start, at most size + avg*t of
// them. Only a lower bound on time is asserted: a slow machine makes the
// requests later, never earlier.
func checkRate(t *testing.T, what string, start time.Time, got []time.Time, avg, size float64) {
	t.Helper()
	ts := slices.Clone(got)
	slices.SortFunc(ts, func(a, b time.Time) int { return a.Compare(b) })
	for k, at := range ts {
		// The (k+1)th request needs k+1-size tokens refilled.
		earliest := time.Duration((float64(k+1) - size) / avg * float64(time.Second))
		// The clock is read in the throttle before the backend's, and
		// timers are coarse: a millisecond of slack, no more.
		if el := at.Sub(start); el < earliest-time.Millisecond {
			t.Fatalf("%s: request %d of %d reached the backend %v after the start, before the earliest %v that %v/s with a bucket of %v allows",
				what, k+1, len(ts), el, earliest, avg, size)
		}
	}
}

// Readers and writers at once, each direction with its own limit: every
// direction keeps to its rate, and neither holds the other back.
func TestThrottleConcurrentReadersWriters(t *testing.T) {
	rec := &recorder{}
	be, th := throttle.Wrap(rec)
	if err := th.Set(throttle.Limits{
		ReadIOPS:   throttle.Rate{Avg: 400}, // a bucket of 40
		WriteIOPS:  throttle.Rate{Avg: 200},
		WriteBytes: throttle.Rate{Avg: 200 * 4096, Burst: 200 * 4096},
	}); err != nil {
		t.Fatal(err)
	}
	const workers, perWorker = 8, 20 // 160 reads, 160 writes
	start := time.Now()
	var wg sync.WaitGroup
	for w := range 2 * workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 4096)
			for i := range perWorker {
				var err error
				switch {
				case w%2 == 0:
					err = be.ReadAt(context.Background(), buf, int64(i)*4096)
				case i%5 == 0:
					err = be.Trim(context.Background(), 0, 1<<20) // a write op, no bytes
				default:
					err = be.WriteAt(context.Background(), buf, int64(i)*4096, false)
				}
				if err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.reads) != workers*perWorker || len(rec.writes) != workers*perWorker {
		t.Fatalf("%d reads and %d writes reached the backend, want %d each", len(rec.reads), len(rec.writes), workers*perWorker)
	}
	checkRate(t, "reads", start, rec.reads, 400, 40)
	checkRate(t, "writes", start, rec.writes, 200, 20)
	st := th.Stats()
	if st.ReadsThrottled == 0 || st.WritesThrottled == 0 || st.ReadWait <= 0 || st.WriteWait <= 0 {
		t.Errorf("stats %+v: want throttled reads and writes, with their waits", st)
	}
	if st.ReadsThrottled > workers*perWorker || st.WritesThrottled > workers*perWorker {
		t.Errorf("stats %+v: more throttled requests than requests", st)
	}
}

// A burst passes at once after a quiet spell, and only the burst.
func TestThrottleBurst(t *testing.T) {
	rec := &recorder{}
	be, th := throttle.Wrap(rec)
	start := time.Now()
	if err := th.Set(throttle.Limits{WriteIOPS: throttle.Rate{Avg: 10, Burst: 50}}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := be.WriteAt(context.Background(), make([]byte, 512), 0, false); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if st := th.Stats(); st.WritesThrottled != 0 {
		t.Fatalf("%d of a burst of 50 waited (burst 50): %+v", st.WritesThrottled, st)
	}
	if err := be.WriteAt(context.Background(), make([]byte, 512), 0, false); err != nil {
		t.Fatal(err)
	}
	if st := th.Stats(); st.WritesThrottled != 1 || st.WriteWait <= 0 {
		t.Fatalf("the 51st write was not throttled: %+v", st)
	}
	// A bucket of 50 at 10/s: the 51st token is there 100 ms after the
	// limits were set, however long the first 50 took.
	if el := time.Since(start); el < 100*time.Millisecond {
		t.Fatalf("the 51st write passed %v after the limits were set, want at least 100ms", el)
	}
	// Reads are not limited: none waits.
	for range 100 {
		if err := be.ReadAt(context.Background(), make([]byte, 512), 0); err != nil {
			t.Fatal(err)
		}
	}
	if st := th.Stats(); st.ReadsThrottled != 0 {
		t.Fatalf("reads throttled with write limits only: %+v", st)
	}
}

// A change of limits applies to the requests already waiting: lifting a
// limit releases them at once, raising one speeds them up.
func TestThrottleLiveChange(t *testing.T) {
	for _, tc := range []struct {
		name string
		next throttle.Limits
	}{
		{"lifted", throttle.Limits{}},
		{"raised", throttle.Limits{WriteIOPS: throttle.Rate{Avg: 100000}}},
		{"moved to reads", throttle.Limits{ReadIOPS: throttle.Rate{Avg: 1}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recorder{}
			be, th := throttle.Wrap(rec)
			// 1 write/s: 40 writes would take 40 s.
			if err := th.Set(throttle.Limits{WriteIOPS: throttle.Rate{Avg: 1}}); err != nil {
				t.Fatal(err)
			}
			done := make(chan struct{})
			var wg sync.WaitGroup
			for range 40 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					_ = be.WriteAt(context.Background(), make([]byte, 512), 0, false)
				}()
			}
			go func() { wg.Wait(); close(done) }()
			time.Sleep(200 * time.Millisecond)
			if err := th.Set(tc.next); err != nil {
				t.Fatal(err)
			}
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Fatalf("writes still waiting 10 s after the limit changed to %+v (%d passed)", tc.next, len(rec.writes))
			}
			if got := th.Limits(); got != tc.next {
				t.Fatalf("Limits() = %+v, want %+v", got, tc.next)
			}
		})
	}
}

// A request whose context ends while it waits fails with that error and
// never reaches the backend.
func TestThrottleCancel(t *testing.T) {
	rec := &recorder{}
	be, th := throttle.Wrap(rec)
	if err := th.Set(throttle.Limits{ReadBytes: throttle.Rate{Avg: 1000}}); err != nil {
		t.Fatal(err)
	}
	if err := be.ReadAt(context.Background(), make([]byte, 100), 0); err != nil { // empties the bucket
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err := be.ReadAt(ctx, make([]byte, 100), 0) // needs 100 ms
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("ReadAt on an ended context: %v, want DeadlineExceeded", err)
	}
	if len(rec.reads) != 1 {
		t.Fatalf("%d reads reached the backend, want 1", len(rec.reads))
	}
}

// A request waiting for its tokens ends when its hold context ends (the NBD
// client is gone), though its I/O context does not, and never reaches the
// backend.
func TestThrottleDropsHeldWhenHoldEnds(t *testing.T) {
	rec := &recorder{}
	be, th := throttle.Wrap(rec)
	if err := th.Set(throttle.Limits{WriteIOPS: throttle.Rate{Avg: 1, Burst: 1}}); err != nil {
		t.Fatal(err)
	}
	if err := be.WriteAt(context.Background(), nil, 0, false); err != nil { // empties the bucket
		t.Fatal(err)
	}
	hold, drop := context.WithCancel(context.Background())
	ctx := nbdattach.WithHoldContext(context.WithoutCancel(hold), hold)
	time.AfterFunc(50*time.Millisecond, drop)
	start := time.Now()
	err := be.WriteAt(ctx, nil, 0, false) // needs a second
	if !errors.Is(err, context.Canceled) || time.Since(start) > 500*time.Millisecond {
		t.Fatalf("WriteAt whose hold context ended after 50ms: %v after %v, want Canceled at once", err, time.Since(start))
	}
	if len(rec.writes) != 1 {
		t.Fatalf("%d writes reached the backend, want 1", len(rec.writes))
	}
}

// No request is held back longer than the throttle's longest hold, however
// many wait before it: a kernel NBD request held past the kernel's I/O
// timeout would fail the connection.
func TestThrottleMaxHold(t *testing.T) {
	rec := &recorder{}
	be, th := throttle.Wrap(rec)
	throttle.SetMaxHold(th, 200*time.Millisecond)
	if err := th.Set(throttle.Limits{WriteIOPS: throttle.Rate{Avg: 1, Burst: 1}}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	var wg sync.WaitGroup
	for range 6 { // a burst of 1, then 5 s of waiting at 1/s without the cap
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := be.WriteAt(context.Background(), nil, 0, false); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("6 writes at writeIOPS=1 with a longest hold of 200ms took %v", d)
	}
	// The overdue requests left their debt: the next waits for it.
	if w := th.Stats().WritesThrottled; w != 5 {
		t.Fatalf("%d writes throttled, want 5", w)
	}
}

// Without limits every request goes straight through; flushes and block
// status are never held back; the BlockStatuser capability survives.
func TestThrottleUnlimitedAndPassThrough(t *testing.T) {
	rec := &recorder{}
	be, th := throttle.Wrap(statusRecorder{rec})
	bs, ok := be.(nbdattach.BlockStatuser)
	if !ok {
		t.Fatal("Wrap lost the BlockStatuser capability")
	}
	if plain, _ := throttle.Wrap(rec); isStatuser(plain) {
		t.Fatal("a backend without block status gained it")
	}
	if err := th.Set(throttle.Limits{ReadIOPS: throttle.Rate{Avg: 1}, WriteIOPS: throttle.Rate{Avg: 1}}); err != nil {
		t.Fatal(err)
	}
	for range 20 {
		if err := be.Flush(context.Background()); err != nil {
			t.Fatal(err)
		}
		if _, err := bs.BlockStatus(context.Background(), 0, 1); err != nil {
			t.Fatal(err)
		}
	}
	if err := th.Set(throttle.Limits{}); err != nil {
		t.Fatal(err)
	}
	for range 1000 {
		_ = be.ReadAt(context.Background(), make([]byte, 1), 0)
		_ = be.WriteZeroes(context.Background(), 0, 1, nbdattach.ZeroFlags{})
	}
	st := th.Stats()
	if st.ReadsThrottled != 0 || st.WritesThrottled != 0 || rec.flushes != 20 || len(rec.reads) != 1000 || rec.trims != 1000 {
		t.Fatalf("stats %+v, %d flushes, %d reads, %d zeroes: want nothing throttled and everything passed", st, rec.flushes, len(rec.reads), rec.trims)
	}
}

func TestThrottleSetRefusesBadLimits(t *testing.T) {
	_, th := throttle.Wrap(&recorder{})
	err := th.Set(throttle.Limits{WriteBytes: throttle.Rate{Burst: 10}})
	if !errors.Is(err, throttle.ErrInvalid) {
		t.Fatalf("Set with a burst without an average: %v, want ErrInvalid", err)
	}
	if got := th.Limits(); !got.Unlimited() {
		t.Fatalf("a refused Set changed the limits to %+v", got)
	}
	var none *throttle.Throttle
	if err := none.Set(throttle.Limits{}); err != nil {
		t.Fatalf("lifting limits on no throttle: %v", err)
	}
	if err := none.Set(throttle.Limits{ReadIOPS: throttle.Rate{Avg: 1}}); !errors.Is(err, throttle.ErrCompiledOut) {
		t.Fatalf("limits on no throttle: %v, want ErrCompiledOut", err)
	}
}

func isStatuser(be nbdattach.Backend) bool {
	_, ok := be.(nbdattach.BlockStatuser)
	return ok
}

// byteCounter is a backend that counts the bytes written to it.
type byteCounter struct {
	nopBackend
	written atomic.Int64
}

func (b *byteCounter) WriteAt(_ context.Context, p []byte, _ int64, _ bool) error {
	b.written.Add(int64(len(p)))
	return nil
}

// A write larger than the bucket among a steady stream of small ones: the
// waiters are served in order, so the large one goes once the bucket has
// filled for it, and is not starved by small writes taking the tokens as
// they come in. The long-run rate holds all the same.
func TestThrottleLargeWriteNotStarved(t *testing.T) {
	const rate = 1 << 20
	be := &byteCounter{}
	th := throttle.New(be)
	if err := th.Set(throttle.Limits{WriteBytes: throttle.Rate{Avg: rate}}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	start := time.Now()
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			small := make([]byte, 4096)
			for th.WriteAt(ctx, small, 0, false) == nil {
			}
		}()
	}
	time.Sleep(200 * time.Millisecond) // the small writers hold the bucket low
	big := make(chan error, 1)
	at := time.Now()
	go func() { big <- th.WriteAt(ctx, make([]byte, 512<<10), 0, false) }()
	select {
	case err := <-big:
		// Behind it at most eight 4 KiB writes and a tenth of a second's
		// refill: far below a second on any machine.
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("the 512 KiB write waited %v", time.Since(at))
	case <-time.After(3 * time.Second):
		t.Fatal("a 512 KiB write under writeBytesPerSecond=1MiB still waits after 3 s of 4 KiB writes beside it")
	}
	time.Sleep(500 * time.Millisecond)
	cancel()
	wg.Wait()
	el := time.Since(start).Seconds()
	// At most rate*t + the bucket (a tenth of the rate) + the one request
	// that may overdraw it.
	if most := rate*el + rate/10 + 512<<10; float64(be.written.Load()) > most {
		t.Fatalf("%d bytes written in %.2fs, more than the %.0f that %d/s allows", be.written.Load(), el, most, rate)
	}
}

// zeroRecorder knows every range reads as zeroes.
type zeroRecorder struct{ *recorder }

func (zeroRecorder) KnownZero(int64, int64) bool { return true }

// The zero-read look passes the throttle while reads are unlimited, and
// not while they are limited: such a read must be counted and paced.
func TestThrottleKnownZero(t *testing.T) {
	be, th := throttle.Wrap(zeroRecorder{&recorder{}})
	zp, ok := be.(nbdattach.ZeroProber)
	if !ok {
		t.Fatal("Wrap hides the ZeroProber capability")
	}
	for _, c := range []struct {
		name   string
		limits throttle.Limits
		want   bool
	}{
		{"unlimited", throttle.Limits{}, true},
		{"writes limited", throttle.Limits{WriteIOPS: throttle.Rate{Avg: 10}}, true},
		{"read IOPS limited", throttle.Limits{ReadIOPS: throttle.Rate{Avg: 10}}, false},
		{"read bytes limited", throttle.Limits{ReadBytes: throttle.Rate{Avg: 1 << 20}}, false},
		{"lifted", throttle.Limits{}, true},
	} {
		if err := th.Set(c.limits); err != nil {
			t.Fatal(err)
		}
		if got := zp.KnownZero(0, 4096); got != c.want {
			t.Errorf("%s: KnownZero %v, want %v", c.name, got, c.want)
		}
	}
	if plain, _ := throttle.Wrap(&recorder{}); plain.(nbdattach.ZeroProber).KnownZero(0, 4096) {
		t.Fatal("a backend without the capability was said to read as zeroes")
	}
}
