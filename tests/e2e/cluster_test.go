package e2e

import (
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

// Addresses: documentation ranges only (RFC 5737), all inside the
// cluster's namespaces (nodes_test.go: cpIP, the nodes' addresses and pod
// ranges).
const (
	serviceCIDR  = "192.0.2.0/24"
	apiServiceIP = "192.0.2.1" // the `kubernetes` Service: a local address the apiserver listens on
	dnsIP        = "192.0.2.10"
	apiPort      = "443"
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

// cluster is a two-node Kubernetes: the control plane in its own network
// namespace, each node in its own network and mount namespaces, all state
// under root.
type cluster struct {
	t      testing.TB
	root   string
	netns  string // the control plane's
	nodes  []*node
	bin    string // tools from hack/e2e/build-tools.sh
	pki    *pki
	admin  string // admin kubeconfig
	procs  []*proc
	mu     sync.Mutex
	steps  []stepTime
	cniNS  map[string]bool // network namespaces that existed before containerd started
	dumped bool            // a failed scenario dumped the state already
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

// inNS returns a command that runs in the control plane's network
// namespace but in the machine's mount namespace (nsenter --net only).
func (c *cluster) inNS(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "nsenter", append([]string{"--net=/run/netns/" + c.netns, "--", name}, args...)...)
}

// start launches a control plane component, output to root/logs/name.log.
func (c *cluster) start(name, bin string, args ...string) (*proc, error) {
	return c.startIn(c.netns, "", name, bin, args...)
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

// ctr runs ctr against node n's containerd (its socket, seen from the
// machine through the node's directory).
func (c *cluster) ctr(n *node, args ...string) (string, error) {
	return run("ctr", append([]string{"-a", n.path("containerd/run/containerd.sock"), "-n", "k8s.io"}, args...)...)
}

func netnsList() map[string]bool {
	m := map[string]bool{}
	ents, _ := os.ReadDir("/run/netns")
	for _, e := range ents {
		m[e.Name()] = true
	}
	return m
}

func (c *cluster) genPKI() error {
	p, err := newPKI(c.path("pki"))
	if err != nil {
		return err
	}
	c.pki = p
	local := []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP(cpIP), net.ParseIP(apiServiceIP)}
	type cert struct {
		name, cn string
		orgs     []string
		ips      []net.IP
		dns      []string
	}
	issues := []cert{
		{"apiserver", "kube-apiserver", nil, local, []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}},
		{"admin", "admin", []string{"system:masters"}, nil, nil},
		{"kcm", "system:kube-controller-manager", nil, nil, nil},
		{"scheduler", "system:kube-scheduler", nil, nil, nil},
		{"apiserver-kubelet-client", "kube-apiserver-kubelet-client", []string{"system:masters"}, nil, nil},
	}
	kubeconfigs := []string{"admin", "kcm", "scheduler"}
	for _, n := range c.nodes {
		issues = append(issues,
			cert{"kubelet-" + n.name, "system:node:" + n.name, []string{"system:nodes"}, nil, nil},
			cert{"kubelet-serving-" + n.name, "system:node:" + n.name, []string{"system:nodes"}, []net.IP{net.ParseIP(n.ip), net.ParseIP("127.0.0.1")}, []string{n.name}})
		kubeconfigs = append(kubeconfigs, "kubelet-"+n.name)
	}
	for _, i := range issues {
		if err := p.issue(i.name, i.cn, i.orgs, i.ips, i.dns); err != nil {
			return err
		}
	}
	server := "https://" + cpIP + ":" + apiPort
	for _, n := range kubeconfigs {
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
		"--bind-address=0.0.0.0", "--secure-port="+apiPort, "--advertise-address="+cpIP,
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
		// -v=4: its log shows each sync that failed and will be retried,
		// and (from -v=3) each request held by its client-side limit.
		"--kubeconfig="+c.admin, "--leader-election=false", "--v=4",
		// Upstream's 5 requests/s (burst 10) held every request of
		// scenario 35's 20 group snapshots about 4 s: each costs it some
		// 35 requests (the group, its content, then per member a content
		// and a snapshot created, bound and given their status), so the
		// groups became ready one every 6 s. This apiserver is ours alone.
		"--kube-api-qps=100", "--kube-api-burst=200",
		// A group's members are deleted only once the group is gone, and
		// nothing requeues them then: each waits out its own retry timer,
		// which doubles from 1 s per refusal (up to 5 min upstream). With
		// 20 groups deleted at once the last members lingered a minute
		// after their groups in scenario 35.
		"--retry-interval-max=2s",
		// The previous chart (the upgrade scenario) ran csi-snapshotter per
		// node, which takes only the contents labelled with its node; the
		// central one of this chart takes every content either way.
		"--enable-distributed-snapshotting",
		// Off by default in v8.6: VolumeGroupSnapshots (group_test.go)
		// need it here and in the chart's csi-snapshotter.
		"--feature-gates=CSIVolumeGroupSnapshot=true")
	if err != nil {
		return err
	}
	time.Sleep(500 * time.Millisecond)
	if !p.alive() {
		return fmt.Errorf("snapshot-controller exited:\n%s", tail(p.log, 30))
	}
	return nil
}

// startContainerd starts node n's mount namespace and containerd, and
// imports the images. Its paths are the usual ones as the node sees them
// (nodes_test.go binds); CNI config and IPAM state are the node's own.
func (c *cluster) startContainerd(n *node, images []string) error {
	if err := c.startHolder(n); err != nil {
		return err
	}
	cni := fmt.Sprintf(`{"cniVersion":"0.4.0","name":"e2e","plugins":[
 {"type":"bridge","bridge":"e2ebr0","isGateway":true,"ipMasq":false,"hairpinMode":true,
  "ipam":{"type":"host-local","ranges":[[{"subnet":%q}]],"routes":[{"dst":"0.0.0.0/0"}],"dataDir":%q}},
 {"type":"portmap","capabilities":{"portMappings":true}}]}
`, n.podCIDR, n.path("cni/ipam"))
	if err := writeFileAt(n.path("cni/net.d/10-e2e.conflist"), cni); err != nil {
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
`, containerdRoot, containerdRun, containerdRun+"/containerd.sock", containerdRoot+"/opt", pauseRef, runcPath(), containerdRun+"/runc", n.path("cni/net.d"))
	cfgPath := n.path("containerd/config.toml")
	if err := writeFileAt(cfgPath, cfg); err != nil {
		return err
	}
	p, err := c.startOn(n, "containerd", "containerd", "--config", cfgPath)
	if err != nil {
		return err
	}
	if err := c.waitFor(n.name+" containerd", time.Minute, p, func() error {
		_, err := c.ctr(n, "version")
		return err
	}); err != nil {
		return err
	}
	for _, img := range images {
		if _, err := c.ctr(n, "images", "import", img); err != nil {
			return err
		}
	}
	return nil
}

func writeFileAt(p, content string) error {
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	return os.WriteFile(p, []byte(content), 0o644)
}

func runcPath() string {
	for _, p := range []string{"/usr/sbin/runc", "/usr/bin/runc"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return "runc"
}

// startKubelet starts node n's kubelet (root dir /var/lib/kubelet as the
// node sees it, pods under its own --cgroup-root, logs in its directory)
// and waits for the node to be Ready.
func (c *cluster) startKubelet(n *node) error {
	P := c.pki.path
	resolv := n.path("resolv.conf")
	if err := writeFileAt(resolv, "nameserver "+dnsIP+"\n"); err != nil {
		return err
	}
	if err := makeCgroupRoot(n.cgroup); err != nil {
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
cgroupRoot: %s
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
`, P("ca.crt"), n.ip, P("kubelet-serving-"+n.name+".crt"), P("kubelet-serving-"+n.name+".key"),
		containerdRun+"/containerd.sock", containerdRun+"/containerd.sock", n.cgroup, dnsIP, resolv, c.podLogsDir(n))
	cfgPath := n.path("kubelet-config.yaml")
	if err := writeFileAt(cfgPath, cfg); err != nil {
		return err
	}
	p, err := c.startOn(n, "kubelet", filepath.Join(c.bin, "kubelet"),
		"--config="+cfgPath, "--kubeconfig="+P("kubelet-"+n.name+".kubeconfig"), "--root-dir="+kubeletView,
		"--hostname-override="+n.name, "--node-ip="+n.ip, "--v=2")
	if err != nil {
		return err
	}
	return c.waitFor(n.name+" Ready", 3*time.Minute, p, func() error {
		out, err := c.kubectl("get", "node", n.name, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`)
		if err != nil {
			return err
		}
		if strings.TrimSpace(out) != "True" {
			return fmt.Errorf("Ready=%q", out)
		}
		return nil
	})
}

// kubeletDir is the kubelet's --root-dir as every node sees it, what the
// chart's kubeletDir names.
func (c *cluster) kubeletDir() string { return kubeletView }

// mountsUnder lists the machine's mount points under prefix, deepest first.
func mountsUnder(prefix string) []string { return mountsIn("/proc/self/mountinfo", prefix) }

// sortDeepestFirst orders mount points for unmounting; later mounts on the
// same point come later in mountinfo and stay after (stable sort).
func sortDeepestFirst(ms []string) {
	sort.SliceStable(ms, func(i, j int) bool { return strings.Count(ms[i], "/") > strings.Count(ms[j], "/") })
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
	return processes(func(pid string) bool {
		b, err := os.ReadFile("/proc/" + pid + "/cmdline")
		return err == nil && bytes.Contains(b, []byte(prefix+"/"))
	})
}

// teardown stops everything, in an order that lets the kubelets and the
// driver unmount and detach first, then force-cleans whatever is left.
// Errors are collected, never stop the teardown.
func (c *cluster) teardown() []error {
	var errs []error
	if p := c.proc("kube-apiserver"); p != nil && p.alive() && c.kubeletsAlive() {
		// Workloads first so the node plugins (still running) unstage
		// their volumes; then everything else.
		c.kubectl("delete", "pods", "--all", "-n", testNS, "--grace-period=1", "--timeout=90s")
		c.kubectl("delete", "daemonsets,deployments,replicasets", "--all", "-A", "--timeout=60s")
		c.kubectl("delete", "pods", "--all", "-A", "--grace-period=1", "--timeout=60s")
	}
	if p := c.proc("snapshot-controller"); p != nil {
		p.stop(15 * time.Second)
	}
	for _, n := range c.nodes {
		if p := c.proc(n.name + "-kubelet"); p != nil {
			p.stop(15 * time.Second)
		}
	}
	for _, n := range c.nodes {
		if p := c.proc(n.name + "-containerd"); p != nil && p.alive() {
			if out, err := c.ctr(n, "tasks", "ls", "-q"); err == nil {
				for _, id := range strings.Fields(out) {
					c.ctr(n, "tasks", "kill", "-s", "KILL", id)
				}
				time.Sleep(time.Second)
				for _, id := range strings.Fields(out) {
					c.ctr(n, "tasks", "delete", "-f", id)
				}
			}
		}
		for _, pid := range pidsOfNode("", n.cgroup) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		if p := c.proc(n.name + "-containerd"); p != nil {
			p.stop(15 * time.Second)
		}
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

func (c *cluster) kubeletsAlive() bool {
	for _, n := range c.nodes {
		if p := c.proc(n.name + "-kubelet"); p == nil || !p.alive() {
			return false
		}
	}
	return len(c.nodes) > 0
}

// sweep removes what a cluster rooted at root may have left: processes
// naming root, the processes of its nodes (by network namespace and
// cgroup root: containerd, shims, kubelets, pods), mounts and loop devices
// under it, the pods' network namespaces created since before (nil: none),
// the cluster's namespaces and cgroups, and the directory itself. It is
// also run on the remains of a previous run that was killed.
func sweep(root, netns string, before map[string]bool) []error {
	var errs []error
	var nodeNS []string
	for n := range netnsList() {
		if strings.HasPrefix(n, netns+"-n") {
			nodeNS = append(nodeNS, n)
		}
	}
	sort.Strings(nodeNS)
	for i := 0; i < 3; i++ {
		pids := pidsMentioning(root)
		for _, ns := range nodeNS {
			pids = append(pids, pidsOfNode(ns, "/"+ns)...)
		}
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
	for _, ns := range append(nodeNS, netns) {
		if netnsList()[ns] {
			if _, err := run("ip", "netns", "delete", ns); err != nil {
				errs = append(errs, err)
			}
		}
	}
	for _, ns := range nodeNS {
		removeCgroup("/" + ns)
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
