package driver_test

import (
	"context"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// panicOnceAttacher panics in its first Attach, as a bug met by odd input
// would, and attaches normally afterwards.
type panicOnceAttacher struct {
	*backendAttacher
	panicked atomic.Bool
}

func (a *panicOnceAttacher) Attach(ctx context.Context, id string, b nbdattach.Backend, o nbdattach.AttachOptions) (nbdattach.Device, error) {
	if !a.panicked.Swap(true) {
		panic("attacher bug")
	}
	return a.backendAttacher.Attach(ctx, id, b, o)
}

// TestNodeStageAfterAttachPanic: a panic inside the node's device lock is
// recovered into Internal, and the lock is released with it, so that the
// next stage on the node completes instead of waiting forever.
func TestNodeStageAfterAttachPanic(t *testing.T) {
	att := &panicOnceAttacher{backendAttacher: &backendAttacher{backends: map[string]nbdattach.Backend{}}}
	srv := drivertest.Start(t, driver.Options{Pool: t.TempDir()}, driver.Seams{Images: driver.Qcow2Images{}, Attachers: []nbdattach.Attacher{att}})
	c := dial(t, srv)
	ctx := context.Background()
	capab := capBlock(rw)
	v, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "panicky", VolumeCapabilities: []*csi.VolumeCapability{capab},
		CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	staging := filepath.Join(t.TempDir(), "staging")
	os.MkdirAll(staging, 0o750)
	req := &csi.NodeStageVolumeRequest{VolumeId: v.Volume.VolumeId, StagingTargetPath: staging, VolumeCapability: capab, VolumeContext: v.Volume.VolumeContext}
	_, err = c.NodeStageVolume(ctx, req)
	wantCode(t, err, codes.Internal, "")
	ctx2, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if _, err := c.NodeStageVolume(ctx2, req); err != nil {
		t.Fatalf("stage after a recovered attach panic: %v (the device lock was left held?)", err)
	}
	if _, err := c.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.Volume.VolumeId, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
}
