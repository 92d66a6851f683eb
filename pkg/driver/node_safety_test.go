package driver_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
)

// mountTmpfs mounts a tmpfs (someone else's mount) at p, creating p, and
// unmounts it when the test ends.
func mountTmpfs(t *testing.T, p string) {
	t.Helper()
	if err := os.MkdirAll(p, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("foreign", p, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(p, "foreign-file"), []byte("not the driver's"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(p, unix.MNT_DETACH) })
}

// wantForeignIntact fails unless the tmpfs of mountTmpfs is still mounted at
// p with its file.
func wantForeignIntact(t *testing.T, p string) {
	t.Helper()
	if b, err := os.ReadFile(filepath.Join(p, "foreign-file")); err != nil || string(b) != "not the driver's" {
		t.Fatalf("the foreign mount at %s was touched: %q, %v", p, b, err)
	}
}

// TestNodeStagingMountGone (issue 20, class 1): a staging mount that
// disappears behind the driver's back is noticed: stats report it
// abnormal, publish refuses to bind the empty directory (the pod would
// write to the node's disk), a repeated stage mounts it again, and a
// foreign mount in its place is refused.
func TestNodeStagingMountGone(t *testing.T) {
	e := newNodeEnv(t)
	c := capMount(rw, "ext4")
	id := e.create("pvc-gone", 64<<20, nil, c)
	staging := e.stage(id, c)
	if err := os.WriteFile(filepath.Join(staging, "kept"), []byte("on the volume"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := unix.Unmount(staging, 0); err != nil {
		t.Fatal(err)
	}
	st, err := e.c.NodeGetVolumeStats(e.ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: staging})
	if err != nil || !st.GetVolumeCondition().GetAbnormal() || !strings.Contains(st.GetVolumeCondition().GetMessage(), "nothing is mounted at "+staging) {
		t.Fatalf("stats with the staging mount gone = %v, %v; want abnormal, saying nothing is mounted", st, err)
	}
	target := filepath.Join(e.dir, "pods", id, "target")
	_, err = e.c.NodePublishVolume(e.ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: c})
	wantCode(t, err, codes.FailedPrecondition, "nothing is mounted at "+staging)
	if _, err := os.Lstat(target); !os.IsNotExist(err) {
		t.Fatalf("refused publish left %s: %v", target, err)
	}

	// A repeated stage mounts the volume again, with its data.
	e.stage(id, c)
	if b, err := os.ReadFile(filepath.Join(staging, "kept")); err != nil || string(b) != "on the volume" {
		t.Fatalf("after restage: %q, %v", b, err)
	}
	target = e.publish(id, staging, c, false)
	st, err = e.c.NodeGetVolumeStats(e.ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target})
	if err != nil || st.GetVolumeCondition().GetAbnormal() {
		t.Fatalf("stats after restage = %v, %v", st, err)
	}

	// Someone else's mount on top of the staging mount: refused, untouched.
	mountTmpfs(t, staging)
	_, err = e.c.NodeStageVolume(e.ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c})
	wantCode(t, err, codes.FailedPrecondition, "has a mount that is not volume "+`"`+id+`"`)
	other := filepath.Join(e.dir, "pods", id, "other")
	_, err = e.c.NodePublishVolume(e.ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: other, VolumeCapability: c})
	wantCode(t, err, codes.FailedPrecondition, "has a mount that is not volume")
	st, err = e.c.NodeGetVolumeStats(e.ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: staging})
	if err != nil || !st.GetVolumeCondition().GetAbnormal() || !strings.Contains(st.GetVolumeCondition().GetMessage(), "has a mount that is not volume") {
		t.Fatalf("stats under a foreign mount = %v, %v; want abnormal", st, err)
	}
	_, err = e.c.NodeExpandVolume(e.ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: staging})
	wantCode(t, err, codes.FailedPrecondition, "has a mount that is not volume")
	_, err = e.c.NodeUnstageVolume(e.ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
	wantCode(t, err, codes.FailedPrecondition, "is still published")
	if _, err := e.c.NodeUnpublishVolume(e.ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	_, err = e.c.NodeUnstageVolume(e.ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
	wantCode(t, err, codes.FailedPrecondition, "has a mount that is not volume")
	wantForeignIntact(t, staging)
	if err := unix.Unmount(staging, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.NodeUnstageVolume(e.ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.DeleteVolume(e.ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
}

// TestNodePublishOntoExistingMount (class 2): only the volume's own mount
// at a target is an idempotent publish; a foreign mount, the staging path
// and "/" are refused and never recorded, so unpublish and unstage still
// work and leave the foreign mount alone.
func TestNodePublishOntoExistingMount(t *testing.T) {
	e := newNodeEnv(t)
	c := capMount(rw, "ext4")
	id := e.create("pvc-existing", 64<<20, nil, c)
	staging := e.stage(id, c)
	target := e.publish(id, staging, c, false)
	e.publish(id, staging, c, false) // its own mount: idempotent

	foreign := filepath.Join(e.dir, "pods", id, "foreign")
	mountTmpfs(t, foreign)
	for _, tc := range []struct {
		target string
		code   codes.Code
		msg    string
	}{
		{foreign, codes.FailedPrecondition, "target path " + foreign + " has a mount that is not volume"},
		{staging, codes.InvalidArgument, "target path " + staging + " is the staging path"},
		{filepath.Join(staging, "sub"), codes.InvalidArgument, "is inside the staging path"},
		{"/", codes.InvalidArgument, "target path / contains the staging path"},
		{e.dir, codes.InvalidArgument, "contains the staging path"},
	} {
		_, err := e.c.NodePublishVolume(e.ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: tc.target, VolumeCapability: c})
		wantCode(t, err, tc.code, tc.msg)
	}
	wantForeignIntact(t, foreign)
	if _, err := e.c.NodeUnpublishVolume(e.ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: foreign}); err != nil {
		t.Fatal(err)
	}
	wantForeignIntact(t, foreign)
	e.teardown(id, staging, target) // unstage is not wedged by a recorded foreign target
	wantForeignIntact(t, foreign)
}

// TestNodeUnpublishTouchesOnlyItsOwn (class 3): unpublish and unstage of
// an unknown volume, or of a target the volume was not published at,
// remove no file or directory and unmount nothing.
func TestNodeUnpublishTouchesOnlyItsOwn(t *testing.T) {
	e := newNodeEnv(t)
	file := filepath.Join(e.dir, "some-file")
	if err := os.WriteFile(file, []byte("precious"), 0o644); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(e.dir, "empty-dir")
	if err := os.Mkdir(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	foreign := filepath.Join(e.dir, "foreign")
	mountTmpfs(t, foreign)

	c := capMount(rw, "ext4")
	id := e.create("pvc-own", 64<<20, nil, c)
	staging := e.stage(id, c)
	target := e.publish(id, staging, c, false)
	for _, vol := range []string{"vol-doesnotexist", id} {
		for _, p := range []string{file, dir, foreign} {
			if _, err := e.c.NodeUnpublishVolume(e.ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: vol, TargetPath: p}); err != nil {
				t.Fatalf("unpublish %s %s: %v", vol, p, err)
			}
		}
		if _, err := e.c.NodeUnstageVolume(e.ctx, &csi.NodeUnstageVolumeRequest{VolumeId: "vol-doesnotexist", StagingTargetPath: foreign}); err != nil {
			t.Fatal(err)
		}
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "precious" {
		t.Fatalf("unpublish of a target not the volume's removed %s: %q, %v", file, b, err)
	}
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("unpublish of a target not the volume's removed %s: %v", dir, err)
	}
	wantForeignIntact(t, foreign)

	// A directory the kubelet made (the driver did not) stays after unpublish.
	made := filepath.Join(e.dir, "pods", id, "kubelet-made")
	if err := os.MkdirAll(made, 0o750); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.NodePublishVolume(e.ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: made, VolumeCapability: c}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.NodeUnpublishVolume(e.ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: made}); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(made); err != nil || !fi.IsDir() || slices.Contains(mountsUnder(t, e.dir), made) {
		t.Fatalf("after unpublish, the kubelet's directory %s: %v, %v (want it there, unmounted)", made, fi, err)
	}
	e.teardown(id, staging, target)
}

// TestNodePaths (class 4): staging and target paths are confined below the
// kubelet directory, symbolic links below it are refused, and a block
// publish never hides (nor later deletes) a file it did not create.
func TestNodePaths(t *testing.T) {
	e := newNodeEnv(t)
	kubelet := filepath.Join(e.dir, "kubelet")
	e.opts.KubeletDir = kubelet
	e.start()
	c, b := capMount(rw, "ext4"), capBlock(rw)
	id := e.create("pvc-paths", 64<<20, nil, c)
	bid := e.create("pvc-paths-block", 64<<20, nil, b)
	stage := func(id, p string, cp *csi.VolumeCapability) error {
		os.MkdirAll(p, 0o750)
		_, err := e.c.NodeStageVolume(e.ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: p, VolumeCapability: cp})
		return err
	}
	publish := func(id, staging, target string, cp *csi.VolumeCapability) error {
		_, err := e.c.NodePublishVolume(e.ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: cp})
		return err
	}

	wantCode(t, stage(id, filepath.Join(e.dir, "outside"), c), codes.InvalidArgument, "is not below the kubelet directory "+kubelet)
	elsewhere := filepath.Join(e.dir, "elsewhere")
	os.MkdirAll(elsewhere, 0o750)
	os.MkdirAll(filepath.Join(kubelet, "plugins"), 0o750)
	if err := os.Symlink(elsewhere, filepath.Join(kubelet, "plugins", "link")); err != nil {
		t.Fatal(err)
	}
	wantCode(t, stage(id, filepath.Join(kubelet, "plugins", "link", "staging"), c), codes.InvalidArgument, "plugins/link is a symbolic link")

	staging := filepath.Join(kubelet, "plugins", "staging", id)
	if err := stage(id, staging, c); err != nil {
		t.Fatal(err)
	}
	bstaging := filepath.Join(kubelet, "plugins", "staging", bid)
	if err := stage(bid, bstaging, b); err != nil {
		t.Fatal(err)
	}
	wantCode(t, publish(id, staging, filepath.Join(e.dir, "pod-outside"), c), codes.InvalidArgument, "is not below the kubelet directory")
	pods := filepath.Join(kubelet, "pods")
	os.MkdirAll(pods, 0o750)
	if err := os.Symlink(elsewhere, filepath.Join(pods, "uid-link")); err != nil {
		t.Fatal(err)
	}
	wantCode(t, publish(id, staging, filepath.Join(pods, "uid-link", "mount"), c), codes.InvalidArgument, "pods/uid-link is a symbolic link")
	if err := os.Symlink(elsewhere, filepath.Join(pods, "target-link")); err != nil {
		t.Fatal(err)
	}
	wantCode(t, publish(id, staging, filepath.Join(pods, "target-link"), c), codes.InvalidArgument, "pods/target-link is a symbolic link")
	if m := mountsUnder(t, elsewhere); len(m) > 0 {
		t.Fatalf("mounted through a symbolic link: %v", m)
	}

	// A file the driver did not make: a block publish neither hides nor
	// (at unpublish) deletes it. A non-empty directory is not hidden either.
	file := filepath.Join(pods, "dev-file")
	if err := os.WriteFile(file, []byte("precious"), 0o644); err != nil {
		t.Fatal(err)
	}
	wantCode(t, publish(bid, bstaging, file, b), codes.FailedPrecondition, "target path "+file+" is a file the driver did not create")
	full := filepath.Join(pods, "full-dir")
	os.MkdirAll(full, 0o750)
	os.WriteFile(filepath.Join(full, "x"), nil, 0o644)
	wantCode(t, publish(id, staging, full, c), codes.FailedPrecondition, "target path "+full+" is a directory that is not empty")
	if _, err := e.c.NodeUnpublishVolume(e.ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: bid, TargetPath: file}); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(file); err != nil || string(got) != "precious" {
		t.Fatalf("file %s after refused publish and unpublish: %q, %v", file, got, err)
	}

	// The kubelet's own paths work, and what the driver made goes away.
	target := filepath.Join(pods, "uid", "volumes", "kubernetes.io~csi", "pv", "mount")
	if err := publish(id, staging, target, c); err != nil {
		t.Fatal(err)
	}
	btarget := filepath.Join(pods, "uid", "volumeDevices", "kubernetes.io~csi", "pv-block")
	if err := publish(bid, bstaging, btarget, b); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.NodeUnpublishVolume(e.ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: bid, TargetPath: btarget}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(btarget); !os.IsNotExist(err) {
		t.Fatalf("block target the driver made is still there: %v", err)
	}
	if _, err := e.c.NodeUnstageVolume(e.ctx, &csi.NodeUnstageVolumeRequest{VolumeId: bid, StagingTargetPath: bstaging}); err != nil {
		t.Fatal(err)
	}
	e.teardown(id, staging, target)
}

// TestNodeRecordFromOlderVersion: a stage record written before device
// numbers and made targets were kept still works after an upgrade: the
// restarted plugin learns the device number at re-attach, unpublish
// unmounts the volume's mount, and leaves the target directory (not known
// to be the driver's) for the kubelet to remove.
func TestNodeRecordFromOlderVersion(t *testing.T) {
	e := newNodeEnv(t)
	c := capMount(rw, "ext4")
	id := e.create("pvc-old-record", 64<<20, nil, c)
	staging := e.stage(id, c)
	target := e.publish(id, staging, c, false)
	rec := filepath.Join(e.pool, ".staged", id+".json")
	var r map[string]any
	b, err := os.ReadFile(rec)
	if err == nil {
		err = json.Unmarshal(b, &r)
	}
	if err != nil || r["dev"] == nil || r["made"] == nil {
		t.Fatalf("record %s: %s, %v; want dev and made in it", rec, b, err)
	}
	delete(r, "dev")
	delete(r, "made")
	if b, err = json.Marshal(r); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(rec, b, 0o600); err != nil {
		t.Fatal(err)
	}
	e.start()
	st, err := e.c.NodeGetVolumeStats(e.ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target})
	if err != nil || st.GetVolumeCondition().GetAbnormal() {
		t.Fatalf("stats after upgrade = %v, %v", st, err)
	}
	if b, _ := os.ReadFile(rec); !strings.Contains(string(b), `"dev"`) {
		t.Errorf("record after re-attach has no device number: %s", b)
	}
	if _, err := e.c.NodeUnpublishVolume(e.ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(target); err != nil || !fi.IsDir() || slices.Contains(mountsUnder(t, e.dir), target) {
		t.Fatalf("target after unpublish: %v, %v; want an unmounted directory", fi, err)
	}
	if _, err := e.c.NodeUnstageVolume(e.ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.DeleteVolume(e.ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
}
