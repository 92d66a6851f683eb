package driver

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
	"k8s.io/klog/v2"
)

// The group snapshot protocol, where it runs: the router for the
// cluster's nodes (each a node agent), a single-process driver for its
// own node. Both speak to a node through groupPeer.

// groupPeer is one node's side of a group snapshot (group.go).
type groupPeer interface {
	prepare(ctx context.Context, req *groupPrepare) (*groupMembers, error)
	commit(ctx context.Context, ref groupRef) (*groupMembers, error)
	release(ctx context.Context, ref groupRef) error
	get(ctx context.Context, ref groupRef) (*groupMembers, error)
}

// localPeer is the driver's own node.
type localPeer struct{ d *Driver }

func (p localPeer) prepare(ctx context.Context, req *groupPrepare) (*groupMembers, error) {
	return p.d.groupPrepare(ctx, req)
}
func (p localPeer) commit(ctx context.Context, ref groupRef) (*groupMembers, error) {
	return p.d.groupCommit(ctx, ref)
}
func (p localPeer) release(ctx context.Context, ref groupRef) error {
	return p.d.groupRelease(ctx, ref)
}
func (p localPeer) get(ctx context.Context, ref groupRef) (*groupMembers, error) {
	return p.d.groupGet(ctx, ref)
}

// groupAbortGrace is how much longer than the hold an abort may take: a
// node that does not answer within it releases at its own deadline anyway
// (and its members, if it committed, go with the retry or the delete),
// while the nodes that do answer are released at once, in parallel.
const groupAbortGrace = time.Second

// groupCommitTimeout bounds a commit, which takes the node's member
// snapshots (each a few metadata writes). A node ends its held I/O at its
// own deadline (group.go); this only bounds the wait for its answer.
const groupCommitTimeout = time.Minute

// maxGroupMembers bounds the source volumes of one group snapshot, and
// the members of one node's prepare. Each member is a goroutine, a held
// snapshot lock and, staged, a paused gate, all at once, and the node's
// members are snapshotted in parallel within one hold (5 s by default,
// 20 s at most): 64 is far above a real group (a database's data and
// WAL, a few shards) and still a count whose snapshot syncs fit in the
// hold on one disk, while a hostile or mistaken request of thousands is
// refused before anything is held.
const maxGroupMembers = 64

// checkGroupSize refuses a group snapshot named name of n volumes (what
// counts: "source volumes", "members on node X") above maxGroupMembers.
func checkGroupSize(name string, n int, what string) error {
	if n > maxGroupMembers {
		return fmt.Errorf("%w: group snapshot %q: %d %s, at most %d", ErrInvalid, name, n, what, maxGroupMembers)
	}
	return nil
}

// groupRun is one CreateVolumeGroupSnapshot across the nodes in peers,
// each with its members in members.
type groupRun struct {
	id, name string
	// attempt tells this create's prepares, commits and aborts from
	// those of another create of the same name (groupPrepare.Attempt);
	// create makes it.
	attempt string
	all     []string
	params  map[string]string
	hold    time.Duration
	peers   map[string]groupPeer
	members map[string][]string
	aborts  *prometheus.CounterVec
}

// eachNode runs fn for every node at once, and returns the errors, each
// naming its node once (the router's own already do).
func (g *groupRun) eachNode(fn func(node string, p groupPeer) error) error {
	var mu sync.Mutex
	var errs []error
	var wg sync.WaitGroup
	for _, n := range slices.Sorted(maps.Keys(g.peers)) {
		wg.Go(func() {
			if err := fn(n, g.peers[n]); err != nil {
				if !namesNode(err, n) {
					err = fmt.Errorf("node %s: %w", n, err)
				}
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// create runs prepare on every node at once, then commit on every node;
// on any failure every node is released and the members taken deleted.
// A group already complete on every node is the answer; one complete on
// some only (an earlier attempt whose commit was interrupted) is deleted
// and taken afresh, once.
func (g *groupRun) create(ctx context.Context) (*csi.VolumeGroupSnapshot, error) {
	logger := klog.FromContext(ctx).WithValues("groupSnapshotID", g.id, "name", g.name)
	if g.attempt == "" {
		var b [8]byte
		if _, err := rand.Read(b[:]); err != nil {
			return nil, fmt.Errorf("group snapshot %q: %w", g.name, err)
		}
		g.attempt = hex.EncodeToString(b[:])
	}
	for attempt := 0; ; attempt++ {
		got, err := g.prepareAll(ctx)
		if err != nil {
			reason := "prepare_failed"
			switch {
			case errors.Is(err, context.DeadlineExceeded) || status.Code(err) == codes.DeadlineExceeded:
				reason = "prepare_timeout"
			case errors.Is(err, ErrHoldExpired):
				reason = "commit_refused" // a one-node group commits in its prepare
			}
			return nil, g.abort(ctx, reason, true, fmt.Errorf("group snapshot %q: prepare: %w", g.name, err))
		}
		done := 0
		for _, m := range got {
			if m.Committed {
				done++
			}
		}
		if done == len(g.peers) {
			return g.assemble(got)
		}
		if done == 0 {
			break
		}
		if attempt > 0 {
			return nil, g.abort(ctx, "prepare_failed", false, fmt.Errorf("%w: group snapshot %q: its members on some nodes exist already from an earlier attempt, again after deleting them", ErrBusy, g.name))
		}
		logger.Info("Group snapshot complete on some nodes only (an earlier attempt was interrupted): taking it afresh", "complete", done, "nodes", len(g.peers))
		// Without this create's attempt: the members are an earlier
		// create's.
		if err := g.releaseAll(ctx, false, ""); err != nil {
			return nil, fmt.Errorf("group snapshot %q: delete the members of an earlier attempt: %w", g.name, err)
		}
	}
	got, err := g.commitAll(ctx)
	if err != nil {
		reason := "commit_failed"
		if errors.Is(err, ErrHoldExpired) || status.Code(err) == codes.Aborted {
			reason = "commit_refused"
		}
		return nil, g.abort(ctx, reason, false, fmt.Errorf("group snapshot %q: commit: %w", g.name, err))
	}
	return g.assemble(got)
}

func (g *groupRun) prepareAll(ctx context.Context) (map[string]*groupMembers, error) {
	pctx, cancel := context.WithTimeout(ctx, g.hold)
	defer cancel()
	return g.collect(func(n string, p groupPeer) (*groupMembers, error) {
		return p.prepare(pctx, &groupPrepare{GroupID: g.id, Name: g.name, Members: g.members[n], All: g.all,
			Parameters: g.params, HoldMillis: g.hold.Milliseconds(), Commit: len(g.peers) == 1, Attempt: g.attempt})
	})
}

func (g *groupRun) commitAll(ctx context.Context) (map[string]*groupMembers, error) {
	cctx, cancel := context.WithTimeout(ctx, groupCommitTimeout)
	defer cancel()
	return g.collect(func(_ string, p groupPeer) (*groupMembers, error) {
		return p.commit(cctx, groupRef{GroupID: g.id, Attempt: g.attempt})
	})
}

// collect calls fn on every node at once (eachNode) and gathers the nodes'
// answers by node name.
func (g *groupRun) collect(fn func(node string, p groupPeer) (*groupMembers, error)) (map[string]*groupMembers, error) {
	var mu sync.Mutex
	got := map[string]*groupMembers{}
	err := g.eachNode(func(n string, p groupPeer) error {
		m, err := fn(n, p)
		if err == nil {
			mu.Lock()
			got[n] = m
			mu.Unlock()
		}
		return err
	})
	return got, err
}

// releaseAll releases every node and, unless holdOnly, deletes the
// members it has: those of attempt (groupRef.Attempt), or of any create
// when attempt is empty. It outlives ctx's cancellation (the caller may
// have gone).
func (g *groupRun) releaseAll(ctx context.Context, holdOnly bool, attempt string) error {
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), g.hold+groupAbortGrace)
	defer cancel()
	return g.eachNode(func(_ string, p groupPeer) error {
		return p.release(actx, groupRef{GroupID: g.id, HoldOnly: holdOnly, Attempt: attempt})
	})
}

// abort releases every node after a failure err (holdOnly: in the
// prepare, when no member was taken), counts it by reason and returns err
// with what the release could not do.
func (g *groupRun) abort(ctx context.Context, reason string, holdOnly bool, err error) error {
	g.aborts.WithLabelValues(reason).Inc()
	rerr := g.releaseAll(ctx, holdOnly, g.attempt)
	klog.FromContext(ctx).Info("Group snapshot aborted", "groupSnapshotID", g.id, "reason", reason, "err", err, "releaseErr", rerr)
	if rerr != nil {
		return fmt.Errorf("%w; release: %v (a node that did not answer releases at its own deadline; its members go with the next attempt or DeleteVolumeGroupSnapshot)", err, rerr)
	}
	return err
}

// assemble makes the group from the nodes' members, in the order of the
// request's source volumes.
func (g *groupRun) assemble(got map[string]*groupMembers) (*csi.VolumeGroupSnapshot, error) {
	bySource := map[string]groupMember{}
	for _, m := range got {
		for _, s := range m.Snapshots {
			bySource[s.Source] = s
		}
	}
	var ms []groupMember
	for _, v := range g.all {
		s, ok := bySource[v]
		if !ok {
			return nil, fmt.Errorf("group snapshot %q: no member snapshot of volume %q came back", g.name, v)
		}
		ms = append(ms, s)
	}
	return groupSnapshot(g.id, ms), nil
}

// groupSnapshot is the CSI form of group id with members ms. Its creation
// time is the earliest member's: all were taken while the I/O was held.
func groupSnapshot(id string, ms []groupMember) *csi.VolumeGroupSnapshot {
	out := &csi.VolumeGroupSnapshot{GroupSnapshotId: id, ReadyToUse: true}
	var first time.Time
	for _, s := range ms {
		out.Snapshots = append(out.Snapshots, &csi.Snapshot{SnapshotId: s.ID, SourceVolumeId: s.Source, SizeBytes: s.Size,
			CreationTime: timestamppb.New(s.Created), ReadyToUse: true, GroupSnapshotId: id})
		if first.IsZero() || s.Created.Before(first) {
			first = s.Created
		}
	}
	out.CreationTime = timestamppb.New(first)
	return out
}

// validateCreateVolumeGroupSnapshotRequest checks what needs no node.
func validateCreateVolumeGroupSnapshotRequest(r *csi.CreateVolumeGroupSnapshotRequest) error {
	name := r.GetName()
	if name == "" {
		return fmt.Errorf("%w: group snapshot name is required", ErrInvalid)
	}
	if len(name) > maxSnapshotNameLen || !utf8.ValidString(name) || strings.ContainsFunc(name, bannedNameRune) {
		return fmt.Errorf("%w: group snapshot name must be 1..%d bytes of UTF-8 without control characters", ErrInvalid, maxSnapshotNameLen)
	}
	if len(r.GetSourceVolumeIds()) == 0 {
		return fmt.Errorf("%w: group snapshot %q: source_volume_ids is required (at least one volume)", ErrInvalid, name)
	}
	if err := checkGroupSize(name, len(r.GetSourceVolumeIds()), "source volumes"); err != nil {
		return err
	}
	seen := map[string]bool{}
	for i, v := range r.GetSourceVolumeIds() {
		if v == "" {
			return fmt.Errorf("%w: group snapshot %q: source_volume_ids[%d] is empty", ErrInvalid, name, i)
		}
		if seen[v] {
			return fmt.Errorf("%w: group snapshot %q: source volume %q is listed twice", ErrInvalid, name, v)
		}
		seen[v] = true
	}
	// Unknown keys fail here, before any I/O is held; the nodes apply
	// their own default block metadata type.
	_, err := parseSnapshotParams(r.GetParameters(), blockMetadataVariable)
	return err
}

// bannedNameRune: the control characters the CSI spec bans from names
// (other than tab, newline and carriage return).
func bannedNameRune(r rune) bool {
	return (r <= 0x1f && r != '\t' && r != '\n' && r != '\r') || (r >= 0x7f && r <= 0x9f)
}

// checkGroupSnapshotID validates a Get or Delete group snapshot ID:
// ErrInvalid when empty, ErrNotFound when this driver did not issue it.
func checkGroupSnapshotID(id string) error {
	if id == "" {
		return fmt.Errorf("%w: group_snapshot_id is required", ErrInvalid)
	}
	if !validGroupID.MatchString(id) {
		return fmt.Errorf("%w: group snapshot %q (not an ID of this driver)", ErrNotFound, id)
	}
	return nil
}

// checkGroupSnapshotIDs compares the snapshot IDs a Get names (none: not
// checked) with the group's members.
func checkGroupSnapshotIDs(id string, asked []string, ms []groupMember) error {
	if len(asked) == 0 {
		return nil
	}
	have := make([]string, 0, len(ms))
	for _, m := range ms {
		have = append(have, m.ID)
	}
	want := append([]string(nil), asked...)
	sort.Strings(have)
	sort.Strings(want)
	if strings.Join(have, "\x00") != strings.Join(want, "\x00") {
		return fmt.Errorf("%w: group snapshot %q has members %v, the request names %v", ErrInvalid, id, have, want)
	}
	return nil
}

// checkDeleteSnapshotIDs checks the snapshot IDs a Delete names (none: not
// checked) against the members the group still has: each of those must be
// named, or the delete would take snapshots the CO does not expect to lose.
// A named one that is gone is no mismatch: a delete that stopped half way
// (a member busy) is retried with the same list and must finish, and the
// spec answers OK once the artifacts are gone.
func checkDeleteSnapshotIDs(id string, asked []string, ms []groupMember) error {
	if len(asked) == 0 {
		return nil
	}
	named := make(map[string]bool, len(asked))
	for _, a := range asked {
		named[a] = true
	}
	var left []string
	for _, m := range ms {
		if !named[m.ID] {
			left = append(left, m.ID)
		}
	}
	if len(left) > 0 {
		return fmt.Errorf("%w: group snapshot %q has members %v that the request does not name", ErrInvalid, id, left)
	}
	return nil
}

func groupControllerCapabilities() *csi.GroupControllerGetCapabilitiesResponse {
	return &csi.GroupControllerGetCapabilitiesResponse{Capabilities: []*csi.GroupControllerServiceCapability{{
		Type: &csi.GroupControllerServiceCapability_Rpc{Rpc: &csi.GroupControllerServiceCapability_RPC{
			Type: csi.GroupControllerServiceCapability_RPC_CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT}}}}}
}
