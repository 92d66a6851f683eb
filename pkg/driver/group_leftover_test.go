package driver_test

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

// pendingLeftover is what a crash right after a group prepare leaves on a
// node: volume vol's image with the member's checkpoint (its only one) and
// the member's pending record, whose snapshot was never taken. It prepares
// group name of vol, keeps the files, waits for the node's deadline to
// delete them, and puts them back; it returns the member's snapshot ID and
// the group's ID.
func pendingLeftover(t *testing.T, n *groupNode, name, vol string) (sid, gid string) {
	t.Helper()
	d := n.srv.Driver
	pool := d.Options().Pool
	snaps := filepath.Join(pool, ".snapshots")
	gid, err := d.GroupPrepareForTest(context.Background(), name, []string{vol}, 300*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	crash := files(t, snaps)
	img, err := os.ReadFile(imageFile(pool, vol))
	if err != nil {
		t.Fatal(err)
	}
	if len(crash) != 1 {
		t.Fatalf("after the prepare, records %v, want the member's", crash)
	}
	for end := time.Now().Add(10 * time.Second); len(files(t, snaps)) != 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("records left after the node's deadline: %v", files(t, snaps))
		}
	}
	for f, data := range crash {
		if err := os.WriteFile(filepath.Join(snaps, f), data, 0o600); err != nil {
			t.Fatal(err)
		}
		sid = strings.TrimSuffix(f, ".json")
	}
	if err := os.WriteFile(imageFile(pool, vol), img, 0o600); err != nil {
		t.Fatal(err)
	}
	if got := checkpoints(t, pool, vol); got != 1 {
		t.Fatalf("the crash's image has %d checkpoints, want the member's", got)
	}
	return sid, gid
}

// TestGroupSnapshotPendingLeftover: the pending record (and checkpoint) a
// crash after a prepare leaves is no snapshot for any call, and goes with
// its group's deletion and with its volume's, leaving nothing behind.
func TestGroupSnapshotPendingLeftover(t *testing.T) {
	ctx := context.Background()
	t.Run("DeleteVolumeGroupSnapshot", func(t *testing.T) {
		n := startGroupNode(t, "node-a", 0)
		a, _ := n.volume(t, "a", false)
		pool := n.srv.Driver.Options().Pool
		_, gid := pendingLeftover(t, n, "crash", a)
		if _, err := n.groups().DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: gid}); err != nil {
			t.Fatal(err)
		}
		if left := files(t, filepath.Join(pool, ".snapshots")); len(left) != 0 {
			t.Errorf("records left by the group's deletion: %v", left)
		}
		// Its only checkpoint, of a snapshot never taken, is no start of
		// any delta: it goes too.
		if got := checkpoints(t, pool, a); got != 0 {
			t.Errorf("%d checkpoints left by the group's deletion, want 0", got)
		}
	})
	t.Run("DeleteVolume", func(t *testing.T) {
		n := startGroupNode(t, "node-a", 0)
		a, _ := n.volume(t, "a", false)
		pool := n.srv.Driver.Options().Pool
		pendingLeftover(t, n, "crash", a)
		if _, err := n.c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: a}); err != nil {
			t.Fatal(err)
		}
		// Deleted, not hidden for a snapshot that does not exist: nothing
		// could ever delete its image then.
		if left := files(t, filepath.Join(pool, ".snapshots")); len(left) != 0 {
			t.Errorf("left in .snapshots after the volume's deletion: %v", keys(left))
		}
		if _, err := os.Stat(imageFile(pool, a)); !os.IsNotExist(err) {
			t.Errorf("the volume's image is still there: %v", err)
		}
	})
	t.Run("hidden", func(t *testing.T) {
		n := startGroupNode(t, "node-a", 0)
		a, _ := n.volume(t, "a", false)
		sid, gid := pendingLeftover(t, n, "crash", a)
		_, err := n.c.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: sid})
		wantCode(t, err, codes.NotFound, sid)
		if l, err := n.c.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: sid}); err != nil || len(l.Entries) != 0 {
			t.Errorf("ListSnapshots by ID: %v %v, want none", l, err)
		}
		if l, err := n.c.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SourceVolumeId: a}); err != nil || len(l.Entries) != 0 {
			t.Errorf("ListSnapshots by volume: %v %v, want none", l, err)
		}
		_, err = n.groups().GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: gid})
		wantCode(t, err, codes.NotFound, "no member")
		_, err = n.c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "restored", VolumeCapabilities: []*csi.VolumeCapability{capBlock(rw)},
			CapacityRange: &csi.CapacityRange{RequiredBytes: snapDisk},
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
				Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: sid}}}})
		wantCode(t, err, codes.NotFound, sid)
		md := dialMetadata(t, n.srv)
		st, err := md.GetMetadataAllocated(ctx, &csi.GetMetadataAllocatedRequest{SnapshotId: sid})
		if err == nil {
			_, err = st.Recv()
		}
		wantCode(t, err, codes.NotFound, sid)
		sd, err := md.GetMetadataDelta(ctx, &csi.GetMetadataDeltaRequest{BaseSnapshotId: sid, TargetSnapshotId: sid})
		if err == nil {
			_, err = sd.Recv()
		}
		wantCode(t, err, codes.NotFound, sid)
	})
}

func keys(m map[string][]byte) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// recording are the names of volume vol's checkpoint bitmaps that record
// writes (enabled).
func recording(t *testing.T, pool, vol string) []string {
	t.Helper()
	img, err := qcow2.Open(imageFile(pool, vol), qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	var out []string
	for _, b := range img.Bitmaps() {
		if strings.HasPrefix(b.Name, "qcow2-csi-cbt-") && b.Enabled {
			out = append(out, b.Name)
		}
	}
	return out
}

// TestGroupSnapshotRetryFinishes: a crash after a member's snapshot was
// taken and before it was completed leaves its record pending and the
// previous checkpoint recording; the retried create that finds the group
// complete completes it as the commit does: the previous checkpoint
// frozen, only the member's records.
func TestGroupSnapshotRetryFinishes(t *testing.T) {
	n := startGroupNode(t, "node-a", 0)
	a, _ := n.volume(t, "a", false)
	pool := n.srv.Driver.Options().Pool
	ctx := context.Background()
	s1, err := n.c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "before", SourceVolumeId: a})
	if err != nil {
		t.Fatal(err)
	}
	req := &csi.CreateVolumeGroupSnapshotRequest{Name: "unfinished", SourceVolumeIds: []string{a}}
	g, err := n.groups().CreateVolumeGroupSnapshot(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	want := recording(t, pool, a)
	if len(want) != 1 {
		t.Fatalf("after the group, recording checkpoints %v, want the member's", want)
	}
	// The crash: the member's record pending, the previous checkpoint
	// still recording.
	member := g.GroupSnapshot.Snapshots[0].SnapshotId
	rec := filepath.Join(pool, ".snapshots", member+".json")
	data, err := os.ReadFile(rec)
	if err != nil {
		t.Fatal(err)
	}
	pending := strings.Replace(string(data), "\n}", ",\n  \"pending\": true\n}", 1)
	if err := os.WriteFile(rec, []byte(pending), 0o600); err != nil {
		t.Fatal(err)
	}
	img, err := qcow2.Open(imageFile(pool, a), qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	seq := strings.Split(s1.Snapshot.SnapshotId, "@")[1]
	if err := img.EnableBitmap("qcow2-csi-cbt-" + seq); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if got := recording(t, pool, a); len(got) != 2 {
		t.Fatalf("the crash's image records in %v, want 2 checkpoints", got)
	}
	g2, err := n.groups().CreateVolumeGroupSnapshot(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if got := g2.GroupSnapshot.Snapshots[0].SnapshotId; got != member {
		t.Fatalf("the retry answered %s, want %s", got, member)
	}
	if got := recording(t, pool, a); !slices.Equal(got, want) {
		t.Errorf("after the retry, recording checkpoints %v, want %v only (the previous one frozen)", got, want)
	}
	if _, err := n.c.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: member}); err != nil {
		t.Errorf("the completed member: %v", err)
	}
}

// TestGroupSnapshotRetryImageHeld: a retried create of a group the node
// completed, while another program holds one member's image, fails
// naming it and deletes nothing: an image the node cannot look into says
// nothing about whether the member was taken.
func TestGroupSnapshotRetryImageHeld(t *testing.T) {
	n := startGroupNode(t, "node-a", 0)
	a, _ := n.volume(t, "a", false)
	b, _ := n.volume(t, "b", false)
	pool := n.srv.Driver.Options().Pool
	ctx := context.Background()
	req := &csi.CreateVolumeGroupSnapshotRequest{Name: "done", SourceVolumeIds: []string{a, b}}
	if _, err := n.groups().CreateVolumeGroupSnapshot(ctx, req); err != nil {
		t.Fatal(err)
	}
	held, err := qcow2.Open(imageFile(pool, b), qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = n.groups().CreateVolumeGroupSnapshot(ctx, req)
	if cerr := held.Close(); cerr != nil {
		t.Fatal(cerr)
	}
	if err == nil || !strings.Contains(err.Error(), "lock") {
		t.Fatalf("retry with a member's image held elsewhere: %v, want an error naming the lock", err)
	}
	list, err := n.c.ListSnapshots(ctx, &csi.ListSnapshotsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Entries) != 2 {
		t.Fatalf("after the refused retry %d snapshots listed, want the group's 2", len(list.Entries))
	}
	if _, err := n.groups().CreateVolumeGroupSnapshot(ctx, req); err != nil {
		t.Fatalf("retry once the image is free: %v", err)
	}
}

// TestGroupSnapshotSameNameAbort: a create of a group name whose prepare
// runs into another create's hold of that name (the same group ID) is
// refused, and its abort must leave the other's hold alone: it ended it,
// so that the other create's commit found its I/O released and failed.
func TestGroupSnapshotSameNameAbort(t *testing.T) {
	ctx := context.Background()
	n := startGroupNode(t, "node-a", 0)
	a, _ := n.volume(t, "a", true)
	b, _ := n.volume(t, "b", true)
	d := n.srv.Driver
	// The first create, prepared and not yet committed (its controller's
	// commit is on its way).
	gid, err := d.GroupPrepareForTest(ctx, "same", []string{a}, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	// The second: same name, another volume. Its prepare finds the name
	// taken by other volumes and fails; its abort releases the nodes, as
	// its own.
	_, err = n.groups().CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "same", SourceVolumeIds: []string{b}})
	wantCode(t, err, codes.AlreadyExists, "taken by")
	// Nor can a commit of another attempt take the first one's group.
	if _, err := d.GroupCommitAttemptForTest(ctx, gid, "another-attempt"); err == nil || !strings.Contains(err.Error(), "another create") {
		t.Fatalf("commit by another attempt: %v, want a refusal naming another create", err)
	}
	ids, err := d.GroupCommitForTest(ctx, gid)
	if err != nil {
		t.Fatalf("the first create's commit after the second's abort: %v", err)
	}
	if len(ids) != 1 {
		t.Fatalf("members %v, want 1", ids)
	}
	g, err := n.groups().GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: gid})
	if err != nil {
		t.Fatal(err)
	}
	if s := g.GroupSnapshot.GetSnapshots(); len(s) != 1 || s[0].GetSourceVolumeId() != a {
		t.Fatalf("group %v, want the one member of volume %s", s, a)
	}
}

// TestGroupSnapshotForeignAbortKeepsCommitted: create B of a group name
// spanning two nodes has committed node A and still holds node B when the
// late abort of an earlier create A of the same name (its commit failed)
// reaches both. The abort must take neither B's hold on node B nor B's
// committed member on node A: B's commit on node B then succeeds, and B
// returns a group whose members all exist. (Found in review: the abort
// kept B's hold, so B went on, but deleted B's member on node A.)
func TestGroupSnapshotForeignAbortKeepsCommitted(t *testing.T) {
	ctx := context.Background()
	na, nb := startGroupNode(t, "node-a", 0), startGroupNode(t, "node-b", 0)
	a, _ := na.volume(t, "a", true)
	b, _ := nb.volume(t, "b", true)
	all := []string{a, b}
	da, db := na.srv.Driver, nb.srv.Driver
	gid, err := da.GroupPrepareAttemptForTest(ctx, "same", []string{a}, all, 5*time.Second, "create-b")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.GroupPrepareAttemptForTest(ctx, "same", []string{b}, all, 5*time.Second, "create-b"); err != nil {
		t.Fatal(err)
	}
	idsA, err := da.GroupCommitAttemptForTest(ctx, gid, "create-b")
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []*driver.Driver{da, db} {
		if err := d.GroupAbortAttemptForTest(ctx, gid, "create-a"); err != nil {
			t.Fatal(err)
		}
	}
	idsB, err := db.GroupCommitAttemptForTest(ctx, gid, "create-b")
	if err != nil {
		t.Fatalf("create B's commit on node B after create A's abort: %v", err)
	}
	for _, c := range []struct {
		n   *groupNode
		ids []string
	}{{na, idsA}, {nb, idsB}} {
		if len(c.ids) != 1 {
			t.Fatalf("members %v, want 1", c.ids)
		}
		if _, err := c.n.c.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: c.ids[0]}); err != nil {
			t.Errorf("member %s of the group create B returns: %v", c.ids[0], err)
		}
	}
	// The abort of create B itself (had its commit failed elsewhere)
	// deletes its members.
	if err := da.GroupAbortAttemptForTest(ctx, gid, "create-b"); err != nil {
		t.Fatal(err)
	}
	_, err = na.c.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: idsA[0]})
	wantCode(t, err, codes.NotFound, idsA[0])
}
