package driver_test

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
)

// wantMode fails unless path has exactly the permission bits want.
func wantMode(t *testing.T, path string, want fs.FileMode) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != want {
		t.Fatalf("%s: mode %#o, want %#o", path, got, want)
	}
}

// TestPoolFileModes: every volume image the driver makes (create, restore,
// clone) is its owner's only, like the records beside it, and the pool
// directory is not open to other users: a hostPath made by the kubelet
// (DirectoryOrCreate: 0755) is narrowed at start, and images left 0644 by
// an older driver are narrowed too.
func TestPoolFileModes(t *testing.T) {
	ctx := context.Background()
	pool := filepath.Join(t.TempDir(), "pool")
	if err := os.Mkdir(pool, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(pool, 0o755); err != nil { // whatever the umask
		t.Fatal(err)
	}
	seams := driver.Seams{Images: driver.Qcow2Images{}}
	srv := drivertest.Start(t, driver.Options{Pool: pool}, seams)
	wantMode(t, pool, 0o700)
	c := dial(t, srv)
	create := func(name string, src *csi.VolumeContentSource) string {
		t.Helper()
		r, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csi.VolumeCapability{capBlock(rw)},
			CapacityRange: &csi.CapacityRange{RequiredBytes: 4 << 20}, VolumeContentSource: src})
		if err != nil {
			t.Fatal(err)
		}
		return r.Volume.VolumeId
	}
	vol := create("plain", nil)
	wantMode(t, imageFile(pool, vol), 0o600)
	wantMode(t, filepath.Join(pool, localID(vol)+".json"), 0o600)
	snap, err := c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: vol})
	if err != nil {
		t.Fatal(err)
	}
	restored := create("restored", &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.Snapshot.SnapshotId}}})
	wantMode(t, imageFile(pool, restored), 0o600)
	clone := create("clone", &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
		Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: vol}}})
	wantMode(t, imageFile(pool, clone), 0o600)

	// An older driver's pool: wide directory, world-readable image. A
	// foreign file in the pool is not the driver's to change.
	srv.Stop(t)
	foreign := filepath.Join(pool, "README")
	if err := os.WriteFile(foreign, []byte("mine\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for p, m := range map[string]fs.FileMode{pool: 0o755, imageFile(pool, vol): 0o644, foreign: 0o644} {
		if err := os.Chmod(p, m); err != nil {
			t.Fatal(err)
		}
	}
	drivertest.Start(t, driver.Options{Pool: pool}, seams)
	wantMode(t, pool, 0o700)
	wantMode(t, imageFile(pool, vol), 0o600)
	wantMode(t, foreign, 0o644)
}

// TestPoolDirCreated: a pool directory the driver makes itself is 0700.
func TestPoolDirCreated(t *testing.T) {
	pool := filepath.Join(t.TempDir(), "a", "pool")
	drivertest.Start(t, driver.Options{Pool: pool}, driver.Seams{Images: drivertest.RawImages{}})
	wantMode(t, pool, 0o700)
}
