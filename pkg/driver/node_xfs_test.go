package driver_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/fuse"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// TestNodeStagesXFSCloneBesideSource: a clone carries its source's xfs
// UUID, and xfs refuses a second mount of a UUID already mounted on the
// node. Both must stage on one node, the clone reading the source's data.
func TestNodeStagesXFSCloneBesideSource(t *testing.T) {
	peer.Root(t)
	needMounts(t, "mkfs.xfs")
	if err := fuse.NewAttacher(fuse.Options{Dir: t.TempDir()}).Available(); err != nil {
		peer.Missing(t, "the fuse attach backend", err.Error())
	}
	e := newNodeEnvOn(t, "fuse")
	c := capMount(rw, "xfs")
	src := e.create("pvc-xfs-src", 320<<20, nil, c)
	srcStaging := e.stage(src, c)
	srcTarget := e.publish(src, srcStaging, c, false)
	if err := os.WriteFile(filepath.Join(srcTarget, "marker"), []byte("from the source"), 0o644); err != nil {
		t.Fatal(err)
	}
	// The clone copies what the image holds: write the filesystem back first.
	f, err := os.Open(srcTarget)
	if err != nil {
		t.Fatal(err)
	}
	err = unix.Syncfs(int(f.Fd()))
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	r, err := e.c.CreateVolume(e.ctx, &csi.CreateVolumeRequest{Name: "pvc-xfs-clone", VolumeCapabilities: []*csi.VolumeCapability{c},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: src}}}})
	if err != nil {
		t.Fatalf("clone: %v", err)
	}
	clone := r.Volume.VolumeId
	e.vctx[clone] = r.Volume.VolumeContext
	cloneStaging := e.stage(clone, c) // failed with "Filesystem has duplicate UUID" before nouuid
	cloneTarget := e.publish(clone, cloneStaging, c, false)
	got, err := os.ReadFile(filepath.Join(cloneTarget, "marker"))
	if err != nil || string(got) != "from the source" {
		t.Fatalf("clone's marker: %q, %v", got, err)
	}
	e.teardown(clone, cloneStaging, cloneTarget)
	e.teardown(src, srcStaging, srcTarget)
}
