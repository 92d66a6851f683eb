package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// The previous release of the chart and driver, which the cluster starts
// with so that the first scenario upgrades from it: chart 0.1.0, where every
// node ran csi-provisioner and csi-snapshotter in node-deployment mode and
// volume IDs carried no node. QCOW2_CSI_E2E_PREV_REF names another commit,
// or "none": the cluster then starts with this checkout's chart and
// scenario 0 is skipped (a checkout without that commit, e.g. shallow).
const (
	prevRef    = "e94529dc414cabdfa53a39867ebeddc0e74e41d8"
	prevDriver = driverRepo + ":e2e-prev"
)

func prevRefOrEnv() string {
	prevOnce.Do(func() { prevResolved, prevMissing = resolvePrevRef() })
	return prevResolved
}

var (
	prevOnce     sync.Once
	prevResolved string
	prevMissing  string // why the previous release is unavailable, when it is
)

// resolvePrevRef is QCOW2_CSI_E2E_PREV_REF, or prevRef when this checkout
// has it. A shallow clone may lack that commit: it is fetched from origin
// once, and where that fails too the suite starts with this chart and
// scenario 0 says loudly why it did not run. The upgrade needs history,
// not an outside tool, so a checkout without it must not turn the whole
// suite red.
func resolvePrevRef() (ref, missing string) {
	if r := os.Getenv("QCOW2_CSI_E2E_PREV_REF"); r != "" {
		return r, ""
	}
	has := func() bool { return exec.Command("git", "cat-file", "-e", prevRef+"^{commit}").Run() == nil }
	if has() {
		return prevRef, ""
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "git", "fetch", "--quiet", "--depth=1", "origin", prevRef).CombinedOutput()
	if has() {
		return prevRef, ""
	}
	return "none", fmt.Sprintf("this checkout lacks the previous release %s (shallow?) and fetching it failed: %v %s", prevRef, err, strings.TrimSpace(string(out)))
}

// prevTree extracts the previous commit's tree (chart and sources) into
// .cache/e2e/prev-<ref>/src and builds its driver there, once: later runs
// reuse both.
func prevTree(root string) (chart, driver string, err error) {
	ref := prevRefOrEnv()
	dir := filepath.Join(root, ".cache/e2e", "prev-"+ref)
	src := filepath.Join(dir, "src")
	chart = filepath.Join(src, "charts/qcow2-csi")
	driver = filepath.Join(dir, "qcow2-csi")
	if _, err := os.Stat(filepath.Join(dir, "stamp")); err == nil {
		return chart, driver, nil
	}
	os.RemoveAll(dir)
	if err := os.MkdirAll(src, 0o755); err != nil {
		return "", "", err
	}
	archive := exec.Command("sh", "-c", `git archive "$1" | tar -x -C "$2"`, "sh", ref, src)
	archive.Dir = root
	if out, err := archive.CombinedOutput(); err != nil {
		return "", "", fmt.Errorf("git archive %s (the previous release, for the upgrade scenario; a shallow checkout lacks it: fetch it, or set QCOW2_CSI_E2E_PREV_REF=none to skip that scenario): %v: %s", ref, err, out)
	}
	build := exec.Command("go", "build", "-trimpath", "-o", driver, "./cmd/qcow2-csi")
	build.Dir = src
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=-buildvcs=false")
	if out, err := build.CombinedOutput(); err != nil {
		return "", "", fmt.Errorf("build the driver of %s: %v\n%s", ref, err, out)
	}
	return chart, driver, os.WriteFile(filepath.Join(dir, "stamp"), []byte(ref+"\n"), 0o644)
}

// prevValues are the e2e values for the previous chart.
func (c *cluster) prevValues() []string {
	return append(c.helmValues(), "image.driver.tag=e2e-prev")
}

// Scenario 0: `helm upgrade` from the previous chart to this one, with
// volumes on both nodes, a snapshot, and legacy (node-less) IDs. With the
// fuse backend the workloads are stopped across the upgrade, as
// docs/operations.md tells operators. Afterwards the controller serves the
// legacy IDs: the data is there, the snapshot restores, a new snapshot is
// taken, and deleting everything empties both pools.
func testUpgradeFromPrevious(t *testing.T, c *cluster) {
	if prevRefOrEnv() == "none" {
		why := "QCOW2_CSI_E2E_PREV_REF=none"
		if prevMissing != "" {
			why = prevMissing
		}
		t.Skip("SKIPPED: " + why + ": the cluster started with this chart, no upgrade tested")
	}
	for i, n := range c.nodes {
		pvc := fmt.Sprintf("old-%d", i+1)
		c.mustApply(t, pvcManifest(pvc, "1Gi", "Filesystem"))
		c.mustApply(t, podOnManifest(pvc+"-pod", pvc, false, "echo kept-"+n.name+" > /data/kept && sync && sleep 3600", n.name))
	}
	for i, n := range c.nodes {
		pvc := fmt.Sprintf("old-%d", i+1)
		c.podReady(t, testNS, pvc+"-pod", 3*time.Minute)
		c.waitOutput(t, testNS, pvc+"-pod", "cat /data/kept", "kept-"+n.name)
		_, handle := c.pvcVolume(t, testNS, pvc)
		if strings.ContainsAny(handle, "@#") {
			t.Errorf("the previous driver made volume ID %q with a node suffix; the legacy path is not tested", handle)
		}
		if _, owner := c.imagePath(t, handle); owner != n {
			t.Errorf("%s: image in %s's pool, want %s's", pvc, owner.name, n.name)
		}
	}
	c.mustApply(t, snapshotManifest("old-snap", "old-1"))
	c.snapshotReady(t, "old-snap")
	for i := range c.nodes {
		c.deletePod(t, testNS, fmt.Sprintf("old-%d-pod", i+1))
	}

	if err := c.helmInstall("upgrade"); err != nil {
		t.Fatal(err)
	}
	if out := c.mustKubectl(t, "get", "daemonset", "-n", releaseNS, "qcow2-csi-node", "-o", "jsonpath={.spec.template.spec.containers[*].name}"); strings.Contains(out, "csi-provisioner") {
		t.Errorf("node DaemonSet still runs %q after the upgrade", out)
	}

	for i, n := range c.nodes {
		pvc := fmt.Sprintf("old-%d", i+1)
		c.mustApply(t, podManifest(pvc+"-after", pvc, false, "sleep 3600"))
		c.podReady(t, testNS, pvc+"-after", 3*time.Minute)
		if got := c.exec(t, testNS, pvc+"-after", "cat /data/kept"); got != "kept-"+n.name {
			t.Errorf("%s after the upgrade holds %q, want %q", pvc, got, "kept-"+n.name)
		}
		if got := c.podNode(t, testNS, pvc+"-after"); got != n.name {
			t.Errorf("%s's pod runs on %s, want %s (the volume's node)", pvc, got, n.name)
		}
	}
	c.mustApply(t, pvcFromManifest("old-restored", "VolumeSnapshot", "snapshot.storage.k8s.io", "old-snap"))
	c.mustApply(t, podOnManifest("old-restored-pod", "old-restored", false, "sleep 3600", c.nodes[0].name))
	c.podReady(t, testNS, "old-restored-pod", 3*time.Minute)
	if got := c.exec(t, testNS, "old-restored-pod", "cat /data/kept"); got != "kept-"+c.nodes[0].name {
		t.Errorf("restore of the pre-upgrade snapshot holds %q", got)
	}
	c.mustApply(t, snapshotManifest("old-snap-after", "old-2"))
	c.snapshotReady(t, "old-snap-after")

	var handles []string
	for _, pvc := range []string{"old-1", "old-2", "old-restored"} {
		_, h := c.pvcVolume(t, testNS, pvc)
		handles = append(handles, h)
	}
	for _, p := range []string{"old-1-after", "old-2-after", "old-restored-pod"} {
		c.deletePod(t, testNS, p)
	}
	c.mustKubectl(t, "delete", "volumesnapshot", "-n", testNS, "old-snap", "old-snap-after", "--wait=true", "--timeout=120s")
	c.mustKubectl(t, "delete", "pvc", "-n", testNS, "old-1", "old-2", "old-restored", "--wait=true", "--timeout=120s")
	for _, h := range handles {
		c.waitPVGone(t, h)
	}
	c.waitPoolsEmpty(t)
}

// waitPoolsEmpty waits until no node's pool holds a file (images, their
// metadata, snapshot records).
func (c *cluster) waitPoolsEmpty(t *testing.T) {
	t.Helper()
	if err := c.waitFor("pools empty", 2*time.Minute, nil, func() error {
		var left []string
		for _, n := range c.nodes {
			ents, err := os.ReadDir(n.pool())
			if err != nil {
				return err
			}
			for _, e := range ents {
				if !strings.HasPrefix(e.Name(), ".") {
					left = append(left, n.name+":"+e.Name())
				}
			}
		}
		if len(left) > 0 {
			return fmt.Errorf("pools hold %v", left)
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
}
