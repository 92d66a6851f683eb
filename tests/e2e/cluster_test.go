package e2e

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
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

// Addresses: documentation ranges only (RFC 5737), all inside the netns.
const (
	nodeIP       = "198.51.100.10" // node end of the veth pair: apiserver, kubelet
	peerIP       = "198.51.100.11" // the other end, in the same namespace
	podCIDR      = "203.0.113.0/24"
	serviceCIDR  = "192.0.2.0/24"
	apiServiceIP = "192.0.2.1" // the `kubernetes` Service: a local address the apiserver listens on
	dnsIP        = "192.0.2.10"
	apiPort      = "443"
	nodeName     = "e2e-node"
	rootPrefix   = "/tmp/qcow2-e2e-"
	netnsPrefix  = "qcow2-e2e-"
)

// proc is one cluster process started by the harness, stopped by its PID.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

// cluster is a single-node Kubernetes running in its own network namespace
// with all state under root.
type cluster struct {
	t       testing.TB
	root    string
	netns   string
	bin     string // tools from hack/e2e/build-tools.sh
	pki     *pki
	admin   string // admin kubeconfig
	procs   []*proc
	mu      sync.Mutex
	steps   []stepTime
	cniNS   map[string]bool // network namespaces that existed before containerd started
	mounted bool            // root is bind-mounted on itself (rshared)
	dumped  bool            // a failed scenario dumped the state already
}

type stepTime struct {
	name string
	d    time.Duration
}

func (c *cluster) path(p ...string) string { return filepath.Join(append([]string{c.root}, p...)...) }

// step runs f and records how long it took, for the report.
func (c *cluster) step(name string, f func() error) error {
	t0 := time.Now()
	err := f()
	d := time.Since(t0)
	c.mu.Lock()
	c.steps = append(c.steps, stepTime{name, d})
	c.mu.Unlock()
	c.t.Logf("step %-40s %6.1fs%s", name, d.Seconds(), map[bool]string{true: " FAILED: " + fmt.Sprint(err), false: ""}[err != nil])
	return err
}

// report returns the step table.
func (c *cluster) report() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var b strings.Builder
	for _, s := range c.steps {
		fmt.Fprintf(&b, "%-44s %7.1f s\n", s.name, s.d.Seconds())
	}
	return b.String()
}

func run(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// inNS returns a command that runs in the cluster's network namespace but in
// the machine's mount namespace (nsenter --net only; `ip netns exec` would
// give each process a private mount namespace and break mount propagation
// between the kubelet, containerd and the driver).
func (c *cluster) inNS(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "nsenter", append([]string{"--net=/run/netns/" + c.netns, "--", name}, args...)...)
}

// start launches a long-running component in the namespace, output to
// root/logs/name.log.
func (c *cluster) start(name, bin string, args ...string) (*proc, error) {
	if err := os.MkdirAll(c.path("logs"), 0o755); err != nil {
		return nil, err
	}
	logPath := c.path("logs", name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := c.inNS(context.Background(), bin, args...)
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

func (p *proc) alive() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// stop sends SIGTERM to the process (by PID), then SIGKILL after grace.
func (p *proc) stop(grace time.Duration) {
	if !p.alive() {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		p.cmd.Process.Kill()
		<-p.done
	}
}

func (c *cluster) proc(name string) *proc {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, p := range c.procs {
		if p.name == name {
			return p
		}
	}
	return nil
}

func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// waitFor polls f until it returns nil or timeout passes; a dead process
// named in watch ends the wait early with its log.
func (c *cluster) waitFor(what string, timeout time.Duration, watch *proc, f func() error) error {
	deadline := time.Now().Add(timeout)
	var err error
	for {
		if err = f(); err == nil {
			return nil
		}
		if watch != nil && !watch.alive() {
			return fmt.Errorf("%s: %s exited: %v\n%s", what, watch.name, err, tail(watch.log, 30))
		}
		if time.Now().After(deadline) {
			msg := fmt.Sprintf("%s: not after %s: %v", what, timeout, err)
			if watch != nil {
				msg += "\n" + tail(watch.log, 30)
			}
			return errors.New(msg)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// kubectl runs kubectl in the namespace as cluster admin.
func (c *cluster) kubectl(args ...string) (string, error) {
	return c.kubectlIn("", args...)
}

func (c *cluster) kubectlIn(stdin string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := c.inNS(ctx, filepath.Join(c.bin, "kubectl"), append([]string{"--kubeconfig", c.admin}, args...)...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("kubectl %s: %v: %s%s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()), strings.TrimSpace(out.String()))
	}
	return out.String(), nil
}

// apply applies a manifest.
func (c *cluster) apply(manifest string) error {
	_, err := c.kubectlIn(manifest, "apply", "-f", "-")
	return err
}

// helm runs the built helm in the namespace with its state under root/helm.
func (c *cluster) helm(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	cmd := c.inNS(ctx, filepath.Join(c.bin, "helm"), append([]string{"--kubeconfig", c.admin}, args...)...)
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+c.path("helm/cache"), "HELM_CONFIG_HOME="+c.path("helm/config"), "HELM_DATA_HOME="+c.path("helm/data"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("helm %s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

func (c *cluster) ctr(args ...string) (string, error) {
	return run("ctr", append([]string{"-a", c.path("containerd/containerd.sock"), "-n", "k8s.io"}, args...)...)
}

func netnsList() map[string]bool {
	m := map[string]bool{}
	ents, _ := os.ReadDir("/run/netns")
	for _, e := range ents {
		m[e.Name()] = true
	}
	return m
}

// setupNetwork creates the namespace: lo, the veth pair with both ends in
// it, and the Service address of the apiserver on lo.
func (c *cluster) setupNetwork() error {
	if _, err := run("ip", "netns", "add", c.netns); err != nil {
		return err
	}
	cmds := [][]string{
		{"link", "add", "e2e0", "netns", c.netns, "type", "veth", "peer", "name", "e2e1", "netns", c.netns},
		{"-n", c.netns, "link", "set", "lo", "up"},
		{"-n", c.netns, "addr", "add", nodeIP + "/24", "dev", "e2e0"},
		{"-n", c.netns, "addr", "add", peerIP + "/24", "dev", "e2e1"},
		{"-n", c.netns, "link", "set", "e2e0", "up"},
		{"-n", c.netns, "link", "set", "e2e1", "up"},
		{"-n", c.netns, "addr", "add", apiServiceIP + "/32", "dev", "lo"},
		// A default route keeps components that look for "the host's
		// interface" happy; packets can only loop back into this namespace.
		{"-n", c.netns, "route", "add", "default", "dev", "e2e0"},
	}
	for _, a := range cmds {
		if _, err := run("ip", a...); err != nil {
			return err
		}
	}
	return nil
}

// writeFile writes content under root.
func (c *cluster) writeFile(rel, content string) (string, error) {
	p := c.path(rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return "", err
	}
	return p, os.WriteFile(p, []byte(content), 0o644)
}

func (c *cluster) genPKI() error {
	p, err := newPKI(c.path("pki"))
	if err != nil {
		return err
	}
	c.pki = p
	local := []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP(nodeIP), net.ParseIP(apiServiceIP)}
	issues := []struct {
		name, cn string
		orgs     []string
		ips      []net.IP
		dns      []string
	}{
		{"apiserver", "kube-apiserver", nil, local, []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}},
		{"admin", "admin", []string{"system:masters"}, nil, nil},
		{"kcm", "system:kube-controller-manager", nil, nil, nil},
		{"scheduler", "system:kube-scheduler", nil, nil, nil},
		{"kubelet", "system:node:" + nodeName, []string{"system:nodes"}, nil, nil},
		{"kubelet-serving", "system:node:" + nodeName, []string{"system:nodes"}, []net.IP{net.ParseIP(nodeIP), net.ParseIP("127.0.0.1")}, []string{nodeName}},
		{"apiserver-kubelet-client", "kube-apiserver-kubelet-client", []string{"system:masters"}, nil, nil},
	}
	for _, i := range issues {
		if err := p.issue(i.name, i.cn, i.orgs, i.ips, i.dns); err != nil {
			return err
		}
	}
	server := "https://" + nodeIP + ":" + apiPort
	for _, n := range []string{"admin", "kcm", "scheduler", "kubelet"} {
		path, err := p.kubeconfig(n, server)
		if err != nil {
			return err
		}
		if n == "admin" {
			c.admin = path
		}
	}
	return nil
}

func (c *cluster) startEtcd() error {
	p, err := c.start("etcd", filepath.Join(c.bin, "etcd"),
		"--name=e2e", "--data-dir="+c.path("etcd"),
		"--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
		"--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
		"--initial-cluster=e2e=http://127.0.0.1:2380", "--initial-cluster-state=new",
		"--listen-metrics-urls=http://127.0.0.1:2381",
		"--quota-backend-bytes=1073741824", "--unsafe-no-fsync")
	if err != nil {
		return err
	}
	// The apiserver's readiness below covers etcd's; only catch an early exit.
	time.Sleep(300 * time.Millisecond)
	if !p.alive() {
		return fmt.Errorf("etcd exited:\n%s", tail(p.log, 30))
	}
	return nil
}

func (c *cluster) startAPIServer() error {
	P := c.pki.path
	p, err := c.start("kube-apiserver", filepath.Join(c.bin, "kube-apiserver"),
		"--etcd-servers=http://127.0.0.1:2379",
		// 0.0.0.0 of the cluster's own namespace: the node address and the
		// Service address 192.0.2.1, so pods reach it without kube-proxy.
		"--bind-address=0.0.0.0", "--secure-port="+apiPort, "--advertise-address="+nodeIP,
		"--tls-cert-file="+P("apiserver.crt"), "--tls-private-key-file="+P("apiserver.key"),
		"--client-ca-file="+P("ca.crt"),
		"--service-account-issuer=https://kubernetes.default.svc", "--service-account-key-file="+P("sa.pub"),
		"--service-account-signing-key-file="+P("sa.key"), "--service-cluster-ip-range="+serviceCIDR,
		"--authorization-mode=Node,RBAC", "--allow-privileged=true",
		"--kubelet-client-certificate="+P("apiserver-kubelet-client.crt"), "--kubelet-client-key="+P("apiserver-kubelet-client.key"),
		"--kubelet-certificate-authority="+P("ca.crt"), "--kubelet-preferred-address-types=InternalIP",
		"--enable-priority-and-fairness=false", "--profiling=false")
	if err != nil {
		return err
	}
	return c.waitFor("kube-apiserver /readyz", 3*time.Minute, p, func() error {
		_, err := c.kubectl("get", "--raw", "/readyz")
		return err
	})
}

func (c *cluster) startControllers() error {
	P := c.pki.path
	kcm, err := c.start("kube-controller-manager", filepath.Join(c.bin, "kube-controller-manager"),
		"--kubeconfig="+P("kcm.kubeconfig"), "--authentication-kubeconfig="+P("kcm.kubeconfig"),
		"--authorization-kubeconfig="+P("kcm.kubeconfig"), "--bind-address=127.0.0.1", "--secure-port=10257",
		"--leader-elect=false", "--service-account-private-key-file="+P("sa.key"), "--root-ca-file="+P("ca.crt"),
		"--cluster-signing-cert-file="+P("ca.crt"), "--cluster-signing-key-file="+P("ca.key"),
		"--use-service-account-credentials=true", "--controllers=*",
		"--service-cluster-ip-range="+serviceCIDR)
	if err != nil {
		return err
	}
	sched, err := c.start("kube-scheduler", filepath.Join(c.bin, "kube-scheduler"),
		"--kubeconfig="+P("scheduler.kubeconfig"), "--authentication-kubeconfig="+P("scheduler.kubeconfig"),
		"--authorization-kubeconfig="+P("scheduler.kubeconfig"), "--bind-address=127.0.0.1", "--secure-port=10259",
		"--leader-elect=false")
	if err != nil {
		return err
	}
	time.Sleep(time.Second)
	for _, p := range []*proc{kcm, sched} {
		if !p.alive() {
			return fmt.Errorf("%s exited:\n%s", p.name, tail(p.log, 30))
		}
	}
	return nil
}

func (c *cluster) startSnapshotController() error {
	p, err := c.start("snapshot-controller", filepath.Join(c.bin, "snapshot-controller"),
		"--kubeconfig="+c.admin, "--leader-election=false", "--v=2",
		// The chart runs csi-snapshotter per node (node-deployment): the
		// controller labels each content with the node that must take it.
		"--enable-distributed-snapshotting")
	if err != nil {
		return err
	}
	time.Sleep(500 * time.Millisecond)
	if !p.alive() {
		return fmt.Errorf("snapshot-controller exited:\n%s", tail(p.log, 30))
	}
	return nil
}

func (c *cluster) startContainerd(images []string) error {
	C := c.path("containerd")
	cni := fmt.Sprintf(`{"cniVersion":"0.4.0","name":"e2e","plugins":[
 {"type":"bridge","bridge":"e2ebr0","isGateway":true,"ipMasq":false,"hairpinMode":true,
  "ipam":{"type":"host-local","ranges":[[{"subnet":%q}]],"routes":[{"dst":"0.0.0.0/0"}],"dataDir":%q}},
 {"type":"portmap","capabilities":{"portMappings":true}}]}
`, podCIDR, c.path("cni/ipam"))
	if _, err := c.writeFile("cni/net.d/10-e2e.conflist", cni); err != nil {
		return err
	}
	cfg := fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
[grpc]
  address = %[3]q
[plugins."io.containerd.internal.v1.opt"]
  path = %[4]q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[5]q
  enable_cdi = false
  # root has no CAP_SYS_RESOURCE here: runc cannot lower oom_score_adj
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = %[6]q
        Root = %[7]q
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = %[8]q
`, C+"/root", C+"/state", C+"/containerd.sock", C+"/opt", pauseRef, runcPath(), C+"/runc", c.path("cni/net.d"))
	cfgPath, err := c.writeFile("containerd/config.toml", cfg)
	if err != nil {
		return err
	}
	c.cniNS = netnsList()
	p, err := c.start("containerd", "containerd", "--config", cfgPath)
	if err != nil {
		return err
	}
	if err := c.waitFor("containerd", time.Minute, p, func() error {
		_, err := c.ctr("version")
		return err
	}); err != nil {
		return err
	}
	for _, img := range images {
		if _, err := c.ctr("images", "import", img); err != nil {
			return err
		}
	}
	return nil
}

func runcPath() string {
	for _, p := range []string{"/usr/sbin/runc", "/usr/bin/runc"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return "runc"
}

func (c *cluster) startKubelet() error {
	P := c.pki.path
	resolv, err := c.writeFile("resolv.conf", "nameserver "+dnsIP+"\n")
	if err != nil {
		return err
	}
	cfg := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: %q}
authorization: {mode: Webhook}
address: %s
port: 10250
healthzBindAddress: 127.0.0.1
healthzPort: 10248
readOnlyPort: 0
tlsCertFile: %q
tlsPrivateKeyFile: %q
containerRuntimeEndpoint: unix://%s
imageServiceEndpoint: unix://%s
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
clusterDomain: cluster.local
clusterDNS: [%s]
resolvConf: %q
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {"memory.available": "100Mi", "nodefs.available": "1%%", "imagefs.available": "1%%"}
podPidsLimit: -1
protectKernelDefaults: false
registerNode: true
syncFrequency: 5s
fileCheckFrequency: 5s
podLogsDir: %q
nodeStatusUpdateFrequency: 5s
`, P("ca.crt"), nodeIP, P("kubelet-serving.crt"), P("kubelet-serving.key"),
		c.path("containerd/containerd.sock"), c.path("containerd/containerd.sock"), dnsIP, resolv, c.podLogsDir())
	cfgPath, err := c.writeFile("kubelet/config.yaml", cfg)
	if err != nil {
		return err
	}
	p, err := c.start("kubelet", filepath.Join(c.bin, "kubelet"),
		"--config="+cfgPath, "--kubeconfig="+P("kubelet.kubeconfig"), "--root-dir="+c.path("kubelet/root"),
		"--hostname-override="+nodeName, "--node-ip="+nodeIP, "--v=2")
	if err != nil {
		return err
	}
	return c.waitFor("node Ready", 3*time.Minute, p, func() error {
		out, err := c.kubectl("get", "node", nodeName, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`)
		if err != nil {
			return err
		}
		if strings.TrimSpace(out) != "True" {
			return fmt.Errorf("Ready=%q", out)
		}
		return nil
	})
}

// kubeletDir is the kubelet's --root-dir, what the chart's kubeletDir names.
func (c *cluster) kubeletDir() string { return c.path("kubelet/root") }

// mountinfo lists mount points under prefix, deepest first.
func mountsUnder(prefix string) []string {
	f, err := os.Open("/proc/self/mountinfo")
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
	// Deepest first; later mounts on the same point come later in mountinfo.
	sort.SliceStable(ms, func(i, j int) bool { return strings.Count(ms[i], "/") > strings.Count(ms[j], "/") })
	return ms
}

func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// loopsBackedUnder returns loop devices whose backing file is under prefix.
func loopsBackedUnder(prefix string) []string {
	var devs []string
	ents, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, e := range ents {
		b, err := os.ReadFile(e)
		if err != nil {
			continue
		}
		if bf := strings.TrimSpace(string(b)); strings.HasPrefix(bf, prefix+"/") {
			devs = append(devs, "/dev/"+filepath.Base(filepath.Dir(filepath.Dir(e))))
		}
	}
	return devs
}

// pidsMentioning returns processes whose command line names prefix: the
// containerd shims (their -address is under root) and anything else the
// cluster started with a path of ours.
func pidsMentioning(prefix string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	self := os.Getpid()
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil {
			continue
		}
		if bytes.Contains(b, []byte(prefix+"/")) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// podPIDs returns the processes of pods, from the kubelet's cgroup tree.
func podPIDs() []int {
	var pids []int
	filepath.WalkDir("/sys/fs/cgroup/pids/kubepods", func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || d.Name() != "cgroup.procs" {
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
	return pids
}

// teardown stops everything, in an order that lets the kubelet and the
// driver unmount and detach first, then force-cleans whatever is left.
// Errors are collected, never stop the teardown.
func (c *cluster) teardown() []error {
	var errs []error
	if p := c.proc("kube-apiserver"); p != nil && p.alive() {
		if k := c.proc("kubelet"); k != nil && k.alive() {
			// Workloads first so the node plugin (still running) unstages
			// their volumes; then everything else.
			c.kubectl("delete", "pods", "--all", "-n", testNS, "--grace-period=1", "--timeout=90s")
			c.kubectl("delete", "daemonsets,deployments,replicasets", "--all", "-A", "--timeout=60s")
			c.kubectl("delete", "pods", "--all", "-A", "--grace-period=1", "--timeout=60s")
		}
	}
	for _, n := range []string{"snapshot-controller", "kubelet"} {
		if p := c.proc(n); p != nil {
			p.stop(15 * time.Second)
		}
	}
	if p := c.proc("containerd"); p != nil && p.alive() {
		if out, err := c.ctr("tasks", "ls", "-q"); err == nil {
			for _, id := range strings.Fields(out) {
				c.ctr("tasks", "kill", "-s", "KILL", id)
			}
			time.Sleep(time.Second)
			for _, id := range strings.Fields(out) {
				c.ctr("tasks", "delete", "-f", id)
			}
		}
	}
	for _, pid := range podPIDs() {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	if p := c.proc("containerd"); p != nil {
		p.stop(15 * time.Second)
	}
	for _, n := range []string{"kube-controller-manager", "kube-scheduler", "kube-apiserver", "etcd"} {
		if p := c.proc(n); p != nil {
			p.stop(20 * time.Second)
		}
	}
	c.mu.Lock()
	for _, p := range c.procs {
		if p.alive() {
			p.cmd.Process.Kill()
		}
	}
	c.mu.Unlock()
	errs = append(errs, sweep(c.root, c.netns, c.cniNS)...)
	return errs
}

// sweep removes what a cluster rooted at root may have left: processes
// naming root (shims), mounts and loop devices under it, the pods' network
// namespaces created since before (nil: none), the cluster namespace, the
// kubelet's cgroups, and the directory itself. It is also run on the
// remains of a previous run that was killed.
func sweep(root, netns string, before map[string]bool) []error {
	var errs []error
	for i := 0; i < 3; i++ {
		// Pod processes (from the kubelet's cgroups) and the processes that
		// name our directory: components, containerd shims.
		pids := append(pidsMentioning(root), podPIDs()...)
		if len(pids) == 0 {
			break
		}
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(500 * time.Millisecond)
	}
	for i := 0; i < 3; i++ {
		ms := mountsUnder(root)
		if len(ms) == 0 {
			break
		}
		for _, m := range ms {
			if err := syscall.Unmount(m, syscall.MNT_DETACH); err != nil && i == 2 {
				errs = append(errs, fmt.Errorf("umount %s: %w", m, err))
			}
		}
	}
	for _, d := range loopsBackedUnder(root) {
		if _, err := run("losetup", "-d", d); err != nil {
			errs = append(errs, err)
		}
	}
	for n := range netnsList() {
		if !strings.HasPrefix(n, "cni-") {
			continue
		}
		// The pods' namespaces: those created since containerd started or,
		// for the remains of a killed run (before == nil), those no process
		// uses any more.
		if before != nil && !before[n] {
			run("ip", "netns", "delete", n)
		} else if before == nil {
			if out, err := run("ip", "netns", "pids", n); err == nil && strings.TrimSpace(out) == "" {
				run("ip", "netns", "delete", n)
			}
		}
	}
	if netnsList()[netns] {
		if _, err := run("ip", "netns", "delete", netns); err != nil {
			errs = append(errs, err)
		}
	}
	// The kubelet's pod cgroups (cgroupfs driver), deepest first.
	for _, base := range []string{"/sys/fs/cgroup/*/kubepods", "/sys/fs/cgroup/kubepods"} {
		dirs, _ := filepath.Glob(base)
		for _, d := range dirs {
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
	if ms := mountsUnder(root); len(ms) > 0 {
		// Never RemoveAll through a mount point.
		return append(errs, fmt.Errorf("mounts left under %s: %v; not removing it", root, ms))
	}
	if err := os.RemoveAll(root); err != nil {
		errs = append(errs, err)
	}
	return errs
}

// sweepStale cleans the remains of earlier runs whose test process is gone.
func sweepStale(t testing.TB) {
	dirs, _ := filepath.Glob(rootPrefix + "*")
	for _, d := range dirs {
		pid, err := strconv.Atoi(strings.TrimPrefix(d, rootPrefix))
		if err != nil || syscall.Kill(pid, 0) == nil {
			continue
		}
		t.Logf("cleaning remains of e2e run %d", pid)
		for _, err := range sweep(d, netnsPrefix+strconv.Itoa(pid), nil) {
			t.Logf("  %v", err)
		}
	}
}
