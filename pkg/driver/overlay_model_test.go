package driver_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// TestOverlayModel is a model-based random test of clones: random clones
// (of snapshots and of volumes), writes, snapshots, deletions of volumes
// and snapshots, and flattens, checked against a model of every volume's
// and snapshot's data, with qemu-img check clean on every image of the
// pool (volumes, hidden images, bases) after every step. Deleting
// everything at the end leaves nothing.
func TestOverlayModel(t *testing.T) {
	qemuImg := peer.Require(t, "qemu-img")
	pool, srv := startQcow2Server(t, driver.Options{})
	c := dial(t, srv)
	ctx := context.Background()
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewSource(seed))
	vols := map[string][]byte{}    // volume ID -> data
	snaps := map[string][]byte{}   // snapshot ID -> data
	snapVol := map[string]string{} // snapshot ID -> source volume
	keys := func(m map[string][]byte) []string {
		var ks []string
		for k := range m {
			ks = append(ks, k)
		}
		sort.Strings(ks)
		return ks
	}
	pick := func(m map[string][]byte) string { ks := keys(m); return ks[rng.Intn(len(ks))] }
	first := blockVolume(t, c)
	vols[first] = make([]byte, snapDisk)
	writeImage(t, imageFile(pool, first), rng, vols[first])
	checkAll := func(step string) {
		t.Helper()
		var imgs []string
		for _, g := range []string{"*.qcow2", ".snapshots/*.qcow2", ".bases/*.qcow2"} {
			m, _ := filepath.Glob(filepath.Join(pool, g))
			imgs = append(imgs, m...)
		}
		for _, p := range imgs {
			out, err := exec.Command(qemuImg, "check", "-U", p).CombinedOutput()
			if _, serr := os.Stat(p); err != nil && serr == nil {
				t.Fatalf("%s: qemu-img check %s: %v\n%s", step, p, err, out)
			}
			// (A base a flatten's last step released may go meanwhile.)
		}
	}
	checkVolume := func(step, id string) {
		t.Helper()
		if !bytes.Equal(qemuReadsImage(t, imageFile(pool, id)), vols[id]) {
			t.Fatalf("%s: qemu-img reads volume %s differently from the model", step, id)
		}
	}
	checkSnapshot := func(step, id string) {
		t.Helper()
		path := imageFile(pool, snapVol[id])
		if _, ok := vols[snapVol[id]]; !ok {
			path = filepath.Join(pool, ".snapshots", filepath.Base(path))
		}
		raw := filepath.Join(t.TempDir(), "snap.raw")
		if out, err := exec.Command(qemuImg, "convert", "-U", "-l", "snapshot.name="+id, "-O", "raw", path, raw).CombinedOutput(); err != nil {
			t.Fatalf("%s: qemu-img convert snapshot %s: %v\n%s", step, id, err, out)
		}
		got, _ := os.ReadFile(raw)
		if !bytes.Equal(got, snaps[id]) {
			t.Fatalf("%s: qemu-img reads snapshot %s differently from the model", step, id)
		}
	}
	n := 0
	for i := range 50 {
		var step string
		switch op := rng.Intn(7); {
		case op == 0 && len(snaps) > 0, op == 1 && len(vols) > 0:
			var src *csi.VolumeContentSource
			var data []byte
			if op == 0 {
				s := pick(snaps)
				src, data, step = fromSnapshot(s), snaps[s], "clone of snapshot "+s
			} else {
				v := pick(vols)
				src, data, step = fromVolume(v), vols[v], "clone of volume "+v
			}
			n++
			id := cloneVolume(t, c, fmt.Sprintf("m%d", n), src, nil)
			vols[id] = bytes.Clone(data)
			checkVolume(step, id)
		case op == 2 && len(vols) > 0:
			v := pick(vols)
			step = "write " + v
			writeImage(t, imageFile(pool, v), rng, vols[v])
			checkVolume(step, v)
		case op == 3 && len(vols) > 0:
			v := pick(vols)
			n++
			// A background flatten may hold the volume's lock: the CO
			// retries Aborted, so does the model.
			var s *csi.CreateSnapshotResponse
			if err := retryAborted(func() (err error) {
				s, err = c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: fmt.Sprintf("m%d", n), SourceVolumeId: v})
				return err
			}); err != nil {
				t.Fatal(err)
			}
			id := s.Snapshot.SnapshotId
			step = "snapshot " + id
			snaps[id], snapVol[id] = bytes.Clone(vols[v]), v
		case op == 4 && len(vols) > 1:
			v := pick(vols)
			step = "delete volume " + v
			if err := retryAborted(func() error { _, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v}); return err }); err != nil {
				t.Fatalf("%s: %v", step, err)
			}
			delete(vols, v)
		case op == 5 && len(snaps) > 0:
			s := pick(snaps)
			step = "delete snapshot " + s
			if err := retryAborted(func() error {
				_, err := c.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: s})
				return err
			}); err != nil {
				t.Fatalf("%s: %v", step, err)
			}
			delete(snaps, s)
		case op == 6 && len(vols) > 0:
			v := pick(vols)
			step = "flatten " + v
			if err := retryAborted(func() error {
				_, err := c.ControllerModifyVolume(ctx, &csi.ControllerModifyVolumeRequest{VolumeId: v, MutableParameters: map[string]string{"flatten": "true"}})
				return err
			}); err != nil {
				t.Fatalf("%s: %v", step, err)
			}
			waitFlatOrWaiting(t, srv.Driver, pool, v)
			checkVolume(step, v)
		default:
			continue
		}
		step = fmt.Sprintf("step %d (%s)", i, step)
		// A snapshot's deletion resumes a flatten that waited for it: let
		// the background flattens settle before looking at the files.
		for _, v := range keys(vols) {
			waitFlatOrWaiting(t, srv.Driver, pool, v)
		}
		checkAll(step)
		for _, s := range keys(snaps) {
			checkSnapshot(step, s)
		}
	}
	for _, v := range keys(vols) {
		checkVolume("end", v)
	}
	for _, v := range keys(vols) {
		if err := retryAborted(func() error { _, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v}); return err }); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range keys(snaps) {
		if err := retryAborted(func() error { _, err := c.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: s}); return err }); err != nil {
			t.Fatal(err)
		}
	}
	if left := poolLeft(t, pool); len(left) != 0 {
		t.Fatalf("pool not empty after deleting everything: %v", left)
	}
}

// waitFlatOrWaiting waits until volume id's flatten is over or waits for
// its snapshots, and no flatten of d runs on it any more. The record alone
// does not say so: the "waiting" a flatten left stays in it while the
// flatten a DeleteSnapshot resumed steps on the image, and this test
// writes images and runs qemu-img check -U (which reads without a lock)
// from outside the driver, so it must not look while the driver writes.
func waitFlatOrWaiting(t *testing.T, d *driver.Driver, pool, id string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if !d.FlattenRunningForTest(id) {
			f, pending := volumeRecord(t, pool, id)["flatten"].(map[string]any)
			if !pending && backingFile(t, imageFile(pool, id)) == "" {
				return
			}
			if w, _ := f["waiting"].(string); w != "" {
				return
			}
			if !pending {
				return // a clone nothing asked to flatten
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("flatten of %s neither ended nor waits: %v", id, volumeRecord(t, pool, id))
}
