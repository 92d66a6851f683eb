package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The scenarios of issue 13: one controller for the cluster, calls routed
// to the node that owns the volume.

// leaderNode returns the node of the controller replica that holds
// csi-provisioner's lease (the sidecars' identity is their pod name), and
// the other node.
func (c *cluster) leaderNode(t *testing.T) (leader, other *node) {
	t.Helper()
	var holder string
	if err := c.waitFor("csi-provisioner leader", 2*time.Minute, nil, func() error {
		out, err := c.kubectl("get", "leases", "-n", releaseNS, "-o",
			`jsonpath={range .items[*]}{.metadata.name}={.spec.holderIdentity}{"\n"}{end}`)
		if err != nil {
			return err
		}
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			name, h, _ := strings.Cut(l, "=")
			// The provisioner's lease is named after the driver; the
			// snapshotter's and resizer's start with external-.
			if h != "" && !strings.HasPrefix(name, "external-") && strings.Contains(name, "qcow2") {
				holder = h
				return nil
			}
		}
		return fmt.Errorf("leases: %q", out)
	}); err != nil {
		t.Fatal(err)
	}
	on, err := c.kubectl("get", "pod", "-n", releaseNS, holder, "-o", "jsonpath={.spec.nodeName}")
	if err != nil {
		t.Fatalf("lease holder %q is not a pod of the release: %v", holder, err)
	}
	leader = c.nodeByName(strings.TrimSpace(on))
	if leader == nil {
		t.Fatalf("lease holder %s runs on %q, not one of the nodes", holder, on)
	}
	for _, n := range c.nodes {
		if n != leader {
			other = n
		}
	}
	t.Logf("active controller: %s on %s; the other node: %s", holder, leader.name, other.name)
	return leader, other
}

// Scenario 9: a PVC for a pod pinned to each node is provisioned in that
// node's pool and nowhere else; its ID names the node, its PV is pinned
// to it.
func testSelectedNode(t *testing.T, c *cluster) {
	for i, n := range c.nodes {
		pvc := fmt.Sprintf("pin-%d", i+1)
		c.mustApply(t, pvcManifest(pvc, "1Gi", "Block"))
		c.mustApply(t, podOnManifest(pvc+"-pod", pvc, true, "sleep 3600", n.name))
	}
	var handles []string
	for i, n := range c.nodes {
		pvc := fmt.Sprintf("pin-%d", i+1)
		c.podReady(t, testNS, pvc+"-pod", 3*time.Minute)
		pv, handle := c.pvcVolume(t, testNS, pvc)
		handles = append(handles, handle)
		if _, owner := c.imagePath(t, handle); owner != n {
			t.Errorf("%s: image in %s's pool, want %s's", pvc, owner.name, n.name)
		}
		if !strings.HasSuffix(handle, "@"+n.name) {
			t.Errorf("%s: volume ID %q does not name its node %s", pvc, handle, n.name)
		}
		aff := c.jsonpath(t, "pv", "", pv, "{.spec.nodeAffinity.required.nodeSelectorTerms[*].matchExpressions[*].values[*]}")
		if aff != n.name {
			t.Errorf("%s: PV node affinity %q, want %s", pvc, aff, n.name)
		}
		// The device is the image: what the pod writes is in that file.
		c.exec(t, testNS, pvc+"-pod", "echo "+n.name+" | dd of=/dev/xvda bs=512 conv=fsync 2>/dev/null")
	}
	for i, n := range c.nodes {
		pvc := fmt.Sprintf("pin-%d", i+1)
		c.deletePod(t, testNS, pvc+"-pod")
		path, _ := c.imagePath(t, handles[i])
		out, err := run("qemu-io", "-U", "-r", "-f", "qcow2", "-c", "read -v 0 16", path)
		// qemu-io's hex column: its text column shows '-' as '.'.
		if err != nil || !strings.Contains(out, fmt.Sprintf("% x", n.name)) {
			t.Errorf("%s: image %s does not hold what the pod wrote: %v\n%s", pvc, path, err, out)
		}
		c.mustKubectl(t, "delete", "pvc", "-n", testNS, pvc, "--wait=true", "--timeout=120s")
	}
	for _, h := range handles {
		c.waitPVGone(t, h)
	}
	// The controller counted the calls it passed to each node's agent.
	m := c.controllerMetrics(t)
	for _, n := range c.nodes {
		for _, method := range []string{"CreateVolume", "DeleteVolume"} {
			if v := metricSum(m, "qcow2_csi_routed_calls_total", `node="`+n.name+`"`, method, `code="OK"`); v < 1 {
				t.Errorf("qcow2_csi_routed_calls_total{node=%q,method=~%q,code=OK} = %v, want >= 1", n.name, method, v)
			}
		}
		if v := metricSum(m, "qcow2_csi_routed_call_seconds_count", `node="`+n.name+`"`); v < 2 {
			t.Errorf("qcow2_csi_routed_call_seconds_count{node=%q} = %v, want >= 2", n.name, v)
		}
	}
}

// Scenario 10: snapshot, restore and online expansion of a volume on the
// node where the active controller does not run: every call crosses from
// the controller to the other node's agent.
func testOffLeaderNode(t *testing.T, c *cluster) {
	_, n := c.leaderNode(t)
	c.mustApply(t, xfsClassManifest)
	defer c.kubectl("delete", "storageclass", "qcow2-xfs")
	c.mustApply(t, pvcClassManifest("far", "1Gi", "Filesystem", "qcow2-xfs"))
	c.mustApply(t, podOnManifest("far-pod", "far", false, "echo snapshot-time > /data/f && sync && sleep 3600", n.name))
	c.podReady(t, testNS, "far-pod", 3*time.Minute)
	c.waitOutput(t, testNS, "far-pod", "cat /data/f", "snapshot-time")
	_, handle := c.pvcVolume(t, testNS, "far")
	if _, owner := c.imagePath(t, handle); owner != n {
		t.Fatalf("far: image in %s's pool, want %s's", owner.name, n.name)
	}
	c.exec(t, testNS, "far-pod", "sync")
	c.mustApply(t, snapshotManifest("far-snap", "far"))
	c.snapshotReady(t, "far-snap")
	snapHandle := c.jsonpath(t, "volumesnapshotcontent", "", c.jsonpath(t, "volumesnapshot", testNS, "far-snap", "{.status.boundVolumeSnapshotContentName}"), "{.status.snapshotHandle}")
	if !strings.HasSuffix(snapHandle, "@"+n.name) {
		t.Errorf("snapshot ID %q does not name its node %s", snapHandle, n.name)
	}
	c.exec(t, testNS, "far-pod", "echo later > /data/f && sync")
	c.expandOnline(t, "far", "far-pod")

	c.mustApply(t, strings.Replace(pvcFromManifest("far-restored", "VolumeSnapshot", "snapshot.storage.k8s.io", "far-snap"),
		"storageClassName: qcow2", "storageClassName: qcow2-xfs", 1))
	c.mustApply(t, podOnManifest("far-restored-pod", "far-restored", false, "sleep 3600", n.name))
	c.podReady(t, testNS, "far-restored-pod", 3*time.Minute)
	if got := c.exec(t, testNS, "far-restored-pod", "cat /data/f"); got != "snapshot-time" {
		t.Errorf("restored volume holds %q, want %q", got, "snapshot-time")
	}
	_, rh := c.pvcVolume(t, testNS, "far-restored")
	if _, owner := c.imagePath(t, rh); owner != n {
		t.Errorf("restore landed in %s's pool, want %s's", owner.name, n.name)
	}
	// Both are mounted on one node with one xfs UUID (the driver mounts
	// xfs with nouuid); the source still holds its later write.
	if got := c.exec(t, testNS, "far-pod", "cat /data/f"); got != "later" {
		t.Errorf("source volume holds %q, want %q", got, "later")
	}
	c.deletePod(t, testNS, "far-restored-pod")
	c.deletePod(t, testNS, "far-pod")
	c.mustKubectl(t, "delete", "volumesnapshot", "-n", testNS, "far-snap", "--wait=true", "--timeout=120s")
	c.mustKubectl(t, "delete", "pvc", "-n", testNS, "far", "far-restored", "--wait=true", "--timeout=120s")
	c.waitPoolsEmpty(t)
}

// Scenario 11: the active controller Pod is deleted while 10 volumes are
// being provisioned (5 per node, raw block: no mkfs). The other replica
// takes the lease and finishes: all 10 claims bind, and the pools hold
// exactly the 10 images of their PVs, on the right nodes, nothing else.
func testControllerFailover(t *testing.T, c *cluster) {
	leader, _ := c.leaderNode(t)
	holder := c.leaseHolder(t)
	const count = 10
	var manifests []string
	for i := 0; i < count; i++ {
		name := fmt.Sprintf("many-%d", i)
		manifests = append(manifests, pvcManifest(name, "64Mi", "Block"),
			podOnManifest(name+"-pod", name, true, "sleep 3600", c.nodes[i%len(c.nodes)].name))
	}
	c.mustApply(t, strings.Join(manifests, "---\n"))
	// In the middle: as soon as the first claims are being provisioned.
	if err := c.waitFor("provisioning started", time.Minute, nil, func() error {
		out, err := c.kubectl("get", "pvc", "-n", testNS, "-o", `jsonpath={range .items[*]}{.metadata.annotations.volume\.kubernetes\.io/selected-node}{"\n"}{end}`)
		if err != nil {
			return err
		}
		if strings.Count(out, "e2e-node") < 2 {
			return fmt.Errorf("selected nodes: %q", out)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	c.mustKubectl(t, "delete", "pod", "-n", releaseNS, holder, "--wait=false")
	t.Logf("deleted the active controller %s (on %s)", holder, leader.name)
	if err := c.waitFor("10 claims bound", 5*time.Minute, nil, func() error {
		out, err := c.kubectl("get", "pvc", "-n", testNS, "-o", `jsonpath={range .items[*]}{.metadata.name}={.status.phase}{" "}{end}`)
		if err != nil {
			return err
		}
		bound := 0
		for i := 0; i < count; i++ {
			if strings.Contains(" "+out, fmt.Sprintf(" many-%d=Bound ", i)) {
				bound++
			}
		}
		if bound != count {
			return fmt.Errorf("%d of %d bound: %s", bound, count, out)
		}
		return nil
	}); err != nil {
		out, _ := c.kubectl("get", "events", "-n", testNS, "--sort-by=.lastTimestamp")
		t.Fatalf("%v\n%s", err, tailString(out, 30))
	}
	t.Logf("lease now held by %s", c.leaseHolder(t))
	want := map[string]string{} // pool file -> node
	for i := 0; i < count; i++ {
		name := fmt.Sprintf("many-%d", i)
		_, h := c.pvcVolume(t, testNS, name)
		want[c.nodes[i%len(c.nodes)].name+":"+localID(h)+".qcow2"] = name
	}
	var have []string
	for _, n := range c.nodes {
		files, _ := filepath.Glob(filepath.Join(n.pool(), "*.qcow2"))
		for _, f := range files {
			have = append(have, n.name+":"+filepath.Base(f))
		}
	}
	sort.Strings(have)
	var stray []string
	for _, f := range have {
		if want[f] == "" {
			stray = append(stray, f)
		}
	}
	if len(stray) > 0 || len(have) != count {
		t.Errorf("pools hold %d images %v, want the %d of the claims; stray: %v", len(have), have, count, stray)
	}
	for i := 0; i < count; i++ {
		c.podReady(t, testNS, fmt.Sprintf("many-%d-pod", i), 3*time.Minute)
	}
	var pods, pvcs []string
	for i := 0; i < count; i++ {
		pvcs = append(pvcs, fmt.Sprintf("many-%d", i))
		pods = append(pods, fmt.Sprintf("many-%d-pod", i))
	}
	c.mustKubectl(t, append([]string{"delete", "pod", "-n", testNS, "--wait=true", "--timeout=180s"}, pods...)...)
	c.mustKubectl(t, append([]string{"delete", "pvc", "-n", testNS, "--wait=true", "--timeout=180s"}, pvcs...)...)
	c.waitPoolsEmpty(t)
	if err := c.waitControllerReplicas(); err != nil {
		t.Error(err)
	}
}

func (c *cluster) leaseHolder(t *testing.T) string {
	t.Helper()
	out := c.mustKubectl(t, "get", "leases", "-n", releaseNS, "-o",
		`jsonpath={range .items[*]}{.metadata.name}={.spec.holderIdentity}{"\n"}{end}`)
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		name, h, _ := strings.Cut(l, "=")
		if !strings.HasPrefix(name, "external-") && strings.Contains(name, "qcow2") {
			return h
		}
	}
	t.Fatalf("no csi-provisioner lease: %q", out)
	return ""
}

// waitControllerReplicas waits for the controller Deployment to have its
// replicas back.
func (c *cluster) waitControllerReplicas() error {
	return c.waitFor("controller replicas back", 3*time.Minute, nil, func() error {
		_, err := c.kubectl("rollout", "status", "-n", releaseNS, "deployment/qcow2-csi-controller", "--timeout=10s")
		return err
	})
}

// eventsAbout returns the messages of the events about an object.
func (c *cluster) eventsAbout(ns, name string) string {
	args := []string{"get", "events", "--field-selector=involvedObject.name=" + name, "-o", `jsonpath={range .items[*]}{.reason}: {.message}{"\n"}{end}`}
	if ns != "" {
		args = append(args, "-n", ns)
	} else {
		args = append(args, "-A")
	}
	out, _ := c.kubectl(args...)
	return out
}

// waitEvent waits for an event about the object whose message contains
// every one of want.
func (c *cluster) waitEvent(t *testing.T, ns, name string, want ...string) string {
	t.Helper()
	var found string
	if err := c.waitFor(fmt.Sprintf("event on %s naming %v", name, want), 3*time.Minute, nil, func() error {
		out := c.eventsAbout(ns, name)
		for _, l := range strings.Split(out, "\n") {
			ok := l != ""
			for _, w := range want {
				ok = ok && strings.Contains(l, w)
			}
			if ok {
				found = l
				return nil
			}
		}
		return fmt.Errorf("events: %q", out)
	}); err != nil {
		t.Fatal(err)
	}
	return found
}

// Scenario 12: with one node's plugin stopped (the DaemonSet's node
// selector no longer matches it: its pluginLabel is removed), operations on that node's volume fail
// with an event naming the node, the other node keeps provisioning, and
// once the plugin is back the failed operations complete.
func testNodePluginDown(t *testing.T, c *cluster) {
	down, up := c.nodes[0], c.nodes[1]
	handle := c.blockVolumeOn(t, "down-vol", down)

	old := c.nodePluginPod(t, down.name)
	c.mustKubectl(t, "label", "node", down.name, pluginLabel+"-")
	restored := false
	restore := func() {
		if !restored {
			restored = true
			c.kubectl("label", "node", down.name, pluginLabel+"=on", "--overwrite")
		}
	}
	defer restore()
	if err := c.waitFor("plugin gone from "+down.name, 2*time.Minute, nil, func() error {
		if _, err := c.kubectl("get", "pod", "-n", releaseNS, old); err == nil {
			return fmt.Errorf("%s still exists", old)
		}
		if p := c.nodePluginPodOrEmpty(down.name); p != "" {
			return fmt.Errorf("%s runs there", p)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	c.mustKubectl(t, "patch", "pvc", "down-vol", "-n", testNS, "--type=merge", "-p", `{"spec":{"resources":{"requests":{"storage":"128Mi"}}}}`)
	c.mustApply(t, snapshotManifest("down-snap", "down-vol"))
	ev := c.waitEvent(t, testNS, "down-vol", down.name)
	t.Logf("expansion while %s's plugin is down: %s", down.name, ev)
	if v := metricSum(c.controllerMetrics(t), "qcow2_csi_agent_connection_errors_total", `node="`+down.name+`"`); v < 1 {
		t.Errorf("qcow2_csi_agent_connection_errors_total{node=%q} = %v while its plugin is down, want >= 1", down.name, v)
	}

	c.mustApply(t, pvcManifest("up-vol", "64Mi", "Block"))
	c.mustApply(t, podOnManifest("up-pod", "up-vol", true, "sleep 3600", up.name))
	c.podReady(t, testNS, "up-pod", 3*time.Minute)
	_, upHandle := c.pvcVolume(t, testNS, "up-vol")
	if _, owner := c.imagePath(t, upHandle); owner != up {
		t.Errorf("up-vol landed in %s's pool, want %s's", owner.name, up.name)
	}
	if p := c.nodePluginPodOrEmpty(down.name); p != "" {
		t.Fatalf("a node plugin pod (%s) came back on %s while its label is off", p, down.name)
	}
	if ready, _ := c.kubectl("get", "volumesnapshot", "down-snap", "-n", testNS, "-o", "jsonpath={.status.readyToUse}"); strings.TrimSpace(ready) == "true" {
		t.Errorf("snapshot of a volume on %s is ready while its plugin is down", down.name)
	}

	restore()
	if err := c.waitFor("plugin back on "+down.name, 3*time.Minute, nil, func() error {
		name := c.nodePluginPodOrEmpty(down.name)
		if name == "" {
			return fmt.Errorf("no plugin pod yet")
		}
		_, err := c.kubectl("wait", "-n", releaseNS, "--for=condition=Ready", "pod/"+name, "--timeout=5s")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	c.snapshotReady(t, "down-snap")
	if err := c.waitFor("down-vol's PV at 128Mi", 3*time.Minute, nil, func() error {
		pv, _ := c.pvcVolume(t, testNS, "down-vol")
		out, err := c.kubectl("get", "pv", pv, "-o", "jsonpath={.spec.capacity.storage}")
		if err == nil && strings.TrimSpace(out) != "128Mi" {
			err = fmt.Errorf("capacity %q", out)
		}
		return err
	}); err != nil {
		t.Error(err)
	}
	// The PV's capacity moves once ControllerExpandVolume went through
	// the agent; the image grows then or at the next NodeExpandVolume.
	t.Logf("down-vol image virtual size after convergence: %d", c.imageInfo(t, handle).VirtualSize)
	c.deletePod(t, testNS, "up-pod")
	c.mustKubectl(t, "delete", "volumesnapshot", "-n", testNS, "down-snap", "--wait=true", "--timeout=120s")
	c.mustKubectl(t, "delete", "pvc", "-n", testNS, "down-vol", "up-vol", "--wait=true", "--timeout=120s")
	c.waitPoolsEmpty(t)
}

// Scenario 13: a clone whose pod is pinned to the other node than its
// source's is refused, for now, with an event on the claim naming both
// nodes; nothing is created in either pool.
func testCloneOtherNode(t *testing.T, c *cluster) {
	src, dst := c.nodes[0], c.nodes[1]
	c.blockVolumeOn(t, "here", src)
	c.mustApply(t, strings.Replace(pvcFromManifest("there", "PersistentVolumeClaim", "", "here"),
		"resources: {requests: {storage: 1Gi}}", "volumeMode: Block\n  resources: {requests: {storage: 64Mi}}", 1))
	c.mustApply(t, podOnManifest("there-pod", "there", true, "sleep 3600", dst.name))
	ev := c.waitEvent(t, testNS, "there", src.name, dst.name)
	t.Logf("clone onto the other node: %s", ev)
	if phase := c.jsonpath(t, "pvc", testNS, "there", "{.status.phase}"); phase != "Pending" {
		t.Errorf("clone onto the other node is %s, want Pending", phase)
	}
	if imgs := c.poolImages(t); len(imgs) != 1 {
		t.Errorf("pools hold %v, want only the source's image", imgs)
	}
	c.mustKubectl(t, "delete", "pod", "-n", testNS, "there-pod", "--wait=true", "--timeout=120s")
	c.mustKubectl(t, "delete", "pvc", "-n", testNS, "there", "here", "--wait=true", "--timeout=120s")
	c.waitPoolsEmpty(t)
}

// blockVolumeOn provisions a 64Mi raw block claim on node n (a pod pinned
// there is its first consumer, then deleted) and returns its handle.
func (c *cluster) blockVolumeOn(t *testing.T, pvc string, n *node) string {
	t.Helper()
	c.mustApply(t, pvcManifest(pvc, "64Mi", "Block"))
	c.mustApply(t, podOnManifest(pvc+"-pod", pvc, true, "sleep 3600", n.name))
	c.podReady(t, testNS, pvc+"-pod", 3*time.Minute)
	c.deletePod(t, testNS, pvc+"-pod")
	_, handle := c.pvcVolume(t, testNS, pvc)
	return handle
}

// controllerMetrics returns the Prometheus text of every controller
// replica.
func (c *cluster) controllerMetrics(t *testing.T) string {
	t.Helper()
	ips := strings.Fields(c.mustKubectl(t, "get", "pods", "-n", releaseNS, "-l", "app.kubernetes.io/component=controller",
		"-o", `jsonpath={range .items[*]}{.status.podIP}{" "}{end}`))
	var all strings.Builder
	for _, ip := range ips {
		text, err := c.scrapeMetrics(ip)
		if err != nil {
			t.Errorf("metrics of the controller at %s: %v", ip, err)
		}
		all.WriteString(text)
	}
	return all.String()
}

// nodeMetrics returns the Prometheus text of the node plugin on node.
func (c *cluster) nodeMetrics(t *testing.T, node string) string {
	t.Helper()
	ip := c.jsonpath(t, "pod", releaseNS, c.nodePluginPod(t, node), "{.status.podIP}")
	text, err := c.scrapeMetrics(ip)
	if err != nil {
		t.Fatalf("metrics of the node plugin on %s at %s: %v", node, ip, err)
	}
	return text
}

// scrapeMetrics fetches /metrics from a pod IP (the chart's metrics port),
// from the control plane's network namespace.
func (c *cluster) scrapeMetrics(ip string) (string, error) {
	var text string
	err := inNetns("/run/netns/"+c.netns, func() error {
		// Dialled here, on the thread in the namespace: http.Transport
		// would dial from a goroutine of its own, anywhere.
		conn, err := net.DialTimeout("tcp", net.JoinHostPort(ip, "9820"), 10*time.Second)
		if err != nil {
			return err
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		req, _ := http.NewRequest("GET", "http://"+net.JoinHostPort(ip, "9820")+"/metrics", nil)
		req.Close = true
		if err := req.Write(conn); err != nil {
			return err
		}
		resp, err := http.ReadResponse(bufio.NewReader(conn), req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET /metrics: %s", resp.Status)
		}
		b, err := io.ReadAll(resp.Body)
		text = string(b)
		return err
	})
	return text, err
}

// metricSum adds the samples of metric whose labels include every one of
// labels (`name="value"` strings).
func metricSum(text, metric string, labels ...string) float64 {
	var sum float64
	for _, l := range strings.Split(text, "\n") {
		if !strings.HasPrefix(l, metric+"{") {
			continue
		}
		ok := true
		for _, want := range labels {
			ok = ok && strings.Contains(l, want)
		}
		f := strings.Fields(l)
		if v, err := strconv.ParseFloat(f[len(f)-1], 64); ok && err == nil {
			sum += v
		}
	}
	return sum
}
