package driver_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// TestNodeStagingPathTrailingSlash: a staging path sent with a trailing
// slash is the same place as without one. The record holds the clean
// path, so stats, publish and unstage match it in either form. Before,
// the path was recorded as sent and stats and publish without the slash
// answered NotFound and FailedPrecondition.
func TestNodeStagingPathTrailingSlash(t *testing.T) {
	e := newNodeEnv(t)
	c := capMount(rw, "ext4")
	id := e.create("pvc-slash", 64<<20, nil, c)
	staging := filepath.Join(e.dir, "staging", id)
	if err := os.MkdirAll(staging, 0o750); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.NodeStageVolume(e.ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging + "/", VolumeCapability: c}); err != nil {
		t.Fatal(err)
	}
	// Repeated with and without the slash: the same staging, idempotent.
	for _, p := range []string{staging, staging + "/"} {
		if _, err := e.c.NodeStageVolume(e.ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: p, VolumeCapability: c}); err != nil {
			t.Fatalf("repeated stage at %s: %v", p, err)
		}
	}
	st, err := e.c.NodeGetVolumeStats(e.ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: staging})
	if err != nil || st.GetVolumeCondition().GetAbnormal() {
		t.Fatalf("stats at %s: %v, %v", staging, st, err)
	}
	target := e.publish(id, staging, c, false)
	if _, err := e.c.NodeUnpublishVolume(e.ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.NodeUnstageVolume(e.ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	if m := mountsUnder(t, e.dir); len(m) > 0 {
		t.Fatalf("mounts left after unstage without the slash: %v", m)
	}
	if _, err := e.c.DeleteVolume(e.ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
}
