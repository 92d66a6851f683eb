package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
)

// Encrypted volumes (issue 18): a StorageClass with encrypted: "true" and
// its Secret; the marker a pod writes is not in the image file on the
// node; a snapshot restores into a new encrypted volume that reads it
// back; the same Secret with another passphrase fails NodeStage clearly.

const (
	luksClass  = "qcow2-luks"
	luksSecret = "luks-key"
	luksPass   = "e2e passphrase: correct horse battery staple"
	// luksMarker is what the pod writes, many times over, so that a
	// clear copy could not hide in one unlucky block boundary.
	luksMarker = "qcow2-csi-luks-marker-5e1f"
)

func luksSecretManifest(pass string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Secret
metadata: {name: %s, namespace: %s}
type: Opaque
stringData: {passphrase: %q}
`, luksSecret, testNS, pass)
}

var luksClassManifest = fmt.Sprintf(`apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: %s}
provisioner: %s
allowVolumeExpansion: true
volumeBindingMode: WaitForFirstConsumer
parameters:
  fsType: ext4
  encrypted: "true"
  csi.storage.k8s.io/provisioner-secret-name: %s
  csi.storage.k8s.io/provisioner-secret-namespace: %s
  csi.storage.k8s.io/node-stage-secret-name: %s
  csi.storage.k8s.io/node-stage-secret-namespace: %s
`, luksClass, driverName, luksSecret, testNS, luksSecret, testNS)

// Scenario 30: the marker written through an encrypted volume is not in
// its image file, which qemu-img sees as LUKS.
func testEncryptedMarkerNotInImage(t *testing.T, c *cluster) {
	c.mustApply(t, luksSecretManifest(luksPass))
	c.mustApply(t, luksClassManifest)
	c.mustApply(t, pvcClassManifest("enc1", "1Gi", "Filesystem", luksClass))
	c.mustApply(t, podManifest("enc-writer", "enc1", false,
		fmt.Sprintf("for i in $(seq 2000); do echo %s; done > /data/m && sync && sleep 3600", luksMarker)))
	c.podReady(t, testNS, "enc-writer", 3*time.Minute)
	c.waitOutput(t, testNS, "enc-writer", "grep -c "+luksMarker+" /data/m", "2000")
	c.exec(t, testNS, "enc-writer", "sync")
	_, handle := c.pvcVolume(t, testNS, "enc1")
	path, _ := c.imagePath(t, handle)
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(raw, []byte(luksMarker)) || bytes.Contains(raw, []byte(luksPass)) {
		t.Fatalf("image %s holds the marker or the passphrase in clear", path)
	}
	out, err := exec.Command("qemu-img", "info", "-U", path).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "encrypted: yes") || !strings.Contains(string(out), "format: luks") {
		t.Fatalf("qemu-img info %s: %v\n%s", path, err, out)
	}
	// Nothing else in the node's pool (records) holds the passphrase.
	for _, n := range c.nodes {
		entries, _ := os.ReadDir(n.pool())
		for _, e := range entries {
			if b, err := os.ReadFile(n.pool() + "/" + e.Name()); err == nil && bytes.Contains(b, []byte(luksPass)) {
				t.Errorf("%s/%s holds the passphrase", n.pool(), e.Name())
			}
		}
	}
}

// Scenario 31: snapshot the encrypted volume, restore it into the
// encrypted class, read the marker back in a new pod.
func testEncryptedSnapshotRestore(t *testing.T, c *cluster) {
	c.mustApply(t, snapshotManifest("enc-snap", "enc1"))
	c.snapshotReady(t, "enc-snap")
	node := c.podNode(t, testNS, "enc-writer")
	c.mustApply(t, fmt.Sprintf(`apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: enc-restored, namespace: %s}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: %s
  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: enc-snap}
  resources: {requests: {storage: 1Gi}}
`, testNS, luksClass))
	c.mustApply(t, podOnManifest("enc-reader", "enc-restored", false, "sleep 3600", node))
	c.podReady(t, testNS, "enc-reader", 3*time.Minute)
	if got := c.exec(t, testNS, "enc-reader", "grep -c "+luksMarker+" /data/m"); got != "2000" {
		t.Fatalf("restored volume has %q marker lines, want 2000", got)
	}
	_, handle := c.pvcVolume(t, testNS, "enc-restored")
	path, _ := c.imagePath(t, handle)
	if raw, err := os.ReadFile(path); err != nil || bytes.Contains(raw, []byte(luksMarker)) {
		t.Fatalf("restored image %s: %v, or it holds the marker in clear", path, err)
	}
}

// Scenario 32: the same Secret with another passphrase: NodeStage of the
// restored volume fails, and says why; the right passphrase back, the pod
// starts.
func testEncryptedWrongPassphrase(t *testing.T, c *cluster) {
	node := c.podNode(t, testNS, "enc-reader")
	c.deletePod(t, testNS, "enc-reader") // unstaged: the next pod stages anew
	c.mustApply(t, luksSecretManifest("not the passphrase"))
	c.mustApply(t, podOnManifest("enc-reader2", "enc-restored", false, "sleep 3600", node))
	if err := c.waitFor("FailedMount naming the wrong passphrase", 3*time.Minute, nil, func() error {
		out, err := c.kubectl("get", "events", "-n", testNS, "--field-selector", "involvedObject.name=enc-reader2",
			"-o", "jsonpath={.items[*].message}")
		if err != nil {
			return err
		}
		if !strings.Contains(out, "InvalidArgument") || !strings.Contains(out, "invalid password") {
			return fmt.Errorf("events: %q", tailString(out, 5))
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if phase := c.jsonpath(t, "pod", testNS, "enc-reader2", "{.status.phase}"); phase == "Running" {
		t.Fatal("the pod runs with the wrong passphrase")
	}
	c.mustApply(t, luksSecretManifest(luksPass))
	c.podReady(t, testNS, "enc-reader2", 4*time.Minute)
	if got := c.exec(t, testNS, "enc-reader2", "grep -c "+luksMarker+" /data/m"); got != "2000" {
		t.Fatalf("marker lines %q after the right passphrase came back", got)
	}
	for _, p := range []string{"enc-reader2", "enc-writer"} {
		c.deletePod(t, testNS, p)
	}
	c.mustKubectl(t, "delete", "pvc", "-n", testNS, "enc-restored", "enc1", "--wait=true", "--timeout=120s")
	c.mustKubectl(t, "delete", "volumesnapshot", "-n", testNS, "enc-snap", "--wait=true", "--timeout=120s")
	c.mustKubectl(t, "delete", "storageclass", luksClass)
	c.mustKubectl(t, "delete", "secret", "-n", testNS, luksSecret)
}

// Scenario 33: the node plugin pod restarts while a pod uses an encrypted
// volume. NodeStage put the volume's master key in root's user keyring
// from inside the plugin's runc container (possessor and uid 0 only); the
// restarted container, on a fresh session keyring, finds it and re-opens
// the image with it (its log says so). This cluster attaches through
// fuse, whose devices die with the plugin process (docs/driver.md), so the
// old pod's mount is lost like a plain volume's (scenario 7): a new pod
// re-stages and reads the marker, and unstaging removes the key. With
// /dev/nbdN the device is re-attached and the same pod goes on
// (pkg/driver TestGuestNBDEncryptedRestart, in the VM).
func testEncryptedPluginRestart(t *testing.T, c *cluster) {
	c.mustApply(t, luksSecretManifest(luksPass))
	c.mustApply(t, luksClassManifest)
	c.mustApply(t, pvcClassManifest("enc-rst", "1Gi", "Filesystem", luksClass))
	c.mustApply(t, podManifest("enc-rst-writer", "enc-rst", false,
		fmt.Sprintf("for i in $(seq 100); do echo %s; done > /data/m && sync && sleep 3600", luksMarker)))
	c.podReady(t, testNS, "enc-rst-writer", 3*time.Minute)
	c.waitOutput(t, testNS, "enc-rst-writer", "grep -c "+luksMarker+" /data/m", "100")
	_, handle := c.pvcVolume(t, testNS, "enc-rst")
	keys := driver.KernelKeyring{Prefix: driverName}
	if k, err := keys.Get(handle); err != nil || len(k) != 64 {
		t.Fatalf("the staged volume's key in root's user keyring: %d bytes, %v", len(k), err)
	}
	node := c.podNode(t, testNS, "enc-rst-writer")
	old := c.nodePluginPod(t, node)
	c.mustKubectl(t, "delete", "pod", "-n", releaseNS, old, "--wait=true", "--timeout=120s")
	var plugin string
	if err := c.waitFor("node plugin back on "+node, 3*time.Minute, nil, func() error {
		plugin = c.nodePluginPodOrEmpty(node)
		if plugin == "" || plugin == old {
			return fmt.Errorf("no new node plugin pod yet")
		}
		_, err := c.kubectl("wait", "-n", releaseNS, "--for=condition=Ready", "pod/"+plugin, "--timeout=5s")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	logs, err := c.kubectl("logs", "-n", releaseNS, plugin, "-c", "qcow2-csi")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs, "Encrypted volume's key found in the kernel keyring") || !strings.Contains(logs, handle) ||
		strings.Contains(logs, "not in the kernel keyring") || strings.Contains(logs, "kernel keyring is not usable") {
		t.Fatalf("the restarted plugin did not find the key of %s in the keyring; its log:\n%s", handle, tailString(logs, 30))
	}
	c.mustKubectl(t, "delete", "pod", "-n", testNS, "enc-rst-writer", "--grace-period=2", "--wait=true", "--timeout=180s")
	c.mustApply(t, podOnManifest("enc-rst-reader", "enc-rst", false, "sleep 3600", node))
	c.podReady(t, testNS, "enc-rst-reader", 3*time.Minute)
	if got := c.exec(t, testNS, "enc-rst-reader", "grep -c "+luksMarker+" /data/m"); got != "100" {
		t.Fatalf("marker lines after the plugin restart: %q, want 100", got)
	}
	if out := c.exec(t, testNS, "enc-rst-reader", "echo after >> /data/m && sync && tail -1 /data/m"); out != "after" {
		t.Fatalf("write after the plugin restart: %q", out)
	}
	c.deletePod(t, testNS, "enc-rst-reader")
	if err := c.waitFor("the key removed at unstage", time.Minute, nil, func() error {
		if _, err := keys.Get(handle); err == nil {
			return fmt.Errorf("still in the keyring")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	c.mustKubectl(t, "delete", "pvc", "-n", testNS, "enc-rst", "--wait=true", "--timeout=120s")
	c.waitPVGone(t, handle)
	c.mustKubectl(t, "delete", "storageclass", luksClass)
	c.mustKubectl(t, "delete", "secret", "-n", testNS, luksSecret)
}
