package driver_test

import (
	"context"
	"fmt"
	"os"
	"sort"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
)

// TestListVolumesPages: pages cover every volume once, in ID order, and a
// token stays valid when volumes are deleted or created between pages.
func TestListVolumesPages(t *testing.T) {
	_, c := startRaw(t, driver.Options{})
	ctx := context.Background()
	var ids []string
	for i := range 7 {
		r, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: fmt.Sprintf("pvc-%d", i), VolumeCapabilities: []*csi.VolumeCapability{capMount(rw, "")}})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, r.Volume.VolumeId)
	}
	sort.Strings(ids)
	r, err := c.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: 3})
	if err != nil || len(r.Entries) != 3 || r.NextToken == "" {
		t.Fatalf("page 1 = %v, %v", r, err)
	}
	var got []string
	for _, e := range r.Entries {
		got = append(got, e.Volume.VolumeId)
	}
	// Delete the first volume of the next page: the token still works and
	// simply starts after it.
	if _, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: ids[3]}); err != nil {
		t.Fatal(err)
	}
	for tok := r.NextToken; tok != ""; tok = r.NextToken {
		if r, err = c.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: 3, StartingToken: tok}); err != nil {
			t.Fatal(err)
		}
		for _, e := range r.Entries {
			got = append(got, e.Volume.VolumeId)
		}
	}
	want := append(append([]string{}, ids[:3]...), ids[4:]...)
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("listed %v, want %v", got, want)
	}
	_, err = c.ListVolumes(ctx, &csi.ListVolumesRequest{StartingToken: "invalid-token"})
	wantCode(t, err, codes.Aborted, `starting_token "invalid-token" was not issued by this driver`)
}

// TestGetCapacityReserve: GetCapacity is the pool's free space minus the
// larger reserve, never negative, and zero for another node's topology.
func TestGetCapacityReserve(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name    string
		bytes   int64
		percent float64
	}{{"none", 0, 0}, {"bytes", 1 << 30, 0}, {"percent", 0, 1}, {"all", 0, 100}} {
		t.Run(tc.name, func(t *testing.T) {
			srv := drivertest.Start(t, driver.Options{CapacityReserve: tc.bytes, CapacityReservePercent: tc.percent}, driver.Seams{Images: drivertest.RawImages{}})
			c := dial(t, srv)
			r, err := c.GetCapacity(ctx, &csi.GetCapacityRequest{})
			if err != nil {
				t.Fatal(err)
			}
			var st unix.Statfs_t
			if err := unix.Statfs(srv.Driver.Options().Pool, &st); err != nil {
				t.Fatal(err)
			}
			reserve := max(tc.bytes, int64(float64(int64(st.Blocks)*st.Bsize)*tc.percent/100))
			want := max(int64(st.Bavail)*st.Bsize-reserve, 0)
			// Other writers on this machine move the free space a little
			// between the two statfs calls.
			if d := r.AvailableCapacity - want; d < -(64<<20) || d > 64<<20 {
				t.Fatalf("available %d, want %d (reserve %d)", r.AvailableCapacity, want, reserve)
			}
			if tc.percent == 100 && r.AvailableCapacity != 0 {
				t.Fatalf("available %d with a 100%% reserve", r.AvailableCapacity)
			}
			other, err := c.GetCapacity(ctx, &csi.GetCapacityRequest{AccessibleTopology: &csi.Topology{Segments: map[string]string{driver.DefaultDriverName + "/node": "other"}}})
			if err != nil || other.AvailableCapacity != 0 {
				t.Fatalf("other node's capacity = %v, %v", other, err)
			}
			if tc.percent == 100 {
				_, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc", VolumeCapabilities: []*csi.VolumeCapability{capMount(rw, "")}})
				wantCode(t, err, codes.ResourceExhausted, "4194304 bytes needed, 0 available above the reserve")
			}
		})
	}
}

// TestCreateIdempotentAcrossRestart: a CreateVolume retried against a new
// plugin process on the same pool finds the same volume; a different size or
// parameters under the same name is AlreadyExists.
func TestCreateIdempotentAcrossRestart(t *testing.T) {
	ctx := context.Background()
	pool := t.TempDir()
	req := &csi.CreateVolumeRequest{Name: "pvc-retry", CapacityRange: &csi.CapacityRange{RequiredBytes: 100<<20 - 1000},
		Parameters:         map[string]string{"clusterSize": "128k", "csi.storage.k8s.io/pvc/name": "data"},
		VolumeCapabilities: []*csi.VolumeCapability{capMount(rw, "xfs")}}
	s1 := drivertest.Start(t, driver.Options{Pool: pool}, driver.Seams{Images: drivertest.RawImages{}})
	r1, err := dial(t, s1).CreateVolume(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	s1.Stop(t)
	c := dial(t, drivertest.Start(t, driver.Options{Pool: pool}, driver.Seams{Images: drivertest.RawImages{}}))
	r2, err := c.CreateVolume(ctx, req)
	if err != nil || r2.Volume.VolumeId != r1.Volume.VolumeId || r2.Volume.CapacityBytes != 100<<20 {
		t.Fatalf("retry = %v, %v; first %v", r2, err, r1)
	}
	if r2.Volume.VolumeContext["fsType"] != "xfs" {
		t.Fatalf("volume context %v", r2.Volume.VolumeContext)
	}
	bigger := proto.Clone(req).(*csi.CreateVolumeRequest)
	bigger.CapacityRange = &csi.CapacityRange{RequiredBytes: 200 << 20}
	_, err = c.CreateVolume(ctx, bigger)
	wantCode(t, err, codes.AlreadyExists, `has 104857600 bytes, the request asks for [209715200, 0]`)
	other := proto.Clone(req).(*csi.CreateVolumeRequest)
	other.Parameters = map[string]string{"clusterSize": "64k"}
	_, err = c.CreateVolume(ctx, other)
	wantCode(t, err, codes.AlreadyExists, "was created with parameters")
}

// TestDeleteCorruptImage: a volume whose image no longer opens (here: not
// qcow2 at all) is still deleted.
func TestDeleteCorruptImage(t *testing.T) {
	srv := drivertest.Start(t, driver.Options{}, driver.Seams{Images: driver.Qcow2Images{}})
	c := dial(t, srv)
	ctx := context.Background()
	v, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-c", VolumeCapabilities: []*csi.VolumeCapability{capMount(rw, "")}})
	if err != nil {
		t.Fatal(err)
	}
	img := imageFile(srv.Driver.Options().Pool, v.Volume.VolumeId)
	if err := os.WriteFile(img, []byte("garbage, not an image"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.Volume.VolumeId}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(img); !os.IsNotExist(err) {
		t.Fatalf("image still there: %v", err)
	}
}
