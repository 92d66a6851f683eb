package driver

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
)

// TestConflictsSymmetric: the table states each conflict once per side; a
// one-sided entry would let two operations run together depending on which
// came first.
func TestConflictsSymmetric(t *testing.T) {
	for a, bs := range conflicts {
		for _, b := range bs {
			if !conflict(b, a) {
				t.Errorf("%s conflicts with %s but not the reverse", a, b)
			}
		}
	}
}

func TestOpLocks(t *testing.T) {
	tests := []struct {
		held, want op
		busy       bool
	}{
		{opStage, opUnstage, true},
		{opStage, opStage, true},
		{opDelete, opRead, true},
		{opExpand, opPublish, true},
		{opRead, opRead, false},
		{opRead, opExpand, false},
		{opExpand, opRead, false},
		{opPublish, opRead, false},
		{opStage, opRead, true},
	}
	for _, tc := range tests {
		t.Run(string(tc.held)+"/"+string(tc.want), func(t *testing.T) {
			l := newOpLocks()
			rel, err := l.acquire("v", tc.held)
			if err != nil {
				t.Fatal(err)
			}
			// Another volume is never affected.
			rel2, err := l.acquire("w", tc.want)
			if err != nil {
				t.Fatalf("other volume: %v", err)
			}
			rel2()
			rel3, err := l.acquire("v", tc.want)
			if got := errors.Is(err, ErrBusy); got != tc.busy {
				t.Fatalf("busy = %v (%v), want %v", got, err, tc.busy)
			}
			if err == nil {
				rel3()
			} else if want := `volume "v": ` + string(tc.want) + " refused, " + string(tc.held) + " in progress: conflicting operation in progress"; err.Error() != want {
				t.Fatalf("error %q, want %q", err, want)
			}
			rel()
			rel() // idempotent
			if s := l.inFlight(); s != "" {
				t.Fatalf("in flight after release: %s", s)
			}
			rel4, err := l.acquire("v", tc.want)
			if err != nil {
				t.Fatalf("after release: %v", err)
			}
			rel4()
		})
	}
}

// TestWaitsAreConflicts: waits only says which conflicts of the table are
// waited out; it never makes two operations conflict.
func TestWaitsAreConflicts(t *testing.T) {
	for a, bs := range waits {
		for _, b := range bs {
			if !conflict(a, b) {
				t.Errorf("waits: %s waits for %s, which is no conflict", a, b)
			}
		}
	}
}

// waitFor polls inFlight until it is want (the waiter is queued), failing
// after a few seconds.
func waitFor(t *testing.T, l *opLocks, want string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for l.inFlight() != want {
		if time.Now().After(deadline) {
			t.Fatalf("in flight %q, want %q", l.inFlight(), want)
		}
		time.Sleep(time.Millisecond)
	}
}

type acquired struct {
	release func()
	err     error
}

func goAcquireWait(ctx context.Context, l *opLocks, id string, o op) chan acquired {
	ch := make(chan acquired, 1)
	go func() {
		rel, err := l.acquireWait(ctx, id, o)
		ch <- acquired{rel, err}
	}()
	return ch
}

// TestAcquireWaitTurns: snapshot operations on one volume wait for each
// other and run in arrival order; a non-waiting acquire does not jump the
// queue; the waiter gets the lock the moment the one in the way ends.
func TestAcquireWaitTurns(t *testing.T) {
	l := newOpLocks()
	l.maxWait = time.Hour // the context bounds this test, not the cap
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	held, err := l.acquireWait(ctx, "v", opSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	first := goAcquireWait(ctx, l, "v", opSnapshot)
	waitFor(t, l, "v:snapshot(waiting #1) v:snapshot×1")
	second := goAcquireWait(ctx, l, "v", opSnapshot)
	waitFor(t, l, "v:snapshot(waiting #1) v:snapshot(waiting #2) v:snapshot×1")

	// Another volume is not in the queue; a non-waiting snapshot (a
	// flatten step) is refused, naming the waiter.
	other, err := l.acquireWait(ctx, "w", opSnapshot)
	if err != nil {
		t.Fatalf("other volume: %v", err)
	}
	other()
	if _, err := l.acquire("v", opSnapshot); !errors.Is(err, ErrBusy) || err.Error() != `volume "v": snapshot refused, snapshot in progress: conflicting operation in progress` {
		t.Fatalf("acquire with one running: %v", err)
	}

	held()
	a := <-first
	if a.err != nil {
		t.Fatalf("first waiter: %v", a.err)
	}
	waitFor(t, l, "v:snapshot(waiting #1) v:snapshot×1")
	select {
	case b := <-second:
		t.Fatalf("second waiter ran with the first still running: %v", b.err)
	default:
	}
	a.release()
	b := <-second
	if b.err != nil {
		t.Fatalf("second waiter: %v", b.err)
	}
	b.release()
	if s := l.inFlight(); s != "" {
		t.Fatalf("in flight after all released: %s", s)
	}
}

// TestAcquireWaitQueuedBlocksAcquire: between a release and the waiter's
// wake-up, a non-waiting conflicting acquire is refused by the waiter.
func TestAcquireWaitQueuedBlocksAcquire(t *testing.T) {
	l := newOpLocks()
	v := l.vol("v")
	v.queue = append(v.queue, &opWaiter{o: opSnapshot})
	_, err := l.acquire("v", opStage)
	if want := `volume "v": stage refused, snapshot waiting: conflicting operation in progress`; err == nil || err.Error() != want {
		t.Fatalf("error %v, want %q", err, want)
	}
	rel, err := l.acquire("v", opRead) // no conflict with snapshot
	if err != nil {
		t.Fatal(err)
	}
	rel()
}

// TestAcquireWaitSerial: many snapshot operations at once on one volume
// all run, one at a time.
func TestAcquireWaitSerial(t *testing.T) {
	l := newOpLocks()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var (
		wg            sync.WaitGroup
		inside, worst atomic.Int32
		failed        atomic.Int32
	)
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rel, err := l.acquireWait(ctx, "v", opSnapshot)
			if err != nil {
				t.Error(err)
				failed.Add(1)
				return
			}
			n := inside.Add(1)
			for {
				w := worst.Load()
				if n <= w || worst.CompareAndSwap(w, n) {
					break
				}
			}
			time.Sleep(time.Millisecond)
			inside.Add(-1)
			rel()
		}()
	}
	wg.Wait()
	if w := worst.Load(); w != 1 || failed.Load() != 0 {
		t.Fatalf("at most %d at once, %d failed; want 1 and 0", w, failed.Load())
	}
	if s := l.inFlight(); s != "" {
		t.Fatalf("in flight after all released: %s", s)
	}
}

// TestAcquireWaitTimeout: past the cap the waiter is refused (Aborted),
// naming what is still in the way, and leaves the queue.
func TestAcquireWaitTimeout(t *testing.T) {
	l := newOpLocks()
	l.maxWait = 30 * time.Millisecond
	held, err := l.acquire("v", opSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer held()
	start := time.Now()
	_, err = l.acquireWait(context.Background(), "v", opSnapshot)
	if !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), `volume "v": snapshot refused after waiting `) ||
		!strings.HasSuffix(err.Error(), ", snapshot in progress: conflicting operation in progress") {
		t.Fatalf("error %v", err)
	}
	if waited := time.Since(start); waited < l.maxWait {
		t.Fatalf("refused after %s, before the cap %s", waited, l.maxWait)
	}
	if s := l.inFlight(); s != "v:snapshot×1" {
		t.Fatalf("in flight %q: the waiter stayed queued", s)
	}
}

// TestAcquireWaitCancel: the request's end ends the wait with its error
// (not Aborted), and the waiter behind moves up.
func TestAcquireWaitCancel(t *testing.T) {
	l := newOpLocks()
	l.maxWait = time.Hour
	held, err := l.acquire("v", opSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	first := goAcquireWait(ctx, l, "v", opSnapshot)
	waitFor(t, l, "v:snapshot(waiting #1) v:snapshot×1")
	second := goAcquireWait(context.Background(), l, "v", opSnapshot)
	waitFor(t, l, "v:snapshot(waiting #1) v:snapshot(waiting #2) v:snapshot×1")
	cancel()
	a := <-first
	if !errors.Is(a.err, context.Canceled) || errors.Is(a.err, ErrBusy) || codeOf(a.err) != codes.Canceled {
		t.Fatalf("cancelled waiter: %v", a.err)
	}
	waitFor(t, l, "v:snapshot(waiting #1) v:snapshot×1")
	held()
	b := <-second
	if b.err != nil {
		t.Fatal(b.err)
	}
	b.release()
}

// TestAcquireWaitRefusesAtOnce: only the conflicts of waits are waited
// out: a create, delete, stage, unstage or expand in the way, or asking,
// is Aborted at once as before.
func TestAcquireWaitRefusesAtOnce(t *testing.T) {
	tests := []struct{ held, want op }{
		{opSnapshot, opCreate},
		{opSnapshot, opDelete},
		{opSnapshot, opStage},
		{opSnapshot, opUnstage},
		{opSnapshot, opExpand},
		{opDelete, opSnapshot},
		{opCreate, opSnapshot},
		{opStage, opSnapshot},
		{opUnstage, opSnapshot},
		{opExpand, opSnapshot},
		{opStage, opStage},
	}
	for _, tc := range tests {
		t.Run(string(tc.held)+"/"+string(tc.want), func(t *testing.T) {
			l := newOpLocks()
			l.maxWait = time.Hour
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			rel, err := l.acquire("v", tc.held)
			if err != nil {
				t.Fatal(err)
			}
			defer rel()
			_, err = l.acquireWait(ctx, "v", tc.want)
			if want := `volume "v": ` + string(tc.want) + " refused, " + string(tc.held) + " in progress: conflicting operation in progress"; err == nil || err.Error() != want {
				t.Fatalf("error %v, want %q", err, want)
			}
			if s := l.inFlight(); s != "v:"+string(tc.held)+"×1" {
				t.Fatalf("in flight %q", s)
			}
		})
	}
}
