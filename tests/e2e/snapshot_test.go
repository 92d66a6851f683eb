package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

func snapshotManifest(name, pvc string) string {
	return fmt.Sprintf(`apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: %s, namespace: %s}
spec:
  volumeSnapshotClassName: qcow2
  source: {persistentVolumeClaimName: %s}
`, name, testNS, pvc)
}

func pvcFromManifest(name, kind, apiGroup, source string) string {
	group := ""
	if apiGroup != "" {
		group = "apiGroup: " + apiGroup + ", "
	}
	return fmt.Sprintf(`apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: %s, namespace: %s}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: qcow2
  dataSource: {%skind: %s, name: %s}
  resources: {requests: {storage: 1Gi}}
`, name, testNS, group, kind, source)
}

func (c *cluster) snapshotReady(t *testing.T, name string) {
	t.Helper()
	if err := c.waitFor("VolumeSnapshot "+name+" readyToUse", 3*time.Minute, nil, func() error {
		out, err := c.kubectl("get", "volumesnapshot", name, "-n", testNS, "-o", "jsonpath={.status.readyToUse}")
		if err != nil {
			return err
		}
		if strings.TrimSpace(out) != "true" {
			return fmt.Errorf("readyToUse=%q", out)
		}
		return nil
	}); err != nil {
		desc, _ := c.kubectl("describe", "volumesnapshot", name, "-n", testNS)
		t.Fatalf("%v\n%s", err, tailString(desc, 20))
	}
}

// Scenario 4: snapshot, then a later write; a PVC restored from the
// snapshot holds the snapshot's data, not the later write.
func testSnapshotRestore(t *testing.T, c *cluster) {
	c.mustApply(t, pvcManifest("src", "1Gi", "Filesystem"))
	c.mustApply(t, podManifest("src-pod", "src", false, "echo snapshot-time > /data/f && sync && sleep 3600"))
	c.podReady(t, testNS, "src-pod", 3*time.Minute)
	c.exec(t, testNS, "src-pod", "sync")
	c.mustApply(t, snapshotManifest("snap1", "src"))
	c.snapshotReady(t, "snap1")
	c.exec(t, testNS, "src-pod", "echo later > /data/f && sync")
	// A restore is made in the source's pool (scenario 13: another node
	// is refused): the pod goes where the source is.
	node := c.podNode(t, testNS, "src-pod")
	c.mustApply(t, pvcFromManifest("restored", "VolumeSnapshot", "snapshot.storage.k8s.io", "snap1"))
	c.mustApply(t, podOnManifest("restored-pod", "restored", false, "sleep 3600", node))
	c.podReady(t, testNS, "restored-pod", 3*time.Minute)
	if got := c.exec(t, testNS, "restored-pod", "cat /data/f"); got != "snapshot-time" {
		t.Errorf("restored volume holds %q, want %q", got, "snapshot-time")
	}
	if got := c.exec(t, testNS, "src-pod", "cat /data/f"); got != "later" {
		t.Errorf("source volume holds %q, want %q", got, "later")
	}
	c.deletePod(t, testNS, "restored-pod")
	c.mustKubectl(t, "delete", "pvc", "-n", testNS, "restored", "--wait=true", "--timeout=120s")
	c.mustKubectl(t, "delete", "volumesnapshot", "-n", testNS, "snap1", "--wait=true", "--timeout=120s")
}

// Scenario 5: a clone of a PVC in use (staged: the clone goes through the
// node's open image) holds the source's data at clone time.
func testClone(t *testing.T, c *cluster) {
	c.exec(t, testNS, "src-pod", "echo clone-time > /data/g && sync")
	c.mustApply(t, pvcFromManifest("cloned", "PersistentVolumeClaim", "", "src"))
	c.mustApply(t, podOnManifest("cloned-pod", "cloned", false, "sleep 3600", c.podNode(t, testNS, "src-pod")))
	c.podReady(t, testNS, "cloned-pod", 3*time.Minute)
	if got := c.exec(t, testNS, "cloned-pod", "cat /data/g /data/f"); got != "clone-time\nlater" {
		t.Errorf("clone holds %q", got)
	}
	c.deletePod(t, testNS, "cloned-pod")
	c.mustKubectl(t, "delete", "pvc", "-n", testNS, "cloned", "--wait=true", "--timeout=120s")
}

// Scenario 6: deleting the PVC while a snapshot of it exists, then the
// snapshot, leaves no files in the pool.
func testDeletePVCBeforeSnapshot(t *testing.T, c *cluster) {
	c.mustApply(t, snapshotManifest("snap2", "src"))
	c.snapshotReady(t, "snap2")
	c.deletePod(t, testNS, "src-pod")
	c.mustKubectl(t, "delete", "pvc", "-n", testNS, "src", "--wait=true", "--timeout=120s")
	c.mustKubectl(t, "delete", "volumesnapshot", "-n", testNS, "snap2", "--wait=true", "--timeout=120s")
	c.waitPoolsEmpty(t)
}
