package driver_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/fuse"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// terminate sends the serving child SIGTERM and waits for a clean exit.
func (e *nodeEnv) terminate() {
	e.t.Helper()
	if err := e.child.Process.Signal(syscall.SIGTERM); err != nil {
		e.t.Fatal(err)
	}
	if err := e.child.Wait(); err != nil {
		e.t.Fatalf("plugin after SIGTERM: %v (want exit 0: shutdown closed every image)", err)
	}
	e.child = nil
}

// bitmapFlags runs `qemu-img info` on path and returns each persistent
// bitmap's flags by name.
func bitmapFlags(t *testing.T, qemuImg, path string, shared bool) map[string][]string {
	t.Helper()
	args := []string{"info", "--output=json", path}
	if shared {
		args = append(args, "-U")
	}
	out, err := exec.Command(qemuImg, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img %v: %v\n%s", args, err, out)
	}
	var info struct {
		FormatSpecific struct {
			Data struct {
				Bitmaps []struct {
					Name  string   `json:"name"`
					Flags []string `json:"flags"`
				} `json:"bitmaps"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("qemu-img info: %v\n%s", err, out)
	}
	m := map[string][]string{}
	for _, b := range info.FormatSpecific.Data.Bitmaps {
		m[b.Name] = b.Flags
	}
	return m
}

// TestNodeSIGTERMFuse: a node plugin stopped with SIGTERM while a volume is
// staged and published closes its image cleanly (qemu-img check clean, no
// bitmap in use, its lock released), so changed block tracking survives:
// after the restart, and the restage the fuse backend needs
// (docs/fuse-attach.md), the data is there and a delta from a snapshot
// taken before the restart is answered, not FAILED_PRECONDITION.
func TestNodeSIGTERMFuse(t *testing.T) {
	peer.Root(t)
	qemuImg := peer.Require(t, "qemu-img")
	if err := fuse.NewAttacher(fuse.Options{Dir: t.TempDir()}).Available(); err != nil {
		peer.Missing(t, "the fuse attach backend", err.Error())
	}
	e := newNodeEnvOn(t, "fuse")
	ctx := e.ctx
	c := capMount(rw, "ext4")
	id := e.create("pvc-term", 64<<20, nil, c)
	image := imageFile(e.pool, id)
	staging := e.stage(id, c)
	target := e.publish(id, staging, c, false)
	if err := os.WriteFile(filepath.Join(target, "before"), []byte("before"), 0o644); err != nil {
		t.Fatal(err)
	}
	unix.Sync()
	s1, err := e.c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s1", SourceVolumeId: id})
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 4<<20)
	rand.New(rand.NewSource(7)).Read(data)
	if err := os.WriteFile(filepath.Join(target, "after"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	unix.Sync()
	cbt := ""
	for name, flags := range bitmapFlags(t, qemuImg, image, true) {
		if strings.HasPrefix(name, "qcow2-csi-cbt-") && strings.Contains(strings.Join(flags, ","), "in-use") {
			cbt = name
		}
	}
	if cbt == "" {
		t.Fatal("no checkpoint bitmap in use while the volume is staged: the test checks nothing")
	}

	e.terminate()
	if out, err := exec.Command(qemuImg, "check", image).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img check after SIGTERM (no -U: the plugin's lock must be gone): %v\n%s", err, out)
	}
	flags := bitmapFlags(t, qemuImg, image, false)
	for name, f := range flags {
		if strings.Contains(strings.Join(f, ","), "in-use") {
			t.Errorf("bitmap %s still in use after SIGTERM: %v", name, f)
		}
	}
	if strings.Join(flags[cbt], ",") != "auto" {
		t.Errorf("checkpoint bitmap %s after SIGTERM: flags %v, want [auto] (stored, still enabled)", cbt, flags[cbt])
	}

	e.startChild()
	st, err := e.c.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target})
	if err != nil || !st.VolumeCondition.GetAbnormal() {
		t.Fatalf("stats after restart = %v, %v; want abnormal (a fuse device dies with its plugin)", st, err)
	}
	if _, err := e.c.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	staging = e.stage(id, c)
	target = e.publish(id, staging, c, false)
	for name, want := range map[string][]byte{"before": []byte("before"), "after": data} {
		if got, err := os.ReadFile(filepath.Join(target, name)); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s after restart: %d bytes, %v", name, len(got), err)
		}
	}

	e.deltaCoversAcrossRestart(id, s1, int64(len(data)))
	e.teardown(id, staging, target)
}

func testNodeSIGTERMNBD(t *testing.T) {
	e := newNodeEnvOn(t, "nbd")
	ctx := e.ctx
	c := capMount(rw, "ext4")
	id := e.create("pvc-term-nbd", 64<<20, nil, c)
	image := imageFile(e.pool, id)
	staging := e.stage(id, c)
	target := e.publish(id, staging, c, false)
	s1, err := e.c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s1", SourceVolumeId: id})
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 16<<20)
	rand.New(rand.NewSource(9)).Read(data)
	written := make(chan error, 1)
	go func() {
		f, err := os.Create(filepath.Join(target, "busy"))
		if err == nil {
			for off := 0; off < len(data) && err == nil; off += 1 << 20 {
				_, err = f.Write(data[off : off+1<<20])
				if err == nil {
					err = f.Sync()
				}
			}
			if cerr := f.Close(); err == nil {
				err = cerr
			}
		}
		written <- err
	}()

	e.terminate()
	img, err := qcow2.Open(image, qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("open after SIGTERM (the plugin's lock must be gone): %v", err)
	}
	res, err := img.Check(qcow2.RepairNone)
	if err != nil || res.Corruptions != 0 || res.Leaks != 0 || res.CheckErrors != 0 {
		t.Errorf("check after SIGTERM: %+v, %v", res, err)
	}
	bms := img.Bitmaps()
	for _, b := range bms {
		if b.InUse || b.Inconsistent {
			t.Errorf("bitmap after SIGTERM: %+v", b)
		}
	}
	img.Close()
	if len(bms) == 0 {
		t.Fatal("no checkpoint bitmap: the test checks nothing")
	}

	e.startChild()
	st, err := e.c.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target})
	if err != nil || st.VolumeCondition.GetAbnormal() {
		t.Fatalf("stats after restart = %v, %v; want the nbd device taken over", st, err)
	}
	if err := <-written; err != nil {
		t.Fatalf("write across the restart: %v", err)
	}
	unix.Sync()
	// Drop the page cache so the read comes from the device.
	os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0o200)
	if got, err := os.ReadFile(filepath.Join(target, "busy")); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("data written across the restart: %d bytes, %v", len(got), err)
	}
	e.deltaCoversAcrossRestart(id, s1, int64(len(data)))
	e.teardown(id, staging, target)
}

// deltaCoversAcrossRestart takes snapshot s2 of volume id and checks that
// the delta from s1 (taken before the plugin restart) is answered and
// covers at least written bytes; then deletes both snapshots.
func (e *nodeEnv) deltaCoversAcrossRestart(id string, s1 *csi.CreateSnapshotResponse, written int64) {
	t := e.t
	t.Helper()
	ctx := context.Background()
	s2, err := e.c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s2", SourceVolumeId: id})
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("unix://"+filepath.Join(filepath.Dir(e.pool), "csi.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	st2, err := csi.NewSnapshotMetadataClient(conn).GetMetadataDelta(context.Background(),
		&csi.GetMetadataDeltaRequest{BaseSnapshotId: s1.Snapshot.SnapshotId, TargetSnapshotId: s2.Snapshot.SnapshotId})
	if err != nil {
		t.Fatal(err)
	}
	var changed int64
	for {
		r, err := st2.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("delta across the SIGTERM restart: %v", err)
		}
		for _, b := range r.BlockMetadata {
			changed += b.SizeBytes
		}
	}
	if changed < written {
		t.Fatalf("delta across the restart covers %d bytes; %d were written", changed, written)
	}
	for _, s := range []string{s1.Snapshot.SnapshotId, s2.Snapshot.SnapshotId} {
		if _, err := e.c.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: s}); err != nil {
			t.Fatal(err)
		}
	}
}
