package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestE2E brings up one two-node cluster with the previous chart and
// runs the scenarios in order: the first upgrades to this checkout's
// chart, the last one uninstalls it. Those of issue 9 come first, then the
// two-node ones of issue 13 (twonode_test.go), then changed block tracking
// through the csi-snapshot-metadata sidecar (issue 14, cbt_test.go: 16-18
// go on from 15's volume and snapshots), and VolumeGroupSnapshots (issue
// 15, group_test.go). Scenarios 5 and 6 start
// from scenario 4's source volume and pod; 6 deletes them and leaves the
// pools empty for those after.
func TestE2E(t *testing.T) {
	c := upCluster(t)
	scenarios := []struct {
		name string
		f    func(t *testing.T, c *cluster)
	}{
		{"examples-validate", testExamplesValidate},
		{"0-upgrade-from-previous-chart", testUpgradeFromPrevious},
		{"1-filesystem-data-survives-pod-recreate", testFilesystemPersists},
		{"2-raw-block", testRawBlock},
		{"3-online-expansion", testOnlineExpansion},
		{"4-snapshot-restore", testSnapshotRestore},
		{"5-clone", testClone},
		{"6-delete-pvc-before-snapshot", testDeletePVCBeforeSnapshot},
		{"7-driver-restart-while-writing", testDriverRestart},
		{"9-volumes-land-on-the-selected-node", testSelectedNode},
		{"10-snapshot-restore-expand-off-leader-node", testOffLeaderNode},
		{"11-controller-killed-during-10-provisionings", testControllerFailover},
		{"12-node-plugin-down", testNodePluginDown},
		{"13-clone-onto-other-node-refused", testCloneOtherNode},
		{"14-agent-is-mutual-tls-only", testAgentMutualTLS},
		{"15-cbt-lister-delta-allocated-and-refusals", testCBTLister},
		{"16-cbt-incremental-backup-restores-byte-for-byte", testCBTIncrementalBackup},
		{"17-cbt-base-deleted-and-fixed-length", testCBTBaseDeletedAndFixed},
		{"18-cbt-delta-across-node-plugin-sigkill", testCBTPluginKilled},
		{"19-cbt-lister-wall-times-opt-in", testCBTBench},
		{"20-qos-write-iops-200", testQoSLimited},
		{"21-qos-raised-to-1000-while-fio-runs", testQoSRaisedLive},
		{"22-qos-limit-lifted", testQoSLifted},
		{"30-encrypted-marker-not-in-image", testEncryptedMarkerNotInImage},
		{"31-encrypted-snapshot-restore", testEncryptedSnapshotRestore},
		{"32-encrypted-wrong-passphrase-fails-stage", testEncryptedWrongPassphrase},
		{"33-encrypted-key-kept-across-node-plugin-restart", testEncryptedPluginRestart},
		{"25-overlay-ten-clones-of-one-snapshot", testOverlayTenClones},
		{"26-overlay-clones-outlive-their-source", testOverlaySourceGone},
		{"27-overlay-flatten-online", testOverlayFlattenOnline},
		{"28-overlay-delete-all-empties-the-pool", testOverlayDeleteAll},
		{"35-group-snapshots-one-node-consistent", testGroupOneNode},
		{"36-group-snapshots-two-nodes-consistent", testGroupTwoNodes},
		{"37-group-snapshot-node-stopped-in-prepare", testGroupNodeStopped},
		{"38-group-snapshot-hold-times-opt-in", testGroupBench},
		{"8-helm-upgrade-and-uninstall", testHelmUpgradeUninstall},
	}
	for _, s := range scenarios {
		ok := t.Run(s.name, func(t *testing.T) {
			// Deferred: a scenario's t.Fatal ends this function at once,
			// and what it left must still be dumped and cleaned.
			defer func() {
				// Dump now: the next scenarios may restart or remove the
				// pods whose logs explain this failure.
				if t.Failed() || os.Getenv(envDumpAlways) == "1" {
					c.dumpState(t, s.name)
					c.dumped = c.dumped || t.Failed()
				}
				if t.Failed() {
					// What a failed scenario left would fail the next
					// ones' checks of the pools.
					c.cleanTestNamespace(t)
				}
			}()
			c.step("scenario "+s.name, func() error {
				s.f(t, c)
				if t.Failed() {
					return fmt.Errorf("failed")
				}
				return nil
			})
		})
		if !ok && (s.name == "examples-validate" || strings.HasPrefix(s.name, "0-")) {
			t.Fatal("the cluster does not accept the chart's objects or the upgrade to this chart failed; not running the scenarios")
		}
	}
}

// --- helpers on the cluster, for scenarios ---------------------------------

// cleanTestNamespace deletes the pods, group snapshots, snapshots and
// claims of the test namespace and waits for the pools to be empty. Group
// snapshots go before snapshots: their members are deleted with them.
func (c *cluster) cleanTestNamespace(t *testing.T) {
	for _, kind := range []string{"pods", "volumegroupsnapshots", "volumesnapshots", "pvc"} {
		if _, err := c.kubectl("delete", kind, "--all", "-n", testNS, "--wait=true", "--timeout=120s"); err != nil {
			t.Logf("cleaning %s after the failure: %v", kind, err)
		}
	}
	c.waitPoolsEmpty(t)
}

func (c *cluster) mustKubectl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := c.kubectl(args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func (c *cluster) mustApply(t *testing.T, manifest string) {
	t.Helper()
	if err := c.apply(manifest); err != nil {
		t.Fatal(err)
	}
}

// podReady waits for the pod to be Ready, with its events on failure.
func (c *cluster) podReady(t *testing.T, ns, name string, timeout time.Duration) {
	t.Helper()
	if _, err := c.kubectl("wait", "-n", ns, "--for=condition=Ready", "pod/"+name, "--timeout="+timeout.String()); err != nil {
		desc, _ := c.kubectl("describe", "pod", "-n", ns, name)
		t.Fatalf("pod %s/%s not Ready: %v\n%s", ns, name, err, tailString(desc, 30))
	}
}

func (c *cluster) deletePod(t *testing.T, ns, name string) {
	t.Helper()
	c.mustKubectl(t, "delete", "pod", "-n", ns, name, "--wait=true", "--timeout=120s")
}

func (c *cluster) exec(t *testing.T, ns, pod, script string) string {
	t.Helper()
	out, err := c.kubectl("exec", "-n", ns, pod, "--", "sh", "-c", script)
	if err != nil {
		t.Fatalf("exec in %s: %q: %v", pod, script, err)
	}
	return strings.TrimSpace(out)
}

// waitOutput waits until script prints want in the pod (a pod's command
// may still be running when it turns Ready).
func (c *cluster) waitOutput(t *testing.T, ns, pod, script, want string) {
	t.Helper()
	if err := c.waitFor(pod+": "+script, time.Minute, nil, func() error {
		out, err := c.kubectl("exec", "-n", ns, pod, "--", "sh", "-c", script)
		if err != nil {
			return err
		}
		if got := strings.TrimSpace(out); got != want {
			return fmt.Errorf("got %q, want %q", got, want)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

func (c *cluster) jsonpath(t *testing.T, kind, ns, name, path string) string {
	t.Helper()
	args := []string{"get", kind, name, "-o", "jsonpath=" + path}
	if ns != "" {
		args = append(args, "-n", ns)
	}
	return strings.TrimSpace(c.mustKubectl(t, args...))
}

// pvcVolume returns the PV name and the CSI volume handle of a bound PVC.
func (c *cluster) pvcVolume(t *testing.T, ns, pvc string) (pv, handle string) {
	t.Helper()
	pv = c.jsonpath(t, "pvc", ns, pvc, "{.spec.volumeName}")
	if pv == "" {
		t.Fatalf("pvc %s is not bound", pvc)
	}
	return pv, c.jsonpath(t, "pv", "", pv, "{.spec.csi.volumeHandle}")
}

// poolImages lists the qcow2 files in every node's pool.
func (c *cluster) poolImages(t *testing.T) []string {
	t.Helper()
	var all []string
	for _, n := range c.nodes {
		m, err := filepath.Glob(filepath.Join(n.pool(), "*.qcow2"))
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, m...)
	}
	return all
}

// localID is the part of a volume or snapshot ID that names its file in
// the pool: the ID without the owning node's "@node" or "#hash" suffix
// (legacy IDs have none).
func localID(id string) string {
	if i := strings.IndexAny(id, "@#"); i >= 0 {
		return id[:i]
	}
	return id
}

// imagePath returns the pool file of a volume and the node whose pool
// holds it; it fails unless exactly one pool does.
func (c *cluster) imagePath(t *testing.T, handle string) (string, *node) {
	t.Helper()
	var found []string
	var owner *node
	for _, n := range c.nodes {
		p := filepath.Join(n.pool(), localID(handle)+".qcow2")
		if _, err := os.Stat(p); err == nil {
			found = append(found, p)
			owner = n
		}
	}
	if len(found) != 1 {
		t.Fatalf("volume %s: image in %d pools (%v), want exactly one; pools hold %v", handle, len(found), found, c.poolImages(t))
	}
	return found[0], owner
}

// imageInfo reads an image in the pool with qemu-img (the qcow2 oracle),
// sharing the driver's locks (-U) since the node plugin holds it open.
type qemuImgInfo struct {
	Format      string `json:"format"`
	VirtualSize int64  `json:"virtual-size"`
}

func (c *cluster) imageInfo(t *testing.T, handle string) qemuImgInfo {
	t.Helper()
	path, _ := c.imagePath(t, handle)
	out, err := exec.Command("qemu-img", "info", "-U", "--output=json", path).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img info %s: %v: %s", path, err, out)
	}
	var info qemuImgInfo
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatal(err)
	}
	return info
}

const gib = int64(1) << 30

func pvcManifest(name, size, mode string) string {
	return pvcClassManifest(name, size, mode, "qcow2")
}

func pvcClassManifest(name, size, mode, class string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: %s, namespace: %s}
spec:
  accessModes: [ReadWriteOnce]
  volumeMode: %s
  storageClassName: %s
  resources: {requests: {storage: %s}}
`, name, testNS, mode, class, size)
}

// podManifest is a busybox pod running script with the PVC at /data
// (filesystem) or /dev/xvda (block), on the node the scheduler picks.
func podManifest(name, pvc string, block bool, script string) string {
	return podOnManifest(name, pvc, block, script, "")
}

// podOnManifest is podManifest pinned to a node (when not empty) by a node
// selector: the scheduler still runs, so a WaitForFirstConsumer claim gets
// that node as its selected node.
func podOnManifest(name, pvc string, block bool, script, node string) string {
	return podImageManifest(name, pvc, busyboxRef, block, script, node)
}

// podImageManifest is podOnManifest with another workload image.
func podImageManifest(name, pvc, image string, block bool, script, node string) string {
	vol := "volumeMounts: [{name: v, mountPath: /data}]"
	if block {
		vol = "volumeDevices: [{name: v, devicePath: /dev/xvda}]"
	}
	sel := ""
	if node != "" {
		sel = fmt.Sprintf("nodeSelector: {kubernetes.io/hostname: %s}\n  ", node)
	}
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: %s, namespace: %s}
spec:
  %sterminationGracePeriodSeconds: 2
  containers:
  - name: c
    image: %s
    imagePullPolicy: Never
    command: [sh, -c, %q]
    %s
  volumes:
  - name: v
    persistentVolumeClaim: {claimName: %s}
`, name, testNS, sel, image, script, vol, pvc)
}

// --- scenarios ---------------------------------------------------------------

// testExamplesValidate: the examples in deploy/examples are accepted by the
// API server (server-side dry run: schema, defaults, admission).
func testExamplesValidate(t *testing.T, c *cluster) {
	dir := filepath.Join(repoRoot(t), "deploy/examples")
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".yaml") {
			continue
		}
		n++
		if _, err := c.kubectl("apply", "--dry-run=server", "-n", testNS, "-f", filepath.Join(dir, e.Name())); err != nil {
			t.Errorf("deploy/examples/%s: %v", e.Name(), err)
		}
	}
	if n < 5 {
		t.Errorf("deploy/examples holds %d manifests, want the PVC, pod, block, snapshot, restore and clone examples", n)
	}
}

// Scenario 1: a file written with its checksum survives deleting and
// recreating the pod (unstage, close, reopen, stage).
func testFilesystemPersists(t *testing.T, c *cluster) {
	c.mustApply(t, pvcManifest("fs1", "1Gi", "Filesystem"))
	c.mustApply(t, podManifest("writer", "fs1", false,
		"dd if=/dev/urandom of=/data/payload bs=1M count=16 && sha256sum /data/payload > /data/payload.sha256 && sync && sleep 3600"))
	c.podReady(t, testNS, "writer", 3*time.Minute)
	want := ""
	if err := c.waitFor("payload written", time.Minute, nil, func() error {
		out, err := c.kubectl("exec", "-n", testNS, "writer", "--", "cat", "/data/payload.sha256")
		want = strings.TrimSpace(out)
		if err == nil && len(want) < 64 {
			err = fmt.Errorf("checksum file holds %q", want)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	// The volume is served as the chart was asked to (helmValues): FUSE
	// over io_uring.
	logs, err := c.kubectl("logs", "-n", releaseNS, c.nodePluginPod(t, c.podNode(t, testNS, "writer")), "-c", "qcow2-csi")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs, "serving over io_uring") {
		t.Errorf("the node plugin's log does not say it serves over io_uring:\n%s", tailString(logs, 30))
	}
	_, handle := c.pvcVolume(t, testNS, "fs1")
	info := c.imageInfo(t, handle)
	if info.Format != "qcow2" || info.VirtualSize != gib {
		t.Errorf("pool image %s: format %q, virtual size %d; want qcow2, %d", handle, info.Format, info.VirtualSize, gib)
	}
	c.deletePod(t, testNS, "writer")
	c.mustApply(t, podManifest("reader", "fs1", false, "sleep 3600"))
	c.podReady(t, testNS, "reader", 3*time.Minute)
	got := c.exec(t, testNS, "reader", "sha256sum /data/payload")
	if got != want {
		t.Errorf("after pod recreation sha256sum = %q, want %q", got, want)
	}
	c.deletePod(t, testNS, "reader")
	c.mustKubectl(t, "delete", "pvc", "-n", testNS, "fs1", "--wait=true", "--timeout=120s")
	c.waitPVGone(t, handle)
}

// waitPVGone waits until the volume's image has left every pool (reclaim
// policy Delete).
func (c *cluster) waitPVGone(t *testing.T, handle string) {
	t.Helper()
	if err := c.waitFor("image "+handle+" deleted from the pools", 2*time.Minute, nil, func() error {
		for _, n := range c.nodes {
			if _, err := os.Stat(filepath.Join(n.pool(), localID(handle)+".qcow2")); err == nil {
				return fmt.Errorf("still in %s's pool", n.name)
			}
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
}

// Scenario 2: a raw block volume: the pod writes 1 MiB of random data to the
// device and reads the same bytes back; the device has the requested size.
func testRawBlock(t *testing.T, c *cluster) {
	c.mustApply(t, pvcManifest("blk1", "1Gi", "Block"))
	c.mustApply(t, podManifest("blk", "blk1", true, "sleep 3600"))
	c.podReady(t, testNS, "blk", 3*time.Minute)
	size := c.exec(t, testNS, "blk", "blockdev --getsize64 /dev/xvda")
	if size != strconv.FormatInt(gib, 10) {
		t.Errorf("block device size %s, want %d", size, gib)
	}
	out := c.exec(t, testNS, "blk", `dd if=/dev/urandom of=/tmp/p bs=4096 count=256 2>/dev/null &&
		dd if=/tmp/p of=/dev/xvda bs=4096 seek=1000 conv=fsync 2>/dev/null &&
		a=$(sha256sum < /tmp/p) &&
		b=$(dd if=/dev/xvda bs=4096 skip=1000 count=256 2>/dev/null | sha256sum) &&
		echo "$a" && echo "$b"`)
	lines := strings.Split(out, "\n")
	if len(lines) != 2 || lines[0] != lines[1] {
		t.Errorf("read back differs from written: %q", out)
	}
	c.deletePod(t, testNS, "blk")
	// The data is on the image, not in a cache of the pod: read it again
	// from a new pod.
	c.mustApply(t, podManifest("blk2", "blk1", true, "sleep 3600"))
	c.podReady(t, testNS, "blk2", 3*time.Minute)
	again := c.exec(t, testNS, "blk2", "dd if=/dev/xvda bs=4096 skip=1000 count=256 2>/dev/null | sha256sum")
	if len(lines) == 2 && again != lines[1] {
		t.Errorf("after pod recreation the device holds %q, want %q", again, lines[1])
	}
	_, handle := c.pvcVolume(t, testNS, "blk1")
	c.deletePod(t, testNS, "blk2")
	c.mustKubectl(t, "delete", "pvc", "-n", testNS, "blk1", "--wait=true", "--timeout=120s")
	c.waitPVGone(t, handle)
}

// Scenario 3: the PVC is resized while the pod runs; the filesystem grows in
// the pod without a restart. The volume is xfs: online ext4 growth needs
// CAP_SYS_RESOURCE (EXT4_IOC_RESIZE_FS), which root does not have on these
// machines, so resize2fs fails there with "Permission denied"; xfs_growfs
// needs only CAP_SYS_ADMIN.
func testOnlineExpansion(t *testing.T, c *cluster) {
	c.mustApply(t, xfsClassManifest)
	defer c.kubectl("delete", "storageclass", "qcow2-xfs")
	c.mustApply(t, pvcClassManifest("grow", "1Gi", "Filesystem", "qcow2-xfs"))
	c.mustApply(t, podManifest("grower", "grow", false, "echo before > /data/marker && sync && sleep 3600"))
	c.podReady(t, testNS, "grower", 3*time.Minute)
	c.waitOutput(t, testNS, "grower", "cat /data/marker", "before")
	handle := c.expandOnline(t, "grow", "grower")
	if got := c.exec(t, testNS, "grower", "cat /data/marker"); got != "before" {
		t.Errorf("marker after expansion %q, want %q", got, "before")
	}
	c.deletePod(t, testNS, "grower")
	c.mustKubectl(t, "delete", "pvc", "-n", testNS, "grow", "--wait=true", "--timeout=120s")
	c.waitPVGone(t, handle)
}

var xfsClassManifest = fmt.Sprintf(`apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: qcow2-xfs}
provisioner: %s
allowVolumeExpansion: true
volumeBindingMode: WaitForFirstConsumer
parameters: {fsType: xfs}
`, driverName)

// expandOnline grows a 1Gi filesystem PVC in use by pod to 2Gi and waits
// for the claim's capacity, the image's virtual size and the filesystem
// seen in the pod; it returns the volume handle.
func (c *cluster) expandOnline(t *testing.T, pvc, pod string) string {
	t.Helper()
	dfKB := func() int64 {
		out := c.exec(t, testNS, pod, "df -k /data | tail -1")
		f := strings.Fields(out)
		if len(f) < 2 {
			t.Fatalf("df output %q", out)
		}
		n, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			t.Fatalf("df output %q: %v", out, err)
		}
		return n
	}
	before := dfKB()
	c.mustKubectl(t, "patch", "pvc", pvc, "-n", testNS, "--type=merge", "-p", `{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}`)
	var after int64
	if err := c.waitFor("PVC capacity 2Gi and filesystem grown", 3*time.Minute, nil, func() error {
		capacity, err := c.kubectl("get", "pvc", pvc, "-n", testNS, "-o", "jsonpath={.status.capacity.storage}")
		if err != nil {
			return err
		}
		after = dfKB()
		if strings.TrimSpace(capacity) != "2Gi" || after < before*3/2 {
			return fmt.Errorf("capacity %q, df %d KiB (was %d)", capacity, after, before)
		}
		return nil
	}); err != nil {
		out, _ := c.kubectl("describe", "pvc", pvc, "-n", testNS)
		t.Fatalf("%v\n%s", err, tailString(out, 20))
	}
	_, handle := c.pvcVolume(t, testNS, pvc)
	if info := c.imageInfo(t, handle); info.VirtualSize != 2*gib {
		t.Errorf("image virtual size after expansion %d, want %d", info.VirtualSize, 2*gib)
	}
	t.Logf("%s: df %d KiB -> %d KiB", pvc, before, after)
	return handle
}

// nodePluginPod returns the name of the running node plugin pod on node.
func (c *cluster) nodePluginPod(t *testing.T, node string) string {
	t.Helper()
	name := c.nodePluginPodOrEmpty(node)
	if name == "" {
		out, _ := c.kubectl("get", "pods", "-n", releaseNS, "-o", "wide")
		t.Fatalf("no running node plugin pod on %s:\n%s", node, out)
	}
	return name
}

// podNode returns the node a pod runs on.
func (c *cluster) podNode(t *testing.T, ns, pod string) string {
	t.Helper()
	n := c.jsonpath(t, "pod", ns, pod, "{.spec.nodeName}")
	if n == "" {
		t.Fatalf("pod %s/%s is not scheduled", ns, pod)
	}
	return n
}

// Scenario 7, with the fuse attach backend this host needs: the node plugin
// pod is deleted while a pod appends a numbered line to its volume and
// syncs after each. A FUSE connection does not survive the process serving
// it, so the writer loses its device (docs/operations.md, "Attach
// backends"); what must hold is that nothing acknowledged is lost: after the
// plugin is back and the workload pod is recreated, the log holds every line
// that had been synced before the restart, in order, with no gap and no
// garbage, and the volume takes writes again.
func testDriverRestart(t *testing.T, c *cluster) {
	c.mustApply(t, pvcManifest("rst", "1Gi", "Filesystem"))
	c.mustApply(t, podManifest("logger", "rst", false,
		`i=0; while true; do echo $i >> /data/log && sync || break; i=$((i+1)); sleep 0.05; done; sleep 3600`))
	c.podReady(t, testNS, "logger", 3*time.Minute)
	time.Sleep(2 * time.Second)
	synced := len(strings.Fields(c.exec(t, testNS, "logger", "cat /data/log")))
	if synced < 10 {
		t.Fatalf("only %d lines written in 2 s", synced)
	}
	node := c.podNode(t, testNS, "logger")
	old := c.nodePluginPod(t, node)
	c.mustKubectl(t, "delete", "pod", "-n", releaseNS, old, "--wait=true", "--timeout=120s")
	if err := c.waitFor("node plugin back on "+node, 3*time.Minute, nil, func() error {
		name := c.nodePluginPodOrEmpty(node)
		if name == "" || name == old {
			return fmt.Errorf("no new node plugin pod yet")
		}
		_, err := c.kubectl("wait", "-n", releaseNS, "--for=condition=Ready", "pod/"+name, "--timeout=5s")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	c.mustKubectl(t, "delete", "pod", "-n", testNS, "logger", "--grace-period=2", "--wait=true", "--timeout=180s")
	c.mustApply(t, podManifest("checker", "rst", false, "sleep 3600"))
	c.podReady(t, testNS, "checker", 3*time.Minute)
	got := strings.Fields(c.exec(t, testNS, "checker", "cat /data/log"))
	if len(got) < synced {
		t.Errorf("log has %d lines after the restart, %d had been synced before it", len(got), synced)
	}
	for i, l := range got {
		if l != strconv.Itoa(i) {
			t.Fatalf("line %d is %q, want %d (log has %d lines)", i, l, i, len(got))
		}
	}
	if out := c.exec(t, testNS, "checker", "echo after >> /data/log && sync && tail -1 /data/log"); out != "after" {
		t.Errorf("write after the restart: %q", out)
	}
	t.Logf("%d lines synced before the plugin restart, %d in the log after, in order", synced, len(got))
	_, handle := c.pvcVolume(t, testNS, "rst")
	c.deletePod(t, testNS, "checker")
	c.mustKubectl(t, "delete", "pvc", "-n", testNS, "rst", "--wait=true", "--timeout=120s")
	c.waitPVGone(t, handle)
}

// nodePluginPodOrEmpty is nodePluginPod without failing.
func (c *cluster) nodePluginPodOrEmpty(node string) string {
	out, err := c.kubectl("get", "pods", "-n", releaseNS, "-l", "app.kubernetes.io/component=node",
		"--field-selector=spec.nodeName="+node,
		"-o", `jsonpath={range .items[*]}{.metadata.name}{"|"}{.metadata.deletionTimestamp}{"\n"}{end}`)
	if err != nil {
		return ""
	}
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if name, deleting, _ := strings.Cut(l, "|"); name != "" && deleting == "" {
			return name
		}
	}
	return ""
}

// Scenario 8: helm upgrade rolls the node plugin and a volume's data stays
// (with the fuse backend the workload is stopped before the upgrade, as
// docs/operations.md tells operators); helm uninstall (after the volumes are deleted) leaves no objects of
// the release, no images in the pool, no mounts under the kubelet dir and no
// loop devices on pool files.
func testHelmUpgradeUninstall(t *testing.T, c *cluster) {
	c.mustApply(t, pvcManifest("upg", "1Gi", "Filesystem"))
	c.mustApply(t, podManifest("upgrader", "upg", false, "echo kept > /data/kept && sync && sleep 3600"))
	c.podReady(t, testNS, "upgrader", 3*time.Minute)
	c.waitOutput(t, testNS, "upgrader", "cat /data/kept", "kept")
	node := c.podNode(t, testNS, "upgrader")
	c.deletePod(t, testNS, "upgrader")
	old := c.nodePluginPod(t, node)
	// The generated CA and certificates outlive an upgrade (the chart looks
	// them up): a new CA would cut the controller off from every agent
	// until both restart.
	tlsData := func() string {
		return c.mustKubectl(t, "get", "secret", "-n", releaseNS, "qcow2-csi-agent-tls", "qcow2-csi-controller-tls", "-o", "jsonpath={..data}")
	}
	certs := tlsData()
	if err := c.helmInstall("upgrade", "driver.logLevel=5"); err != nil {
		t.Fatal(err)
	}
	if now := tlsData(); now != certs || !strings.Contains(now, "ca.crt") {
		t.Errorf("the agent and controller TLS Secrets changed in helm upgrade (or hold no ca.crt)")
	}
	if now := c.nodePluginPod(t, node); now == old {
		t.Errorf("helm upgrade with a changed value did not roll the node plugin (still %s)", now)
	}
	c.mustApply(t, podManifest("upgraded", "upg", false, "sleep 3600"))
	c.podReady(t, testNS, "upgraded", 3*time.Minute)
	if got := c.exec(t, testNS, "upgraded", "cat /data/kept && echo again >> /data/kept && sync && cat /data/kept"); got != "kept\nkept\nagain" {
		t.Errorf("volume after upgrade: %q", got)
	}
	_, handle := c.pvcVolume(t, testNS, "upg")
	c.deletePod(t, testNS, "upgraded")
	c.mustKubectl(t, "delete", "pvc", "-n", testNS, "upg", "--wait=true", "--timeout=120s")
	c.waitPVGone(t, handle)
	// The provisioner deletes the PV object after DeleteVolume returned,
	// so it can outlive the image for a moment.
	if err := c.waitFor("PV objects deleted", 2*time.Minute, nil, func() error {
		out, err := c.kubectl("get", "pv", "-o", "name")
		if err == nil && strings.TrimSpace(out) != "" {
			err = fmt.Errorf("left: %s", strings.TrimSpace(out))
		}
		return err
	}); err != nil {
		t.Errorf("PVs left before uninstall: %v", err)
	}
	if _, err := c.helm("uninstall", "qcow2-csi", "--namespace", releaseNS, "--wait", "--timeout", "3m"); err != nil {
		t.Fatal(err)
	}
	if err := c.waitFor("release objects gone", 2*time.Minute, nil, func() error {
		out, err := c.kubectl("get", "daemonsets,deployments,pods,services,serviceaccounts,roles,rolebindings,clusterroles,clusterrolebindings,csidrivers,storageclasses,volumesnapshotclasses,volumegroupsnapshotclasses,snapshotmetadataservices",
			"-A", "-l", "app.kubernetes.io/instance=qcow2-csi", "-o", "name")
		if err != nil {
			return err
		}
		if s := strings.TrimSpace(out); s != "" {
			return fmt.Errorf("left: %s", strings.ReplaceAll(s, "\n", ", "))
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
	if imgs := c.poolImages(t); len(imgs) != 0 {
		t.Errorf("images left in the pool: %v", imgs)
	}
	for _, n := range c.nodes {
		// Mounts the kubelet made for volumes: under pods/ (the plugin's own
		// registration socket dir is not a mount).
		if ms := n.mountsOn(c.kubeletDir() + "/pods"); len(ms) != 0 {
			t.Errorf("%s: mounts left under the kubelet's pods dir: %v", n.name, ms)
		}
		if ms := n.mountsOn(c.kubeletDir() + "/plugins"); len(ms) != 0 {
			t.Errorf("%s: mounts left under the kubelet's plugins dir: %v", n.name, ms)
		}
		out := c.mustKubectl(t, "get", "csinode", n.name, "-o", "jsonpath={.spec.drivers[*].name}")
		if strings.Contains(out, driverName) {
			// The kubelet unregisters a plugin when its registration socket goes.
			t.Errorf("CSINode of %s still lists %s after uninstall", n.name, driverName)
		}
	}
	if loops := append(loopsBackedUnder(c.poolView()), loopsBackedUnder(c.fuseView())...); len(loops) != 0 {
		t.Errorf("loop devices left on pool or fuse files: %v", loops)
	}
}
