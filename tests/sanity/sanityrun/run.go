// Package sanityrun runs the csi-test sanity suite against a driver served
// in process. The Ginkgo suite can run once per process, so each test binary
// (tests/sanity on qcow2, tests/sanity/raw on raw images, the VM run) calls
// Run once.
package sanityrun

import (
	"context"
	_ "embed"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
)

// Run serves a driver built from seams, with the given --attach-backend, and
// runs the whole suite against it.
func Run(t *testing.T, seams driver.Seams, backend string) {
	srv := drivertest.Start(t, driver.Options{ControllerExpand: true, AttachBackend: backend}, seams)
	run(t, srv.Endpoint, srv.Endpoint)
}

// RunRouted runs the suite through the cluster topology: a node driver
// serving Node on its socket and its agent on 127.0.0.1 over mutual TLS,
// and a controller (--mode=controller) routing to that agent. The suite's
// Node calls go to the node's socket, every Controller call to the
// controller. The node runs --mode=all, not node: csi-test runs its
// volume lifecycle specs ("Node Service should work") only when the
// Identity at Address lists CONTROLLER_SERVICE, though it then sends the
// controller calls to ControllerAddress all the same.
func RunRouted(t *testing.T, seams driver.Seams, backend string) {
	node := drivertest.Start(t, driver.Options{Mode: driver.ModeAll, ControllerExpand: true, AttachBackend: backend}, seams)
	certs := drivertest.MakeCerts(t, t.TempDir())
	agent := drivertest.StartAgent(t, node, certs)
	ctl := drivertest.StartController(t, driver.StaticAgents{node.Driver.Options().NodeID: agent.Addr}, certs, driver.RouterOptions{})
	run(t, node.Endpoint, ctl.Endpoint)
	// The suite's controller calls did go through the controller. Its
	// group snapshots have one node, which commits in its prepare: no
	// GroupCommit (pkg/driver's two-node tests route those).
	metrics := ctl.Metrics()
	for _, m := range []string{"CreateVolume", "DeleteVolume", "CreateSnapshot", "ListVolumes", "ControllerExpandVolume", "ControllerModifyVolume", "GroupPrepare", "GroupRelease"} {
		if want := `qcow2_csi_routed_calls_total{code="OK",method="` + m + `",node="test-node"}`; !strings.Contains(metrics, want) {
			t.Errorf("no %s routed to the agent (%s missing from the controller's metrics)", m, want)
		}
	}
}

// mutableParameters is the suite's mutable-parameters file: the
// VolumeAttributesClass parameters its modify specs create and modify
// volumes with.
//
//go:embed mutable-parameters.yaml
var mutableParameters []byte

func run(t *testing.T, nodeEndpoint, controllerEndpoint string) {
	dir := t.TempDir()
	cfg := sanity.NewTestConfig()
	cfg.TestVolumeMutableParametersFile = filepath.Join(dir, "mutable-parameters.yaml")
	if err := os.WriteFile(cfg.TestVolumeMutableParametersFile, mutableParameters, 0o644); err != nil {
		t.Fatal(err)
	}
	cfg.Address, cfg.DialOptions = suiteDial(nodeEndpoint)
	if controllerEndpoint != nodeEndpoint {
		cfg.ControllerAddress, cfg.ControllerDialOptions = suiteDial(controllerEndpoint)
	}
	cfg.TargetPath = filepath.Join(dir, "target")
	cfg.StagingPath = filepath.Join(dir, "staging")
	cfg.TestVolumeSize = 64 << 20
	cfg.TestVolumeExpandSize = 128 << 20
	cfg.IdempotentCount = 3
	// No spec is skipped: GET_SNAPSHOT, which csi-test v5.4.0's capability
	// spec rejects ("Unknown capability"), is off by default
	// (--enable-get-snapshot).
	sanity.Test(t, cfg)

	t.Run("ControllerGetCapabilities", func(t *testing.T) { checkControllerCapabilities(t, controllerEndpoint) })
	t.Run("GroupSnapshot", func(t *testing.T) { checkGroupSnapshot(t, nodeEndpoint, controllerEndpoint) })
}

// checkGroupSnapshot: where the plugin lists the GroupController service,
// a group snapshot of two volumes is made, read back and deleted with its
// members (csi-test v5.4.0's GroupController specs only check errors).
func checkGroupSnapshot(t *testing.T, nodeEndpoint, controllerEndpoint string) {
	ctx := context.Background()
	id, err := grpc.NewClient(nodeEndpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer id.Close()
	caps, err := csi.NewIdentityClient(id).GetPluginCapabilities(ctx, &csi.GetPluginCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	group := false
	for _, c := range caps.GetCapabilities() {
		group = group || c.GetService().GetType() == csi.PluginCapability_Service_GROUP_CONTROLLER_SERVICE
	}
	if !group {
		return // raw images: no snapshots
	}
	conn, err := grpc.NewClient(controllerEndpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c, gc := csi.NewControllerClient(conn), csi.NewGroupControllerClient(conn)
	var vols []string
	for _, name := range []string{"group-data", "group-wal"} {
		v, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{{
				AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
				AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
			}}})
		if err != nil {
			t.Fatal(err)
		}
		defer c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.GetVolume().GetVolumeId()})
		vols = append(vols, v.GetVolume().GetVolumeId())
	}
	g, err := gc.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "group", SourceVolumeIds: vols})
	if err != nil {
		t.Fatal(err)
	}
	gs := g.GetGroupSnapshot()
	var ids []string
	for i, s := range gs.GetSnapshots() {
		if s.GetSourceVolumeId() != vols[i] || s.GetGroupSnapshotId() != gs.GetGroupSnapshotId() || !s.GetReadyToUse() {
			t.Errorf("member %d: %v, want a ready snapshot of %s in group %s", i, s, vols[i], gs.GetGroupSnapshotId())
		}
		ids = append(ids, s.GetSnapshotId())
	}
	if len(ids) != 2 {
		t.Fatalf("group snapshot %v: want 2 members", gs)
	}
	got, err := gc.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: gs.GetGroupSnapshotId(), SnapshotIds: ids})
	if err != nil || !proto.Equal(got.GetGroupSnapshot(), gs) {
		t.Errorf("GetVolumeGroupSnapshot: %v %v, want %v", got, err, gs)
	}
	if _, err := gc.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: gs.GetGroupSnapshotId(), SnapshotIds: ids}); err != nil {
		t.Fatal(err)
	}
	for _, sid := range ids {
		if l, err := c.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: sid}); err != nil || len(l.GetEntries()) != 0 {
			t.Errorf("member %s after DeleteVolumeGroupSnapshot: %v %v", sid, l, err)
		}
	}
}

// suiteDial is the address and dial options the suite connects to a unix
// endpoint with. csi-test v5.4.0's utils.Connect reads the connection's
// state and then waits for it to change: a connection already Ready at
// that first read never changes, and the spec fails with "Connection timed
// out" after a minute though the driver answers (seen on the first spec
// of a run). A dialler that takes a moment keeps the connection
// Connecting until Connect watches it; the passthrough address keeps
// Connect from replacing this dialler with its own.
func suiteDial(endpoint string) (string, []grpc.DialOption) {
	path := strings.TrimPrefix(endpoint, "unix://")
	return "passthrough:///" + path, []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithAuthority("localhost"),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			select {
			case <-time.After(50 * time.Millisecond):
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}),
	}
}

// checkControllerCapabilities: every advertised controller capability is a
// known value of the spec's enum, listed once, GET_SNAPSHOT not by default;
// with snapshots, GetSnapshot answers what ListSnapshots says about a
// snapshot, NotFound for an unknown ID and InvalidArgument without one.
func checkControllerCapabilities(t *testing.T, endpoint string) {
	conn, err := grpc.NewClient(endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := csi.NewControllerClient(conn)
	ctx := context.Background()
	resp, err := c.ControllerGetCapabilities(ctx, &csi.ControllerGetCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	has := map[csi.ControllerServiceCapability_RPC_Type]bool{}
	for _, cp := range resp.GetCapabilities() {
		typ := cp.GetRpc().GetType()
		if _, known := csi.ControllerServiceCapability_RPC_Type_name[int32(typ)]; !known || typ == csi.ControllerServiceCapability_RPC_UNKNOWN {
			t.Errorf("capability %v is not an RPC capability of the CSI spec", cp)
		}
		if has[typ] {
			t.Errorf("capability %v listed twice", typ)
		}
		has[typ] = true
	}
	if has[csi.ControllerServiceCapability_RPC_GET_SNAPSHOT] {
		t.Error("GET_SNAPSHOT advertised by default")
	}
	if !has[csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT] {
		return
	}
	// GetSnapshot answers whether or not GET_SNAPSHOT is advertised.
	v, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "get-snapshot-source",
		CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{{
			AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
		}}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.GetVolume().GetVolumeId()})
	s, err := c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "get-snapshot", SourceVolumeId: v.GetVolume().GetVolumeId()})
	if err != nil {
		t.Fatal(err)
	}
	id := s.GetSnapshot().GetSnapshotId()
	defer c.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id})
	got, err := c.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: id})
	if err != nil {
		t.Fatal(err)
	}
	l, err := c.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: id})
	if err != nil || len(l.GetEntries()) != 1 {
		t.Fatalf("ListSnapshots %s: %v %v", id, l, err)
	}
	if !proto.Equal(got.GetSnapshot(), l.GetEntries()[0].GetSnapshot()) || !proto.Equal(got.GetSnapshot(), s.GetSnapshot()) {
		t.Errorf("GetSnapshot %v, ListSnapshots %v, CreateSnapshot %v", got.GetSnapshot(), l.GetEntries()[0].GetSnapshot(), s.GetSnapshot())
	}
	for _, tc := range []struct {
		id   string
		code codes.Code
	}{{"", codes.InvalidArgument}, {"no-such-snapshot", codes.NotFound}, {v.GetVolume().GetVolumeId() + "@1", codes.NotFound}} {
		if _, err := c.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: tc.id}); status.Code(err) != tc.code {
			t.Errorf("GetSnapshot(%q): %v, want %v", tc.id, err, tc.code)
		}
	}
	if _, err := c.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: id}); status.Code(err) != codes.NotFound {
		t.Errorf("GetSnapshot of a deleted snapshot: %v, want NotFound", err)
	}
}
