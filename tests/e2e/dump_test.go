package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// envDumpDir names where failure dumps go (kept after the run); without it
// each dump goes to a new qcow2-csi-e2e-dump-* directory in $TMPDIR.
// envDumpAlways=1 dumps after every scenario, failed or not (to check the
// dump itself).
const (
	envDumpDir    = "E2E_DUMP_DIR"
	envDumpAlways = "E2E_DUMP_ALWAYS"
)

// podLogsDir is node n's kubelet podLogsDir: inside the cluster root, so
// the dump can read every container's log from disk, also when the API
// server or the kubelet no longer serves logs, and a run leaves nothing in
// /var/log/pods.
func (c *cluster) podLogsDir(n *node) string { return n.path("pod-logs") }

// keptLogsDir mirrors podLogsDir with hard links to every log file (see
// keepPodLogs): the logs of pods deleted since, such as the node plugin
// before an upgrade or a scenario's pods, stay readable for the dump.
func (c *cluster) keptLogsDir() string { return c.path("kept-pod-logs") }

// keepPodLogs hard-links every new log file under the nodes' podLogsDirs
// into keptLogsDir every half second until stop is closed (pod directory
// names hold the pod's UID: the two nodes' never collide). The runtime keeps
// appending to the same inode, so the link sees the whole log, and the
// kubelet's removal of a pod's directory leaves it. (A container that
// comes and goes within half a second can be missed.)
func (c *cluster) keepPodLogs(stop <-chan struct{}) {
	dst := c.keptLogsDir()
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		for _, n := range c.nodes {
			src := c.podLogsDir(n)
			files, _ := filepath.Glob(filepath.Join(src, "*", "*", "*.log"))
			for _, f := range files {
				rel, err := filepath.Rel(src, f)
				if err != nil {
					continue
				}
				to := filepath.Join(dst, rel)
				if _, err := os.Lstat(to); err == nil {
					continue
				}
				if os.MkdirAll(filepath.Dir(to), 0o755) == nil {
					_ = os.Link(f, to)
				}
			}
		}
		select {
		case <-stop:
			return
		case <-tick.C:
		}
	}
}

// containerLog is one container's log as the kubelet wrote it: one file per
// start (0.log, 1.log, ... in restart order).
type containerLog struct {
	ns, pod, container string
	files              []string
}

func (l containerLog) name() string { return l.ns + "_" + l.pod + "_" + l.container }

// podLogs lists the container logs under a kubelet podLogsDir, laid out as
// <namespace>_<pod>_<uid>/<container>/<restart>.log, sorted by name.
func podLogs(dir string) ([]containerLog, error) {
	pods, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []containerLog
	for _, p := range pods {
		parts := strings.SplitN(p.Name(), "_", 3)
		if !p.IsDir() || len(parts) != 3 {
			continue
		}
		ctrs, err := os.ReadDir(filepath.Join(dir, p.Name()))
		if err != nil {
			return nil, err
		}
		for _, ctr := range ctrs {
			if !ctr.IsDir() {
				continue
			}
			l := containerLog{ns: parts[0], pod: parts[1], container: ctr.Name()}
			files, _ := filepath.Glob(filepath.Join(dir, p.Name(), ctr.Name(), "*.log"))
			sort.Slice(files, func(i, j int) bool { return restartOf(files[i]) < restartOf(files[j]) })
			l.files = files
			out = append(out, l)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name() < out[j].name() })
	return out, nil
}

func restartOf(path string) int {
	n, err := strconv.Atoi(strings.TrimSuffix(filepath.Base(path), ".log"))
	if err != nil {
		return -1
	}
	return n
}

// dumpTailLines is how much of a container's log goes into the test log:
// the driver's most, the sidecars' less, the test pods' a little. The
// whole logs are in the dump directory.
func dumpTailLines(l containerLog) int {
	switch {
	case l.ns == releaseNS && l.container == "qcow2-csi":
		return 120
	case l.ns == releaseNS:
		return 40
	}
	return 15
}

// newDumpDir makes the directory one dump goes to.
func newDumpDir(label string) (string, error) {
	if d := os.Getenv(envDumpDir); d != "" {
		dir := filepath.Join(d, label)
		return dir, os.MkdirAll(dir, 0o755)
	}
	return os.MkdirTemp("", "qcow2-csi-e2e-dump-"+label+"-")
}

// dumpState records what helps to understand a failure, at the end of the
// failed scenario (later ones restart and uninstall the plugin): objects
// and events, the log of every container the run started, pods deleted
// since included (keepPodLogs; each restart's file, so a crashed
// container's earlier run too) and every cluster process's log, whole into
// a dump directory and as tails into the test log.
func (c *cluster) dumpState(t testing.TB, label string) {
	t.Helper()
	dir, err := newDumpDir(strings.NewReplacer("/", "-", " ", "-").Replace(label))
	if err != nil {
		t.Logf("dump: %v", err)
		return
	}
	save := func(name, content string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Logf("dump: %v", err)
		}
	}
	if p := c.proc("kube-apiserver"); p != nil && p.alive() {
		for i, a := range [][]string{
			{"get", "nodes,pods,pvc,pv,volumesnapshots,volumesnapshotcontents,volumegroupsnapshots,volumegroupsnapshotcontents,volumeattachments", "-A", "-o", "wide"},
			{"get", "events", "-A", "--sort-by=.lastTimestamp"},
			{"get", "pods,pvc,pv,volumesnapshots,volumesnapshotcontents,volumegroupsnapshots,volumegroupsnapshotcontents", "-A", "-o", "yaml"},
		} {
			out, err := c.kubectl(a...)
			save(fmt.Sprintf("kubectl-%d.txt", i), "kubectl "+strings.Join(a, " ")+"\n"+out+errOrEmpty(err))
			if i < 2 {
				t.Logf("kubectl %s:\n%s%v", strings.Join(a, " "), tailString(out, 60), errOrEmpty(err))
			}
		}
	} else {
		t.Logf("dump: kube-apiserver is not running: no objects or events")
	}
	logs, err := podLogs(c.keptLogsDir())
	if err != nil {
		t.Logf("dump: container logs: %v", err)
	}
	for _, l := range logs {
		var all strings.Builder
		for _, f := range l.files {
			b, _ := os.ReadFile(f)
			fmt.Fprintf(&all, "==> %s <==\n%s", f, b)
		}
		save(l.name()+".log", all.String())
		if len(l.files) == 0 {
			continue
		}
		last := l.files[len(l.files)-1]
		if len(l.files) > 1 {
			prev := l.files[len(l.files)-2]
			t.Logf("container %s/%s %s, previous run (%s), last lines:\n%s", l.ns, l.pod, l.container, filepath.Base(prev), tail(prev, 20))
		}
		t.Logf("container %s/%s %s (%s), last %d lines:\n%s", l.ns, l.pod, l.container, filepath.Base(last), dumpTailLines(l), tail(last, dumpTailLines(l)))
	}
	c.mu.Lock()
	procs := append([]*proc(nil), c.procs...)
	c.mu.Unlock()
	for _, p := range procs {
		b, _ := os.ReadFile(p.log)
		save("proc-"+p.name+".log", string(b))
		t.Logf("%s log (%s), last lines:\n%s", p.name, p.log, tail(p.log, 15))
	}
	t.Logf("dump %q: whole logs and objects in %s", label, dir)
}

// TestPodLogs: the dump finds every container's log files in a kubelet
// podLogsDir, in restart order (10.log after 9.log), and skips what is not
// a pod directory.
func TestPodLogs(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{
		"qcow2-csi_qcow2-csi-node-x1_uid1/qcow2-csi/0.log",
		"qcow2-csi_qcow2-csi-node-x1_uid1/qcow2-csi/10.log",
		"qcow2-csi_qcow2-csi-node-x1_uid1/qcow2-csi/9.log",
		"qcow2-csi_qcow2-csi-node-x1_uid1/csi-snapshotter/0.log",
		"e2e_restored-pod_uid2/app/0.log",
		"stray/file/0.log",
	} {
		p := filepath.Join(dir, f)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(f+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	logs, err := podLogs(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, l := range logs {
		var files []string
		for _, f := range l.files {
			files = append(files, filepath.Base(f))
		}
		got = append(got, fmt.Sprintf("%s:%s:%d", l.name(), strings.Join(files, ","), dumpTailLines(l)))
	}
	want := []string{
		"e2e_restored-pod_app:0.log:15",
		"qcow2-csi_qcow2-csi-node-x1_csi-snapshotter:0.log:40",
		"qcow2-csi_qcow2-csi-node-x1_qcow2-csi:0.log,9.log,10.log:120",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("podLogs:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}
