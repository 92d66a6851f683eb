package driver_test

import (
	"bytes"
	"context"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// backendAttacher "attaches" by keeping the backend, so a test writes
// through the node's one open image as the kernel would.
type backendAttacher struct {
	mu       sync.Mutex
	backends map[string]nbdattach.Backend
}

type backendDevice struct{ id string }

func (d backendDevice) Path() string                                            { return "/dev/null" }
func (d backendDevice) ID() string                                              { return d.id }
func (d backendDevice) Resize(context.Context, int64) error                     { return nil }
func (d backendDevice) Detach(context.Context) error                            { return nil }
func (a *backendAttacher) Name() string                                         { return "nbd" }
func (a *backendAttacher) Available() error                                     { return nil }
func (a *backendAttacher) List(context.Context) ([]nbdattach.DeviceInfo, error) { return nil, nil }
func (a *backendAttacher) Attach(_ context.Context, id string, b nbdattach.Backend, _ nbdattach.AttachOptions) (nbdattach.Device, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.backends[id] = b
	return backendDevice{id}, nil
}
func (a *backendAttacher) Reattach(_ context.Context, id string, _ nbdattach.Backend, _ nbdattach.AttachOptions) (nbdattach.Device, error) {
	return nil, nbdattach.ErrNotAttached
}

// TestSnapshotsOfStagedVolume: snapshots, deltas and clones of a staged
// volume go through its open image (a second open would be refused by the
// image lock), and a restore or clone from it is exact.
func TestSnapshotsOfStagedVolume(t *testing.T) {
	qemuImg := peer.Require(t, "qemu-img")
	pool := t.TempDir()
	att := &backendAttacher{backends: map[string]nbdattach.Backend{}}
	srv := drivertest.Start(t, driver.Options{Pool: pool}, driver.Seams{Images: driver.Qcow2Images{}, Attachers: []nbdattach.Attacher{att}})
	c := dial(t, srv)
	conn, err := grpc.NewClient("unix://"+srv.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	md := csi.NewSnapshotMetadataClient(conn)
	ctx := context.Background()
	capab := capBlock(rw)
	v, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "staged", VolumeCapabilities: []*csi.VolumeCapability{capab},
		CapacityRange: &csi.CapacityRange{RequiredBytes: snapDisk, LimitBytes: snapDisk}})
	if err != nil {
		t.Fatal(err)
	}
	vol := v.Volume.VolumeId
	staging := filepath.Join(t.TempDir(), "staging")
	os.MkdirAll(staging, 0o750)
	if _, err := c.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: staging, VolumeCapability: capab, VolumeContext: v.Volume.VolumeContext}); err != nil {
		t.Fatal(err)
	}
	b := att.backends[localID(vol)]
	rng := rand.New(rand.NewSource(9))
	model := make([]byte, snapDisk)
	write := func() {
		for range 6 {
			off := rng.Int63n(snapDisk - 50000)
			p := make([]byte, 1+rng.Intn(50000))
			rng.Read(p)
			if err := b.WriteAt(ctx, p, off, false); err != nil {
				t.Fatal(err)
			}
			copy(model[off:], p)
		}
	}
	write()
	s1, err := c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "st1", SourceVolumeId: vol})
	if err != nil {
		t.Fatal(err)
	}
	m1 := bytes.Clone(model)
	write()
	s2, err := c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "st2", SourceVolumeId: vol})
	if err != nil {
		t.Fatal(err)
	}
	write() // after s2: must not show in anything below
	st, err := md.GetMetadataDelta(ctx, &csi.GetMetadataDeltaRequest{BaseSnapshotId: s1.Snapshot.SnapshotId, TargetSnapshotId: s2.Snapshot.SnapshotId})
	if err != nil {
		t.Fatal(err)
	}
	blocks, err := collect(t, st.Recv, 0)
	if err != nil {
		t.Fatal(err)
	}
	// Restore s2 (copy path: the source is open) and check the delta
	// turns s1's content into it.
	r, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "from-staged", VolumeCapabilities: []*csi.VolumeCapability{capab},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: s2.Snapshot.SnapshotId}}}})
	if err != nil {
		t.Fatal(err)
	}
	if r.Volume.CapacityBytes != snapDisk {
		t.Fatalf("restored capacity %d", r.Volume.CapacityBytes)
	}
	got := readImage(t, imageFile(pool, r.Volume.VolumeId))
	backup := bytes.Clone(m1)
	for _, bl := range blocks {
		copy(backup[bl.ByteOffset:bl.ByteOffset+bl.SizeBytes], got[bl.ByteOffset:bl.ByteOffset+bl.SizeBytes])
	}
	if !bytes.Equal(backup, got) {
		t.Fatal("s1 + delta(s1, s2) differs from s2")
	}
	// A clone of the staged volume goes through its open image (a
	// temporary internal snapshot, copied, then dropped) and holds the
	// disk at clone time.
	atClone := bytes.Clone(model)
	cl, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "clone-staged", VolumeCapabilities: []*csi.VolumeCapability{capab},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: vol}}}})
	if err != nil {
		t.Fatal(err)
	}
	cloneImg := imageFile(pool, cl.Volume.VolumeId)
	if got := readImage(t, cloneImg); !bytes.Equal(got, atClone) {
		t.Fatal("clone of the staged volume differs from its disk at clone time")
	}
	ls, err := c.ListSnapshots(ctx, &csi.ListSnapshotsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(ls.Entries) != 2 {
		t.Fatalf("ListSnapshots after the clone: %v, want st1 and st2 only", ls.Entries)
	}
	// Tracking across the clone stays exact: s2 + delta(s2, s3) is s3.
	write()
	s3, err := c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "st3", SourceVolumeId: vol})
	if err != nil {
		t.Fatal(err)
	}
	m3 := bytes.Clone(model)
	st, err = md.GetMetadataDelta(ctx, &csi.GetMetadataDeltaRequest{BaseSnapshotId: s2.Snapshot.SnapshotId, TargetSnapshotId: s3.Snapshot.SnapshotId})
	if err != nil {
		t.Fatal(err)
	}
	blocks, err = collect(t, st.Recv, 0)
	if err != nil {
		t.Fatal(err)
	}
	backup = got // s2's content, restored above
	for _, bl := range blocks {
		copy(backup[bl.ByteOffset:bl.ByteOffset+bl.SizeBytes], m3[bl.ByteOffset:bl.ByteOffset+bl.SizeBytes])
	}
	if !bytes.Equal(backup, m3) {
		t.Fatal("s2 + delta(s2, s3) differs from s3 after a clone of the staged volume")
	}
	if _, err := c.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	// Released: the source holds st1..st3 and no temporary snapshot, and
	// qemu-img checks both images clean.
	srcImg := imageFile(pool, vol)
	var names []string
	func() {
		img, err := qcow2.Open(srcImg, qcow2.OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		defer img.Close()
		for _, sn := range img.Snapshots() {
			names = append(names, sn.Name)
		}
	}()
	if want := []string{s1.Snapshot.SnapshotId, s2.Snapshot.SnapshotId, s3.Snapshot.SnapshotId}; !slices.Equal(names, want) {
		t.Fatalf("source image snapshots %q, want %q", names, want)
	}
	for _, p := range []string{srcImg, cloneImg} {
		if out, err := exec.Command(qemuImg, "check", p).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img check %s: %v\n%s", p, err, out)
		}
	}
	// Unstaged: clone of the volume's current content.
	r, err = c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "clone", VolumeCapabilities: []*csi.VolumeCapability{capab},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: vol}}}})
	if err != nil {
		t.Fatal(err)
	}
	if got := readImage(t, imageFile(pool, r.Volume.VolumeId)); !bytes.Equal(got, model) {
		t.Fatal("clone differs from the volume")
	}
}
