package driver_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io/fs"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

func fromSnapshot(id string) *csi.VolumeContentSource {
	return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: id}}}
}

func fromVolume(id string) *csi.VolumeContentSource {
	return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}
}

// cloneVolume creates block volume name from src with StorageClass params.
func cloneVolume(t *testing.T, c clients, name string, src *csi.VolumeContentSource, params map[string]string) string {
	t.Helper()
	// A background flatten may hold the source's lock: the CO retries
	// Aborted, so do the tests.
	var v *csi.CreateVolumeResponse
	err := retryAborted(func() (err error) {
		v, err = c.CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csi.VolumeCapability{capBlock(rw)},
			Parameters: params, VolumeContentSource: src})
		return err
	})
	if err != nil {
		t.Fatalf("clone %s: %v", name, err)
	}
	return v.Volume.VolumeId
}

// volumeWithSnapshot makes block volume "v" with random data (from seed),
// then snapshot "s" of it; it returns the volume, its data and the snapshot.
func volumeWithSnapshot(t *testing.T, pool string, c clients, seed int64) (string, []byte, *csi.CreateSnapshotResponse) {
	t.Helper()
	vol := blockVolume(t, c)
	model := make([]byte, snapDisk)
	writeImage(t, imageFile(pool, vol), rand.New(rand.NewSource(seed)), model)
	s, err := c.CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: vol})
	if err != nil {
		t.Fatal(err)
	}
	return vol, model, s
}

// backingFile is the backing file name in an image's header ("" for none).
func backingFile(t *testing.T, path string) string {
	t.Helper()
	img, err := qcow2.Open(path, qcow2.OpenOptions{ReadOnly: true, NoLock: true, NoBacking: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	info, err := img.Info()
	if err != nil {
		t.Fatal(err)
	}
	return info.BackingFile
}

// qemuReadsImage is the disk of path as qemu-img convert reads it.
func qemuReadsImage(t *testing.T, path string) []byte {
	t.Helper()
	raw := filepath.Join(t.TempDir(), "out.raw")
	if out, err := exec.Command(peer.Require(t, "qemu-img"), "convert", "-U", "-O", "raw", path, raw).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert %s: %v\n%s", path, err, out)
	}
	b, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// qemuCheckClean runs qemu-img check on path (and so on its chain).
func qemuCheckClean(t *testing.T, path, when string) {
	t.Helper()
	if out, err := exec.Command(peer.Require(t, "qemu-img"), "check", "-U", path).CombinedOutput(); err != nil {
		t.Fatalf("%s: qemu-img check %s: %v\n%s", when, path, err, out)
	}
}

// poolLeft lists the images, bases and base references left in a pool,
// relative to it.
func poolLeft(t *testing.T, pool string) []string {
	t.Helper()
	var left []string
	err := filepath.WalkDir(pool, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(pool, p)
		if e.Type()&fs.ModeSymlink != 0 {
			return nil
		}
		if strings.HasSuffix(p, ".qcow2") || strings.Contains(rel, ".refs/") {
			left = append(left, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return left
}

// TestOverlayClones: clones and restores of one snapshot are overlays of
// one base, made once; qemu reads each like the snapshot; each is written
// on its own; the source volume and snapshot go while the clones work; a
// snapshot of a clone reports the base's data as allocated; deleting
// everything leaves nothing.
func TestOverlayClones(t *testing.T) {
	pool, c, md := startQcow2(t)
	ctx := context.Background()
	vol, model, s := volumeWithSnapshot(t, pool, c, 1)
	sid := s.Snapshot.SnapshotId
	want := map[string][]byte{}
	var clones []string
	for i := range 4 {
		id := cloneVolume(t, c, "clone-"+string(rune('a'+i)), fromSnapshot(sid), nil)
		clones = append(clones, id)
		want[id] = bytes.Clone(model)
	}
	bases, _ := filepath.Glob(filepath.Join(pool, ".bases", "*.qcow2"))
	if len(bases) != 1 {
		t.Fatalf("bases %v, want one for the snapshot", bases)
	}
	for _, id := range clones {
		path := imageFile(pool, id)
		if b := backingFile(t, path); b != filepath.Join(".bases", filepath.Base(bases[0])) {
			t.Fatalf("clone %s backing file %q", id, b)
		}
		qemuCheckClean(t, path, "after clone")
		if !bytes.Equal(qemuReadsImage(t, path), model) {
			t.Fatalf("qemu-img reads clone %s differently from the snapshot", id)
		}
	}
	for i, id := range clones {
		writeImage(t, imageFile(pool, id), rand.New(rand.NewSource(int64(10+i))), want[id])
	}
	// The source volume and its snapshot go; the clones stay whole.
	if _, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: vol}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: sid}); err != nil {
		t.Fatal(err)
	}
	for _, id := range clones {
		if !bytes.Equal(readImage(t, imageFile(pool, id)), want[id]) {
			t.Fatalf("clone %s changed when its source went", id)
		}
		qemuCheckClean(t, imageFile(pool, id), "after the source went")
	}
	// A snapshot of a clone: the full backup covers the base's data.
	cs, err := c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "of-clone", SourceVolumeId: clones[0]})
	if err != nil {
		t.Fatal(err)
	}
	st, err := md.GetMetadataAllocated(ctx, &csi.GetMetadataAllocatedRequest{SnapshotId: cs.Snapshot.SnapshotId})
	if err != nil {
		t.Fatal(err)
	}
	blocks, err := collect(t, st.Recv, 0)
	if err != nil {
		t.Fatal(err)
	}
	backup := make([]byte, snapDisk)
	img := readImage(t, imageFile(pool, clones[0]))
	for _, b := range blocks {
		copy(backup[b.ByteOffset:], img[b.ByteOffset:b.ByteOffset+b.SizeBytes])
	}
	if !bytes.Equal(backup, want[clones[0]]) {
		t.Fatal("a full backup of the clone's snapshot misses data of its base")
	}
	// A clone of the clone's snapshot: its own base, over the first
	// or flat, reads the same.
	cc := cloneVolume(t, c, "clone-of-clone", fromSnapshot(cs.Snapshot.SnapshotId), nil)
	if !bytes.Equal(qemuReadsImage(t, imageFile(pool, cc)), want[clones[0]]) {
		t.Fatal("clone of a clone reads differently")
	}
	// A clone of a clone volume.
	cv := cloneVolume(t, c, "clone-of-volume", fromVolume(clones[1]), nil)
	if !bytes.Equal(qemuReadsImage(t, imageFile(pool, cv)), want[clones[1]]) {
		t.Fatal("clone of a clone volume reads differently")
	}
	// The clone with a snapshot is deleted first (hidden, its base kept
	// for the snapshot), then everything else.
	for _, id := range append(clones, cc, cv) {
		if _, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatal(err)
		}
	}
	if left := poolLeft(t, pool); len(left) == 0 {
		t.Fatal("the hidden clone's image and base went while its snapshot exists")
	}
	if _, err := c.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: cs.Snapshot.SnapshotId}); err != nil {
		t.Fatal(err)
	}
	if left := poolLeft(t, pool); len(left) != 0 {
		t.Fatalf("pool not empty after deleting everything: %v", left)
	}
}

// TestCloneModes: reflink and copy make standalone images; a bad mode is
// refused by name.
func TestCloneModes(t *testing.T) {
	pool, c, _ := startQcow2(t)
	ctx := context.Background()
	vol, s := blockVolumeWithSnapshot(t, c, "s")
	for _, mode := range []string{"reflink", "copy"} {
		id := cloneVolume(t, c, "clone-"+mode, fromSnapshot(s.Snapshot.SnapshotId), map[string]string{"cloneMode": mode})
		if b := backingFile(t, imageFile(pool, id)); b != "" {
			t.Fatalf("cloneMode=%s made an image with backing file %q", mode, b)
		}
	}
	_, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "bad", VolumeCapabilities: []*csi.VolumeCapability{capBlock(rw)},
		Parameters: map[string]string{"cloneMode": "linked"}, VolumeContentSource: fromVolume(vol)})
	wantCode(t, err, codes.InvalidArgument, "cloneMode")
	_, err = c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "bad", VolumeCapabilities: []*csi.VolumeCapability{capBlock(rw)},
		Parameters: map[string]string{"maxChainDepth": "0"}})
	wantCode(t, err, codes.InvalidArgument, "maxChainDepth")
}

// retryAborted calls f again while it fails with Aborted, as a CO does: a
// flatten's step may hold the volume for a moment.
func retryAborted(f func() error) error {
	for {
		err := f()
		if status.Code(err) != codes.Aborted {
			return err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// volumeRecord reads a volume's record as JSON fields.
func volumeRecord(t *testing.T, pool, id string) map[string]any {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(pool, localID(id)+".json"))
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// waitFlat waits until volume id's flatten is over: no backing file and no
// flatten in its record.
func waitFlat(t *testing.T, pool, id string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, pending := volumeRecord(t, pool, id)["flatten"]; !pending && backingFile(t, imageFile(pool, id)) == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("volume %s not flattened: record %v", id, volumeRecord(t, pool, id))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestFlattenOnline: a staged clone is flattened through its open image
// while a writer keeps writing (VolumeAttributesClass flatten=true); a
// clone of a StorageClass with flatten=true flattens by itself. The bases
// go with their last user.
func TestFlattenOnline(t *testing.T) {
	peer.Require(t, "qemu-img")
	pool := t.TempDir()
	att := &backendAttacher{backends: map[string]nbdattach.Backend{}}
	srv := drivertest.Start(t, driver.Options{Pool: pool}, driver.Seams{Images: driver.Qcow2Images{}, Attachers: []nbdattach.Attacher{att}})
	c := dial(t, srv)
	ctx := context.Background()
	_, model, s := volumeWithSnapshot(t, pool, c, 2)
	snapModel := bytes.Clone(model)
	id := cloneVolume(t, c, "staged-clone", fromSnapshot(s.Snapshot.SnapshotId), nil)
	staging := filepath.Join(t.TempDir(), "staging")
	if _, err := c.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: capBlock(rw)}); err != nil {
		t.Fatal(err)
	}
	b := att.backends[localID(id)]
	var mu sync.Mutex
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		rng := rand.New(rand.NewSource(3))
		for {
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			off := rng.Int63n(snapDisk - 9000)
			p := bytes.Repeat([]byte{byte(rng.Intn(256))}, 1+rng.Intn(9000))
			mu.Lock()
			err := b.WriteAt(ctx, p, off, false)
			copy(model[off:], p)
			mu.Unlock()
			if err != nil {
				done <- err
				return
			}
		}
	}()
	if _, err := c.ControllerModifyVolume(ctx, &csi.ControllerModifyVolumeRequest{VolumeId: id, MutableParameters: map[string]string{"flatten": "true"}}); err != nil {
		close(stop)
		<-done
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for backingFile(t, imageFile(pool, id)) != "" && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	waitFlat(t, pool, id)
	got := make([]byte, snapDisk)
	if err := b.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatal("the staged clone's data changed under its flatten")
	}
	if err := retryAborted(func() error {
		_, err := c.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	qemuCheckClean(t, imageFile(pool, id), "after flatten")
	if !bytes.Equal(qemuReadsImage(t, imageFile(pool, id)), model) {
		t.Fatal("qemu-img reads the flattened clone differently")
	}
	if left, _ := filepath.Glob(filepath.Join(pool, ".bases", "*.qcow2")); len(left) != 0 {
		t.Fatalf("base %v left after its only clone was flattened", left)
	}
	// StorageClass flatten=true.
	id2 := cloneVolume(t, c, "flat-clone", fromSnapshot(s.Snapshot.SnapshotId), map[string]string{"flatten": "true"})
	waitFlat(t, pool, id2)
	if !bytes.Equal(readImage(t, imageFile(pool, id2)), snapModel) {
		t.Fatal("clone flattened at creation differs from the snapshot")
	}
	_, err := c.ControllerModifyVolume(ctx, &csi.ControllerModifyVolumeRequest{VolumeId: id2, MutableParameters: map[string]string{"clusterSize": "4k"}})
	wantCode(t, err, codes.InvalidArgument, `unknown parameter "clusterSize"`)
}

// TestFlattenResumes: a flatten stopped with its driver resumes at the
// next start, from the offset its record holds.
func TestFlattenResumes(t *testing.T) {
	pool := t.TempDir()
	srv := drivertest.Start(t, driver.Options{Pool: pool}, driver.Seams{Images: driver.Qcow2Images{}})
	c := dial(t, srv)
	_, model, s := volumeWithSnapshot(t, pool, c, 4)
	id := cloneVolume(t, c, "clone", fromSnapshot(s.Snapshot.SnapshotId), nil)
	srv.Stop(t)
	// A record as a flatten interrupted half way leaves it.
	rec := volumeRecord(t, pool, id)
	rec["flatten"] = map[string]any{"offset": snapDisk / 2}
	b, _ := json.Marshal(rec)
	if err := os.WriteFile(filepath.Join(pool, localID(id)+".json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	// The lower half was copied up before the interruption.
	img, err := qcow2.Open(imageFile(pool, id), qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.Stream(0, snapDisk/2); err != nil {
		t.Fatal(err)
	}
	img.Close()
	srv = drivertest.Start(t, driver.Options{Pool: pool}, driver.Seams{Images: driver.Qcow2Images{}})
	waitFlat(t, pool, id)
	if !bytes.Equal(readImage(t, imageFile(pool, id)), model) {
		t.Fatal("resumed flatten lost data")
	}
}

// TestFlattenWaitsForSnapshots: a clone's snapshot taken before its flatten
// reads the base; the backing file stays until the snapshot goes.
func TestFlattenWaitsForSnapshots(t *testing.T) {
	pool, c, _ := startQcow2(t)
	ctx := context.Background()
	_, model, s := volumeWithSnapshot(t, pool, c, 5)
	id := cloneVolume(t, c, "clone", fromSnapshot(s.Snapshot.SnapshotId), nil)
	cs, err := c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "cs", SourceVolumeId: id})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.ControllerModifyVolume(ctx, &csi.ControllerModifyVolumeRequest{VolumeId: id, MutableParameters: map[string]string{"flatten": "true"}}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		f, _ := volumeRecord(t, pool, id)["flatten"].(map[string]any)
		if w, _ := f["waiting"].(string); strings.Contains(w, "snapshot") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("flatten not waiting for the snapshot: %v", volumeRecord(t, pool, id))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if backingFile(t, imageFile(pool, id)) == "" {
		t.Fatal("backing file dropped while a snapshot reads it")
	}
	if err := retryAborted(func() error {
		_, err := c.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: cs.Snapshot.SnapshotId})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	waitFlat(t, pool, id)
	if !bytes.Equal(readImage(t, imageFile(pool, id)), model) {
		t.Fatal("flattened clone differs")
	}
	qemuCheckClean(t, imageFile(pool, id), "after flatten")
}

// TestOverlayExpand: a clone grows past its base; the new space reads
// zeroes, the old the snapshot's data, and qemu-img agrees.
func TestOverlayExpand(t *testing.T) {
	pool, c, _ := startQcow2(t)
	ctx := context.Background()
	_, model, s := volumeWithSnapshot(t, pool, c, 7)
	id := cloneVolume(t, c, "clone", fromSnapshot(s.Snapshot.SnapshotId), nil)
	if _, err := c.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 2 * snapDisk}, VolumeCapability: capBlock(rw)}); err != nil {
		t.Fatal(err)
	}
	want := append(bytes.Clone(model), make([]byte, snapDisk)...)
	if got := qemuReadsImage(t, imageFile(pool, id)); !bytes.Equal(got, want) {
		t.Fatal("grown clone reads differently")
	}
	qemuCheckClean(t, imageFile(pool, id), "after expansion")
	if b := backingFile(t, imageFile(pool, id)); b == "" {
		t.Fatal("expansion dropped the backing file")
	}
}

// TestOverlayDeltas: changed-block deltas between a clone's own snapshots
// hold what was written between them, not the base's data, also across a
// flatten (its copy-up is no change).
func TestOverlayDeltas(t *testing.T) {
	pool, srv := startQcow2Server(t, driver.Options{})
	c, md := dial(t, srv), dialMetadata(t, srv)
	ctx := context.Background()
	_, _, s := volumeWithSnapshot(t, pool, c, 8)
	id := cloneVolume(t, c, "clone", fromSnapshot(s.Snapshot.SnapshotId), nil)
	s1, err := c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "c1", SourceVolumeId: id})
	if err != nil {
		t.Fatal(err)
	}
	img, err := qcow2.Open(imageFile(pool, id), qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(bytes.Repeat([]byte{0xee}, 64<<10), 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	// Flatten: the disk is copied up, the backing file stays for c1.
	if _, err := c.ControllerModifyVolume(ctx, &csi.ControllerModifyVolumeRequest{VolumeId: id, MutableParameters: map[string]string{"flatten": "true"}}); err != nil {
		t.Fatal(err)
	}
	waitFlatOrWaiting(t, srv.Driver, pool, id)
	var s2 *csi.CreateSnapshotResponse
	if err := retryAborted(func() error {
		var err error
		s2, err = c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "c2", SourceVolumeId: id})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	st, err := md.GetMetadataDelta(ctx, &csi.GetMetadataDeltaRequest{BaseSnapshotId: s1.Snapshot.SnapshotId, TargetSnapshotId: s2.Snapshot.SnapshotId})
	if err != nil {
		t.Fatal(err)
	}
	blocks, err := collect(t, st.Recv, 0)
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, b := range blocks {
		n += b.SizeBytes
		if b.ByteOffset > 1<<20 || b.ByteOffset+b.SizeBytes < (1<<20)+(64<<10) {
			t.Fatalf("delta %v holds more than the write at 1 MiB", blocks)
		}
	}
	if n == 0 || n > 2<<20 {
		t.Fatalf("delta of %d bytes (%v) for a 64 KiB write", n, blocks)
	}
}
