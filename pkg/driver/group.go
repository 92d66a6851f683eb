package driver

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"github.com/qcow2-csi/qcow2-csi/pkg/snapshotter"
)

// Group snapshots, the node's side (docs/group-snapshots.md). A group
// snapshot is taken in two steps so that it can span nodes:
//
//   - prepare takes the snapshot lock of each of the node's members,
//     readies each member's snapshot while I/O still flows (its record,
//     marked pending, the image's writes and metadata made durable, its
//     checkpoint bitmap: snapshotter.Prepare), then quiesces the staged
//     ones (gate.pause: requests inside finish, new ones wait) and
//     answers; it also starts the node's own timer;
//   - commit takes each member's internal snapshot (snapshotter.Commit,
//     the one step that fixes what it holds) while the I/O is held,
//     releases the I/O, then completes the members (the previous
//     checkpoints frozen, the records no longer pending) before it
//     answers: the hold is the drain and the snapshots only;
//   - release (abort, or DeleteVolumeGroupSnapshot) lets the I/O go and
//     deletes the member snapshots the group has on the node.
//
// A group not committed (aborted, expired, failed) leaves no member: its
// prepared records are deleted at its release, and those a crash left
// (pending, with or without their snapshot) by the retried create
// (groupExisting), by DeleteVolumeGroupSnapshot (groupRelease) or by
// DeleteVolume of their volume (dropPendingLeftovers).
//
// The timer releases the hold at the deadline whatever the controller
// does: I/O is never held longer than the hold the prepare asked for
// (capped by Options.GroupHoldTimeout), even when the controller died in
// between, and a commit that comes later is refused (ErrHoldExpired): the
// point in time is lost. The members are ordinary snapshots whose records
// carry the group (snapshotMeta.Group): restore, clone, deltas and
// DeleteSnapshot work on them as on any other.

// groupIDPrefix starts every group snapshot ID.
const groupIDPrefix = "grp-"

var validGroupID = regexp.MustCompile(`^grp-[0-9a-f]{32}$`)

// groupIDForName is the ID of the group snapshot named name. It is derived
// from the name so that a retried create (the controller keeps no state)
// finds the group its first attempt made.
func groupIDForName(name string) string {
	sum := sha256.Sum256([]byte(name))
	return groupIDPrefix + hex.EncodeToString(sum[:16])
}

// groupPrepare asks a node to hold its members of a group snapshot.
type groupPrepare struct {
	GroupID string `json:"groupId"`
	Name    string `json:"name"`
	// Members are the node's own source volumes; All the whole group's,
	// in the order of the request, recorded with each member.
	Members    []string          `json:"members"`
	All        []string          `json:"all"`
	Parameters map[string]string `json:"parameters,omitempty"`
	// HoldMillis is the longest the node may hold the I/O.
	HoldMillis int64 `json:"holdMillis"`
	// Commit: the node holds the whole group, so it commits as soon as
	// it is prepared and answers the members (Committed): the hold then
	// spans no round trip to the controller. A node that does not know
	// the field only prepares, and the controller commits as usual.
	Commit bool `json:"commit,omitempty"`
	// Attempt names the controller's create that sends the prepare (one
	// per CreateVolumeGroupSnapshot call). Requests of the same name share
	// the group's ID; the attempt tells their transactions apart, so that
	// one create's abort never ends another's hold. Empty from a controller
	// of an older release.
	Attempt string `json:"attempt,omitempty"`
}

// groupRef names a group snapshot in commit, release and get.
type groupRef struct {
	GroupID string `json:"groupId"`
	// HoldOnly: release ends the hold and keeps the members (the abort
	// of a prepare that took none, failed, must not delete a group that
	// a same-named request with other members ran into; see
	// groupRun.prepareTookNone).
	HoldOnly bool `json:"holdOnly,omitempty"`
	// Attempt: the create whose commit or abort this is
	// (groupPrepare.Attempt). A transaction another attempt prepared is
	// neither committed nor released by it. Empty (DeleteVolumeGroupSnapshot,
	// a controller of an older release): whichever is prepared.
	Attempt string `json:"attempt,omitempty"`
}

// owns reports whether ref may commit or release t: t is ref's attempt's,
// or one of the two does not say (see groupRef.Attempt).
func (ref groupRef) owns(t *groupTxn) bool {
	return ref.Attempt == "" || t.want.GroupAttempt == "" || ref.Attempt == t.want.GroupAttempt
}

// groupMember is one member snapshot, as a node reports it.
type groupMember struct {
	ID      string    `json:"id"`
	Source  string    `json:"source"`
	Size    int64     `json:"size"`
	Created time.Time `json:"created"`
}

// groupMembers is a node's answer: its member snapshots, and for a
// prepare whether the group was complete on the node already (a retry).
// Sources are the source volumes of the whole group, on every node, as
// its records have them: where a get or delete finds the other nodes.
type groupMembers struct {
	Committed bool          `json:"committed,omitempty"`
	Snapshots []groupMember `json:"snapshots,omitempty"`
	Sources   []string      `json:"sources,omitempty"`
}

func membersOf(ms []*snapshotMeta) *groupMembers {
	out := &groupMembers{}
	for _, m := range ms {
		out.Snapshots = append(out.Snapshots, groupMember{ID: m.ID, Source: m.Source, Size: m.Size, Created: m.Created})
	}
	if len(ms) > 0 {
		out.Sources = ms[0].GroupMembers
	}
	return out
}

// groupTxn is a group snapshot prepared on this node.
type groupTxn struct {
	id      string
	want    snapshotMeta // the members' record (its attempt too), less ID and source
	members []string
	start   time.Time
	// prepared is when the hold was in place (the drain done).
	prepared time.Time
	// deadline ends the hold: the commit's snapshots too must end by it.
	deadline time.Time
	timer    *time.Timer

	mu      sync.Mutex
	done    bool // released: committed, aborted or expired
	gates   []*gate
	unlocks []func()
	// recs are the members' records the prepare wrote (pending); at the
	// release they are deleted unless committed.
	recs      []*snapshotMeta
	committed bool
}

// groupTxns are the group snapshots prepared on the node, by ID.
type groupTxns struct {
	mu sync.Mutex
	m  map[string]*groupTxn
}

func (g *groupTxns) add(t *groupTxn) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.m == nil {
		g.m = map[string]*groupTxn{}
	}
	if _, ok := g.m[t.id]; ok {
		return fmt.Errorf("%w: group snapshot %q is being prepared or committed", ErrBusy, t.id)
	}
	g.m[t.id] = t
	return nil
}

func (g *groupTxns) get(id string) *groupTxn {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.m[id]
}

func (g *groupTxns) remove(t *groupTxn) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.m[t.id] == t {
		delete(g.m, t.id)
	}
}

// groupHold is the hold a prepare may use: what it asks, at most the
// node's own limit.
func (d *Driver) groupHold(askedMillis int64) time.Duration {
	h := time.Duration(askedMillis) * time.Millisecond
	if h <= 0 || h > d.opts.GroupHoldTimeout {
		h = d.opts.GroupHoldTimeout
	}
	return h
}

// checkGroupPrepare validates a prepare: every member listed once, in the
// group, and a volume of this node's pool whose I/O can be held.
func (d *Driver) checkGroupPrepare(req *groupPrepare) error {
	if !validGroupID.MatchString(req.GroupID) {
		return fmt.Errorf("%w: group snapshot ID %q was not issued by this driver", ErrInvalid, req.GroupID)
	}
	if len(req.Members) == 0 {
		return fmt.Errorf("%w: group snapshot %q: no member on node %s", ErrInvalid, req.Name, d.opts.NodeID)
	}
	// A prepare comes from the controller over the agent's TLS listener,
	// but is bounded as the CSI request is: the whole group, and so this
	// node's share of it.
	if err := checkGroupSize(req.Name, len(req.All), "source volumes"); err != nil {
		return err
	}
	if err := checkGroupSize(req.Name, len(req.Members), "members on node "+d.opts.NodeID); err != nil {
		return err
	}
	if _, ok := d.snapshotImages(); !ok {
		return needQcow2(req.Members[0])
	}
	inGroup := make(map[string]bool, len(req.All))
	for _, v := range req.All {
		inGroup[v] = true
	}
	seen := make(map[string]bool, len(req.Members))
	for _, v := range req.Members {
		// A member twice would find its own first lock in the way: Aborted
		// for ever, where the request is what is wrong.
		if seen[v] {
			return fmt.Errorf("%w: group snapshot %q: member %q listed twice", ErrInvalid, req.Name, v)
		}
		seen[v] = true
		if !inGroup[v] {
			return fmt.Errorf("%w: group snapshot %q: member %q is not among the group's volumes", ErrInvalid, req.Name, v)
		}
		if err := d.checkGroupMember(v); err != nil {
			return err
		}
	}
	return nil
}

// checkGroupMember checks that volume v is this node's, and that its I/O
// can be held if it is staged.
func (d *Driver) checkGroupMember(v string) error {
	if checkVolumeID(v) != nil {
		return fmt.Errorf("source volume %q: %w", v, ErrNotFound)
	}
	if err := d.ownVolume(v); err != nil {
		return err
	}
	if _, err := d.pool.get(v); err != nil {
		return fmt.Errorf("source volume %q: %w", v, err)
	}
	sv := d.lookupStaged(v)
	switch {
	case sv == nil:
		return nil // no I/O to hold
	case sv.image == nil:
		return fmt.Errorf("%w: source volume %q lost its device at a plugin restart (%s); unstage it first", ErrPrecondition, v, sv.lostReason)
	case sv.gate == nil:
		// Its device reads the file itself: its I/O cannot be held, and
		// its member would be silently inconsistent with the others.
		return fmt.Errorf("%w: source volume %q is staged on a device that reads its image directly: its I/O cannot be held for a group snapshot", ErrPrecondition, v)
	}
	return nil
}

// groupRecords are the member snapshots of group id on this node.
func (d *Driver) groupRecords(id string) ([]*snapshotMeta, error) {
	all, err := d.pool.listRecords()
	if err != nil {
		return nil, err
	}
	var out []*snapshotMeta
	for _, m := range all {
		if m.Group == id {
			out = append(out, m)
		}
	}
	return out, nil
}

// lockMembers takes the snapshot lock of each volume (never waiting:
// ErrBusy), or none.
func (d *Driver) lockMembers(vols []string) ([]func(), error) {
	var unlocks []func()
	for _, v := range vols {
		release, err := d.locks.acquire(v, opSnapshot)
		if err != nil {
			for _, u := range unlocks {
				u()
			}
			return nil, err
		}
		unlocks = append(unlocks, release)
	}
	return unlocks, nil
}

// groupPrepare holds the node's members of a group snapshot; see the top
// of the file. A group already complete on the node with the same members
// is answered Committed (a retried create); the leftovers of a commit a
// crash interrupted are deleted first.
func (d *Driver) groupPrepare(ctx context.Context, req *groupPrepare) (*groupMembers, error) {
	if err := d.checkGroupPrepare(req); err != nil {
		return nil, err
	}
	params, err := parseSnapshotParams(req.Parameters, d.opts.BlockMetadataType)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	deadline := start.Add(d.groupHold(req.HoldMillis))
	unlocks, err := d.lockMembers(req.Members)
	if err != nil {
		return nil, err
	}
	t := &groupTxn{id: req.GroupID, members: req.Members, start: start, deadline: deadline, unlocks: unlocks,
		want: snapshotMeta{BlockMetadataType: params.BlockMetadataType, Group: req.GroupID, GroupName: req.Name, GroupMembers: req.All,
			GroupAttempt: req.Attempt}}
	if done, err := d.groupExisting(ctx, req); done != nil || err != nil {
		t.unlock()
		return done, err
	}
	// t is locked until it is held: a commit waits for the prepare.
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := d.groups.add(t); err != nil {
		t.unlock()
		return nil, err
	}
	hctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	ready := time.Now()
	if err := d.prepareMembers(hctx, t); err != nil {
		d.releaseLocked(t, "") // deletes what was readied
		return nil, err
	}
	// The hold starts here (the work above holds nothing); the deadline
	// counts from the prepare's arrival.
	t.start = time.Now()
	for _, v := range req.Members {
		sv := d.lookupStaged(v)
		if sv == nil {
			continue // not staged here: no I/O to hold
		}
		if err := sv.gate.pause(hctx); err != nil {
			d.releaseLocked(t, "") // the caller counts the abort
			return nil, fmt.Errorf("volume %q: quiesce: %w", v, err)
		}
		t.gates = append(t.gates, sv.gate)
	}
	if err := ctx.Err(); err != nil {
		// The controller gave up on this prepare (a node stopped, then
		// resumed, handles it late): nobody will commit, so no hold.
		d.releaseLocked(t, "")
		return nil, fmt.Errorf("group snapshot %q: the prepare's caller is gone: %w", t.id, err)
	}
	t.prepared = time.Now()
	klog.FromContext(ctx).V(2).Info("Group snapshot prepared", "groupSnapshotID", t.id, "members", t.members, "held", len(t.gates),
		"ready", t.start.Sub(ready), "drain", t.prepared.Sub(t.start))
	if req.Commit {
		// No timer: the commit's own deadline bounds the hold.
		out, err := d.commitLocked(ctx, t)
		if out != nil {
			out.Committed = true
		}
		return out, err
	}
	t.timer = time.AfterFunc(time.Until(deadline), func() { d.expireGroup(t) })
	return &groupMembers{}, nil
}

// prepareMembers readies the snapshot of each of t's members, all at
// once, while I/O still flows; t.recs are the records written, also on
// an error (the release deletes them).
func (d *Driver) prepareMembers(ctx context.Context, t *groupTxn) error {
	recs := make([]*snapshotMeta, len(t.members))
	err := eachMember(t, func(i int, v string) error {
		var err error
		recs[i], err = d.prepareMember(ctx, v, t.want)
		return err
	})
	t.recs = slices.DeleteFunc(recs, func(m *snapshotMeta) bool { return m == nil })
	return err
}

// prepareMember writes the pending record of a member snapshot of volume
// vol and readies its snapshot (snapshotter.Prepare). The record goes
// first: whatever a crash leaves in the image, a record names it, and
// deleting the record's snapshot removes it. It returns the record once
// written, also on an error.
func (d *Driver) prepareMember(ctx context.Context, vol string, want snapshotMeta) (m *snapshotMeta, _ error) {
	err := d.withImage(ctx, vol, false, func(img *qcow2.Image, _ bool) error {
		n := newSnapshotMeta(img, vol, want)
		n.Source, n.Pending = vol, true
		if err := d.pool.putSnapshot(n); err != nil {
			return err
		}
		m = n
		return driverErr(snapshotter.Prepare(img, n.ID, n.Seq))
	})
	return m, err
}

// eachMember runs fn for each of t's members at once and waits for them
// all; each error names its member.
func eachMember(t *groupTxn, fn func(i int, vol string) error) error {
	errs := make([]error, len(t.members))
	var wg sync.WaitGroup
	for i, v := range t.members {
		wg.Go(func() {
			if err := fn(i, v); err != nil {
				errs[i] = fmt.Errorf("group snapshot %q: member %q: %w", t.id, v, err)
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// groupExisting checks a prepare against the group's records on the node:
// the same name with other members is AlreadyExists; a group complete here
// is the answer (done); a partial one, left by an interrupted commit, is
// deleted so that the prepare starts afresh.
func (d *Driver) groupExisting(ctx context.Context, req *groupPrepare) (done *groupMembers, err error) {
	recs, err := d.groupRecords(req.GroupID)
	if err != nil || len(recs) == 0 {
		return nil, err
	}
	// The same volumes in another order are the same group.
	if !slices.Equal(slices.Sorted(slices.Values(recs[0].GroupMembers)), slices.Sorted(slices.Values(req.All))) {
		return nil, fmt.Errorf("%w: group snapshot name %q is taken by %s of volumes %v", ErrAlreadyExists, req.Name, req.GroupID, recs[0].GroupMembers)
	}
	have := map[string]bool{}
	for _, m := range recs {
		// A record goes before its snapshot (prepareMember): one whose
		// snapshot a crash kept from being taken is not a member.
		taken, err := d.snapshotTaken(ctx, m)
		if err != nil {
			// Unknown is not "not taken": deleting here could delete
			// a group an earlier create already answered.
			return nil, fmt.Errorf("group snapshot %s: member %s: %w", req.GroupID, m.ID, err)
		}
		have[m.Source] = taken
	}
	complete := len(recs) == len(req.Members)
	for _, v := range req.Members {
		complete = complete && have[v]
	}
	if complete {
		// Every snapshot was taken; a crash may have come before their
		// records were completed (and the previous checkpoints frozen).
		for _, m := range recs {
			if m.Pending {
				if err := d.finishMember(ctx, m.Source, m); err != nil {
					return nil, err
				}
			}
		}
		out := membersOf(recs)
		out.Committed = true
		return out, nil
	}
	klog.FromContext(ctx).Info("Deleting the members an interrupted group snapshot left", "groupSnapshotID", req.GroupID, "members", len(recs))
	return nil, d.deleteGroupRecords(ctx, recs)
}

// snapshotTaken reports whether m's internal snapshot is in its image; an
// image it cannot look into (held by another program, its device lost) is
// an error, not an answer. The caller holds the volume's snapshot lock.
func (d *Driver) snapshotTaken(ctx context.Context, m *snapshotMeta) (bool, error) {
	err := d.withImage(ctx, m.Source, m.Hidden, func(img *qcow2.Image, _ bool) error {
		_, err := snapshotter.Find(img, m.ID)
		return err
	})
	if errors.Is(err, snapshotter.ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}

// deleteGroupRecords deletes member snapshots, their snapshots taken or
// not: a pending one, never answered, leaves no checkpoint behind
// (deleteSnapshot). The caller holds their volumes' snapshot locks.
func (d *Driver) deleteGroupRecords(ctx context.Context, recs []*snapshotMeta) error {
	var errs []error
	for _, m := range recs {
		ref, ok := parseSnapshotRef(m.ID)
		if !ok {
			continue
		}
		if err := d.deleteSnapshot(ctx, m.ID, ref); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (t *groupTxn) unlock() {
	for _, u := range t.unlocks {
		u()
	}
	t.unlocks = nil
}

// releaseGroup lets t's I/O go and its locks, once; reason, when not
// empty, counts it as aborted: only node_deadline, the node's own; the
// other reasons are counted where the protocol runs (group_coord.go),
// which in a --mode=all plugin is the same registry. It returns false
// when t was released already.
func (d *Driver) releaseGroup(t *groupTxn, reason string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return d.releaseLocked(t, reason)
}

func (d *Driver) releaseLocked(t *groupTxn, reason string) bool {
	if t.done {
		return false
	}
	t.done = true
	if t.timer != nil {
		t.timer.Stop()
	}
	d.endHold(t)
	if !t.committed && len(t.recs) > 0 {
		// Its locks are still held: nothing else sees the members go.
		if err := d.deleteGroupRecords(context.Background(), t.recs); err != nil {
			klog.Background().Error(err, "Deleting the members of a group snapshot that was not committed; a retried create or DeleteVolumeGroupSnapshot deletes them", "groupSnapshotID", t.id)
		}
		t.recs = nil
	}
	t.unlock()
	// Last: a commit that finds t waits on t.mu for the deletion above,
	// and then finds the volumes free.
	d.groups.remove(t)
	if reason != "" {
		d.metrics.groupAborts.WithLabelValues(reason).Inc()
	}
	return true
}

// endHold lets t's held I/O go, once, and records how long it was held.
// The caller holds t.mu.
func (d *Driver) endHold(t *groupTxn) {
	for _, g := range t.gates {
		g.resume()
	}
	if len(t.gates) > 0 {
		d.metrics.groupHold.Observe(time.Since(t.start).Seconds())
	}
	t.gates = nil
}

// expireGroup is the node's own deadline: no commit came in time.
func (d *Driver) expireGroup(t *groupTxn) {
	if d.releaseGroup(t, "node_deadline") {
		klog.Background().Info("Group snapshot hold released at the node's deadline: no commit came in time", "groupSnapshotID", t.id, "held", since(t.start))
	}
}

// groupCommit takes the member snapshots of a prepared group while their
// I/O is held, then releases it. A group no longer held (its deadline
// passed), or whose snapshots do not end by the deadline, is refused with
// ErrHoldExpired. On a failure the members taken
// are deleted: the node keeps no partial group.
func (d *Driver) groupCommit(ctx context.Context, ref groupRef) (*groupMembers, error) {
	t := d.groups.get(ref.GroupID)
	if t == nil {
		return nil, fmt.Errorf("%w: group snapshot %q is not prepared on node %s (never prepared, aborted, or released at its deadline)", ErrHoldExpired, ref.GroupID, d.opts.NodeID)
	}
	if !ref.owns(t) {
		return nil, fmt.Errorf("%w: group snapshot %q is held on node %s for another create of the same name, not this one", ErrHoldExpired, ref.GroupID, d.opts.NodeID)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.done || (t.timer != nil && !t.timer.Stop()) {
		d.releaseLocked(t, "node_deadline")
		return nil, fmt.Errorf("%w: group snapshot %q: node %s released its I/O at its deadline, %s after the prepare; the point in time is lost", ErrHoldExpired, t.id, d.opts.NodeID, since(t.start))
	}
	return d.commitLocked(ctx, t)
}

// commitLocked is groupCommit of t, held and with its timer stopped; the
// caller holds t.mu.
func (d *Driver) commitLocked(ctx context.Context, t *groupTxn) (*groupMembers, error) {
	// The snapshots run within what is left of the hold: I/O is never
	// held past the deadline, even when the disk is slow.
	hctx, cancel := context.WithDeadline(ctx, t.deadline)
	defer cancel()
	created, commitStart := time.Now().UTC(), time.Now()
	infos, each, late, err := d.commitMembers(hctx, t)
	if late != nil {
		d.abandonCommit(ctx, t, late)
		return nil, fmt.Errorf("%w: group snapshot %q: node %s: its member snapshots had not ended %s after the prepare (%v): I/O released, the members deleted once they end", ErrHoldExpired, t.id, d.opts.NodeID, since(t.start), context.Cause(hctx))
	}
	if err != nil {
		d.releaseLocked(t, "") // deletes the members; the caller counts the abort
		return nil, err
	}
	// The point in time is fixed: the I/O goes on while the members are
	// completed, before the answer.
	snaps, held := since(commitStart), since(t.start)
	d.endHold(t)
	finishStart := time.Now()
	if err := d.finishMembers(ctx, t, infos, created); err != nil {
		d.releaseLocked(t, "") // deletes the members; the caller counts the abort
		return nil, err
	}
	t.committed = true
	recs := t.recs
	d.releaseLocked(t, "")
	klog.FromContext(ctx).Info("Group snapshot members taken", "groupSnapshotID", t.id, "members", len(recs), "held", held)
	// Where the hold went: the prepare's drain is logged with it; then
	// the wait for the commit (the round trip to the controller), the
	// snapshots (each member's), and after the release the completion.
	klog.FromContext(ctx).V(2).Info("Group snapshot commit", "groupSnapshotID", t.id, "held", held, "waited", commitStart.Sub(t.prepared),
		"snapshots", snaps, "each", fmt.Sprint(each), "complete", since(finishStart))
	return membersOf(recs), nil
}

// finishMembers completes t's members once their snapshots are taken and
// the I/O goes on: the previous checkpoints frozen (snapshotter.Finish),
// and each record, no longer pending, with the snapshot's size and time,
// made durable before the group is answered.
func (d *Driver) finishMembers(ctx context.Context, t *groupTxn, infos []qcow2.SnapshotInfo, created time.Time) error {
	return eachMember(t, func(i int, v string) error {
		m := t.recs[i]
		m.Size, m.Created = int64(infos[i].DiskSize), created
		return d.finishMember(ctx, v, m)
	})
}

// finishMember completes member m of volume vol, its snapshot taken: the
// previous checkpoints frozen (snapshotter.Finish), then its record no
// longer pending. The caller holds the volume's snapshot lock.
func (d *Driver) finishMember(ctx context.Context, vol string, m *snapshotMeta) error {
	err := d.withImage(ctx, vol, false, func(img *qcow2.Image, _ bool) error {
		snapshotter.Finish(img, m.Seq)
		return nil
	})
	if err != nil {
		return err
	}
	m.Pending = false
	return d.pool.putSnapshot(m)
}

// abandonCommit ends a commit whose snapshots outlived the hold: the I/O
// goes now; the volumes stay locked (a retry is Aborted) until the
// snapshots still running end and every member taken is deleted, as a
// member taken after the release is not of the group's instant. The
// caller holds t.mu.
func (d *Driver) abandonCommit(ctx context.Context, t *groupTxn, late func()) {
	unlocks, recs := t.unlocks, t.recs
	t.unlocks, t.recs = nil, nil
	d.releaseLocked(t, "") // the caller counts the abort
	logger := klog.FromContext(ctx).WithValues("groupSnapshotID", t.id)
	logger.Info("Group snapshot hold ran out during its commit: I/O released", "held", since(t.start))
	go func() {
		late()
		if err := d.deleteGroupRecords(context.WithoutCancel(ctx), recs); err != nil {
			logger.Error(err, "Deleting the members of a commit that ran out of its hold; DeleteVolumeGroupSnapshot or a retry deletes them")
		}
		for _, u := range unlocks {
			u()
		}
	}()
}

// commitMembers takes the internal snapshots of t's prepared members, all
// at once: each is its own image (and its own syncs), and the I/O is held
// until the slowest is done, so the hold is the longest snapshot, not
// their sum. It returns each member's snapshot, in t.recs' order. When
// ctx ends first it returns at once with late, which waits for the
// snapshots still running (they cannot be interrupted).
func (d *Driver) commitMembers(ctx context.Context, t *groupTxn) (_ []qcow2.SnapshotInfo, _ []time.Duration, late func(), _ error) {
	recs := t.recs // abandonCommit takes them from t while these run
	infos := make([]qcow2.SnapshotInfo, len(recs))
	each := make([]time.Duration, len(recs)) // each member's, for the log
	var err error
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		err = eachMember(t, func(i int, v string) error {
			m, start := recs[i], time.Now()
			defer func() { each[i] = time.Since(start) }()
			return d.withImage(ctx, v, false, func(img *qcow2.Image, _ bool) error {
				var err error
				infos[i], err = snapshotter.Commit(img, m.ID, m.Seq)
				return driverErr(err)
			})
		})
	}()
	select {
	case <-ended:
		return infos, each, nil, err
	case <-ctx.Done():
		select {
		case <-ended: // both at once: the snapshots did end in time
			return infos, each, nil, err
		default:
			return nil, nil, func() { <-ended }, nil
		}
	}
}

// groupRelease aborts group id on this node, if it is held, and deletes
// the member snapshots it has here (not with HoldOnly): the abort of a
// failed create and DeleteVolumeGroupSnapshot alike. With an attempt, only
// that create's hold and members (groupRef.Attempt). An unknown group is
// released already.
func (d *Driver) groupRelease(ctx context.Context, ref groupRef) error {
	if t := d.groups.get(ref.GroupID); t != nil {
		if !ref.owns(t) {
			// Another create of the same name holds the group here: this
			// attempt's prepare could not have added its own, so it has
			// nothing here, and the records are the other's to keep or
			// delete.
			klog.FromContext(ctx).V(2).Info("Group snapshot abort leaves another create's hold alone", "groupSnapshotID", t.id)
			return nil
		}
		if d.releaseGroup(t, "") {
			klog.FromContext(ctx).Info("Group snapshot hold released by an abort", "groupSnapshotID", t.id, "held", since(t.start))
		}
	}
	if ref.HoldOnly {
		return nil
	}
	recs, err := d.groupRecords(ref.GroupID)
	if err != nil {
		return err
	}
	for _, m := range recs {
		if !ref.deletes(m) {
			continue // not waiting for the lock of another create's member
		}
		unlock, err := d.locks.acquireWait(ctx, m.Source, opSnapshot)
		if err != nil {
			return err
		}
		err = d.releaseMember(ctx, m.ID, ref)
		unlock()
		if err != nil {
			return err
		}
	}
	return nil
}

// deletes reports whether a release of ref deletes member m: with an
// attempt, only that create's members (and untokened ones of older
// releases) go; another create's may be in a group it returns.
func (ref groupRef) deletes(m *snapshotMeta) bool {
	return ref.Attempt == "" || m.GroupAttempt == "" || m.GroupAttempt == ref.Attempt
}

// releaseMember deletes member snapshot id for release ref, as its record
// is once the caller holds its volume's snapshot lock: it may be gone or
// changed since it was listed.
func (d *Driver) releaseMember(ctx context.Context, id string, ref groupRef) error {
	m, err := d.pool.getRecord(id)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if m.Group != ref.GroupID || !ref.deletes(m) {
		return nil
	}
	return d.deleteGroupRecords(ctx, []*snapshotMeta{m})
}

// groupGet reports the member snapshots of group id on this node;
// ErrNotFound when it has none.
func (d *Driver) groupGet(_ context.Context, ref groupRef) (*groupMembers, error) {
	recs, err := d.groupRecords(ref.GroupID)
	if err != nil {
		return nil, err
	}
	// Members being prepared or committed are not the group's yet.
	recs = slices.DeleteFunc(recs, func(m *snapshotMeta) bool { return m.Pending })
	if len(recs) == 0 {
		return nil, fmt.Errorf("%w: group snapshot %q has no member on node %s", ErrNotFound, ref.GroupID, d.opts.NodeID)
	}
	return membersOf(recs), nil
}

const (
	// DefaultGroupHoldTimeout is Options.GroupHoldTimeout's default: ample
	// for the prepare round trip and a few snapshots, short enough that a
	// stalled protocol costs applications seconds, not their I/O.
	DefaultGroupHoldTimeout = 5 * time.Second
	// MaxGroupHoldTimeout keeps a hold well below the kernel's nbd
	// request timeout (30 s), past which held requests would fail.
	MaxGroupHoldTimeout = 20 * time.Second
)

// checkGroupHold validates a group snapshot hold timeout.
func checkGroupHold(h time.Duration) error {
	if h <= 0 || h > MaxGroupHoldTimeout {
		return fmt.Errorf("group snapshot hold timeout %s: want more than 0 and at most %s", h, MaxGroupHoldTimeout)
	}
	return nil
}
