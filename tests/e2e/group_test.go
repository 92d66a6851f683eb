package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The scenarios of issue 15: VolumeGroupSnapshots (docs/group-snapshots.md),
// through the chart's VolumeGroupSnapshotClass, the central csi-snapshotter
// and snapshot-controller with their group snapshot feature gate on.
//
// The workload is an append log on raw block volumes: number i goes to
// sector i of claim A, fsync'd, then to sector i of claim B, fsync'd, then
// i+1. In a crash-consistent image of both taken at one instant, B's last
// number is at most A's and A's at most B's + 1; a snapshot of A and one of
// B taken at two instants break that as soon as the log moved in between.
// Raw block keeps the restores cheap (no filesystem to mount) and lets one
// dd read a whole log: zeros between the records drop out with tr.
//
// 35 runs the loop in one pod with both claims on one node; 36 runs it
// from this process through two pods on the two nodes (one pod cannot use
// volumes of two nodes), each writing what it reads on stdin and echoing it
// once it is durable. 36 leaves its claims and pods to 37, which sets them up
// itself when run alone and deletes them.

const (
	groupClass = "qcow2-group" // the chart's VolumeGroupSnapshotClass
	groupLabel = "e2e-group"   // the claims' label the group selectors match
	groupTakes = 20            // group snapshots taken in 35 and 36
	// groupHold is the driver's default group hold timeout (the nodes'
	// prepare deadline, after which a node releases on its own).
	groupHold = 5 * time.Second
)

// groupClaimManifest is a 64Mi raw block claim labelled for group.
func groupClaimManifest(name, group string) string {
	return strings.Replace(pvcManifest(name, "64Mi", "Block"), "namespace: "+testNS+"}",
		"namespace: "+testNS+", labels: {"+groupLabel+": "+group+"}}", 1)
}

// groupSnapshotManifest takes a group snapshot of the claims labelled group.
func groupSnapshotManifest(name, group string) string {
	return fmt.Sprintf(`apiVersion: groupsnapshot.storage.k8s.io/v1
kind: VolumeGroupSnapshot
metadata: {name: %s, namespace: %s, labels: {%s: %s}}
spec:
  volumeGroupSnapshotClassName: %s
  source:
    selector:
      matchLabels: {%s: %s}
`, name, testNS, groupLabel, group, groupClass, groupLabel, group)
}

// restoreBlockManifest is a 64Mi raw block claim restored from a
// VolumeSnapshot.
func restoreBlockManifest(name, snapshot string) string {
	return strings.Replace(pvcFromManifest(name, "VolumeSnapshot", "snapshot.storage.k8s.io", snapshot),
		"resources: {requests: {storage: 1Gi}}", "volumeMode: Block\n  resources: {requests: {storage: 64Mi}}", 1)
}

// podClaimsManifest is a busybox pod on node running script, with each raw
// block claim at /dev/<claim>.
func podClaimsManifest(name, node, script string, claims ...string) string {
	var devs, vols strings.Builder
	for i, cl := range claims {
		fmt.Fprintf(&devs, "\n    - {name: v%d, devicePath: /dev/%s}", i, cl)
		fmt.Fprintf(&vols, "\n  - {name: v%d, persistentVolumeClaim: {claimName: %s}}", i, cl)
	}
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: %s, namespace: %s}
spec:
  nodeSelector: {kubernetes.io/hostname: %s}
  terminationGracePeriodSeconds: 2
  containers:
  - name: c
    image: %s
    imagePullPolicy: Never
    command: [sh, -c, %q]
    volumeDevices:%s
  volumes:%s
`, name, testNS, node, busyboxRef, script, devs.String(), vols.String())
}

// appendRecord is the shell that writes the number in $i to sector $i of
// device $d and fsyncs it.
const appendRecord = `echo $i | dd of=$d bs=512 seek=$i conv=notrunc,fsync 2>/dev/null`

// groupPair is the pair of claims of 35 and 36 and where their logs are.
type groupPair struct {
	group      string
	a, b       string // claims
	nodeA      string // node of a
	nodeB      string // node of b
	podA, podB string // pods holding them (one pod in 35)
}

// readLog returns the numbers of the append log on a pod's device, the
// first n sectors: 0, 1, ... in order, or an error naming what is not.
func (c *cluster) readLog(t *testing.T, pod, dev string, n int) (last int, err error) {
	t.Helper()
	out := c.exec(t, testNS, pod, fmt.Sprintf(`dd if=/dev/%s bs=512 count=%d 2>/dev/null | tr -d '\000'`, dev, n))
	return parseLog(out)
}

// parseLog checks an append log and returns its last number (-1 when
// empty).
func parseLog(s string) (int, error) {
	last := -1
	for _, f := range strings.Split(strings.TrimSpace(s), "\n") {
		if f == "" && last == -1 {
			continue
		}
		if f != strconv.Itoa(last+1) {
			return last, fmt.Errorf("record %d is %q (log %q)", last+1, f, tailString(s, 3))
		}
		last++
	}
	return last, nil
}

// groupReady waits for a VolumeGroupSnapshot to be readyToUse.
func (c *cluster) groupReady(t *testing.T, name string) {
	t.Helper()
	if err := c.waitFor("VolumeGroupSnapshot "+name+" readyToUse", 3*time.Minute, nil, func() error {
		out, err := c.kubectl("get", "volumegroupsnapshot", name, "-n", testNS, "-o", "jsonpath={.status.readyToUse} {.status.error.message}")
		if err != nil {
			return err
		}
		if strings.TrimSpace(out) != "true" {
			return fmt.Errorf("readyToUse, error: %q", out)
		}
		return nil
	}); err != nil {
		desc, _ := c.kubectl("describe", "volumegroupsnapshot", name, "-n", testNS)
		t.Fatalf("%v\n%s", err, tailString(desc, 20))
	}
}

// groupMembers waits for the member VolumeSnapshots of a ready group
// snapshot (those it owns) to be ready, one per claim of want, and returns
// them by claim.
func (c *cluster) groupMembers(t *testing.T, name string, want ...string) map[string]string {
	t.Helper()
	var members map[string]string
	if err := c.waitFor("members of "+name, 2*time.Minute, nil, func() error {
		out, err := c.kubectl("get", "volumesnapshots", "-n", testNS, "-o",
			`jsonpath={range .items[*]}{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name} {.spec.source.persistentVolumeClaimName} {.metadata.name} {.status.readyToUse}{"\n"}{end}`)
		if err != nil {
			return err
		}
		members = map[string]string{}
		for _, l := range strings.Split(out, "\n") {
			f := strings.Fields(l)
			if len(f) != 4 || f[0] != "VolumeGroupSnapshot/"+name {
				continue
			}
			if f[3] != "true" {
				return fmt.Errorf("member %s of %s not ready", f[2], f[1])
			}
			members[f[1]] = f[2]
		}
		if len(members) != len(want) {
			return fmt.Errorf("members %v, want one of each of %v", members, want)
		}
		for _, w := range want {
			if members[w] == "" {
				return fmt.Errorf("members %v, none of %s", members, w)
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return members
}

// takeGroups makes n group snapshots of p's claims, one every half
// second, while the log runs, and waits for them and their members;
// progress says how far the log is. (Each is ready within about a second
// of its apply; at snapshot-controller's default 5 API requests/s it was 5-6
// s a group: startSnapshotController.)
func (c *cluster) takeGroups(t *testing.T, p groupPair, n int, progress func() (int, error)) []map[string]string {
	t.Helper()
	var groups []map[string]string
	first, _ := progress()
	t0 := time.Now()
	for i := range n {
		c.mustApply(t, groupSnapshotManifest(fmt.Sprintf("%s-%d", p.group, i), p.group))
		time.Sleep(500 * time.Millisecond)
	}
	for i := range n {
		name := fmt.Sprintf("%s-%d", p.group, i)
		c.groupReady(t, name)
		groups = append(groups, c.groupMembers(t, name, p.a, p.b))
	}
	now, err := progress()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d group snapshots in %v while the log went from %d to %d", n, time.Since(t0).Round(time.Millisecond), first, now)
	return groups
}

// checkRestores restores every group of p (a claim from each member
// VolumeSnapshot, in the member's node), reads both logs from pods with up
// to 10 claims each and checks B <= A <= B+1 in every pair; the groups
// must not all end at one record (they were taken while the log ran). It
// deletes the pods, restored claims and group snapshots after.
func (c *cluster) checkRestores(t *testing.T, p groupPair, groups []map[string]string, maxLog int) {
	t.Helper()
	type restored struct{ a, b string }
	var rs []restored
	var manifests []string
	byNode := map[string][]string{}
	for i, g := range groups {
		r := restored{fmt.Sprintf("%s-r%d-a", p.group, i), fmt.Sprintf("%s-r%d-b", p.group, i)}
		rs = append(rs, r)
		manifests = append(manifests, restoreBlockManifest(r.a, g[p.a]), restoreBlockManifest(r.b, g[p.b]))
		byNode[p.nodeA] = append(byNode[p.nodeA], r.a)
		byNode[p.nodeB] = append(byNode[p.nodeB], r.b)
	}
	podOf := map[string]string{}
	var pods []string
	for _, node := range sortedKeys(byNode) {
		claims := byNode[node]
		for k := 0; k < len(claims); k += 10 {
			batch := claims[k:min(k+10, len(claims))]
			pod := fmt.Sprintf("%s-read-%d", p.group, len(pods))
			pods = append(pods, pod)
			manifests = append(manifests, podClaimsManifest(pod, node, "sleep 3600", batch...))
			for _, cl := range batch {
				podOf[cl] = pod
			}
		}
	}
	c.mustApply(t, strings.Join(manifests, "---\n"))
	defer func() {
		var claims []string
		for _, r := range rs {
			claims = append(claims, r.a, r.b)
		}
		for _, args := range [][]string{
			append([]string{"delete", "pod", "-n", testNS, "--wait=true", "--timeout=180s"}, pods...),
			append([]string{"delete", "pvc", "-n", testNS, "--wait=true", "--timeout=180s"}, claims...),
			// The members go with their group (deletionPolicy Delete).
			{"delete", "volumegroupsnapshot", "-n", testNS, "-l", groupLabel + "=" + p.group, "--wait=true", "--timeout=180s"},
		} {
			if _, err := c.kubectl(args...); err != nil {
				t.Error(err)
			}
		}
	}()
	for _, pod := range pods {
		c.podReady(t, testNS, pod, 5*time.Minute)
	}
	lowA, highA := math.MaxInt, -1
	for i, r := range rs {
		a, errA := c.readLog(t, podOf[r.a], r.a, maxLog+8)
		b, errB := c.readLog(t, podOf[r.b], r.b, maxLog+8)
		if errA != nil || errB != nil {
			t.Errorf("group %d: restored logs damaged: A: %v; B: %v", i, errA, errB)
			continue
		}
		if !(b <= a && a <= b+1) {
			t.Errorf("group %d: restored A ends at %d, B at %d: not one instant (want B <= A <= B+1)", i, a, b)
		}
		lowA, highA = min(lowA, a), max(highA, a)
	}
	t.Logf("%d groups restored, A's log ending from %d to %d", len(rs), lowA, highA)
	if highA <= lowA {
		t.Errorf("every restored A ends at %d: the groups were not taken while the log ran", highA)
	}
}

func sortedKeys[V any](m map[string]V) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// Scenario 35: one pod appends to A then B on one node; 20 group snapshots
// while it runs; every restored pair is of one instant.
func testGroupOneNode(t *testing.T, c *cluster) {
	node := c.nodes[0].name
	p := groupPair{group: "g35", a: "g35-a", b: "g35-b", nodeA: node, nodeB: node, podA: "g35-w", podB: "g35-w"}
	// The loop stops at the first failed write; the pod then waits to be
	// looked at. /tmp/n is how far it got (renamed into place: a reader
	// never sees it empty).
	loop := fmt.Sprintf(`i=0; while :; do d=/dev/%s; %s || break; d=/dev/%s; %s || break; echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; i=$((i+1)); done; echo failed at $i > /tmp/n; sleep 3600`,
		p.a, appendRecord, p.b, appendRecord)
	c.mustApply(t, groupClaimManifest(p.a, p.group)+"---\n"+groupClaimManifest(p.b, p.group)+"---\n"+
		podClaimsManifest(p.podA, node, loop, p.a, p.b))
	c.podReady(t, testNS, p.podA, 3*time.Minute)
	progress := func() (int, error) {
		out, err := c.kubectl("exec", "-n", testNS, p.podA, "--", "cat", "/tmp/n")
		if err != nil {
			return -1, err
		}
		n, err := strconv.Atoi(strings.TrimSpace(out))
		if err != nil {
			return -1, fmt.Errorf("the log's progress: %q", out)
		}
		return n, nil
	}
	c.waitOutputAbove(t, progress, 20)
	groups := c.takeGroups(t, p, groupTakes, progress)
	end, err := progress()
	if err != nil {
		t.Fatal(err)
	}
	c.deletePod(t, testNS, p.podA)
	c.checkRestores(t, p, groups, end+1)
	c.mustKubectl(t, "delete", "pvc", "-n", testNS, p.a, p.b, "--wait=true", "--timeout=120s")
	c.waitPoolsEmpty(t)
}

// waitOutputAbove waits until progress passes n (the log is running).
func (c *cluster) waitOutputAbove(t *testing.T, progress func() (int, error), n int) {
	t.Helper()
	if err := c.waitFor(fmt.Sprintf("the log past %d", n), time.Minute, nil, func() error {
		got, err := progress()
		if err == nil && got <= n {
			err = fmt.Errorf("at %d", got)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
}

// seqWriter is a shell in a pod, through kubectl exec, that appends each
// number it reads on stdin to the pod's device and echoes it once fsync'd.
type seqWriter struct {
	pod    string
	cancel context.CancelFunc
	cmd    *exec.Cmd
	in     io.WriteCloser
	out    *bufio.Reader
}

func (c *cluster) startSeqWriter(t *testing.T, pod, claim string) *seqWriter {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	script := fmt.Sprintf(`d=/dev/%s; while read i; do %s || exit 1; echo $i; done`, claim, appendRecord)
	cmd := c.inNS(ctx, filepath.Join(c.bin, "kubectl"), "--kubeconfig", c.admin, "exec", "-i", "-n", testNS, pod, "--", "sh", "-c", script)
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w := &seqWriter{pod: pod, cancel: cancel, cmd: cmd, in: in, out: bufio.NewReader(out)}
	t.Cleanup(w.close)
	return w
}

// write appends i and returns once it is durable.
func (w *seqWriter) write(i int) error {
	if _, err := fmt.Fprintf(w.in, "%d\n", i); err != nil {
		return fmt.Errorf("%s: %w", w.pod, err)
	}
	l, err := w.out.ReadString('\n')
	if err != nil {
		return fmt.Errorf("%s: writing %d: %w", w.pod, i, err)
	}
	if strings.TrimSpace(l) != strconv.Itoa(i) {
		return fmt.Errorf("%s: wrote %d, it answered %q", w.pod, i, l)
	}
	return nil
}

func (w *seqWriter) close() {
	w.in.Close()
	done := make(chan struct{})
	go func() { w.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		w.cancel()
		<-done
	}
	w.cancel()
}

// loopState is a loop of writes run by runLoop: how far it got, when
// each write was done, and why it stopped.
type loopState struct {
	mu   sync.Mutex
	last int
	at   []time.Time // when each i was done
	err  error
	done chan struct{}
}

// runLoop runs step(i) for i = 0, 1, ... until stop is closed or a step
// fails.
func runLoop(stop <-chan struct{}, step func(i int) error) *loopState {
	s := &loopState{last: -1, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			err := step(i)
			s.mu.Lock()
			if err != nil {
				s.err = err
				s.mu.Unlock()
				return
			}
			s.last = i
			s.at = append(s.at, time.Now())
			s.mu.Unlock()
		}
	}()
	return s
}

// progress is how far the loop got, or why it stopped.
func (s *loopState) progress() (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return s.last, fmt.Errorf("the writes stopped after %d: %w", s.last, s.err)
	}
	return s.last, nil
}

// maxGap is the longest time between two writes done in [from, to], with
// the edges of the window counted as writes (nothing done at all is a gap
// of the whole window).
func (s *loopState) maxGap(from, to time.Time) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	prev, gap := from, time.Duration(0)
	for _, at := range append(append([]time.Time(nil), s.at...), to) {
		if at.Before(from) {
			continue
		}
		if at.After(to) {
			at = to
		}
		gap = max(gap, at.Sub(prev))
		prev = at
		if at.Equal(to) {
			break
		}
	}
	return gap
}

// twoNodePair sets up (or finds, apply being idempotent) A on the first
// node and B on the second, each in a pod of its own that sleeps.
func (c *cluster) twoNodePair(t *testing.T) groupPair {
	t.Helper()
	p := groupPair{group: "g36", a: "g36-a", b: "g36-b", nodeA: c.nodes[0].name, nodeB: c.nodes[1].name, podA: "g36-wa", podB: "g36-wb"}
	c.mustApply(t, strings.Join([]string{groupClaimManifest(p.a, p.group), groupClaimManifest(p.b, p.group),
		podClaimsManifest(p.podA, p.nodeA, "sleep 3600", p.a), podClaimsManifest(p.podB, p.nodeB, "sleep 3600", p.b)}, "---\n"))
	c.podReady(t, testNS, p.podA, 3*time.Minute)
	c.podReady(t, testNS, p.podB, 3*time.Minute)
	return p
}

// Scenario 36: 35 with A and B on the two nodes, the loop run from here.
func testGroupTwoNodes(t *testing.T, c *cluster) {
	p := c.twoNodePair(t)
	wa, wb := c.startSeqWriter(t, p.podA, p.a), c.startSeqWriter(t, p.podB, p.b)
	stop := make(chan struct{})
	log := runLoop(stop, func(i int) error {
		if err := wa.write(i); err != nil {
			return err
		}
		return wb.write(i)
	})
	c.waitOutputAbove(t, log.progress, 20)
	groups := c.takeGroups(t, p, groupTakes, log.progress)
	close(stop)
	<-log.done
	if log.err != nil {
		t.Fatalf("the log stopped: %v", log.err)
	}
	c.checkRestores(t, p, groups, log.last+1)
	// A, B and their pods stay for 37.
}

// Scenario 37: a node whose plugin stops answering (SIGSTOP) before the
// prepare: the group snapshot fails, the other node's writes go on within
// the hold deadline while it is stopped, no member VolumeSnapshotContent
// nor image snapshot is left; once it is continued, its writes go on too.
func testGroupNodeStopped(t *testing.T, c *cluster) {
	p := c.twoNodePair(t)
	defer func() {
		c.kubectl("delete", "volumegroupsnapshot", "-n", testNS, "-l", groupLabel+"="+p.group, "--wait=true", "--timeout=120s")
		c.kubectl("delete", "pod", "-n", testNS, p.podA, p.podB, "--wait=true", "--timeout=180s")
		c.kubectl("delete", "pvc", "-n", testNS, p.a, p.b, "--wait=true", "--timeout=120s")
		c.waitPoolsEmpty(t)
	}()
	stopped, running := p.nodeA, p.nodeB
	// What the checks below find must be this scenario's: wait for what
	// 36 deleted to be gone.
	if err := c.waitFor("no snapshots left from before", 2*time.Minute, nil, func() error {
		return c.groupLeftovers()
	}); err != nil {
		t.Fatal(err)
	}
	images := map[string][]string{}
	for _, cl := range []string{p.a, p.b} {
		images[cl] = c.imageSnapshots(t, cl)
	}
	wa, wb := c.startSeqWriter(t, p.podA, p.a), c.startSeqWriter(t, p.podB, p.b)
	stop := make(chan struct{})
	defer close(stop)
	la, lb := runLoop(stop, wa.write), runLoop(stop, wb.write)
	for _, l := range []*loopState{la, lb} {
		c.waitOutputAbove(t, l.progress, 10)
	}

	pid := c.pluginPID(t, stopped)
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatalf("SIGSTOP the node plugin on %s (pid %d): %v", stopped, pid, err)
	}
	continued := false
	cont := func() {
		if !continued {
			continued = true
			syscall.Kill(pid, syscall.SIGCONT)
		}
	}
	defer cont()
	// What was in flight at the stop waits for the plugin too; a second
	// is ample for the writer to get stuck.
	time.Sleep(time.Second)
	stoppedAt, _ := la.progress()
	t0 := time.Now()
	c.mustApply(t, groupSnapshotManifest("g37", p.group))
	var failure string
	if err := c.waitFor("g37 failed", 2*time.Minute, nil, func() error {
		out, err := c.kubectl("get", "volumegroupsnapshot", "g37", "-n", testNS, "-o",
			"jsonpath={.status.readyToUse}|{.status.boundVolumeGroupSnapshotContentName}|{.status.error.message}")
		if err != nil {
			return err
		}
		f := strings.SplitN(strings.TrimSpace(out), "|", 3)
		if len(f) != 3 {
			return fmt.Errorf("status: %q", out)
		}
		if f[0] == "true" {
			t.Fatalf("group snapshot g37 is ready while the plugin on %s is stopped", stopped)
		}
		failure = f[2]
		if failure == "" && f[1] != "" {
			// The sidecar sets the content's error; the VolumeGroupSnapshot
			// gets it at the controller's next sync.
			failure, _ = c.kubectl("get", "volumegroupsnapshotcontent", f[1], "-o", "jsonpath={.status.error.message}")
			failure = strings.TrimSpace(failure)
		}
		if failure == "" {
			return fmt.Errorf("status: %q", out)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	t.Logf("g37 failed after %v: %s", time.Since(t0).Round(time.Millisecond), failure)
	// The message names the volumes (and so both nodes); the driver's
	// part of it must name the node that did not answer.
	if _, desc, ok := strings.Cut(failure, "desc = "); ok && !strings.Contains(desc, stopped) {
		t.Errorf("the group snapshot's error does not name the stopped node %s: %s", stopped, failure)
	}
	// Stopped long enough that a hold waiting for the stopped node would
	// show (at most ~50 s: then the liveness probe restarts the plugin).
	if rest := 3*groupHold - time.Since(t0); rest > 0 {
		time.Sleep(rest)
	}
	window := time.Since(t0)
	if gap := lb.maxGap(t0, time.Now()); gap > 2*groupHold {
		t.Errorf("%s's writer stood still for %v in the %v %s was stopped, want at most %v (the hold deadline %v, and slack)",
			running, gap.Round(time.Millisecond), window.Round(time.Second), stopped, 2*groupHold, groupHold)
	} else {
		t.Logf("%s's writer: longest pause %v in the %v %s was stopped", running, gap.Round(time.Millisecond), window.Round(time.Second), stopped)
	}
	if err := c.noMembers(t, "g37", images); err != nil {
		t.Error(err)
	}
	if now, _ := la.progress(); now != stoppedAt {
		t.Errorf("%s's writer went from %d to %d while its plugin was stopped: the SIGSTOP did not hold its I/O", stopped, stoppedAt, now)
	}

	// Deleted while the node is stopped; what a retry after the SIGCONT
	// may still take goes with it: the end state is checked once it is
	// gone.
	c.mustKubectl(t, "delete", "volumegroupsnapshot", "-n", testNS, "g37", "--wait=false")
	cont()
	before, _ := la.progress()
	c.waitOutputAbove(t, la.progress, before)
	if err := c.waitFor("g37 deleted, nothing of it left", 2*time.Minute, nil, func() error {
		out, err := c.kubectl("get", "volumegroupsnapshot", "g37", "-n", testNS, "--ignore-not-found", "-o", "name")
		if err == nil && strings.TrimSpace(out) != "" {
			return fmt.Errorf("left: %s", out)
		}
		if err != nil {
			return err
		}
		return c.noMembers(t, "g37", images)
	}); err != nil {
		t.Error(err)
	}
}

// groupLeftovers names the VolumeSnapshots of the test namespace and the
// VolumeSnapshotContents bound to one, if any.
func (c *cluster) groupLeftovers() error {
	vs, err := c.kubectl("get", "volumesnapshots", "-n", testNS, "-o", "name")
	if err != nil {
		return err
	}
	out, err := c.kubectl("get", "volumesnapshotcontents", "-o", `jsonpath={range .items[*]}{.metadata.name} {.spec.volumeSnapshotRef.namespace}{"\n"}{end}`)
	if err != nil {
		return err
	}
	var vsc []string
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) == 2 && f[1] == testNS {
			vsc = append(vsc, f[0])
		}
	}
	if s := strings.TrimSpace(vs); s != "" || len(vsc) > 0 {
		return fmt.Errorf("VolumeSnapshots %q, VolumeSnapshotContents %v", s, vsc)
	}
	return nil
}

// imageSnapshots lists the internal snapshots (their tags) in a claim's
// image, with qemu-img sharing the plugin's locks.
func (c *cluster) imageSnapshots(t *testing.T, claim string) []string {
	t.Helper()
	_, h := c.pvcVolume(t, testNS, claim)
	path, _ := c.imagePath(t, h)
	out, err := run("qemu-img", "snapshot", "-U", "-l", path)
	if err != nil {
		t.Fatalf("%s: %v", claim, err)
	}
	var tags []string
	for _, l := range strings.Split(out, "\n") {
		// "Snapshot list:", the column titles, then ID TAG ... per snapshot.
		if f := strings.Fields(l); len(f) >= 2 && f[0] != "ID" && f[0] != "Snapshot" {
			tags = append(tags, f[1])
		}
	}
	return tags
}

// noMembers: a failed group snapshot left no VolumeSnapshot or
// VolumeSnapshotContent, and no internal snapshot in the images of the
// claims (keys of before, their snapshots before it).
func (c *cluster) noMembers(t *testing.T, group string, before map[string][]string) error {
	t.Helper()
	if err := c.groupLeftovers(); err != nil {
		return fmt.Errorf("after the failed group snapshot %s: %w", group, err)
	}
	for cl, was := range before {
		if now := c.imageSnapshots(t, cl); fmt.Sprint(now) != fmt.Sprint(was) {
			return fmt.Errorf("image of %s holds snapshots %v after the failed group snapshot %s, %v before it", cl, now, group, was)
		}
	}
	return nil
}

// pluginPID is the host PID of the driver container of node's plugin pod.
func (c *cluster) pluginPID(t *testing.T, node string) int {
	t.Helper()
	id := c.jsonpath(t, "pod", releaseNS, c.nodePluginPod(t, node), `{.status.containerStatuses[?(@.name=="qcow2-csi")].containerID}`)
	return c.taskPID(t, node, strings.TrimPrefix(id, "containerd://"))
}

// Scenario 38 (opt-in, QCOW2_CSI_E2E_GROUP_BENCH=1; tests/bench/group.sh
// runs it): fio writes to 4 raw block volumes (4 KiB random, O_DIRECT, 4
// in flight each) while GROUP_SNAPSHOTS (default 20) group snapshots of
// them are taken one after the other; the time I/O was held per group
// snapshot, from the nodes' qcow2_csi_group_snapshot_hold_seconds
// histograms (the difference over the run), with the 4 volumes on one node
// and 2 on each node. Across nodes each node holds its own members: each
// group counts once per node.
func testGroupBench(t *testing.T, c *cluster) {
	if os.Getenv("QCOW2_CSI_E2E_GROUP_BENCH") != "1" {
		t.Skip("opt-in measurement: QCOW2_CSI_E2E_GROUP_BENCH=1 (tests/bench/group.sh)")
	}
	n := groupTakes
	if v, err := strconv.Atoi(os.Getenv("GROUP_SNAPSHOTS")); err == nil && v > 0 {
		n = v
	}
	const fioCmd = "exec fio --name=w --filename=%s --rw=randwrite --bs=4k --direct=1 --ioengine=libaio --iodepth=4 --time_based --runtime=1800"
	cases := []struct {
		name  string
		nodes []string // of each volume
	}{
		{"4 volumes, one node", []string{c.nodes[0].name, c.nodes[0].name, c.nodes[0].name, c.nodes[0].name}},
		{"4 volumes, two nodes", []string{c.nodes[0].name, c.nodes[0].name, c.nodes[1].name, c.nodes[1].name}},
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "%d group snapshots each, fio 4k randwrite QD4 on every volume; I/O hold per group per node, ms\n", n)
	fmt.Fprintf(&sb, "%-22s %6s %8s %8s %8s %14s\n", "case", "holds", "p50", "p99", "mean", "ready p50 (s)")
	for ci, cs := range cases {
		group := fmt.Sprintf("gb%d", ci)
		var manifests, pods, claims []string
		for i, node := range cs.nodes {
			cl := fmt.Sprintf("%s-%d", group, i)
			claims, pods = append(claims, cl), append(pods, cl+"-fio")
			manifests = append(manifests, groupClaimManifest(cl, group),
				strings.Replace(podClaimsManifest(cl+"-fio", node, fmt.Sprintf(fioCmd, "/dev/"+cl), cl), busyboxRef, fioRef, 1))
		}
		// A failed measurement must not leave its pods to scenario 8.
		cleanup := func() {
			c.kubectl("delete", "volumegroupsnapshot", "-n", testNS, "-l", groupLabel+"="+group, "--wait=true", "--timeout=300s")
			c.kubectl(append([]string{"delete", "pod", "-n", testNS, "--wait=true", "--timeout=180s"}, pods...)...)
			c.kubectl(append([]string{"delete", "pvc", "-n", testNS, "--wait=true", "--timeout=180s"}, claims...)...)
		}
		defer cleanup()
		c.mustApply(t, strings.Join(manifests, "---\n"))
		for _, pod := range pods {
			c.podReady(t, testNS, pod, 3*time.Minute)
		}
		time.Sleep(2 * time.Second) // fio past its start
		nodes := sortedKeys(map[string]bool{cs.nodes[0]: true, cs.nodes[len(cs.nodes)-1]: true})
		scrape := func() histogram {
			var h histogram
			for _, node := range nodes {
				h = h.add(parseHistogram(c.nodeMetrics(t, node), "qcow2_csi_group_snapshot_hold_seconds"), 1)
			}
			return h
		}
		before := scrape()
		var ready []time.Duration
		for i := range n {
			name := fmt.Sprintf("%s-%d", group, i)
			t0 := time.Now()
			c.mustApply(t, groupSnapshotManifest(name, group))
			c.groupReady(t, name)
			ready = append(ready, time.Since(t0))
		}
		h := scrape().add(before, -1)
		cleanup()
		if h.count < float64(n*len(nodes)) {
			t.Errorf("%s: %v holds counted for %d group snapshots on %d nodes", cs.name, h.count, n, len(nodes))
		}
		sort.Slice(ready, func(i, j int) bool { return ready[i] < ready[j] })
		fmt.Fprintf(&sb, "%-22s %6.0f %8.1f %8.1f %8.1f %14.2f\n", cs.name, h.count,
			1000*h.quantile(0.5), 1000*h.quantile(0.99), 1000*h.sum/h.count, ready[len(ready)/2].Seconds())
	}
	c.waitPoolsEmpty(t)
	t.Logf("GROUP-BENCH\n%s", sb.String())
}

// histogram is a Prometheus histogram: cumulative counts by upper bound.
type histogram struct {
	le         []float64
	cum        []float64
	count, sum float64
}

// parseHistogram reads the unlabelled histogram metric from Prometheus
// text.
func parseHistogram(text, metric string) histogram {
	var h histogram
	for _, l := range strings.Split(text, "\n") {
		f := strings.Fields(l)
		if len(f) != 2 {
			continue
		}
		v, err := strconv.ParseFloat(f[1], 64)
		if err != nil {
			continue
		}
		switch {
		case strings.HasPrefix(f[0], metric+`_bucket{le="`):
			le, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimPrefix(f[0], metric+`_bucket{le="`), `"}`), 64)
			if err == nil {
				h.le, h.cum = append(h.le, le), append(h.cum, v)
			}
		case f[0] == metric+"_count":
			h.count = v
		case f[0] == metric+"_sum":
			h.sum = v
		}
	}
	return h
}

// add returns h + sign*o, bucket by bucket (o empty: h; h empty: sign*o).
func (h histogram) add(o histogram, sign float64) histogram {
	if len(h.le) == 0 {
		r := histogram{le: o.le, count: sign * o.count, sum: sign * o.sum}
		for _, v := range o.cum {
			r.cum = append(r.cum, sign*v)
		}
		return r
	}
	r := histogram{le: h.le, count: h.count + sign*o.count, sum: h.sum + sign*o.sum}
	for i, v := range h.cum {
		if i < len(o.cum) {
			v += sign * o.cum[i]
		}
		r.cum = append(r.cum, v)
	}
	return r
}

// quantile interpolates linearly within the bucket that holds q, as
// Prometheus' histogram_quantile does.
func (h histogram) quantile(q float64) float64 {
	if h.count <= 0 || len(h.le) == 0 {
		return math.NaN()
	}
	rank := q * h.count
	lo, below := 0.0, 0.0
	for i, le := range h.le {
		if h.cum[i] >= rank {
			if math.IsInf(le, 1) {
				return lo
			}
			in := h.cum[i] - below
			if in <= 0 {
				return le
			}
			return lo + (le-lo)*(rank-below)/in
		}
		lo, below = le, h.cum[i]
	}
	return lo
}

// The helpers that judge scenarios 35-38, on known input.
func TestGroupLogAndHistogram(t *testing.T) {
	for _, c := range []struct {
		in   string
		last int
		bad  bool
	}{
		{"", -1, false}, {"0\n", 0, false}, {"0\n1\n2\n", 2, false},
		{"0\n2\n", 0, true}, {"1\n", -1, true}, {"0\n1x\n", 0, true},
	} {
		last, err := parseLog(c.in)
		if last != c.last || (err != nil) != c.bad {
			t.Errorf("parseLog(%q) = %d, %v; want %d, error %v", c.in, last, err, c.last, c.bad)
		}
	}
	const m = "qcow2_csi_group_snapshot_hold_seconds"
	before := parseHistogram(m+`_bucket{le="0.001"} 0
`+m+`_bucket{le="0.002"} 1
`+m+`_bucket{le="0.004"} 1
`+m+`_bucket{le="+Inf"} 1
`+m+`_sum 0.0015
`+m+`_count 1
`, m)
	after := parseHistogram(m+`_bucket{le="0.001"} 0
`+m+`_bucket{le="0.002"} 1
`+m+`_bucket{le="0.004"} 11
`+m+`_bucket{le="+Inf"} 11
`+m+`_sum 0.0315
`+m+`_count 11
`, m)
	h := after.add(before, -1)
	if h.count != 10 || math.Abs(h.sum-0.03) > 1e-9 {
		t.Fatalf("difference: count %v sum %v, want 10, 0.03", h.count, h.sum)
	}
	// All 10 in (2 ms, 4 ms]: the median is its middle, p99 near its top.
	if q := h.quantile(0.5); math.Abs(q-0.003) > 1e-9 {
		t.Errorf("p50 = %v, want 0.003", q)
	}
	if q := h.quantile(0.99); math.Abs(q-0.00398) > 1e-9 {
		t.Errorf("p99 = %v, want 0.00398", q)
	}
	if q := (histogram{}).add(h, 1).add(h, 1).quantile(0.5); math.Abs(q-0.003) > 1e-9 {
		t.Errorf("p50 of the sum of two = %v, want 0.003", q)
	}
}
