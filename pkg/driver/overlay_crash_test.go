package driver_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
	"github.com/qcow2-csi/qcow2-csi/tests/child"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// TestOverlayCrashHelper is the node plugin TestOverlayCrash kills: on the
// pool it is given it clones the snapshot, snapshots and clones the clones,
// flattens some and deletes others, as fast as it can, until it is killed.
func TestOverlayCrashHelper(t *testing.T) {
	pool := os.Getenv("OVERLAY_CRASH_POOL")
	if pool == "" {
		t.Skip("helper for TestOverlayCrash")
	}
	seed, _ := strconv.ParseInt(os.Getenv("OVERLAY_CRASH_SEED"), 10, 64)
	snap := os.Getenv("OVERLAY_CRASH_SNAP")
	srv := drivertest.Start(t, driver.Options{Pool: pool}, driver.Seams{Images: driver.Qcow2Images{}})
	c := dial(t, srv)
	ctx := context.Background()
	rng := rand.New(rand.NewSource(seed))
	fmt.Println("ready")
	var clones, snaps []string
	for i := 0; ; i++ {
		switch op := rng.Intn(6); {
		case op <= 1 || len(clones) == 0:
			src := snap
			if len(snaps) > 0 && rng.Intn(2) == 0 {
				src = snaps[rng.Intn(len(snaps))]
			}
			params := map[string]string{}
			if rng.Intn(3) == 0 {
				params["flatten"] = "true"
			}
			v, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: fmt.Sprintf("crash-%d-%d", seed, i), VolumeCapabilities: []*csi.VolumeCapability{capBlock(rw)},
				Parameters: params, VolumeContentSource: fromSnapshot(src)})
			if err == nil {
				clones = append(clones, v.Volume.VolumeId)
			}
		case op == 2:
			s, err := c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: fmt.Sprintf("crash-%d-%d", seed, i), SourceVolumeId: clones[rng.Intn(len(clones))]})
			if err == nil {
				snaps = append(snaps, s.Snapshot.SnapshotId)
			}
		case op == 3 && len(snaps) > 0:
			k := rng.Intn(len(snaps))
			if _, err := c.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snaps[k]}); err == nil {
				snaps = append(snaps[:k], snaps[k+1:]...)
			}
		default:
			k := rng.Intn(len(clones))
			if _, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: clones[k]}); err == nil {
				clones = append(clones[:k], clones[k+1:]...)
			}
		}
	}
}

// checkBases checks what TestOverlayCrash promises after a kill and the
// next start's recovery: no temporary file, every base read by some image
// through a reference of its own, every volume readable with the data it
// was cloned with, and qemu-img check clean on every image.
func checkBases(t *testing.T, pool string, want []byte) {
	t.Helper()
	refDirs, _ := filepath.Glob(filepath.Join(pool, ".bases", "*.refs"))
	for _, dir := range append([]string{pool, filepath.Join(pool, ".bases")}, refDirs...) {
		tmp, _ := filepath.Glob(filepath.Join(dir, ".tmp-*"))
		if len(tmp) > 0 {
			t.Fatalf("temporary files left: %v", tmp)
		}
	}
	bases, _ := filepath.Glob(filepath.Join(pool, ".bases", "*.qcow2"))
	for _, b := range bases {
		name := strings.TrimSuffix(filepath.Base(b), ".qcow2")
		refs, _ := os.ReadDir(filepath.Join(pool, ".bases", name+".refs"))
		used := false
		for _, r := range refs {
			var img string
			switch n := r.Name(); {
			case strings.HasPrefix(n, "v-"):
				img = filepath.Join(pool, strings.TrimPrefix(n, "v-")+".qcow2")
				if _, err := os.Stat(strings.TrimSuffix(img, ".qcow2") + ".json"); err != nil {
					img = filepath.Join(pool, ".snapshots", strings.TrimPrefix(n, "v-")+".qcow2")
				}
			case strings.HasPrefix(n, "b-"):
				img = filepath.Join(pool, ".bases", strings.TrimPrefix(n, "b-")+".qcow2")
			}
			if _, err := os.Stat(img); err != nil {
				t.Fatalf("base %s: reference %s to a missing image", name, r.Name())
			}
			used = used || backingFile(t, img) == filepath.Join(".bases", name+".qcow2")
		}
		if !used {
			t.Fatalf("base %s left without users (references %d)", name, len(refs))
		}
	}
	recs, _ := filepath.Glob(filepath.Join(pool, "*.json"))
	for _, r := range recs {
		img := strings.TrimSuffix(r, ".json") + ".qcow2"
		qemuCheckNoCorruption(t, img)
		if !bytes.Equal(readImage(t, img)[:len(want)], want) {
			t.Fatalf("volume %s does not hold the data it was cloned with", img)
		}
	}
	hidden, _ := filepath.Glob(filepath.Join(pool, ".snapshots", "*.qcow2"))
	for _, img := range hidden {
		qemuCheckNoCorruption(t, img)
	}
}

// qemuCheckNoCorruption: a kill in the middle of a write may leak clusters
// (allocated, not yet referenced: qemu-img check's exit status 3, harmless,
// as in qemu); anything else is a failure.
func qemuCheckNoCorruption(t *testing.T, path string) {
	t.Helper()
	out, err := exec.Command(peer.Require(t, "qemu-img"), "check", "-U", path).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); err != nil && !(ok && ee.ExitCode() == 3) {
		t.Fatalf("after a kill: qemu-img check %s: %v\n%s", path, err, out)
	}
}

// TestOverlayCrash: SIGKILL at random points of clones, snapshots,
// flattens and deletions leaves, after the next start, working volumes
// and no base that nothing uses; deleting everything then empties the pool.
func TestOverlayCrash(t *testing.T) {
	if os.Getenv("OVERLAY_CRASH_POOL") != "" {
		t.Skip("inside the helper")
	}
	peer.Require(t, "qemu-img")
	pool := t.TempDir()
	srv := drivertest.Start(t, driver.Options{Pool: pool}, driver.Seams{Images: driver.Qcow2Images{}})
	c := dial(t, srv)
	ctx := context.Background()
	_, model, s := volumeWithSnapshot(t, pool, c, 6)
	srv.Stop(t)
	// Nothing writes: every volume holds the snapshot's data.
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	for k := range 12 {
		cmd, line := child.Start(t, "TestOverlayCrashHelper", "OVERLAY_CRASH_POOL="+pool, "OVERLAY_CRASH_SEED="+strconv.Itoa(k), "OVERLAY_CRASH_SNAP="+s.Snapshot.SnapshotId)
		if line != "ready" {
			t.Fatalf("helper said %q", line)
		}
		time.Sleep(time.Duration(rng.Intn(400)) * time.Millisecond)
		child.Kill(cmd)
		srv := drivertest.Start(t, driver.Options{Pool: pool}, driver.Seams{Images: driver.Qcow2Images{}})
		srv.Stop(t) // (the flattens it resumed stop with it)
		checkBases(t, pool, model)
	}
	// Everything deleted: nothing left.
	srv = drivertest.Start(t, driver.Options{Pool: pool}, driver.Seams{Images: driver.Qcow2Images{}})
	c = dial(t, srv)
	vs, err := c.ListVolumes(ctx, &csi.ListVolumesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range vs.Entries {
		if err := retryAborted(func() error {
			_, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.Volume.VolumeId})
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
	ss, err := c.ListSnapshots(ctx, &csi.ListSnapshotsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range ss.Entries {
		if err := retryAborted(func() error {
			_, err := c.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: s.Snapshot.SnapshotId})
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
	if left := poolLeft(t, pool); len(left) != 0 {
		t.Fatalf("pool not empty after deleting everything: %v", left)
	}
}
