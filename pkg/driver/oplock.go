package driver

import (
	"fmt"
	"sort"
	"strings"
	"sync"
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

func conflict(a, b op) bool {
	for _, c := range conflicts[a] {
		if c == b {
			return true
		}
	}
	return false
}

// opLocks is the table of operations in flight per volume. Acquire never
// waits: a conflicting request fails with ErrBusy (Aborted), which is what the
// CSI spec asks of a plugin that sees a second call for a volume while the
// first is still running; the CO retries with backoff.
type opLocks struct {
	mu      sync.Mutex
	running map[string]map[op]int
}

func newOpLocks() *opLocks { return &opLocks{running: map[string]map[op]int{}} }

// acquire registers o on id, or returns an error wrapping ErrBusy naming the
// operation in the way. The returned func releases it.
func (l *opLocks) acquire(id string, o op) (release func(), err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	cur := l.running[id]
	for other, n := range cur {
		if n > 0 && conflict(o, other) {
			return nil, fmt.Errorf("volume %q: %s refused, %s in progress: %w", id, o, other, ErrBusy)
		}
	}
	if cur == nil {
		cur = map[op]int{}
		l.running[id] = cur
	}
	cur[o]++
	var once sync.Once
	return func() {
		once.Do(func() {
			l.mu.Lock()
			defer l.mu.Unlock()
			if cur[o]--; cur[o] == 0 {
				delete(cur, o)
			}
			if len(cur) == 0 {
				delete(l.running, id)
			}
		})
	}, nil
}

// inFlight describes the operations running now, for tests and debugging.
func (l *opLocks) inFlight() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var parts []string
	for id, ops := range l.running {
		for o, n := range ops {
			parts = append(parts, fmt.Sprintf("%s:%s×%d", id, o, n))
		}
	}
	sort.Strings(parts)
	return strings.Join(parts, " ")
}
