package driver_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

// groupNode is a node driver on qcow2 images whose staged volumes' I/O a
// test issues through the backend the kernel would be served from (the
// gate included).
type groupNode struct {
	srv  *drivertest.Server
	c    clients
	conn *grpc.ClientConn
	att  *backendAttacher
}

func startGroupNode(t testing.TB, node string, hold time.Duration) *groupNode {
	t.Helper()
	return startGroupNodeImages(t, node, hold, driver.Qcow2Images{})
}

// startGroupNodeImages is startGroupNode on images.
func startGroupNodeImages(t testing.TB, node string, hold time.Duration, images driver.Images) *groupNode {
	t.Helper()
	att := &backendAttacher{backends: map[string]nbdattach.Backend{}}
	srv := drivertest.Start(t, driver.Options{NodeID: node, GroupHoldTimeout: hold},
		driver.Seams{Images: images, Attachers: []nbdattach.Attacher{att}})
	conn, err := grpc.NewClient("unix://"+srv.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &groupNode{srv: srv, c: dial(t, srv), conn: conn, att: att}
}

func (n *groupNode) groups() csi.GroupControllerClient { return csi.NewGroupControllerClient(n.conn) }

// volume creates a volume (staged when staged) and returns its ID and, if
// staged, its device's backend.
func (n *groupNode) volume(t testing.TB, name string, staged bool) (string, nbdattach.Backend) {
	t.Helper()
	ctx := context.Background()
	capab := capBlock(rw)
	v, err := n.c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csi.VolumeCapability{capab},
		CapacityRange: &csi.CapacityRange{RequiredBytes: snapDisk, LimitBytes: snapDisk}})
	if err != nil {
		t.Fatal(err)
	}
	id := v.Volume.VolumeId
	if !staged {
		return id, nil
	}
	staging := filepath.Join(t.TempDir(), "staging")
	if err := os.MkdirAll(staging, 0o750); err != nil {
		t.Fatal(err)
	}
	if _, err := n.c.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: capab, VolumeContext: v.Volume.VolumeContext}); err != nil {
		t.Fatal(err)
	}
	n.att.mu.Lock()
	defer n.att.mu.Unlock()
	return id, n.att.backends[localID(id)]
}

// writeSeq writes seq, big-endian, at the start of the first sector, FUA:
// acknowledged means durable, as after the pod's fsync.
func writeSeq(ctx context.Context, be nbdattach.Backend, seq uint64) error {
	buf := make([]byte, 512)
	binary.BigEndian.PutUint64(buf, seq)
	return be.WriteAt(ctx, buf, 0, true)
}

// seqWriter writes 1, 2, 3, ... to each of bes in turn, each write after
// the previous one was acknowledged, until stopped; stop returns the last
// sequence number written and the first error.
func seqWriter(bes ...nbdattach.Backend) (stop func() (uint64, error)) {
	ctx, cancel := context.WithCancel(context.Background())
	var last atomic.Uint64
	errc := make(chan error, 1)
	go func() {
		for seq := uint64(1); ctx.Err() == nil; seq++ {
			for _, be := range bes {
				if err := writeSeq(ctx, be, seq); err != nil {
					if ctx.Err() != nil {
						err = nil
					}
					errc <- err
					return
				}
			}
			last.Store(seq)
		}
		errc <- nil
	}()
	return func() (uint64, error) {
		cancel()
		return last.Load(), <-errc
	}
}

// restoredSeq restores snapshot sid to a new volume and reads the sequence
// number at its start.
func (n *groupNode) restoredSeq(t testing.TB, name, sid string) uint64 {
	t.Helper()
	v, err := n.c.CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: name,
		VolumeCapabilities: []*csi.VolumeCapability{capBlock(rw)}, CapacityRange: &csi.CapacityRange{RequiredBytes: snapDisk},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: sid}}}})
	if err != nil {
		t.Fatalf("restore %s: %v", sid, err)
	}
	img, err := qcow2.Open(imageFile(n.srv.Driver.Options().Pool, v.Volume.VolumeId), qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	buf := make([]byte, 8)
	if _, err := img.ReadAt(buf, 0); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	return binary.BigEndian.Uint64(buf)
}

// checkOrder restores each group's two members and checks that they are
// one instant of a writer that writes A then B: B <= A <= B+1.
func checkOrder(t *testing.T, nodeA, nodeB *groupNode, groups []*csi.VolumeGroupSnapshot) {
	t.Helper()
	for i, g := range groups {
		if len(g.Snapshots) != 2 {
			t.Fatalf("group %d: %d members, want 2", i, len(g.Snapshots))
		}
		a := nodeA.restoredSeq(t, "ra-"+g.GroupSnapshotId+"-"+string(rune('a'+i)), g.Snapshots[0].SnapshotId)
		b := nodeB.restoredSeq(t, "rb-"+g.GroupSnapshotId+"-"+string(rune('a'+i)), g.Snapshots[1].SnapshotId)
		if !(b <= a && a <= b+1) {
			t.Errorf("group %d (%s): restored A=%d B=%d: not one instant of a writer writing A then B", i, g.GroupSnapshotId, a, b)
		}
	}
}

// takeGroups takes n group snapshots of vols while the writer runs.
func takeGroups(t *testing.T, gc csi.GroupControllerClient, prefix string, n int, vols ...string) []*csi.VolumeGroupSnapshot {
	t.Helper()
	var out []*csi.VolumeGroupSnapshot
	for i := range n {
		r, err := gc.CreateVolumeGroupSnapshot(context.Background(), &csi.CreateVolumeGroupSnapshotRequest{
			Name: prefix + string(rune('a'+i)), SourceVolumeIds: vols})
		if err != nil {
			t.Fatalf("group snapshot %d: %v", i, err)
		}
		out = append(out, r.GroupSnapshot)
		time.Sleep(5 * time.Millisecond)
	}
	return out
}

// TestGroupSnapshotOrder: a writer appends to A then to B on one node;
// every group snapshot restores to a pair where B <= A <= B+1. Members are
// ordinary snapshots: restored above, listed with their group, and the
// delta between the members of successive groups is served.
func TestGroupSnapshotOrder(t *testing.T) {
	n := startGroupNode(t, "node-a", 0)
	a, beA := n.volume(t, "a", true)
	b, beB := n.volume(t, "b", true)
	stop := seqWriter(beA, beB)
	groups := takeGroups(t, n.groups(), "order-", 10, a, b)
	last, err := stop()
	if err != nil {
		t.Fatalf("writer: %v", err)
	}
	if last == 0 {
		t.Fatal("the writer wrote nothing")
	}
	checkOrder(t, n, n, groups)

	ctx := context.Background()
	l, err := n.c.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: groups[0].Snapshots[0].SnapshotId})
	if err != nil || len(l.Entries) != 1 || l.Entries[0].Snapshot.GroupSnapshotId != groups[0].GroupSnapshotId {
		t.Fatalf("ListSnapshots of a member: %v %v, want it with group %s", l, err, groups[0].GroupSnapshotId)
	}
	md := csi.NewSnapshotMetadataClient(n.conn)
	st, err := md.GetMetadataDelta(ctx, &csi.GetMetadataDeltaRequest{BaseSnapshotId: groups[0].Snapshots[0].SnapshotId,
		TargetSnapshotId: groups[len(groups)-1].Snapshots[0].SnapshotId})
	if err != nil {
		t.Fatal(err)
	}
	ranges := 0
	for {
		r, err := st.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("delta between members of two groups: %v", err)
		}
		ranges += len(r.BlockMetadata)
	}
	if ranges == 0 {
		t.Error("delta between members of the first and last group is empty; the writer wrote in between")
	}
}

// TestGroupSnapshotCalls: validation, idempotency, Get, and Delete, which
// deletes the members.
func TestGroupSnapshotCalls(t *testing.T) {
	n := startGroupNode(t, "node-a", 0)
	gc := n.groups()
	ctx := context.Background()
	a, _ := n.volume(t, "a", true)
	b, _ := n.volume(t, "b", false) // unstaged: nothing to hold
	c, _ := n.volume(t, "c", false)
	create := func(name string, vols ...string) (*csi.VolumeGroupSnapshot, error) {
		r, err := gc.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: name, SourceVolumeIds: vols})
		return r.GetGroupSnapshot(), err
	}
	for _, tc := range []struct {
		name string
		vols []string
		code codes.Code
		msg  string
	}{
		{"", []string{a}, codes.InvalidArgument, "name is required"},
		{"g", nil, codes.InvalidArgument, "source_volume_ids is required"},
		{"g", []string{a, a}, codes.InvalidArgument, "listed twice"},
		{"g", []string{a, ""}, codes.InvalidArgument, "source_volume_ids[1] is empty"},
		{"g", []string{a, "vol-00000000000000000000000000000000@node-a"}, codes.NotFound, "vol-00000000000000000000000000000000@node-a"},
		{"g", []string{a, "../x"}, codes.NotFound, "../x"},
		{"bad\x01name", []string{a}, codes.InvalidArgument, "control characters"},
	} {
		_, err := create(tc.name, tc.vols...)
		wantCode(t, err, tc.code, tc.msg)
	}
	if l, _ := n.c.ListSnapshots(ctx, &csi.ListSnapshotsRequest{}); len(l.GetEntries()) != 0 {
		t.Fatalf("failed creates left snapshots: %v", l.Entries)
	}
	if _, err := gc.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "p", SourceVolumeIds: []string{a},
		Parameters: map[string]string{"nope": "1"}}); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "nope") {
		t.Fatalf("unknown parameter: %v", err)
	}

	g1, err := create("g", a, b)
	if err != nil {
		t.Fatal(err)
	}
	g2, err := create("g", a, b)
	if err != nil {
		t.Fatal(err)
	}
	if g1.GroupSnapshotId != g2.GroupSnapshotId || g1.Snapshots[0].SnapshotId != g2.Snapshots[0].SnapshotId || g1.Snapshots[1].SnapshotId != g2.Snapshots[1].SnapshotId {
		t.Fatalf("retry of the same group: %v, then %v", g1, g2)
	}
	if g3, err := create("g", b, a); err != nil || g3.GroupSnapshotId != g1.GroupSnapshotId {
		t.Fatalf("retry with the members in another order: %v %v", g3, err)
	}
	_, err = create("g", a, c)
	wantCode(t, err, codes.AlreadyExists, `name "g" is taken`)
	ids := []string{g1.Snapshots[0].SnapshotId, g1.Snapshots[1].SnapshotId}
	got, err := gc.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: g1.GroupSnapshotId, SnapshotIds: ids})
	if err != nil || len(got.GroupSnapshot.Snapshots) != 2 || !got.GroupSnapshot.ReadyToUse {
		t.Fatalf("GetVolumeGroupSnapshot: %v %v", got, err)
	}
	_, err = gc.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: g1.GroupSnapshotId, SnapshotIds: ids[:1]})
	wantCode(t, err, codes.InvalidArgument, "the request names")

	// A member is an ordinary snapshot: DeleteSnapshot works on it, and
	// the group goes on with the rest.
	if _, err := n.c.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: ids[1]}); err != nil {
		t.Fatal(err)
	}
	if _, err := gc.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: g1.GroupSnapshotId, SnapshotIds: ids[:1]}); err != nil {
		t.Fatal(err)
	}
	if l, _ := n.c.ListSnapshots(ctx, &csi.ListSnapshotsRequest{}); len(l.GetEntries()) != 0 {
		t.Fatalf("DeleteVolumeGroupSnapshot left snapshots: %v", l.Entries)
	}
	_, err = gc.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: g1.GroupSnapshotId})
	wantCode(t, err, codes.NotFound, g1.GroupSnapshotId)
	if _, err := gc.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: g1.GroupSnapshotId}); err != nil {
		t.Fatalf("second delete: %v", err)
	}
	// The name is free again, for other members.
	if _, err := create("g", a, c); err != nil {
		t.Fatal(err)
	}
}

// TestGroupSnapshotNodeDeadline: a node holds its members' I/O after a
// prepare, releases it on its own at the deadline when no commit comes,
// and refuses the late commit: no snapshot is left.
func TestGroupSnapshotNodeDeadline(t *testing.T) {
	n := startGroupNode(t, "node-a", 0)
	a, beA := n.volume(t, "a", true)
	b, _ := n.volume(t, "b", false)
	d := n.srv.Driver
	ctx := context.Background()
	id, err := d.GroupPrepareForTest(ctx, "late", []string{a, b}, 300*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- writeSeq(ctx, beA, 7) }()
	time.Sleep(50 * time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("a write went through while the volume was held: %v", err)
	default:
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("held write: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the node did not release the held write at its deadline")
	}
	// Refused, whether it finds the group gone or still deleting the
	// members its prepare readied.
	_, err = d.GroupCommitForTest(ctx, id)
	wantCode(t, err, codes.Aborted, "node node-a")
	if l, _ := n.c.ListSnapshots(ctx, &csi.ListSnapshotsRequest{}); len(l.GetEntries()) != 0 {
		t.Fatalf("snapshots left: %v", l.Entries)
	}
	if count, sum := d.GroupHoldForTest(); count != 1 || sum <= 0 {
		t.Errorf("hold histogram: %d observations, %g s; want 1", count, sum)
	}
	metrics := scrape(t, d)
	if !strings.Contains(metrics, `qcow2_csi_group_snapshot_aborts_total{reason="node_deadline"} 1`) {
		t.Errorf("no node_deadline abort counted:\n%s", grepLines(metrics, "group_snapshot"))
	}
	// The volumes are free: an ordinary snapshot goes through.
	if _, err := n.c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "after", SourceVolumeId: a}); err != nil {
		t.Fatal(err)
	}
}

// TestGroupSnapshotCommitInTime: a commit within the hold takes the
// members and releases the I/O; the held write lands after the snapshot.
func TestGroupSnapshotCommitInTime(t *testing.T) {
	n := startGroupNode(t, "node-a", 0)
	a, beA := n.volume(t, "a", true)
	d := n.srv.Driver
	ctx := context.Background()
	if err := writeSeq(ctx, beA, 1); err != nil {
		t.Fatal(err)
	}
	id, err := d.GroupPrepareForTest(ctx, "in-time", []string{a}, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- writeSeq(ctx, beA, 2) }()
	time.Sleep(20 * time.Millisecond)
	ids, err := d.GroupCommitForTest(ctx, id)
	if err != nil || len(ids) != 1 {
		t.Fatalf("commit: %v %v", ids, err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := n.restoredSeq(t, "r", ids[0]); got != 1 {
		t.Errorf("member holds %d, want 1: the write held during the group snapshot is not in it", got)
	}
}

func scrape(t testing.TB, d *driver.Driver) string {
	t.Helper()
	rec := httptest.NewRecorder()
	d.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	return rec.Body.String()
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// routedGroups serves a controller over the agents of nodes (and of extra
// node -> address entries) and returns its GroupController client.
func routedGroups(t testing.TB, hold time.Duration, extra map[string]string, nodes ...*groupNode) (csi.GroupControllerClient, *drivertest.Controller) {
	t.Helper()
	certs := drivertest.MakeCerts(t, t.TempDir())
	agents := driver.StaticAgents{}
	for _, n := range nodes {
		agents[n.srv.Driver.Options().NodeID] = drivertest.StartAgent(t, n.srv, certs).Addr
	}
	for k, v := range extra {
		agents[k] = v
	}
	ctl := drivertest.StartController(t, agents, certs, driver.RouterOptions{GroupHoldTimeout: hold})
	conn, err := grpc.NewClient(ctl.Endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return csi.NewGroupControllerClient(conn), ctl
}

// TestGroupSnapshotAcrossNodes: the same order check with A and B on two
// nodes, through the controller and the node agents; deleting the group
// through the controller deletes the members on both nodes.
func TestGroupSnapshotAcrossNodes(t *testing.T) {
	na, nb := startGroupNode(t, "node-a", 0), startGroupNode(t, "node-b", 0)
	a, beA := na.volume(t, "a", true)
	b, beB := nb.volume(t, "b", true)
	gc, ctl := routedGroups(t, 0, nil, na, nb)
	stop := seqWriter(beA, beB)
	groups := takeGroups(t, gc, "across-", 5, a, b)
	if _, err := stop(); err != nil {
		t.Fatalf("writer: %v", err)
	}
	checkOrder(t, na, nb, groups)
	for _, m := range []string{"GroupPrepare", "GroupCommit"} {
		for _, node := range []string{"node-a", "node-b"} {
			if want := `qcow2_csi_routed_calls_total{code="OK",method="` + m + `",node="` + node + `"} 5`; !strings.Contains(ctl.Metrics(), want) {
				t.Errorf("%s missing from the controller's metrics", want)
			}
		}
	}
	ctx := context.Background()
	g := groups[0]
	got, err := gc.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: g.GroupSnapshotId})
	if err != nil || len(got.GroupSnapshot.Snapshots) != 2 {
		t.Fatalf("GetVolumeGroupSnapshot through the controller: %v %v", got, err)
	}
	ids := []string{g.Snapshots[0].SnapshotId, g.Snapshots[1].SnapshotId}
	if _, err := gc.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: g.GroupSnapshotId, SnapshotIds: ids}); err != nil {
		t.Fatal(err)
	}
	for i, n := range []*groupNode{na, nb} {
		l, err := n.c.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: ids[i]})
		if err != nil || len(l.Entries) != 0 {
			t.Errorf("member %s still listed after the group's deletion: %v %v", ids[i], l, err)
		}
	}
}

// TestGroupSnapshotNodeSilent: a node whose agent accepts connections but
// never answers makes the group snapshot fail at the hold; the other node
// is released at once (its I/O resumes) and keeps no member snapshot.
func TestGroupSnapshotNodeSilent(t *testing.T) {
	na := startGroupNode(t, "node-a", 0)
	a, beA := na.volume(t, "a", true)
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var held []net.Conn
	go func() {
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c) // never read, never answered
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		silent.Close()
		mu.Lock()
		for _, c := range held {
			c.Close()
		}
		mu.Unlock()
	})
	hold := time.Second
	gc, ctl := routedGroups(t, hold, map[string]string{"node-b": silent.Addr().String()}, na)
	b := "vol-0123456789abcdef0123456789abcdef@node-b"
	stop := seqWriter(beA)
	_, err = gc.CreateVolumeGroupSnapshot(context.Background(), &csi.CreateVolumeGroupSnapshotRequest{Name: "silent", SourceVolumeIds: []string{a, b}})
	wantCode(t, err, codes.DeadlineExceeded, "node node-b")
	// Each phase names the node, its agent and the cause once.
	msg := status.Convert(err).Message()
	addr := regexp.QuoteMeta(silent.Addr().String())
	if !regexp.MustCompile(`^group snapshot "silent": prepare: node node-b \(agent `+addr+`\) did not answer within [0-9.]+m?s: context deadline exceeded[^;]*; release: node node-b \(agent `+addr+`\) [^;]*\(a node that did not answer releases at its own deadline`).MatchString(msg) ||
		strings.Count(msg, "node node-b") != 2 || strings.Contains(msg, "exceeded: context deadline exceeded") {
		t.Errorf("error text repeats or misses what failed: %q", msg)
	}
	// node-a was released by the abort: its writer goes on.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := writeSeq(ctx, beA, 1<<40); err != nil {
		t.Fatalf("node-a's I/O did not resume: %v", err)
	}
	if _, err := stop(); err != nil {
		t.Fatalf("writer: %v", err)
	}
	if l, _ := na.c.ListSnapshots(context.Background(), &csi.ListSnapshotsRequest{}); len(l.GetEntries()) != 0 {
		t.Fatalf("member snapshots left on node-a: %v", l.Entries)
	}
	if !strings.Contains(ctl.Metrics(), `qcow2_csi_group_snapshot_aborts_total{reason="prepare_timeout"} 1`) {
		t.Errorf("no prepare_timeout abort counted:\n%s", grepLines(ctl.Metrics(), "group_snapshot"))
	}
	if count, _ := na.srv.Driver.GroupHoldForTest(); count != 1 {
		t.Errorf("node-a's hold histogram has %d observations, want 1", count)
	}
}

// TestGroupHoldTimeoutBounds: a hold past the kernel's nbd request timeout
// is refused by the driver and the router alike.
func TestGroupHoldTimeoutBounds(t *testing.T) {
	for _, h := range []time.Duration{-time.Second, 21 * time.Second} {
		_, err := driver.New(driver.Options{Pool: t.TempDir(), NodeID: "n", GroupHoldTimeout: h}, driver.Seams{Images: driver.Qcow2Images{}})
		if err == nil || !strings.Contains(err.Error(), "group snapshot hold timeout") {
			t.Errorf("driver with hold %s: %v", h, err)
		}
		_, err = driver.NewRouter(driver.RouterOptions{GroupHoldTimeout: h, Agents: driver.StaticAgents{}})
		if err == nil || !strings.Contains(err.Error(), "group snapshot hold timeout") {
			t.Errorf("router with hold %s: %v", h, err)
		}
	}
}

// TestGroupSnapshotCrashLeftover: a member record whose internal snapshot
// a crash kept from being taken (the record goes first) is no member: the
// retried create deletes the group's leftovers and takes it afresh.
func TestGroupSnapshotCrashLeftover(t *testing.T) {
	n := startGroupNode(t, "node-a", 0)
	a, _ := n.volume(t, "a", false)
	b, _ := n.volume(t, "b", false)
	ctx := context.Background()
	req := &csi.CreateVolumeGroupSnapshotRequest{Name: "crash", SourceVolumeIds: []string{a, b}}
	g1, err := n.groups().CreateVolumeGroupSnapshot(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	lost := g1.GroupSnapshot.Snapshots[1]
	img, err := qcow2.Open(imageFile(n.srv.Driver.Options().Pool, b), qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.DeleteSnapshot(lost.SnapshotId); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	g2, err := n.groups().CreateVolumeGroupSnapshot(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if g2.GroupSnapshot.GroupSnapshotId != g1.GroupSnapshot.GroupSnapshotId {
		t.Fatalf("group ID changed: %s, then %s", g1.GroupSnapshot.GroupSnapshotId, g2.GroupSnapshot.GroupSnapshotId)
	}
	if g2.GroupSnapshot.Snapshots[1].SnapshotId == lost.SnapshotId {
		t.Fatalf("the retry answered member %s, whose snapshot is not in the image", lost.SnapshotId)
	}
	l, err := n.c.ListSnapshots(ctx, &csi.ListSnapshotsRequest{})
	if err != nil || len(l.Entries) != 2 {
		t.Fatalf("after the retry: %v %v, want the 2 new members only", l, err)
	}
	for i, s := range g2.GroupSnapshot.Snapshots {
		if got := n.restoredSeq(t, "r"+string(rune('a'+i)), s.SnapshotId); got != 0 {
			t.Errorf("member %d restores to %d, want 0 (never written)", i, got)
		}
	}
}

// TestGroupSnapshotCommitRefused: a node that released at its own deadline
// (here 1 ms after its prepare, its answers reaching the controller 50 ms
// late) refuses the commit; the controller aborts, and the member the
// other node took is deleted: no partial group.
func TestGroupSnapshotCommitRefused(t *testing.T) {
	na, nb := startGroupNode(t, "node-a", 0), startGroupNode(t, "node-b", time.Millisecond)
	a, _ := na.volume(t, "a", true)
	b, _ := nb.volume(t, "b", true)
	certs := drivertest.MakeCerts(t, t.TempDir())
	slow := slowProxy(t, drivertest.StartAgent(t, nb.srv, certs).Addr, 50*time.Millisecond)
	ctl := drivertest.StartController(t, driver.StaticAgents{"node-a": drivertest.StartAgent(t, na.srv, certs).Addr, "node-b": slow}, certs, driver.RouterOptions{})
	conn, err := grpc.NewClient(ctl.Endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	gc := csi.NewGroupControllerClient(conn)
	_, err = gc.CreateVolumeGroupSnapshot(context.Background(), &csi.CreateVolumeGroupSnapshotRequest{Name: "refused", SourceVolumeIds: []string{a, b}})
	wantCode(t, err, codes.Aborted, "node node-b")
	for _, n := range []*groupNode{na, nb} {
		if l, _ := n.c.ListSnapshots(context.Background(), &csi.ListSnapshotsRequest{}); len(l.GetEntries()) != 0 {
			t.Errorf("member snapshots left on %s: %v", n.srv.Driver.Options().NodeID, l.Entries)
		}
	}
	if !strings.Contains(ctl.Metrics(), `qcow2_csi_group_snapshot_aborts_total{reason="commit_refused"} 1`) {
		t.Errorf("no commit_refused abort counted:\n%s", grepLines(ctl.Metrics(), "group_snapshot"))
	}
	if !strings.Contains(scrape(t, nb.srv.Driver), `qcow2_csi_group_snapshot_aborts_total{reason="node_deadline"} 1`) {
		t.Errorf("node-b counted no node_deadline release:\n%s", grepLines(scrape(t, nb.srv.Driver), "group_snapshot"))
	}
}

// slowProxy forwards TCP connections to addr, delaying each chunk the
// server sends by delay; it returns its address.
func slowProxy(t testing.TB, addr string, delay time.Duration) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		lis.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", addr)
			if err != nil {
				c.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, c, s)
			mu.Unlock()
			go func() { _, _ = io.Copy(s, c) }()
			go func() {
				buf := make([]byte, 64<<10)
				for {
					n, err := s.Read(buf)
					if n > 0 {
						time.Sleep(delay)
						if _, werr := c.Write(buf[:n]); werr != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	return lis.Addr().String()
}

// TestGroupSnapshotLatePrepare: a prepare whose caller has given up (a
// node that was stopped handles it late) holds nothing.
func TestGroupSnapshotLatePrepare(t *testing.T) {
	n := startGroupNode(t, "node-a", 0)
	a, beA := n.volume(t, "a", true)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := n.srv.Driver.GroupPrepareForTest(ctx, "late", []string{a}, 5*time.Second); status.Code(err) != codes.Canceled {
		t.Fatalf("prepare with its caller gone: %v, want Canceled", err)
	}
	wctx, wcancel := context.WithTimeout(context.Background(), 4*time.Second) // below the 5 s hold
	defer wcancel()
	if err := writeSeq(wctx, beA, 1); err != nil {
		t.Fatalf("the volume is held after a prepare nobody waits for: %v", err)
	}
	// The abort is the caller's to count (where the protocol runs: in a
	// --mode=all plugin the same registry, which would count it twice); a
	// node counts only the holds its own timer ends.
	if m := grepLines(scrape(t, n.srv.Driver), "group_snapshot_aborts_total{"); m != "" {
		t.Errorf("the node counted an abort its caller counts:\n%s", m)
	}
}

// TestGroupSnapshotTooManyMembers: a group of more volumes than the bound
// is refused before anything is held or looked up, by the single-process
// service, the router and a node's prepare alike, naming the count and
// the bound.
func TestGroupSnapshotTooManyMembers(t *testing.T) {
	n := startGroupNode(t, "node-a", 0)
	a, _ := n.volume(t, "a", true)
	vols := []string{a}
	for i := 1; i <= driver.MaxGroupMembersForTest; i++ {
		vols = append(vols, fmt.Sprintf("vol-%032x@node-a", i))
	}
	want := fmt.Sprintf("%d source volumes, at most %d", len(vols), driver.MaxGroupMembersForTest)
	routed, _ := routedGroups(t, 0, nil, n)
	ctx := context.Background()
	for _, gc := range []csi.GroupControllerClient{n.groups(), routed} {
		_, err := gc.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "big", SourceVolumeIds: vols})
		wantCode(t, err, codes.InvalidArgument, want)
	}
	_, err := n.srv.Driver.GroupPrepareForTest(ctx, "big", vols, time.Second)
	wantCode(t, err, codes.InvalidArgument, want)
	// Nothing was held: the volume takes a snapshot at once.
	if _, err := n.c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "after", SourceVolumeId: a}); err != nil {
		t.Fatal(err)
	}
}

// stuckImages opens the images whose path contains stuck (when set) only
// once release is closed: a disk that stalls a snapshot of a closed image.
type stuckImages struct {
	driver.Qcow2Images
	stuck   atomic.Pointer[string]
	release chan struct{}
}

func (s *stuckImages) Open(ctx context.Context, path string, o driver.ImageOpenOptions) (driver.Image, error) {
	if p := s.stuck.Load(); p != nil && strings.Contains(path, *p) {
		<-s.release
	}
	return s.Qcow2Images.Open(ctx, path, o)
}

// TestGroupSnapshotCommitOutlivesHold: a commit whose member snapshots do
// not end within the hold releases the I/O at the deadline and answers
// Aborted; the members are deleted once the stalled snapshot ends, and
// the volumes are free again.
func TestGroupSnapshotCommitOutlivesHold(t *testing.T) {
	imgs := &stuckImages{release: make(chan struct{})}
	n := startGroupNodeImages(t, "node-a", 0, imgs)
	a, beA := n.volume(t, "a", true)
	b, _ := n.volume(t, "b", false) // closed: its snapshot opens its image
	d := n.srv.Driver
	ctx := context.Background()
	id, err := d.GroupPrepareForTest(ctx, "stuck", []string{a, b}, 500*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	stuck := strings.TrimPrefix(strings.SplitN(b, "@", 2)[0], "vol-")
	imgs.stuck.Store(&stuck)
	released := false
	defer func() {
		if !released {
			close(imgs.release)
		}
	}()
	wrote := make(chan error, 1)
	go func() { wrote <- writeSeq(ctx, beA, 9) }()
	committed := make(chan error, 1)
	go func() {
		_, err := d.GroupCommitForTest(ctx, id)
		committed <- err
	}()
	// Both while b's snapshot is still stalled.
	select {
	case err := <-committed:
		wantCode(t, err, codes.Aborted, "had not ended")
	case <-time.After(10 * time.Second):
		t.Fatal("the commit held on past its deadline while a member snapshot stalled")
	}
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the held write was not released at the deadline")
	}
	imgs.stuck.Store(nil)
	close(imgs.release)
	released = true
	// Once the stalled snapshot ends, no member is left and the volumes
	// take snapshots again.
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		l, err := n.c.ListSnapshots(ctx, &csi.ListSnapshotsRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if len(l.GetEntries()) == 0 {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("members left after the stalled snapshot ended: %v", l.GetEntries())
		}
	}
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		_, err := n.c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "after", SourceVolumeId: b})
		if err == nil {
			break
		}
		if status.Code(err) != codes.Aborted || time.Now().After(end) {
			t.Fatalf("a snapshot of the volume after the group: %v", err)
		}
	}
}

// files reads every file of dir by name (none when it does not exist).
func files(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	out := map[string][]byte{}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = b
	}
	return out
}

// checkpoints counts the driver's checkpoint bitmaps in volume vol's image.
func checkpoints(t *testing.T, pool, vol string) int {
	t.Helper()
	img, err := qcow2.Open(imageFile(pool, vol), qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	n := 0
	for _, b := range img.Bitmaps() {
		if strings.HasPrefix(b.Name, "qcow2-csi-cbt-") {
			n++
		}
	}
	return n
}

// TestGroupSnapshotPreparedLeftover: a prepare writes its members'
// records (pending) and checkpoints before the hold. They are no
// snapshots: not listed; a group that expires uncommitted leaves neither
// record nor checkpoint; and the state a crash after the prepare leaves
// (put back here) is cleaned up by the retried create, which takes the
// group afresh.
func TestGroupSnapshotPreparedLeftover(t *testing.T) {
	n := startGroupNode(t, "node-a", 0)
	a, _ := n.volume(t, "a", false)
	b, _ := n.volume(t, "b", false)
	d := n.srv.Driver
	pool := d.Options().Pool
	snaps := filepath.Join(pool, ".snapshots")
	ctx := context.Background()
	if _, err := d.GroupPrepareForTest(ctx, "crash", []string{a, b}, 300*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	crash := files(t, snaps)
	imgs := map[string][]byte{}
	for _, v := range []string{a, b} {
		img, err := os.ReadFile(imageFile(pool, v))
		if err != nil {
			t.Fatal(err)
		}
		imgs[v] = img
	}
	if len(crash) != 2 {
		t.Fatalf("after the prepare, %d records, want the 2 members' (pending): %v", len(crash), crash)
	}
	if l, err := n.c.ListSnapshots(ctx, &csi.ListSnapshotsRequest{}); err != nil || len(l.GetEntries()) != 0 {
		t.Fatalf("prepared members are listed: %v %v", l, err)
	}
	for end := time.Now().Add(10 * time.Second); len(files(t, snaps)) != 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("records left after the node's deadline: %v", files(t, snaps))
		}
	}
	for _, v := range []string{a, b} {
		if got := checkpoints(t, pool, v); got != 0 {
			t.Errorf("volume %s: %d checkpoints left by the expired prepare, want 0", v, got)
		}
	}
	// The crash: the files as they were after the prepare.
	for name, data := range crash {
		if err := os.WriteFile(filepath.Join(snaps, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for v, data := range imgs {
		if err := os.WriteFile(imageFile(pool, v), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	g, err := n.groups().CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "crash", SourceVolumeIds: []string{a, b}})
	if err != nil {
		t.Fatal(err)
	}
	l, err := n.c.ListSnapshots(ctx, &csi.ListSnapshotsRequest{})
	if err != nil || len(l.GetEntries()) != 2 {
		t.Fatalf("after the retry: %v %v, want its 2 members", l, err)
	}
	for _, s := range g.GroupSnapshot.Snapshots {
		if _, ok := crash[s.SnapshotId+".json"]; ok {
			t.Errorf("the retry answered member %s, prepared before the crash and never taken", s.SnapshotId)
		}
	}
	if left := files(t, snaps); len(left) != 2 {
		t.Errorf("after the retry, records %v, want its 2 members' only", left)
	}
	for _, v := range []string{a, b} {
		if got := checkpoints(t, pool, v); got != 1 {
			t.Errorf("volume %s: %d checkpoints after the retry, want its member's only", v, got)
		}
	}
	for i, s := range g.GroupSnapshot.Snapshots {
		if got := n.restoredSeq(t, "r"+string(rune('a'+i)), s.SnapshotId); got != 0 {
			t.Errorf("member %d restores to %d, want 0 (never written)", i, got)
		}
	}
}

// TestGroupSnapshotTakenPendingLeftover: a crash after the commit's
// snapshots but before their records were completed leaves them pending;
// they are not listed, and the retried create answers the same members,
// completed.
func TestGroupSnapshotTakenPendingLeftover(t *testing.T) {
	n := startGroupNode(t, "node-a", 0)
	a, _ := n.volume(t, "a", true)
	b, _ := n.volume(t, "b", false)
	ctx := context.Background()
	req := &csi.CreateVolumeGroupSnapshotRequest{Name: "late", SourceVolumeIds: []string{a, b}}
	g1, err := n.groups().CreateVolumeGroupSnapshot(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	snaps := filepath.Join(n.srv.Driver.Options().Pool, ".snapshots")
	for name, data := range files(t, snaps) {
		pending := strings.Replace(string(data), "\n}", ",\n  \"pending\": true\n}", 1)
		if pending == string(data) {
			t.Fatalf("record %s: %s", name, data)
		}
		if err := os.WriteFile(filepath.Join(snaps, name), []byte(pending), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if l, err := n.c.ListSnapshots(ctx, &csi.ListSnapshotsRequest{}); err != nil || len(l.GetEntries()) != 0 {
		t.Fatalf("pending members are listed: %v %v", l, err)
	}
	_, err = n.groups().GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: g1.GroupSnapshot.GroupSnapshotId})
	wantCode(t, err, codes.NotFound, "no member")
	g2, err := n.groups().CreateVolumeGroupSnapshot(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	for i, s := range g2.GroupSnapshot.Snapshots {
		if s.SnapshotId != g1.GroupSnapshot.Snapshots[i].SnapshotId {
			t.Errorf("member %d: %s after the retry, %s before", i, s.SnapshotId, g1.GroupSnapshot.Snapshots[i].SnapshotId)
		}
	}
	if l, err := n.c.ListSnapshots(ctx, &csi.ListSnapshotsRequest{}); err != nil || len(l.GetEntries()) != 2 {
		t.Fatalf("after the retry: %v %v, want the 2 members", l, err)
	}
}
