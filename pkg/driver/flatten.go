package driver

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"github.com/qcow2-csi/qcow2-csi/pkg/snapshotter"
)

// Flatten: copying a clone's base up into it (qemu's block-stream), so that
// it stands alone and its base can go. It is asked for by the StorageClass
// parameter flatten=true or a VolumeAttributesClass with flatten=true (at
// creation, or later through ControllerModifyVolume, qos.go), and runs in
// the background, one snapshotter.FlattenStepSize step at a time, each
// under the volume's snapshot and modify locks (the latter: it rewrites the
// record, as ControllerModifyVolume does): on the node's open image when the volume is staged (I/O
// goes on), otherwise on the closed image. The offset reached is kept in
// the volume's record, and Start resumes every flatten the record shows.
// When the disk is copied up the backing file is dropped and the volume's
// reference to its base released; if a snapshot of the volume still reads
// the base the flatten waits, and DeleteSnapshot of the volume tries again.

// flattenState is the progress of a volume's flatten, in its record.
type flattenState struct {
	// Offset: the disk below it is copied up.
	Offset int64 `json:"offset"`
	// Waiting says why the backing file could not be dropped yet.
	Waiting string `json:"waiting,omitempty"`
}

// flattenRuns are the background flattens of this process.
type flattenRuns struct {
	mu      sync.Mutex
	running map[string]context.CancelFunc
	// again: a start came while id's flatten ran; it runs once more
	// before it ends, so that what the start was for (a snapshot deleted
	// after the last step found it on the base) is not lost.
	again map[string]bool
	wg    sync.WaitGroup
}

// start registers a flatten of id; false when one runs already (it then
// runs once more before it ends).
func (r *flattenRuns) start(id string) (context.Context, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.running[id]; ok {
		if r.again == nil {
			r.again = map[string]bool{}
		}
		r.again[id] = true
		return nil, false
	}
	if r.running == nil {
		r.running = map[string]context.CancelFunc{}
	}
	ctx, cancel := context.WithCancel(context.Background())
	r.running[id] = cancel
	r.wg.Add(1)
	return ctx, true
}

// done ends id's flatten (ctx its context), unless a start came while it
// ran and it was not stopped: then it stays registered and is to run
// again (false).
func (r *flattenRuns) done(ctx context.Context, id string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.again[id] && ctx.Err() == nil {
		delete(r.again, id)
		return false
	}
	delete(r.again, id)
	if c, ok := r.running[id]; ok {
		c()
		delete(r.running, id)
	}
	r.wg.Done()
	return true
}

// stop cancels id's flatten; it ends at its next step.
func (r *flattenRuns) stop(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if c, ok := r.running[id]; ok {
		c()
	}
}

// stopAll cancels every flatten and waits for them to end.
func (r *flattenRuns) stopAll() {
	r.mu.Lock()
	for _, c := range r.running {
		c()
	}
	r.mu.Unlock()
	r.wg.Wait()
}

// flattenRetry bounds the wait before a step that found the volume busy
// tries again.
const flattenRetry = 2 * time.Second

// startFlatten runs volume id's flatten in the background; one that runs
// already runs once more before it ends (DeleteSnapshot may come between
// its last step and its end).
func (d *Driver) startFlatten(id string) {
	ctx, ok := d.flattens.start(id)
	if !ok {
		return
	}
	go func() {
		for {
			d.runFlatten(ctx, id)
			if d.flattens.done(ctx, id) {
				return
			}
		}
	}()
}

// runFlatten steps volume id's flatten until it is done, stopped, or fails.
func (d *Driver) runFlatten(ctx context.Context, id string) {
	logger := klog.Background().WithValues("volumeID", id)
	start := time.Now()
	wait := 50 * time.Millisecond
	for {
		done, err := d.flattenStep(ctx, id)
		switch {
		case errors.Is(err, ErrBusy):
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
			wait = min(2*wait, flattenRetry)
			continue
		case err != nil:
			logger.Error(err, "Flatten stopped; it resumes at the next start or request")
			return
		case done:
			logger.Info("Flatten ended", "took", since(start))
			return
		}
		wait = 50 * time.Millisecond
	}
}

// flattenStep does one step of volume id's flatten under its snapshot
// lock. done: nothing more to do now (finished, waiting for snapshots,
// cancelled, or the volume is gone).
func (d *Driver) flattenStep(ctx context.Context, id string) (done bool, err error) {
	if ctx.Err() != nil {
		return true, nil
	}
	release, err := d.locks.acquire(id, opSnapshot)
	if err != nil {
		return false, err
	}
	defer release()
	releaseModify, err := d.locks.acquire(id, opModify)
	if err != nil {
		return false, err
	}
	defer releaseModify()
	m, err := d.pool.get(id)
	if errors.Is(err, ErrNotFound) {
		return true, nil
	} else if err != nil {
		return true, err
	}
	if m.Flatten == nil {
		return true, nil
	}
	base := baseOf(d.pool.imagePath(id))
	finished := false
	err = d.withImage(ctx, id, false, func(img *qcow2.Image, _ bool) error {
		next, fin, err := snapshotter.FlattenStep(img, m.Flatten.Offset)
		if errors.Is(err, qcow2.ErrBackingNeeded) {
			m.Flatten.Waiting, done = err.Error(), true
			return nil
		}
		m.Flatten.Offset, finished = next, fin
		return err
	})
	if err != nil {
		return true, fmt.Errorf("volume %q: flatten: %w", id, err)
	}
	if finished {
		m.Flatten = nil
	}
	if err := d.pool.put(m); err != nil {
		return true, err
	}
	if finished {
		klog.FromContext(ctx).V(2).Info("Flattened; releasing the base", "volumeID", id, "base", base)
		return true, d.releaseImageBase(base, id)
	}
	return done, nil
}

// requestFlatten marks volume id for flattening and starts it; a volume
// without a base has nothing to flatten (started is false). The caller
// holds id's modify lock (one writer of the record at a time).
func (d *Driver) requestFlatten(id string) (started bool, err error) {
	m, err := d.pool.get(id)
	if err != nil {
		return false, err
	}
	if baseOf(d.pool.imagePath(id)) == "" {
		return false, nil
	}
	if m.Flatten == nil || m.Flatten.Waiting != "" {
		if m.Flatten == nil {
			m.Flatten = &flattenState{}
		}
		m.Flatten.Waiting = ""
		if err := d.pool.put(m); err != nil {
			return false, err
		}
	}
	d.startFlatten(id)
	return true, nil
}

// resumeFlattens starts the flattens the records show (Start).
func (d *Driver) resumeFlattens(ctx context.Context) {
	names, err := d.pool.list()
	if err != nil {
		klog.FromContext(ctx).Error(err, "Listing volumes to resume flattens")
		return
	}
	for _, n := range names {
		if m, err := d.pool.getFile(n); err == nil && m.Flatten != nil {
			klog.FromContext(ctx).Info("Resuming flatten", "volumeID", m.ID, "offset", m.Flatten.Offset)
			d.startFlatten(m.ID)
		}
	}
}

// takeFlatten splits the flatten key (a VolumeAttributesClass with
// flatten: "true") from mutable parameters; the rest are I/O limits
// (qos.go).
func takeFlatten(p map[string]string) (rest map[string]string, flatten bool, err error) {
	v, ok := p[paramFlatten]
	if !ok {
		return p, false, nil
	}
	if flatten, err = strconv.ParseBool(v); err != nil {
		return nil, false, fmt.Errorf("%w: mutable parameter %s=%q: want true or false", ErrInvalid, paramFlatten, v)
	}
	rest = make(map[string]string, len(p)-1)
	for k, v := range p {
		if k != paramFlatten {
			rest[k] = v
		}
	}
	return rest, flatten, nil
}
