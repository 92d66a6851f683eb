// Package sanityrun runs the csi-test sanity suite against a driver served
// in process. The Ginkgo suite can run once per process, so each test binary
// (tests/sanity on qcow2, tests/sanity/raw on raw images, the VM run) calls
// Run once.
package sanityrun

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	"github.com/onsi/ginkgo/v2"
	"github.com/onsi/gomega"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
)

// skipped are csi-test v5.4.0 specs that are wrong for a CSI 1.12 driver,
// each replaced by a check in this package.
//
// "ControllerGetCapabilities should return appropriate capabilities" fails
// any capability its switch does not list, and v5.4.0 predates GET_SNAPSHOT
// (CSI 1.12): "Unknown capability: GET_SNAPSHOT". Later csi-test releases
// know it, but need CSI spec 1.13, which the Kubernetes libraries here do
// not build with (docs/driver.md). checkControllerCapabilities makes the
// same check against the spec's own enum and tests GetSnapshot.
var skipped = []string{`ControllerGetCapabilities should return appropriate capabilities`}

// Run serves a driver built from seams, with the given --attach-backend, and
// runs the whole suite against it.
func Run(t *testing.T, seams driver.Seams, backend string) {
	srv := drivertest.Start(t, driver.Options{ControllerExpand: true, AttachBackend: backend}, seams)
	dir := t.TempDir()
	cfg := sanity.NewTestConfig()
	cfg.Address = srv.Endpoint
	cfg.TargetPath = filepath.Join(dir, "target")
	cfg.StagingPath = filepath.Join(dir, "staging")
	cfg.TestVolumeSize = 64 << 20
	cfg.TestVolumeExpandSize = 128 << 20
	cfg.IdempotentCount = 3
	// sanity.Test, with the skips.
	sc := sanity.GinkgoTest(&cfg)
	gomega.RegisterFailHandler(ginkgo.Fail)
	suite, reporter := ginkgo.GinkgoConfiguration()
	suite.SkipStrings = append(suite.SkipStrings, skipped...)
	ginkgo.RunSpecs(t, "CSI Driver Test Suite", suite, reporter)
	sc.Finalize()

	t.Run("ControllerGetCapabilities", func(t *testing.T) { checkControllerCapabilities(t, srv.Endpoint) })
}

// checkControllerCapabilities: every advertised controller capability is a
// known value of the spec's enum, listed once; with GET_SNAPSHOT,
// GetSnapshot answers what ListSnapshots says about a snapshot, NotFound
// for an unknown ID and InvalidArgument without one.
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
	if !has[csi.ControllerServiceCapability_RPC_GET_SNAPSHOT] {
		if has[csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT] {
			t.Error("snapshots without GET_SNAPSHOT")
		}
		return
	}
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
