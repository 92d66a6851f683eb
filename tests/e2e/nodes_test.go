package e2e

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// The two nodes. Each has its own network namespace, routed to the control
// plane's over a veth pair (documentation-range /32 addresses), and its own
// mount namespace in which its directories under the cluster root are
// bind-mounted over the paths the kubelet, containerd and the driver use:
// the same paths on every node (as a DaemonSet needs), different contents.
const (
	cpIP = "198.51.100.1" // the control plane: apiserver, etcd
)

// node is one kubelet + containerd, with its namespaces.
type node struct {
	name    string
	ip      string
	podCIDR string
	netns   string
	dir     string // its directories, under the cluster root
	holder  *proc  // keeps the mount namespace; kubelet and containerd join it
	cgroup  string // the kubelet's --cgroup-root
}

func (n *node) path(p ...string) string { return filepath.Join(append([]string{n.dir}, p...)...) }

// newNodes describes the nodes of a cluster rooted at c.root.
func (c *cluster) newNodes() {
	for i, cidr := range []string{"203.0.113.0/25", "203.0.113.128/25"} {
		id := strconv.Itoa(i + 1)
		c.nodes = append(c.nodes, &node{
			name:    "e2e-node-" + id,
			ip:      "198.51.100.1" + id,
			podCIDR: cidr,
			netns:   c.netns + "-n" + id,
			dir:     c.path("nodes", "n"+id),
			cgroup:  "/" + c.netns + "-n" + id,
		})
	}
}

func (c *cluster) nodeByName(name string) *node {
	for _, n := range c.nodes {
		if n.name == name {
			return n
		}
	}
	return nil
}

// The paths a node sees as its own (bind mounts in its mount namespace).
// The kubelet dir and containerd's are the usual ones: containerd 1.6 puts
// its shims' sockets under /run/containerd whatever its config says. The
// pool and the fuse dir are per run (under the root), so that a sweep
// finds the loop devices of this run by their backing file.
const (
	kubeletView    = "/var/lib/kubelet"
	containerdRoot = "/var/lib/containerd"
	containerdRun  = "/run/containerd"
)

func (c *cluster) poolView() string { return c.path("pool") }
func (c *cluster) fuseView() string { return c.path("fuse") }

// binds lists a node's bind mounts: its directory -> the path it sees, and
// whether the mount must be shared (Bidirectional propagation into the
// plugin's container needs it).
func (c *cluster) binds(n *node) [][3]string {
	return [][3]string{
		{n.path("kubelet"), kubeletView, "shared"},
		{n.path("containerd/root"), containerdRoot, ""},
		{n.path("containerd/run"), containerdRun, ""},
		{n.path("pool"), c.poolView(), "shared"},
		{n.path("fuse"), c.fuseView(), "shared"},
	}
}

// nodePool is where the host reads a node's pool.
func (n *node) pool() string { return n.path("pool") }

// setupNetwork creates the control plane's namespace (lo carries its
// address and the `kubernetes` Service address) and one namespace per
// node, each linked to the control plane's by a veth pair with /32
// addresses and routes both ways: the node's pod range through the node,
// everything else from the node through the control plane, which forwards
// between the nodes.
func (c *cluster) setupNetwork() error {
	if _, err := run("ip", "netns", "add", c.netns); err != nil {
		return err
	}
	cp := c.netns
	cmds := [][]string{
		{"-n", cp, "link", "set", "lo", "up"},
		{"-n", cp, "addr", "add", cpIP + "/32", "dev", "lo"},
		{"-n", cp, "addr", "add", apiServiceIP + "/32", "dev", "lo"},
	}
	for i, n := range c.nodes {
		if _, err := run("ip", "netns", "add", n.netns); err != nil {
			return err
		}
		cpEnd := "n" + strconv.Itoa(i+1)
		cmds = append(cmds,
			[]string{"link", "add", cpEnd, "netns", cp, "type", "veth", "peer", "name", "e2e0", "netns", n.netns},
			[]string{"-n", cp, "link", "set", cpEnd, "up"},
			[]string{"-n", cp, "route", "add", n.ip + "/32", "dev", cpEnd},
			[]string{"-n", cp, "route", "add", n.podCIDR, "via", n.ip, "dev", cpEnd},
			[]string{"-n", n.netns, "link", "set", "lo", "up"},
			[]string{"-n", n.netns, "addr", "add", n.ip + "/32", "dev", "e2e0"},
			[]string{"-n", n.netns, "link", "set", "e2e0", "up"},
			[]string{"-n", n.netns, "route", "add", cpIP + "/32", "dev", "e2e0"},
			// Everything else (the other node, its pods, Service
			// addresses) goes through the control plane's namespace;
			// packets can only loop back into the cluster's namespaces.
			[]string{"-n", n.netns, "route", "add", "default", "via", cpIP, "dev", "e2e0", "onlink"},
		)
	}
	for _, a := range cmds {
		if _, err := run("ip", a...); err != nil {
			return err
		}
	}
	for _, ns := range append([]string{cp}, c.nodeNetns()...) {
		if _, err := run("nsenter", "--net=/run/netns/"+ns, "--", "sysctl", "-qw", "net.ipv4.ip_forward=1"); err != nil {
			return err
		}
	}
	return nil
}

func (c *cluster) nodeNetns() []string {
	var s []string
	for _, n := range c.nodes {
		s = append(s, n.netns)
	}
	return s
}

// startHolder starts the process that owns a node's mount namespace: it
// unshares one (private propagation: nothing leaks to the machine or the
// other node), bind-mounts the node's directories over the paths it sees,
// makes those that need it shared inside the namespace, and sleeps. The
// node's containerd and kubelet join it (nsenter --mount).
func (c *cluster) startHolder(n *node) error {
	var script strings.Builder
	script.WriteString("set -e\n")
	for _, b := range c.binds(n) {
		for _, d := range []string{b[0], b[1]} {
			// The mount points must exist on the machine: empty directories.
			if err := os.MkdirAll(d, 0o755); err != nil {
				return err
			}
		}
		fmt.Fprintf(&script, "mount --bind %q %q\n", b[0], b[1])
		if b[2] == "shared" {
			fmt.Fprintf(&script, "mount --make-rshared %q\n", b[1])
		}
	}
	script.WriteString("echo ready\nexec sleep 2147483647\n")
	p, err := c.startIn(n.netns, "", n.name+"-mounts", "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script.String())
	if err != nil {
		return err
	}
	n.holder = p
	return c.waitFor(n.name+" mount namespace", 30*time.Second, p, func() error {
		b, _ := os.ReadFile(p.log)
		if !strings.Contains(string(b), "ready") {
			return fmt.Errorf("binds not done")
		}
		return nil
	})
}

// startIn launches a long-running component in network namespace netns and,
// when mntPID is set, the mount namespace of that process; output to
// root/logs/name.log.
func (c *cluster) startIn(netns, mntPID, name, bin string, args ...string) (*proc, error) {
	if err := os.MkdirAll(c.path("logs"), 0o755); err != nil {
		return nil, err
	}
	logPath := c.path("logs", name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	ns := []string{"--net=/run/netns/" + netns}
	if mntPID != "" {
		ns = append(ns, "--mount=/proc/"+mntPID+"/ns/mnt")
	}
	cmd := exec.CommandContext(context.Background(), "nsenter", append(append(ns, "--", bin), args...)...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = append(os.Environ(), "HOME="+c.path("home"))
	// Own process group: a ^C to `go test` reaches the harness, which then
	// tears the cluster down in order instead of every process dying at once.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() { cmd.Wait(); f.Close(); close(p.done) }()
	c.mu.Lock()
	c.procs = append(c.procs, p)
	c.mu.Unlock()
	return p, nil
}

// startOn launches a component of node n: in its network and mount
// namespaces.
func (c *cluster) startOn(n *node, name, bin string, args ...string) (*proc, error) {
	return c.startIn(n.netns, strconv.Itoa(n.holder.cmd.Process.Pid), n.name+"-"+name, bin, args...)
}

// mountsOn lists the mount points under prefix in node n's mount namespace.
func (n *node) mountsOn(prefix string) []string {
	if n.holder == nil || !n.holder.alive() {
		return nil
	}
	return mountsIn("/proc/"+strconv.Itoa(n.holder.cmd.Process.Pid)+"/mountinfo", prefix)
}

// cgroupDirs returns a node's cgroup-root directories, one per hierarchy.
func cgroupDirs(cgroup string) []string {
	dirs, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", cgroup))
	if d := filepath.Join("/sys/fs/cgroup", cgroup); isDir(d) {
		dirs = append(dirs, d)
	}
	return dirs
}

func isDir(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}

// makeCgroupRoot creates the kubelet's --cgroup-root in every v1 hierarchy
// (the kubelet refuses a root that does not exist), with the parent's
// cpuset so that tasks may join.
func makeCgroupRoot(cgroup string) error {
	hier, _ := filepath.Glob("/sys/fs/cgroup/*")
	for _, h := range hier {
		if !isDir(h) || filepath.Base(h) == "unified" {
			continue
		}
		if _, err := os.Stat(filepath.Join(h, "cgroup.procs")); err != nil {
			continue
		}
		d := filepath.Join(h, cgroup)
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
		if filepath.Base(h) == "cpuset" {
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				b, err := os.ReadFile(filepath.Join(h, f))
				if err != nil {
					return err
				}
				if err := os.WriteFile(filepath.Join(d, f), b, 0o644); err != nil {
					return fmt.Errorf("%s: %w", filepath.Join(d, f), err)
				}
			}
		}
	}
	return nil
}

// pidsOfNode returns the processes of a node: those in its network
// namespace (its mount holder, containerd, the shims, the kubelet and the
// pods that run with hostNetwork) and those in its cgroup root (every pod
// container).
func pidsOfNode(netns, cgroup string) []int {
	var pids []int
	var st syscall.Stat_t
	if netns != "" && syscall.Stat("/run/netns/"+netns, &st) == nil {
		pids = processes(func(pid string) bool {
			var ps syscall.Stat_t
			return syscall.Stat("/proc/"+pid+"/ns/net", &ps) == nil && ps.Ino == st.Ino && ps.Dev == st.Dev
		})
	}
	for _, d := range cgroupDirs(cgroup) {
		filepath.WalkDir(d, func(p string, e os.DirEntry, err error) error {
			if err != nil || e.IsDir() || e.Name() != "cgroup.procs" {
				return nil
			}
			b, _ := os.ReadFile(p)
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil {
					pids = append(pids, pid)
				}
			}
			return nil
		})
	}
	return pids
}

// removeCgroup removes a cgroup root and everything below, deepest first.
func removeCgroup(cgroup string) {
	for _, d := range cgroupDirs(cgroup) {
		var all []string
		filepath.WalkDir(d, func(p string, e os.DirEntry, err error) error {
			if err == nil && e.IsDir() {
				all = append(all, p)
			}
			return nil
		})
		for i := len(all) - 1; i >= 0; i-- {
			os.Remove(all[i])
		}
	}
}

// mountsIn lists the mount points under prefix in a mountinfo file,
// deepest first.
func mountsIn(mountinfo, prefix string) []string {
	f, err := os.Open(mountinfo)
	if err != nil {
		return nil
	}
	defer f.Close()
	var ms []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 5 {
			continue
		}
		mp := unescapeMount(fs[4])
		if mp == prefix || strings.HasPrefix(mp, prefix+"/") {
			ms = append(ms, mp)
		}
	}
	sortDeepestFirst(ms)
	return ms
}

// processes returns the PIDs (but this process's) for which match holds.
func processes(match func(pid string) bool) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	self := os.Getpid()
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		if match(e.Name()) {
			pids = append(pids, pid)
		}
	}
	return pids
}
