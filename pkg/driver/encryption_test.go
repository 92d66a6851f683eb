package driver_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/fuse"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// TestNodeEncryptedVolume: an encrypted StorageClass's volume through
// CreateVolume and NodeStage on qcow2 images (fuse backend, in a child
// plugin process): the Secret's passphrase is required at both, a wrong
// one is refused clearly, the data is not in the pool in clear, the
// passphrase is nowhere in the pool, and qemu-img reads the data with it.
func TestNodeEncryptedVolume(t *testing.T) {
	peer.Root(t)
	if err := fuse.NewAttacher(fuse.Options{Dir: t.TempDir()}).Available(); err != nil {
		peer.Missing(t, "the fuse attach backend", err.Error())
	}
	qemuImg := peer.Require(t, "qemu-img")
	e := newNodeEnvOn(t, "fuse")
	c := capBlock(rw)
	const pass = "correct horse battery staple"
	params := map[string]string{"encrypted": "true"}
	req := &csi.CreateVolumeRequest{Name: "pvc-enc", CapacityRange: &csi.CapacityRange{RequiredBytes: 32 << 20},
		Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{c}}
	_, err := e.c.CreateVolume(e.ctx, req)
	wantCode(t, err, codes.InvalidArgument, `the provisioner secret must have a non-empty key "passphrase"`)
	req.Secrets = map[string]string{"passphrase": pass}
	r, err := e.c.CreateVolume(e.ctx, req)
	if err != nil {
		t.Fatalf("CreateVolume: %v", err)
	}
	id := r.Volume.VolumeId
	staging := filepath.Join(e.dir, "staging", "enc")
	stage := func(secrets map[string]string) error {
		_, err := e.c.NodeStageVolume(e.ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			VolumeCapability: c, VolumeContext: r.Volume.VolumeContext, Secrets: secrets})
		return err
	}
	wantCode(t, stage(nil), codes.InvalidArgument, `the node-stage secret must have a non-empty key "passphrase"`)
	wantCode(t, stage(map[string]string{"passphrase": "wrong"}), codes.InvalidArgument, "invalid password")
	if err := stage(map[string]string{"passphrase": pass}); err != nil {
		t.Fatalf("NodeStageVolume: %v", err)
	}
	target := e.publish(id, staging, c, false)
	marker := bytes.Repeat([]byte("ENCRYPTED-MARKER-0123456789 "), 100)
	f, err := os.OpenFile(target, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(marker, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := e.c.NodeUnpublishVolume(e.ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.NodeUnstageVolume(e.ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	// Nothing in the pool holds the marker or the passphrase in clear.
	filepath.Walk(e.pool, func(p string, fi os.FileInfo, err error) error {
		if err != nil || fi.IsDir() {
			return nil
		}
		b, _ := os.ReadFile(p)
		if bytes.Contains(b, []byte("ENCRYPTED-MARKER")) || bytes.Contains(b, []byte(pass)) {
			t.Errorf("%s holds the marker or the passphrase in clear", p)
		}
		return nil
	})
	// qemu-img reads the marker with the passphrase.
	raw := filepath.Join(t.TempDir(), "raw")
	out, err := exec.Command(qemuImg, "convert", "--object", "secret,id=k,data="+pass, "--image-opts",
		"driver=qcow2,file.filename="+imageFile(e.pool, id)+",encrypt.key-secret=k", "-O", "raw", raw).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img convert: %v\n%s", err, out)
	}
	if b, _ := os.ReadFile(raw); !bytes.Equal(b[1<<20:1<<20+len(marker)], marker) {
		t.Fatal("qemu-img does not read the marker back")
	}
	// Encrypted volumes have subclusters by default (a first write encrypts
	// only what it touches), and qemu-img checks the image clean.
	out, err = exec.Command(qemuImg, "info", "--output=json", imageFile(e.pool, id)).CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte(`"extended-l2": true`)) {
		t.Fatalf("qemu-img info: want extended-l2 true (%v)\n%s", err, out)
	}
	out, err = exec.Command(qemuImg, "check", "--object", "secret,id=k,data="+pass, "--image-opts",
		"driver=qcow2,file.filename="+imageFile(e.pool, id)+",encrypt.key-secret=k").CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img check: %v\n%s", err, out)
	}
	// A snapshot restores into an encrypted volume under the same key; into
	// a plain class it is refused.
	snap, err := e.c.CreateSnapshot(e.ctx, &csi.CreateSnapshotRequest{SourceVolumeId: id, Name: "snap-enc"})
	if err != nil {
		t.Fatalf("CreateSnapshot: %v", err)
	}
	from := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.Snapshot.SnapshotId}}}
	_, err = e.c.CreateVolume(e.ctx, &csi.CreateVolumeRequest{Name: "pvc-plain-from-enc", VolumeContentSource: from, VolumeCapabilities: []*csi.VolumeCapability{c}})
	wantCode(t, err, codes.InvalidArgument, "keeps the source's encryption")
	_, err = e.c.CreateVolume(e.ctx, &csi.CreateVolumeRequest{Name: "pvc-enc-wrong", VolumeContentSource: from, Parameters: params,
		Secrets: map[string]string{"passphrase": "wrong"}, VolumeCapabilities: []*csi.VolumeCapability{c}})
	wantCode(t, err, codes.InvalidArgument, "invalid password")
	rr, err := e.c.CreateVolume(e.ctx, &csi.CreateVolumeRequest{Name: "pvc-enc-restored", VolumeContentSource: from, Parameters: params,
		Secrets: req.Secrets, VolumeCapabilities: []*csi.VolumeCapability{c}})
	if err != nil {
		t.Fatalf("CreateVolume from the snapshot: %v", err)
	}
	rid := rr.Volume.VolumeId
	rstaging := filepath.Join(e.dir, "staging", "enc-restored")
	if _, err := e.c.NodeStageVolume(e.ctx, &csi.NodeStageVolumeRequest{VolumeId: rid, StagingTargetPath: rstaging,
		VolumeCapability: c, VolumeContext: rr.Volume.VolumeContext, Secrets: req.Secrets}); err != nil {
		t.Fatalf("NodeStageVolume of the restored volume: %v", err)
	}
	rtarget := e.publish(rid, rstaging, c, false)
	got := make([]byte, len(marker))
	if f, err := os.Open(rtarget); err != nil {
		t.Fatal(err)
	} else {
		_, err = f.ReadAt(got, 1<<20)
		f.Close()
		if err != nil || !bytes.Equal(got, marker) {
			t.Fatalf("restored volume: marker not read back (%v)", err)
		}
	}
	if raw, _ := os.ReadFile(imageFile(e.pool, rid)); bytes.Contains(raw, []byte("ENCRYPTED-MARKER")) {
		t.Fatal("the restored image holds the marker in clear")
	}
	e.teardown(rid, rstaging, rtarget)
	if _, err := e.c.DeleteSnapshot(e.ctx, &csi.DeleteSnapshotRequest{SnapshotId: snap.Snapshot.SnapshotId}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.DeleteVolume(e.ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatalf("DeleteVolume (no secret needed): %v", err)
	}
}
