package driver_test

import (
	"context"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
)

// TestGroupSnapshotDeleteRetry: a DeleteVolumeGroupSnapshot that names
// every member the group had succeeds when some of them are gone already
// (a first attempt that stopped half way, or a member deleted on its
// own): the CO retries with the same list, and the spec wants OK once the
// artifacts are gone. A list that leaves out a member the group still has
// is a mismatch (InvalidArgument) and deletes nothing, in a
// single-process driver and through the controller alike.
func TestGroupSnapshotDeleteRetry(t *testing.T) {
	na, nb := startGroupNode(t, "node-a", 0), startGroupNode(t, "node-b", 0)
	a, _ := na.volume(t, "a", true)
	a2, _ := na.volume(t, "a2", false)
	b, _ := nb.volume(t, "b", false)
	routed, _ := routedGroups(t, 0, nil, na, nb)
	for _, tc := range []struct {
		name  string
		gc    csi.GroupControllerClient
		vols  []string
		nodes []*groupNode
	}{
		{"single-process", na.groups(), []string{a, a2}, []*groupNode{na}},
		{"controller", routed, []string{a, b}, []*groupNode{na, nb}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			r, err := tc.gc.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "del-" + tc.name, SourceVolumeIds: tc.vols})
			if err != nil {
				t.Fatal(err)
			}
			g := r.GroupSnapshot
			ids := []string{g.Snapshots[0].SnapshotId, g.Snapshots[1].SnapshotId}
			del := func(ids ...string) error {
				_, err := tc.gc.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: g.GroupSnapshotId, SnapshotIds: ids})
				return err
			}
			wantCode(t, del(ids[0]), codes.InvalidArgument, ids[1])
			if n := memberCount(t, tc.nodes, g.GroupSnapshotId); n != 2 {
				t.Fatalf("a refused delete left %d members, want 2", n)
			}
			// The first member goes on its own, as a half-done delete leaves it.
			if _, err := tc.nodes[0].c.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: ids[0]}); err != nil {
				t.Fatal(err)
			}
			if err := del(ids...); err != nil {
				t.Fatalf("retried delete with the group's full list: %v", err)
			}
			if n := memberCount(t, tc.nodes, g.GroupSnapshotId); n != 0 {
				t.Fatalf("delete left %d members", n)
			}
			if err := del(ids...); err != nil {
				t.Fatalf("delete of a deleted group: %v", err)
			}
		})
	}
}

// memberCount counts the snapshots of group id on nodes.
func memberCount(t testing.TB, nodes []*groupNode, id string) int {
	t.Helper()
	n := 0
	for _, node := range nodes {
		l, err := node.c.ListSnapshots(context.Background(), &csi.ListSnapshotsRequest{})
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range l.Entries {
			if e.Snapshot.GroupSnapshotId == id {
				n++
			}
		}
	}
	return n
}

// TestGroupPrepareChecks: a node refuses a prepare that names a member
// twice with InvalidArgument, holding nothing (it would otherwise find its
// own first lock in the way and answer Aborted, which a retry never
// clears).
func TestGroupPrepareChecks(t *testing.T) {
	n := startGroupNode(t, "node-a", 0)
	a, beA := n.volume(t, "a", true)
	ctx := context.Background()
	_, err := n.srv.Driver.GroupPrepareForTest(ctx, "twice", []string{a, a}, 5*time.Second)
	wantCode(t, err, codes.InvalidArgument, "twice")
	wctx, cancel := context.WithTimeout(ctx, 4*time.Second) // below the hold
	defer cancel()
	if err := writeSeq(wctx, beA, 1); err != nil {
		t.Fatalf("a refused prepare held the volume: %v", err)
	}
}
