package driver_test

import (
	"context"
	"slices"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
)

// openLog is a test double around Qcow2Images that records every image the
// driver opens. It keeps Qcow2Images' optional capabilities (SnapshotImages
// among them) by embedding it.
type openLog struct {
	driver.Qcow2Images
	mu     sync.Mutex
	opened []string
}

func (o *openLog) Open(ctx context.Context, path string, opts driver.ImageOpenOptions) (driver.Image, error) {
	o.mu.Lock()
	o.opened = append(o.opened, path)
	o.mu.Unlock()
	return o.Qcow2Images.Open(ctx, path, opts)
}

func (o *openLog) take() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := o.opened
	o.opened = nil
	return out
}

// TestSnapshotsThroughImagesSeam checks that snapshots are offered by the
// Images' SnapshotImages capability, not by its concrete type, and that a
// snapshot of a volume not staged here opens the image through Images.Open,
// the one open path (with its logger and crash-consistent bitmaps).
func TestSnapshotsThroughImagesSeam(t *testing.T) {
	images := &openLog{Qcow2Images: driver.Qcow2Images{CrashConsistentBitmaps: true}}
	pool := t.TempDir()
	c := dial(t, drivertest.Start(t, driver.Options{Pool: pool}, driver.Seams{Images: images}))
	ctx := context.Background()

	caps, err := c.ControllerGetCapabilities(ctx, &csi.ControllerGetCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(caps.Capabilities, func(c *csi.ControllerServiceCapability) bool {
		return c.GetRpc().GetType() == csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT
	}) {
		t.Fatalf("capabilities %v lack CREATE_DELETE_SNAPSHOT for an Images with SnapshotImages", caps.Capabilities)
	}

	v, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: []*csi.VolumeCapability{capBlock(rw)},
		CapacityRange: &csi.CapacityRange{RequiredBytes: snapDisk}})
	if err != nil {
		t.Fatal(err)
	}
	vol := v.Volume.VolumeId
	images.take()
	s, err := c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: vol})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{imageFile(pool, vol)}
	if got := images.take(); !slices.Equal(got, want) {
		t.Errorf("CreateSnapshot opened %q, want %q", got, want)
	}
	if _, err := c.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: s.Snapshot.SnapshotId}); err != nil {
		t.Fatal(err)
	}
	if got := images.take(); !slices.Equal(got, want) {
		t.Errorf("DeleteSnapshot opened %q, want %q", got, want)
	}
}
