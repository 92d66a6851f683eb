package driver_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

// directImages are qcow2 images whose backend says its device reads the
// file itself (FilePath, as a loop device on a raw file): the driver then
// puts no gate in front of it, so nothing can hold its I/O.
type directImages struct{ driver.Qcow2Images }

type directImage struct{ driver.Image }

type directBackend struct{ nbdattach.Backend }

func (directBackend) FilePath() string { return "/dev/null" }

func (i directImage) Backend() nbdattach.Backend { return directBackend{i.Image.Backend()} }

func (d directImages) Open(ctx context.Context, path string, o driver.ImageOpenOptions) (driver.Image, error) {
	img, err := d.Qcow2Images.Open(ctx, path, o)
	if err != nil {
		return nil, err
	}
	return directImage{img}, nil
}

func (d directImages) Qcow2(img driver.Image) (*qcow2.Image, bool) {
	if di, ok := img.(directImage); ok {
		img = di.Image
	}
	return d.Qcow2Images.Qcow2(img)
}

// TestGroupSnapshotUngatedMember: a staged member whose I/O cannot be held
// (no gate between its device and the image) fails the group snapshot
// with FailedPrecondition before anything is held or taken; a snapshot of
// it taken "held" would be silently inconsistent with the other members.
func TestGroupSnapshotUngatedMember(t *testing.T) {
	att := &backendAttacher{backends: map[string]nbdattach.Backend{}}
	srv := drivertest.Start(t, driver.Options{NodeID: "node-a"},
		driver.Seams{Images: directImages{}, Attachers: []nbdattach.Attacher{att}})
	c := dial(t, srv)
	ctx := context.Background()
	capab := capBlock(rw)
	var vols []string
	for i, name := range []string{"a", "b"} {
		v, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csi.VolumeCapability{capab},
			CapacityRange: &csi.CapacityRange{RequiredBytes: snapDisk, LimitBytes: snapDisk}})
		if err != nil {
			t.Fatal(err)
		}
		vols = append(vols, v.Volume.VolumeId)
		if i > 0 {
			continue // b stays unstaged: no I/O to hold
		}
		staging := filepath.Join(t.TempDir(), "staging")
		if err := os.MkdirAll(staging, 0o750); err != nil {
			t.Fatal(err)
		}
		if _, err := c.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.Volume.VolumeId, StagingTargetPath: staging,
			VolumeCapability: capab, VolumeContext: v.Volume.VolumeContext}); err != nil {
			t.Fatal(err)
		}
	}
	gc := csi.NewGroupControllerClient(dialConn(t, "unix://"+srv.Socket))
	_, err := gc.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: vols})
	wantCode(t, err, codes.FailedPrecondition, vols[0])
	if l, _ := c.ListSnapshots(ctx, &csi.ListSnapshotsRequest{}); len(l.GetEntries()) != 0 {
		t.Fatalf("a refused group left snapshots: %v", l.Entries)
	}
}
