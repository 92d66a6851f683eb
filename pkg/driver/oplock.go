package driver

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"
)

// op is a kind of volume-scoped operation.
type op string

const (
	opCreate    op = "create"
	opDelete    op = "delete"
	opExpand    op = "expand"
	opStage     op = "stage"
	opUnstage   op = "unstage"
	opPublish   op = "publish"
	opUnpublish op = "unpublish"
	opRead      op = "read" // ControllerGetVolume, ValidateVolumeCapabilities, NodeGetVolumeStats
	// opSnapshot: CreateSnapshot, DeleteSnapshot, and reading a volume as
	// the source of a restore or clone. It opens the closed image or works
	// on the staged one, so it excludes what opens, closes or destroys it.
	opSnapshot op = "snapshot"
	// opModify: ControllerModifyVolume. It rewrites the volume's record
	// (as create and expand do) and sets the limits of its device (made
	// and destroyed by stage and unstage).
	opModify op = "modify"
)

// conflicts states, in one place, which operations on the same volume
// exclude each other. The relation is symmetric (checked in a test). Reads
// (ControllerGetVolume, ValidateVolumeCapabilities, NodeGetVolumeStats) only
// conflict with what makes or destroys the volume or its device; everything
// that changes the volume's image, device or mounts excludes every other
// change.
var conflicts = map[op][]op{
	opCreate:    {opCreate, opDelete, opExpand, opStage, opUnstage, opPublish, opUnpublish, opRead, opSnapshot, opModify},
	opDelete:    {opCreate, opDelete, opExpand, opStage, opUnstage, opPublish, opUnpublish, opRead, opSnapshot, opModify},
	opExpand:    {opCreate, opDelete, opExpand, opStage, opUnstage, opPublish, opUnpublish, opSnapshot, opModify},
	opStage:     {opCreate, opDelete, opExpand, opStage, opUnstage, opPublish, opUnpublish, opRead, opSnapshot, opModify},
	opUnstage:   {opCreate, opDelete, opExpand, opStage, opUnstage, opPublish, opUnpublish, opRead, opSnapshot, opModify},
	opPublish:   {opCreate, opDelete, opExpand, opStage, opUnstage, opPublish, opUnpublish},
	opUnpublish: {opCreate, opDelete, opExpand, opStage, opUnstage, opPublish, opUnpublish},
	opRead:      {opCreate, opDelete, opStage, opUnstage},
	opSnapshot:  {opCreate, opDelete, opExpand, opStage, opUnstage, opSnapshot},
	opModify:    {opCreate, opDelete, opExpand, opStage, opUnstage, opModify},
}

func conflict(a, b op) bool { return in(conflicts[a], b) }

// waits states which conflicts acquireWait waits out rather than refusing
// at once; each entry is a conflict of the table above (checked in a test).
// Snapshot work on one volume (CreateSnapshot, DeleteSnapshot, a restore or
// clone reading it, a group snapshot's member deleted, a snapshot metadata
// stream) is ordered, not
// refused: the CO sends many at once (a group snapshot's deletion, several
// restores from one volume) and its backoff (doubling to minutes) would
// drag each out far past the seconds the one in the way takes. Everything
// else (create, delete, stage, unstage, expand, modify in the way or
// asking) stays a pending operation on the volume, answered Aborted at once.
var waits = map[op][]op{
	opSnapshot: {opSnapshot},
}

func in(ops []op, o op) bool {
	for _, c := range ops {
		if c == o {
			return true
		}
	}
	return false
}

// maxOpWait bounds acquireWait beyond the request's context: a restore's
// full copy holds its source's snapshot lock for as long as the copy takes,
// and a waiter answered Aborted then is retried by the CO.
const maxOpWait = 20 * time.Second

// opLocks is the table of operations in flight per volume. acquire never
// waits: a conflicting request fails with ErrBusy (Aborted), which is what the
// CSI spec asks of a plugin that sees a second call for a volume while the
// first is still running; the CO retries with backoff. acquireWait waits
// out the conflicts in waits, in arrival order.
type opLocks struct {
	mu      sync.Mutex
	vols    map[string]*volOps
	maxWait time.Duration
}

// volOps is one volume's operations: those running, those waiting in
// arrival order, and a channel closed (and replaced) whenever either shrinks.
type volOps struct {
	running map[op]int
	queue   []*opWaiter
	changed chan struct{}
}

type opWaiter struct{ o op }

func newOpLocks() *opLocks { return &opLocks{vols: map[string]*volOps{}, maxWait: maxOpWait} }

// vol returns id's entry, made if missing. l.mu held.
func (l *opLocks) vol(id string) *volOps {
	v := l.vols[id]
	if v == nil {
		v = &volOps{running: map[op]int{}, changed: make(chan struct{})}
		l.vols[id] = v
	}
	return v
}

// blocker is what keeps o from running on v now: a conflicting operation
// running, or one waiting ahead of w (all waiters when w is nil). l.mu held.
func (v *volOps) blocker(o op, w *opWaiter) (other op, running, ok bool) {
	for other, n := range v.running {
		if n > 0 && conflict(o, other) {
			return other, true, true
		}
	}
	for _, q := range v.queue {
		if q == w {
			break
		}
		if conflict(o, q.o) {
			return q.o, false, true
		}
	}
	return "", false, false
}

// changedLocked wakes the waiters of id and forgets an idle volume. l.mu held.
func (l *opLocks) changedLocked(id string, v *volOps) {
	close(v.changed)
	v.changed = make(chan struct{})
	if len(v.running) == 0 && len(v.queue) == 0 {
		delete(l.vols, id)
	}
}

// acquire registers o on id, or returns an error wrapping ErrBusy naming the
// operation in the way (running, or waiting for its turn). The returned
// func releases it.
func (l *opLocks) acquire(id string, o op) (release func(), err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	v := l.vol(id)
	if other, running, busy := v.blocker(o, nil); busy {
		return nil, busyErr(id, o, other, running, 0)
	}
	return l.runLocked(id, v, o), nil
}

// acquireWait is acquire that, while everything in the way is a conflict
// of waits, waits its turn (first come, first served) until ctx ends or
// l.maxWait passes. A conflict it does not wait out, there at the call or
// met while waiting, is ErrBusy at once; so is the end of l.maxWait, naming
// the operation still in the way; ctx's end is ctx's error.
func (l *opLocks) acquireWait(ctx context.Context, id string, o op) (release func(), err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	v := l.vol(id)
	other, running, busy := v.blocker(o, nil)
	if !busy {
		return l.runLocked(id, v, o), nil
	}
	if other, running, ok := v.unwaitable(o, nil); ok {
		return nil, busyErr(id, o, other, running, 0)
	}
	w := &opWaiter{o: o}
	v.queue = append(v.queue, w)
	start := time.Now()
	timer := time.NewTimer(l.maxWait)
	defer timer.Stop()
	for {
		changed := v.changed
		l.mu.Unlock()
		select {
		case <-changed:
		case <-ctx.Done():
		case <-timer.C:
		}
		l.mu.Lock()
		other, running, busy = v.blocker(o, w)
		if !busy {
			v.dequeue(w) // it runs now: it blocks whom it blocked waiting
			return l.runLocked(id, v, o), nil
		}
		if u, urunning, ok := v.unwaitable(o, w); ok {
			other, running = u, urunning
		} else if ctx.Err() == nil && time.Since(start) < l.maxWait {
			continue
		}
		err := busyErr(id, o, other, running, time.Since(start))
		if ctx.Err() != nil {
			err = fmt.Errorf("volume %q: %s waited %s for %s: %w", id, o, since(start), other, ctx.Err())
		}
		v.dequeue(w)
		l.changedLocked(id, v) // a waiter behind w may be next now
		return nil, err
	}
}

// unwaitable is what in o's way on v (running, or waiting ahead of w; all
// waiters when w is nil) o does not wait out, if anything. l.mu held.
func (v *volOps) unwaitable(o op, w *opWaiter) (other op, running, ok bool) {
	for other, n := range v.running {
		if n > 0 && conflict(o, other) && !in(waits[o], other) {
			return other, true, true
		}
	}
	for _, q := range v.queue {
		if q == w {
			break
		}
		if conflict(o, q.o) && !in(waits[o], q.o) {
			return q.o, false, true
		}
	}
	return "", false, false
}

// dequeue removes w from v's waiters. l.mu held.
func (v *volOps) dequeue(w *opWaiter) {
	for i, q := range v.queue {
		if q == w {
			v.queue = append(v.queue[:i], v.queue[i+1:]...)
			return
		}
	}
}

func busyErr(id string, o, other op, running bool, waited time.Duration) error {
	state := "in progress"
	if !running {
		state = "waiting"
	}
	if waited > 0 {
		return fmt.Errorf("volume %q: %s refused after waiting %s, %s %s: %w", id, o, waited.Round(time.Millisecond), other, state, ErrBusy)
	}
	return fmt.Errorf("volume %q: %s refused, %s %s: %w", id, o, other, state, ErrBusy)
}

// runLocked registers o as running on v. l.mu held.
func (l *opLocks) runLocked(id string, v *volOps, o op) func() {
	v.running[o]++
	var once sync.Once
	return func() {
		once.Do(func() {
			l.mu.Lock()
			defer l.mu.Unlock()
			if v.running[o]--; v.running[o] == 0 {
				delete(v.running, o)
			}
			l.changedLocked(id, v)
		})
	}
}

// inFlight describes the operations running and waiting now, for tests and debugging.
func (l *opLocks) inFlight() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var parts []string
	for id, v := range l.vols {
		for o, n := range v.running {
			parts = append(parts, fmt.Sprintf("%s:%s×%d", id, o, n))
		}
		for i, w := range v.queue {
			parts = append(parts, fmt.Sprintf("%s:%s(waiting #%d)", id, w.o, i+1))
		}
	}
	sort.Strings(parts)
	return strings.Join(parts, " ")
}
