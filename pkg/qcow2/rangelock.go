package qcow2

import "sync"

// rangeLock serialises requests on overlapping guest ranges: readers share,
// writers (and readers against writers) exclude each other. The set of held
// ranges is small (one per request in flight), so a list scan is enough.
type rangeLock struct {
	mu   sync.Mutex
	cond *sync.Cond
	held []heldRange
	next uint64
}

type heldRange struct {
	start, end int64
	excl       bool
	id         uint64
}

func (r *rangeLock) conflicts(start, end int64, excl bool) bool {
	for _, h := range r.held {
		if h.start < end && start < h.end && (excl || h.excl) {
			return true
		}
	}
	return false
}

// lock waits until [start, end) can be held and returns a token for unlock.
func (r *rangeLock) lock(start, end int64, excl bool) uint64 {
	r.mu.Lock()
	if r.cond == nil {
		r.cond = sync.NewCond(&r.mu)
	}
	for r.conflicts(start, end, excl) {
		r.cond.Wait()
	}
	r.next++
	id := r.next
	r.held = append(r.held, heldRange{start, end, excl, id})
	r.mu.Unlock()
	return id
}

func (r *rangeLock) unlock(id uint64) {
	r.mu.Lock()
	for i, h := range r.held {
		if h.id == id {
			r.held[i] = r.held[len(r.held)-1]
			r.held = r.held[:len(r.held)-1]
			break
		}
	}
	r.cond.Broadcast()
	r.mu.Unlock()
}
