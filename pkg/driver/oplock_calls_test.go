package driver_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
)

// TestSnapshotCallsWaitTheirTurn: while snapshot work holds a volume (a
// restore's copy, say), CreateSnapshot, DeleteSnapshot and a restore from
// one of its snapshots wait for it instead of being Aborted, and all
// succeed once it ends; a DeleteVolume of the volume is still Aborted at
// once.
func TestSnapshotCallsWaitTheirTurn(t *testing.T) {
	_, srv := startQcow2Server(t, driver.Options{})
	c := dial(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	v, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "src", VolumeCapabilities: []*csi.VolumeCapability{capBlock(rw)},
		CapacityRange: &csi.CapacityRange{RequiredBytes: snapDisk, LimitBytes: snapDisk}})
	if err != nil {
		t.Fatal(err)
	}
	vol := v.Volume.VolumeId
	var snaps []string
	for _, name := range []string{"s1", "s2"} {
		s, err := c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: vol})
		if err != nil {
			t.Fatal(err)
		}
		snaps = append(snaps, s.Snapshot.SnapshotId)
	}
	release, err := srv.Driver.HoldSnapshotLockForTest(vol)
	if err != nil {
		t.Fatal(err)
	}
	calls := []func() error{
		func() error {
			_, err := c.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snaps[0]})
			return err
		},
		func() error {
			_, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "restored", VolumeCapabilities: []*csi.VolumeCapability{capBlock(rw)},
				VolumeContentSource: fromSnapshot(snaps[1])})
			return err
		},
		func() error {
			_, err := c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s3", SourceVolumeId: vol})
			return err
		},
	}
	done := make(chan error, len(calls))
	for _, call := range calls {
		go func() { done <- call() }()
	}
	for end := time.Now().Add(10 * time.Second); !strings.Contains(srv.Driver.OpsInFlightForTest(), "(waiting #3)"); time.Sleep(time.Millisecond) {
		select {
		case err := <-done:
			t.Fatalf("a call ended while the volume was held: %v", err)
		default:
		}
		if time.Now().After(end) {
			t.Fatalf("not all three waiting: %s", srv.Driver.OpsInFlightForTest())
		}
	}
	_, err = c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: vol})
	wantCode(t, err, codes.Aborted, "delete refused, snapshot in progress")
	release()
	for range calls {
		if err := <-done; err != nil {
			t.Errorf("after the hold: %v", err)
		}
	}
	if s := srv.Driver.OpsInFlightForTest(); s != "" {
		t.Fatalf("in flight after all ended: %s", s)
	}
}
