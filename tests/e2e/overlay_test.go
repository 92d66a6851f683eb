package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Scenarios 25-28 (issue 17): clones and restores as qcow2 overlays of a
// shared base (cloneMode=overlay, the default). They run in order on one
// source volume and its snapshot; 28 leaves the pools empty.

const overlayClones = 10

// overlayNode is the node of scenario 25's source pod, where every clone
// of its snapshot lives.
var overlayNode string

// imageBacking is the backing file named in a pool image's header, as
// qemu-img reads it (-U: the node plugin holds it open).
func imageBacking(t *testing.T, path string) string {
	t.Helper()
	out, err := exec.Command("qemu-img", "info", "-U", "--output=json", path).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img info %s: %v: %s", path, err, out)
	}
	var info struct {
		BackingFile string `json:"backing-filename"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatal(err)
	}
	return info.BackingFile
}

// poolBases lists the clone bases in every node's pool.
func (c *cluster) poolBases(t *testing.T) []string {
	t.Helper()
	var all []string
	for _, n := range c.nodes {
		m, err := filepath.Glob(filepath.Join(n.pool(), ".bases", "*.qcow2"))
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, m...)
	}
	return all
}

func clonePod(i int) string { return fmt.Sprintf("ov-clone-%d-pod", i) }
func clonePVC(i int) string { return fmt.Sprintf("ov-clone-%d", i) }

// Scenario 25: ten clones of one snapshot are overlays of one base, each
// written differently, each holding the snapshot's data and its own.
func testOverlayTenClones(t *testing.T, c *cluster) {
	c.mustApply(t, pvcManifest("ov-src", "1Gi", "Filesystem"))
	c.mustApply(t, podManifest("ov-src-pod", "ov-src", false, "head -c 3000000 /dev/urandom > /data/f && md5sum /data/f | cut -d' ' -f1 > /data/f.md5 && sync && sleep 3600"))
	c.podReady(t, testNS, "ov-src-pod", 3*time.Minute)
	c.waitOutput(t, testNS, "ov-src-pod", "test -s /data/f.md5 && echo ok", "ok")
	c.exec(t, testNS, "ov-src-pod", "sync")
	sum := c.exec(t, testNS, "ov-src-pod", "cat /data/f.md5")
	overlayNode = c.podNode(t, testNS, "ov-src-pod")
	c.mustApply(t, snapshotManifest("ov-snap", "ov-src"))
	c.snapshotReady(t, "ov-snap")
	c.exec(t, testNS, "ov-src-pod", "echo after-snapshot > /data/later && sync")
	for i := range overlayClones {
		c.mustApply(t, pvcFromManifest(clonePVC(i), "VolumeSnapshot", "snapshot.storage.k8s.io", "ov-snap"))
		// Clone 0 keeps writing a counter: scenario 27 flattens it under
		// that writer.
		script := fmt.Sprintf("echo clone-%d > /data/mine && sync && sleep 3600", i)
		if i == 0 {
			script = "echo clone-0 > /data/mine && sync && i=0 && while true; do echo $i > /data/counter; sync; i=$((i+1)); sleep 0.2; done"
		}
		c.mustApply(t, podOnManifest(clonePod(i), clonePVC(i), false, script, overlayNode))
	}
	var base string
	for i := range overlayClones {
		c.podReady(t, testNS, clonePod(i), 5*time.Minute)
		c.waitOutput(t, testNS, clonePod(i), "cat /data/mine", fmt.Sprintf("clone-%d", i))
		if got := c.exec(t, testNS, clonePod(i), "md5sum /data/f | cut -d' ' -f1; cat /data/f.md5; test -e /data/later && echo has-later || echo no-later"); got != sum+"\n"+sum+"\nno-later" {
			t.Errorf("clone %d holds %q, want the snapshot's data (md5 %s) without the later write", i, got, sum)
		}
		_, handle := c.pvcVolume(t, testNS, clonePVC(i))
		path, _ := c.imagePath(t, handle)
		b := imageBacking(t, path)
		if !strings.HasPrefix(b, ".bases/") {
			t.Errorf("clone %d's image %s has backing file %q, want an overlay of a base in .bases/", i, path, b)
		}
		if base == "" {
			base = b
		} else if b != base {
			t.Errorf("clone %d reads base %q, clone 0 reads %q: one base per snapshot", i, b, base)
		}
	}
	if bases := c.poolBases(t); len(bases) != 1 {
		t.Errorf("pools hold bases %v, want the snapshot's one", bases)
	}
}

// Scenario 26: the source PVC and its snapshot are deleted while the
// clones are in use; the clones keep reading and writing.
func testOverlaySourceGone(t *testing.T, c *cluster) {
	c.deletePod(t, testNS, "ov-src-pod")
	c.mustKubectl(t, "delete", "pvc", "-n", testNS, "ov-src", "--wait=true", "--timeout=120s")
	c.mustKubectl(t, "delete", "volumesnapshot", "-n", testNS, "ov-snap", "--wait=true", "--timeout=120s")
	for i := range overlayClones {
		pod := clonePod(i)
		if got := c.exec(t, testNS, pod, "echo again-"+fmt.Sprint(i)+" >> /data/mine && sync && cat /data/mine && md5sum /data/f | cut -d' ' -f1 && cat /data/f.md5"); !strings.HasPrefix(got, fmt.Sprintf("clone-%d\nagain-%d\n", i, i)) {
			t.Errorf("clone %d after its source went: %q", i, got)
		} else if lines := strings.Split(got, "\n"); len(lines) != 4 || lines[2] != lines[3] {
			t.Errorf("clone %d's copy of the snapshot's data changed after its source went: %q", i, got)
		}
	}
	if bases := c.poolBases(t); len(bases) != 1 {
		t.Errorf("pools hold bases %v after the source went, want the clones' one", bases)
	}
}

// Scenario 27: one clone is flattened online, by a VolumeAttributesClass
// with flatten=true, while its pod writes (a counter, since scenario 25);
// its image stands alone after and the writer never stopped.
func testOverlayFlattenOnline(t *testing.T, c *cluster) {
	c.mustApply(t, fmt.Sprintf(`apiVersion: storage.k8s.io/v1
kind: VolumeAttributesClass
metadata: {name: qcow2-flatten}
driverName: %s
parameters: {flatten: "true"}
`, driverName))
	pod, pvc := clonePod(0), clonePVC(0)
	c.mustKubectl(t, "patch", "pvc", pvc, "-n", testNS, "--type=merge", "-p", `{"spec":{"volumeAttributesClassName":"qcow2-flatten"}}`)
	_, handle := c.pvcVolume(t, testNS, pvc)
	path, _ := c.imagePath(t, handle)
	if err := c.waitFor("clone 0 flattened", 3*time.Minute, nil, func() error {
		if b := imageBacking(t, path); b != "" {
			return fmt.Errorf("backing file %q", b)
		}
		return nil
	}); err != nil {
		desc, _ := c.kubectl("describe", "pvc", pvc, "-n", testNS)
		t.Fatalf("%v\n%s", err, tailString(desc, 20))
	}
	before := c.exec(t, testNS, pod, "cat /data/counter")
	time.Sleep(2 * time.Second)
	after := c.exec(t, testNS, pod, "cat /data/counter")
	if before == after {
		t.Errorf("the writer stopped: counter %s then %s", before, after)
	}
	if got := c.exec(t, testNS, pod, "md5sum /data/f | cut -d' ' -f1; cat /data/f.md5; head -1 /data/mine"); func() bool {
		l := strings.Split(got, "\n")
		return len(l) != 3 || l[0] != l[1] || l[2] != "clone-0"
	}() {
		t.Errorf("flattened clone holds %q", got)
	}
	// The other clones still read the base.
	if bases := c.poolBases(t); len(bases) != 1 {
		t.Errorf("pools hold bases %v, want the other clones' one", bases)
	}
	if out, err := exec.Command("qemu-img", "check", "-U", path).CombinedOutput(); err != nil {
		t.Errorf("qemu-img check of the flattened clone: %v\n%s", err, out)
	}
}

// Scenario 28: deleting every clone leaves the pools empty: no image, no
// base, no reference, no snapshot record.
func testOverlayDeleteAll(t *testing.T, c *cluster) {
	for i := range overlayClones {
		c.deletePod(t, testNS, clonePod(i))
		c.mustKubectl(t, "delete", "pvc", "-n", testNS, clonePVC(i), "--wait=true", "--timeout=120s")
	}
	c.mustKubectl(t, "delete", "volumeattributesclass", "qcow2-flatten", "--ignore-not-found", "--wait=true", "--timeout=60s")
	if err := c.waitFor("pools empty, bases included", 2*time.Minute, nil, func() error {
		var left []string
		for _, n := range c.nodes {
			for _, g := range []string{"*.qcow2", "*.json", ".bases/*", ".bases/*/*", ".snapshots/*.qcow2", ".snapshots/*.json"} {
				m, _ := filepath.Glob(filepath.Join(n.pool(), g))
				for _, p := range m {
					if fi, err := os.Lstat(p); err == nil && fi.Mode()&os.ModeSymlink == 0 {
						left = append(left, n.name+":"+strings.TrimPrefix(p, n.pool()))
					}
				}
			}
		}
		if len(left) > 0 {
			return fmt.Errorf("left: %v", left)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}
