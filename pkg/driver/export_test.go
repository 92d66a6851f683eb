package driver

import (
	"context"
	"time"

	dto "github.com/prometheus/client_model/go"
)

// The node's steps of a group snapshot (group.go), for tests that play a
// controller which prepares and then commits late, or never.

// GroupPrepareForTest prepares group name of members (all on this node)
// with hold, as the create attempt TestAttempt, and returns the group's ID.
func (d *Driver) GroupPrepareForTest(ctx context.Context, name string, members []string, hold time.Duration) (string, error) {
	return d.GroupPrepareAttemptForTest(ctx, name, members, members, hold, TestAttempt)
}

// TestAttempt is the create attempt of GroupPrepareForTest and
// GroupCommitForTest.
const TestAttempt = "test-attempt"

// GroupPrepareAttemptForTest prepares this node's members of group name
// (whose volumes are all) as create attempt attempt.
func (d *Driver) GroupPrepareAttemptForTest(ctx context.Context, name string, members, all []string, hold time.Duration, attempt string) (string, error) {
	id := groupIDForName(name)
	_, err := d.groupPrepare(ctx, &groupPrepare{GroupID: id, Name: name, Members: members, All: all, HoldMillis: hold.Milliseconds(), Attempt: attempt})
	return id, toStatus(err)
}

// GroupAbortAttemptForTest is create attempt attempt's abort of group id on
// this node after its commit failed (not hold-only), as releaseAll sends it.
func (d *Driver) GroupAbortAttemptForTest(ctx context.Context, id, attempt string) error {
	return toStatus(d.groupRelease(ctx, groupRef{GroupID: id, Attempt: attempt}))
}

// GroupCommitForTest commits group id as attempt TestAttempt and returns
// its member snapshot IDs.
func (d *Driver) GroupCommitForTest(ctx context.Context, id string) ([]string, error) {
	return d.GroupCommitAttemptForTest(ctx, id, TestAttempt)
}

// GroupCommitAttemptForTest commits group id as create attempt attempt.
func (d *Driver) GroupCommitAttemptForTest(ctx context.Context, id, attempt string) ([]string, error) {
	m, err := d.groupCommit(ctx, groupRef{GroupID: id, Attempt: attempt})
	if err != nil {
		return nil, toStatus(err)
	}
	var ids []string
	for _, s := range m.Snapshots {
		ids = append(ids, s.ID)
	}
	return ids, nil
}

// GroupHoldForTest is the hold histogram's count and sum (seconds).
func (d *Driver) GroupHoldForTest() (uint64, float64) {
	var m dto.Metric
	if err := d.metrics.groupHold.Write(&m); err != nil {
		panic(err)
	}
	return m.GetHistogram().GetSampleCount(), m.GetHistogram().GetSampleSum()
}

// MaxGroupMembersForTest is the bound on a group snapshot's volumes.
const MaxGroupMembersForTest = maxGroupMembers

// FlattenRunningForTest says whether a background flatten of volume id is
// registered: stepping, backing off from a busy volume, or ending its
// last step. The record's "waiting" outlives the flatten that set it (a
// DeleteSnapshot starts a new one before any step rewrites it), so only
// this says that nothing of the driver has the closed image open.
func (d *Driver) FlattenRunningForTest(id string) bool {
	d.flattens.mu.Lock()
	defer d.flattens.mu.Unlock()
	_, ok := d.flattens.running[id]
	return ok
}

// HoldSnapshotLockForTest takes volume id's snapshot lock as a restore's
// copy or a snapshot does, until the returned func is called.
func (d *Driver) HoldSnapshotLockForTest(id string) (func(), error) {
	return d.locks.acquire(id, opSnapshot)
}

// OpsInFlightForTest lists the operations running and waiting per volume.
func (d *Driver) OpsInFlightForTest() string { return d.locks.inFlight() }
