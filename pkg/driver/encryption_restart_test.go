//go:build linux

package driver_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/fuse"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/kernel"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
	"github.com/qcow2-csi/qcow2-csi/tests/vm/vmharness"
)

// TestGuestNBDEncryptedRestart: an encrypted volume on /dev/nbdN keeps
// working across a kill -9 of the node plugin: the new process finds the
// volume's key in the kernel keyring and re-attaches the device, and the
// data written before reads back through it (direct I/O, so through the
// new server, not the page cache). Then the hostile case: the key is gone
// from the keyring at the next restart, so the volume is reported
// abnormal naming why, its image is not opened (the file does not change,
// its unstage included: the device is disconnected without being served),
// unstaging it leaves no device behind, and staging it again with the
// Secret gives the data back. Unstage removes the key. (That unstage once
// waited out the kernel's timeouts, 2.5 minutes, and leaked /dev/nbd0: it
// served the device from a process whose first served device it was, and
// the process-wide PR_SET_IO_FLUSHER stopped the world while its own fsync
// of the device waited for that server.)
func TestGuestNBDEncryptedRestart(t *testing.T) {
	vmharness.Guest(t)
	e := newNodeEnvOn(t, "nbd")
	c := capBlock(rw)
	id, staging, stage := e.encryptedVolume("pvc-enc-restart", "enc-restart", "restart keeps the key", c, 32<<20)
	keys := driver.KernelKeyring{Prefix: driver.DefaultDriverName}
	stage()
	if k, err := keys.Get(id); err != nil || len(k) != 64 {
		t.Fatalf("key in the keyring after stage: %d bytes, %v", len(k), err)
	}
	target := e.publish(id, staging, c, false)
	before := directBuf(t, "before the restart ")
	directIO(t, target, before, 1<<20, true)

	e.start() // kill -9: the new process knows the key only from the keyring
	st, err := e.c.NodeGetVolumeStats(e.ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target})
	if err != nil || st.VolumeCondition.GetAbnormal() {
		t.Fatalf("stats after restart = %v, %v", st, err)
	}
	got := directBuf(t, "")
	directIO(t, target, got, 1<<20, false)
	if !bytes.Equal(got, before) {
		t.Fatal("the data written before the restart does not read back through the re-attached device")
	}
	after := directBuf(t, "after the restart ")
	directIO(t, target, after, 2<<20, true)
	directIO(t, target, got, 2<<20, false)
	if !bytes.Equal(got, after) {
		t.Fatal("a write after the restart does not read back")
	}

	// The key is lost (as if removed by hand): the next restart must not
	// serve the volume, nor touch its image.
	if err := keys.Remove(id); err != nil {
		t.Fatal(err)
	}
	e.restartWithoutKey(id, staging, target)
	stage()
	target = e.publish(id, staging, c, false)
	directIO(t, target, got, 2<<20, false)
	if !bytes.Equal(got, after) {
		t.Fatal("the data does not read back after staging again")
	}
	e.teardown(id, staging, target)
	if _, err := keys.Get(id); err == nil {
		t.Fatal("the key is still in the keyring after NodeUnstageVolume")
	}
}

// TestGuestNBDEncryptedKeyLostMount: the missing-key case on an ext4
// volume, with writes still in the page cache at the restart: its unstage
// unmounts a filesystem whose device nobody serves, so the device is
// disconnected first (the unmount's writes fail at once instead of waiting
// for the kernel's timeouts); the image is not touched, no device is left,
// and what was synced before reads back once staged again with the Secret.
func TestGuestNBDEncryptedKeyLostMount(t *testing.T) {
	vmharness.Guest(t)
	e := newNodeEnvOn(t, "nbd")
	c := capMount(rw, "ext4")
	id, staging, stage := e.encryptedVolume("pvc-enc-lost", "enc-lost", "the keyring lost it", c, 64<<20)
	keys := driver.KernelKeyring{Prefix: driver.DefaultDriverName}
	stage()
	target := e.publish(id, staging, c, false)
	synced := bytes.Repeat([]byte("synced before the key was lost\n"), 1000)
	writeFile(t, filepath.Join(target, "synced"), synced, true)
	if err := keys.Remove(id); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(target, "dirty"), bytes.Repeat([]byte("in the page cache only\n"), 10000), false)

	e.restartWithoutKey(id, staging, target) // kill -9, and no key for the new process
	stage()
	target = e.publish(id, staging, c, false)
	if got, err := os.ReadFile(filepath.Join(target, "synced")); err != nil || !bytes.Equal(got, synced) {
		t.Fatalf("the synced file after staging again: %d bytes, %v", len(got), err)
	}
	e.teardown(id, staging, target)
}

func writeFile(t *testing.T, p string, b []byte, sync bool) {
	t.Helper()
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(b); err != nil {
		t.Fatal(err)
	}
	if sync {
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
	}
}

// nbdDeviceOf is the kernel nbd device still configured for volume id,
// or "".
func nbdDeviceOf(t *testing.T, id string) string {
	t.Helper()
	devs, err := kernel.NewAttacher(kernel.Options{}).List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range devs {
		if d.ID == localID(id) {
			return d.Path
		}
	}
	return ""
}

// TestNodeEncryptedKeyAcrossRestart: the key's life in the kernel
// keyring on this host, where devices cannot outlive the plugin (fuse):
// NodeStage puts it; after a kill -9 the new process finds it and opens
// the image with it, and fails only where fuse does (its device cannot be
// taken over; without the key it would say so first); with the key gone
// the volume is abnormal naming the keyring; unstage removes it, and so
// does DeleteVolume for a key an interrupted unstage left.
func TestNodeEncryptedKeyAcrossRestart(t *testing.T) {
	peer.Root(t)
	if err := fuse.NewAttacher(fuse.Options{Dir: t.TempDir()}).Available(); err != nil {
		peer.Missing(t, "the fuse attach backend", err.Error())
	}
	if _, err := unix.KeyctlGetKeyringID(unix.KEY_SPEC_USER_KEYRING, true); err != nil {
		peer.Missing(t, "the kernel keyring", err.Error())
	}
	e := newNodeEnvOn(t, "fuse")
	c := capMount(rw, "ext4") // a block volume with no device left is forgotten at start, key or not
	id, staging, stage := e.encryptedVolume("pvc-enc-key", "enc-key", "fuse keeps no device, the keyring keeps the key", c, 32<<20)
	keys := driver.KernelKeyring{Prefix: driver.DefaultDriverName}
	stage()
	if k, err := keys.Get(id); err != nil || len(k) != 64 {
		t.Fatalf("key in the keyring after stage: %d bytes, %v", len(k), err)
	}
	target := e.publish(id, staging, c, false)
	condition := func() string {
		t.Helper()
		st, err := e.c.NodeGetVolumeStats(e.ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target})
		if err != nil || !st.VolumeCondition.GetAbnormal() {
			t.Fatalf("stats after a restart on fuse = %v, %v; want abnormal", st, err)
		}
		return st.VolumeCondition.GetMessage()
	}
	e.start()
	if msg := condition(); !strings.Contains(msg, "cannot be taken over") || strings.Contains(msg, "keyring") {
		t.Fatalf("after a restart with the key kept: %q; want fuse's reason, the key found and the image opened with it", msg)
	}
	if err := keys.Remove(id); err != nil {
		t.Fatal(err)
	}
	e.start()
	if msg := condition(); !strings.Contains(msg, "its key is not in the kernel keyring") || !strings.Contains(msg, "stage it again") {
		t.Fatalf("after a restart without the key: %q; want the missing key named", msg)
	}
	if _, err := e.c.NodeUnpublishVolume(e.ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.NodeUnstageVolume(e.ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	stage()
	if _, err := keys.Get(id); err != nil {
		t.Fatalf("key after staging again: %v", err)
	}
	if _, err := e.c.NodeUnstageVolume(e.ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	if _, err := keys.Get(id); !errors.Is(err, driver.ErrKeyNotKept) {
		t.Fatalf("key after NodeUnstageVolume: %v, want ErrKeyNotKept", err)
	}
	if err := keys.Put(id, make([]byte, 64)); err != nil { // left by an interrupted unstage
		t.Fatal(err)
	}
	if _, err := e.c.DeleteVolume(e.ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
	if _, err := keys.Get(id); !errors.Is(err, driver.ErrKeyNotKept) {
		t.Fatalf("key after DeleteVolume: %v, want ErrKeyNotKept", err)
	}
}

// directBuf is 64 KiB of a pattern, page aligned for O_DIRECT.
func directBuf(t *testing.T, pattern string) []byte {
	b, err := unix.Mmap(-1, 0, 64<<10, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	if pattern != "" {
		for i := range b {
			b[i] = pattern[i%len(pattern)]
		}
	}
	return b
}

// directIO writes (and fsyncs) or reads buf at off of a block device,
// bypassing the page cache.
func directIO(t *testing.T, dev string, buf []byte, off int64, write bool) {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if write {
		if _, err = f.WriteAt(buf, off); err == nil {
			err = f.Sync()
		}
	} else {
		_, err = f.ReadAt(buf, off)
	}
	if err != nil {
		t.Fatalf("%s at %d: %v", dev, off, err)
	}
}

func fileSum(t *testing.T, p string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// encryptedVolume creates encrypted volume name of size bytes with
// passphrase pass and returns its ID, its staging path (staging/dir) and a
// function that stages it there with the same Secret. The volume's key
// leaves the keyring with the test.
func (e *nodeEnv) encryptedVolume(name, dir, pass string, c *csi.VolumeCapability, size int64) (id, staging string, stage func()) {
	t := e.t
	t.Helper()
	secrets := map[string]string{"passphrase": pass}
	r, err := e.c.CreateVolume(e.ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		Parameters: map[string]string{"encrypted": "true"}, Secrets: secrets, VolumeCapabilities: []*csi.VolumeCapability{c}})
	if err != nil {
		t.Fatalf("CreateVolume: %v", err)
	}
	id = r.Volume.VolumeId
	keys := driver.KernelKeyring{Prefix: driver.DefaultDriverName}
	t.Cleanup(func() { _ = keys.Remove(id) })
	staging = filepath.Join(e.dir, "staging", dir)
	return id, staging, func() {
		t.Helper()
		if _, err := e.c.NodeStageVolume(e.ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			VolumeCapability: c, VolumeContext: r.Volume.VolumeContext, Secrets: secrets}); err != nil {
			t.Fatalf("NodeStageVolume: %v", err)
		}
	}
}

// restartWithoutKey restarts the node plugin (kill -9) while volume id,
// staged at staging and published at target, has no key in the keyring: the
// volume is reported abnormal, naming the missing key; unpublish and
// unstage succeed without touching the image, and leave no nbd device.
func (e *nodeEnv) restartWithoutKey(id, staging, target string) {
	t := e.t
	t.Helper()
	e.start()
	sum := fileSum(t, imageFile(e.pool, id))
	st, err := e.c.NodeGetVolumeStats(e.ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target})
	if err != nil || !st.VolumeCondition.GetAbnormal() || !strings.Contains(st.VolumeCondition.GetMessage(), "not in the kernel keyring") {
		t.Fatalf("stats after a restart without the key = %v, %v; want abnormal, naming the missing key", st, err)
	}
	if _, err := e.c.NodeUnpublishVolume(e.ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.NodeUnstageVolume(e.ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatalf("NodeUnstageVolume of the volume without its key: %v", err)
	}
	if dev := nbdDeviceOf(t, id); dev != "" {
		t.Fatalf("%s is still attached after unstaging the volume without its key", dev)
	}
	if fileSum(t, imageFile(e.pool, id)) != sum {
		t.Fatal("the image changed while its volume had no key (unstage included)")
	}
}
