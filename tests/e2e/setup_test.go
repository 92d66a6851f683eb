package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/qcow2-csi/qcow2-csi/hack/image/imagetar"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// Image references. The sidecars keep the chart's default references so the
// chart installs with only the driver image overridden.
const (
	pauseRef       = "registry.k8s.io/pause:3.10.1"
	busyboxRef     = "e2e.local/busybox:e2e"
	fioRef         = "e2e.local/fio:e2e"
	driverRepo     = "e2e.local/qcow2-csi"
	driverTag      = "e2e"
	provisionerRef = "registry.k8s.io/sig-storage/csi-provisioner:v6.3.0"
	snapshotterRef = "registry.k8s.io/sig-storage/csi-snapshotter:v8.6.0"
	resizerRef     = "registry.k8s.io/sig-storage/csi-resizer:v2.2.0"
	smdRef         = "registry.k8s.io/sig-storage/csi-snapshot-metadata:v0.2.0"
	testNS         = "e2e"
	releaseNS      = "qcow2-csi"
	driverName     = "qcow2.csi.qcow2-csi.io"
)

func repoRoot(t testing.TB) string {
	out, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err != nil {
		// Not a git checkout (a source tarball): the module root is two up.
		abs, aerr := filepath.Abs("../..")
		if aerr != nil {
			t.Fatal(aerr)
		}
		return abs
	}
	return strings.TrimSpace(string(out))
}

var (
	toolsOnce sync.Once
	toolsBin  string
	toolsErr  error
	toolsTime time.Duration
)

// buildTools builds (or finds cached) the cluster programs; shared by every
// test of the package.
func buildTools(t testing.TB) string {
	toolsOnce.Do(func() {
		t0 := time.Now()
		cmd := exec.Command(filepath.Join(repoRoot(t), "hack/e2e/build-tools.sh"))
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		toolsTime = time.Since(t0)
		if err != nil {
			toolsErr = fmt.Errorf("hack/e2e/build-tools.sh: %v\n%s", err, tailString(stderr.String(), 40))
			return
		}
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		toolsBin = lines[len(lines)-1]
	})
	if toolsErr != nil {
		t.Fatal(toolsErr)
	}
	return toolsBin
}

func tailString(s string, n int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

// requirePeers checks what the cluster needs from the machine.
func requirePeers(t testing.TB) {
	peer.Root(t)
	for _, p := range []string{"ip", "nsenter", "containerd", "ctr", "losetup", "ldd"} {
		peer.Require(t, p)
	}
	if _, err := os.Stat(runcPath()); err != nil {
		peer.Missing(t, "runc", "apt-get install runc")
	}
	for _, f := range []struct{ path, pkg string }{
		{"/usr/lib/cni/bridge", "containernetworking-plugins"},
		{"/usr/lib/cni/host-local", "containernetworking-plugins"},
		{"/bin/busybox", "busybox-static"},
		{"/dev/fuse", "a kernel with FUSE"},
		{"/dev/loop-control", "a kernel with loop devices"},
	} {
		if _, err := os.Stat(f.path); err != nil {
			peer.Missing(t, f.path, "install "+f.pkg)
		}
	}
	// The node plugins serve FUSE over io_uring (helmValues), which the
	// host kernel offers only with this module parameter on. It is left
	// on: it lets a FUSE connection ask for io_uring, nothing more.
	const uringParam = "/sys/module/fuse/parameters/enable_uring"
	if b, err := os.ReadFile(uringParam); err != nil {
		peer.Missing(t, "FUSE over io_uring (Linux 6.14+ with CONFIG_FUSE_IO_URING)", err.Error())
	} else if strings.TrimSpace(string(b)) != "Y" {
		if err := os.WriteFile(uringParam, []byte("Y"), 0); err != nil {
			t.Fatalf("turning FUSE over io_uring on: %v", err)
		}
	}
}

// buildImages writes the docker-archive tarballs the cluster imports: the
// driver (built from this checkout), the sidecars, pause and busybox.
func buildImages(t testing.TB, root, bin, dir string) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	// QCOW2_CSI_E2E_DRIVER_BINARY tests a given static qcow2-csi binary
	// instead of building this checkout's.
	drv := os.Getenv("QCOW2_CSI_E2E_DRIVER_BINARY")
	if drv == "" {
		drv = filepath.Join(dir, "qcow2-csi")
		build := exec.Command("go", "build", "-trimpath", "-o", drv, "./cmd/qcow2-csi")
		build.Dir = root
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("build qcow2-csi: %v\n%s", err, out)
		}
	}
	prevDrv := ""
	if prevRefOrEnv() != "none" {
		var err error
		if _, prevDrv, err = prevTree(root); err != nil {
			return nil, err
		}
	}
	pause := filepath.Join(dir, "pause")
	build := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", pause, "./hack/image/pause")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build pause: %v\n%s", err, out)
	}
	type img struct {
		ref  string
		make func() (*imagetar.Image, error)
	}
	imgs := []img{
		{driverRepo + ":" + driverTag, func() (*imagetar.Image, error) { return imagetar.Driver(drv, "/bin/busybox") }},
		{prevDriver, func() (*imagetar.Image, error) { return imagetar.Driver(prevDrv, "/bin/busybox") }},
		{pauseRef, func() (*imagetar.Image, error) { return imagetar.Single("pause", pause) }},
		{busyboxRef, func() (*imagetar.Image, error) { return imagetar.Busybox("/bin/busybox") }},
		{fioRef, func() (*imagetar.Image, error) { return imagetar.Fio("/bin/busybox") }},
		{provisionerRef, func() (*imagetar.Image, error) {
			return imagetar.Single("csi-provisioner", filepath.Join(bin, "csi-provisioner"))
		}},
		{snapshotterRef, func() (*imagetar.Image, error) {
			return imagetar.Single("csi-snapshotter", filepath.Join(bin, "csi-snapshotter"))
		}},
		{resizerRef, func() (*imagetar.Image, error) {
			return imagetar.Single("csi-resizer", filepath.Join(bin, "csi-resizer"))
		}},
		{smdRef, func() (*imagetar.Image, error) {
			return imagetar.Single("csi-snapshot-metadata", filepath.Join(bin, "csi-snapshot-metadata"))
		}},
	}
	var files []string
	for i, im := range imgs {
		if im.ref == prevDriver && prevDrv == "" {
			continue
		}
		m, err := im.make()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", im.ref, err)
		}
		f := filepath.Join(dir, strconv.Itoa(i)+".tar")
		if _, err := m.WriteFile(f, im.ref); err != nil {
			return nil, fmt.Errorf("%s: %w", im.ref, err)
		}
		files = append(files, f)
	}
	return files, nil
}

// toolsModuleDir returns the directory of module mod as the tools module
// (hack/e2e/tools) requires it, downloading it if it is not in the cache.
func toolsModuleDir(root, mod string) (string, error) {
	list := func() ([]byte, error) {
		cmd := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", mod)
		cmd.Dir = filepath.Join(root, "hack/e2e/tools")
		return cmd.Output()
	}
	out, err := list()
	if err == nil && strings.TrimSpace(string(out)) == "" {
		err = fmt.Errorf("not downloaded")
	}
	if err != nil {
		dl := exec.Command("go", "mod", "download", mod)
		dl.Dir = filepath.Join(root, "hack/e2e/tools")
		if o, err := dl.CombinedOutput(); err != nil {
			return "", fmt.Errorf("%s: %v: %s", mod, err, o)
		}
		if out, err = list(); err != nil {
			return "", fmt.Errorf("%s: %v", mod, err)
		}
	}
	return strings.TrimSpace(string(out)), nil
}

// snapshotCRDs returns the CRD manifests of the external-snapshotter client
// module the tools were built with (VolumeSnapshot, VolumeSnapshotContent,
// VolumeSnapshotClass, and their VolumeGroupSnapshot* counterparts) and of
// the external-snapshot-metadata client module (SnapshotMetadataService),
// with the names to wait for.
func snapshotCRDs(root string) (files, names []string, err error) {
	const snapshotter = "github.com/kubernetes-csi/external-snapshotter/client/v8"
	for _, m := range []struct {
		mod, group string
		kinds      []string
	}{
		{snapshotter, "snapshot.storage.k8s.io", []string{"volumesnapshotclasses", "volumesnapshotcontents", "volumesnapshots"}},
		{snapshotter, "groupsnapshot.storage.k8s.io", []string{"volumegroupsnapshotclasses", "volumegroupsnapshotcontents", "volumegroupsnapshots"}},
		{"github.com/kubernetes-csi/external-snapshot-metadata/client", "cbt.storage.k8s.io", []string{"snapshotmetadataservices"}},
	} {
		dir, err := toolsModuleDir(root, m.mod)
		if err != nil {
			return nil, nil, fmt.Errorf("CRDs: %w", err)
		}
		for _, k := range m.kinds {
			f := filepath.Join(dir, "config/crd", m.group+"_"+k+".yaml")
			if _, err := os.Stat(f); err != nil {
				return nil, nil, fmt.Errorf("CRDs: %w", err)
			}
			files = append(files, f)
			names = append(names, "crd/"+k+"."+m.group)
		}
	}
	return files, names, nil
}

// upCluster brings up the whole cluster, with the chart installed with
// values (helm --set pairs) on top of the e2e ones. Teardown is registered
// before anything starts.
func upCluster(t *testing.T, extraValues ...string) *cluster {
	requirePeers(t)
	root := repoRoot(t)
	sweepStale(t)
	c := &cluster{t: t, root: rootPrefix + strconv.Itoa(os.Getpid()), netns: netnsPrefix + strconv.Itoa(os.Getpid())}
	c.newNodes()
	c.steps = append(c.steps, stepTime{"build cluster tools (hack/e2e/build-tools.sh)", 0})
	c.bin = buildTools(t)
	c.steps[0].d = toolsTime
	t.Logf("step %-40s %6.1fs", c.steps[0].name, toolsTime.Seconds())
	if err := os.MkdirAll(c.root, 0o755); err != nil {
		t.Fatal(err)
	}
	// ^C or a kill of `go test` must not leave a cluster running: tear down,
	// then exit. (A SIGKILL cannot be caught: the next run sweeps.)
	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		if s, ok := <-sigc; ok {
			fmt.Fprintf(os.Stderr, "e2e: %v: tearing the cluster down\n", s)
			for _, err := range c.teardown() {
				fmt.Fprintf(os.Stderr, "e2e: teardown: %v\n", err)
			}
			os.Exit(2)
		}
	}()
	t.Cleanup(func() {
		signal.Stop(sigc)
		close(sigc)
		if t.Failed() && !c.dumped {
			c.dumpState(t, "cluster")
		}
		var errs []error
		c.step("teardown", func() error {
			errs = c.teardown()
			if len(errs) > 0 {
				return fmt.Errorf("%d problems", len(errs))
			}
			return nil
		})
		for _, e := range errs {
			t.Errorf("teardown: %v", e)
		}
		report := c.report()
		t.Logf("e2e step times:\n%s", report)
		os.WriteFile(filepath.Join(root, ".cache/e2e/last-run-times.txt"), []byte(report), 0o644)
	})
	must := func(name string, f func() error) {
		t.Helper()
		if err := c.step(name, f); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	var images []string
	must("build images (driver, sidecars, pause)", func() error {
		var err error
		images, err = buildImages(t, root, c.bin, c.path("images"))
		return err
	})
	must("netns per node + control plane, routes, PKI", func() error {
		if err := c.setupNetwork(); err != nil {
			return err
		}
		return c.genPKI()
	})
	must("etcd", c.startEtcd)
	must("kube-apiserver ready", c.startAPIServer)
	must("controller-manager + scheduler", c.startControllers)
	c.cniNS = netnsList()
	must("2 nodes: mount ns, containerd, image import", func() error {
		return parallel(len(c.nodes), func(i int) error { return c.startContainerd(c.nodes[i], images) })
	})
	must("2 kubelets, nodes Ready", func() error {
		if err := parallel(len(c.nodes), func(i int) error { return c.startKubelet(c.nodes[i]) }); err != nil {
			return err
		}
		for _, n := range c.nodes {
			if _, err := c.kubectl("label", "node", n.name, pluginLabel+"=on"); err != nil {
				return err
			}
		}
		return nil
	})
	stopKeeping := make(chan struct{})
	go c.keepPodLogs(stopKeeping)
	t.Cleanup(func() { close(stopKeeping) })
	must("VolumeSnapshot, VolumeGroupSnapshot, SnapshotMetadataService CRDs, snapshot-controller", func() error {
		crds, names, err := snapshotCRDs(root)
		if err != nil {
			return err
		}
		for _, f := range crds {
			if _, err := c.kubectl("apply", "-f", f); err != nil {
				return err
			}
		}
		if _, err := c.kubectl(append([]string{"wait", "--for=condition=Established", "--timeout=60s"}, names...)...); err != nil {
			return err
		}
		return c.startSnapshotController()
	})
	// The previous chart and driver: the first scenario upgrades to this
	// checkout's.
	must("helm install qcow2-csi (previous chart)", func() error {
		if prevRefOrEnv() == "none" {
			return c.helmInstall("install", extraValues...)
		}
		chart, _, err := prevTree(root)
		if err != nil {
			return err
		}
		return c.helmInstallChart(chart, "install", append(c.prevValues(), extraValues...)...)
	})
	must("test namespace", func() error {
		if _, err := c.kubectl("create", "namespace", testNS); err != nil {
			return err
		}
		return c.waitFor("default ServiceAccount", time.Minute, nil, func() error {
			_, err := c.kubectl("get", "serviceaccount", "default", "-n", testNS)
			return err
		})
	})
	return c
}

// parallel runs f(0..n-1) at once and returns the first error.
func parallel(n int, f func(i int) error) error {
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) { defer wg.Done(); errs[i] = f(i) }(i)
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// pluginLabel marks the nodes on which the node plugin runs.
const pluginLabel = "qcow2-e2e-plugin"

// helmValues are the chart values of the e2e install. The kubelet dir is
// the default (every node sees its own at /var/lib/kubelet); the pool and
// the fuse dir are per-run paths, each node's own by bind mount.
func (c *cluster) helmValues() []string {
	return []string{
		"image.driver.repository=" + driverRepo,
		"image.driver.tag=" + driverTag,
		"image.driver.pullPolicy=Never",
		"pool.hostPath=" + c.poolView(),
		// No registry here: the driver registers itself with the kubelet.
		"node.registrar=builtin",
		// The node plugin runs where this label is: scenario 12 stops one
		// node's plugin by removing it (the kubelet restores its own
		// labels, kubernetes.io/os included).
		"node.nodeSelector." + pluginLabel + "=on",
		// The host kernel has no nbd module. The fuse backend serves over
		// io_uring (docs/fuse-attach.md), without a cache: a cache serves
		// the pods' I/O before the plugin's per-volume limits (the QoS
		// scenarios measured 62k write IOPS under a limit of 200 with the
		// writeback cache).
		"attachBackend=fuse",
		"fuseDir=" + c.fuseView(),
		"fuseUring=true",
		"driver.logLevel=4",
		// Retry a failed call within 10 s, not the sidecars' 5 min: the
		// scenario that stops a node's plugin waits for convergence.
		"controller.provisioner.extraArgs={--retry-interval-max=10s}",
		"controller.snapshotter.extraArgs={--retry-interval-max=10s}",
		"controller.resizer.extraArgs={--retry-interval-max=10s}",
		// No kube-proxy here: the csi-snapshot-metadata sidecar listens on
		// its Service's port, so that the Service's DNS name mapped to a
		// controller pod's IP (cbt_test.go) reaches it.
		"snapshotMetadata.port=" + smdPort,
	}
}

// helmInstall runs `helm install` or `helm upgrade` of the chart in this
// checkout and waits for the node plugins to be registered with the
// kubelets.
func (c *cluster) helmInstall(verb string, extra ...string) error {
	return c.helmInstallChart(filepath.Join(repoRoot(c.t), "charts/qcow2-csi"), verb, extra...)
}

// helmInstallChart is helmInstall of the chart in dir.
func (c *cluster) helmInstallChart(dir, verb string, extra ...string) error {
	args := []string{verb, "qcow2-csi", dir,
		"--namespace", releaseNS, "--wait", "--timeout", "4m"}
	if verb == "install" {
		args = append(args, "--create-namespace")
	}
	for _, v := range append(c.helmValues(), extra...) {
		args = append(args, "--set", v)
	}
	if _, err := c.helm(args...); err != nil {
		c.logPods()
		return err
	}
	if err := c.pluginSteady(); err != nil {
		return err
	}
	for _, n := range c.nodes {
		if err := c.waitFor("CSINode of "+n.name+" lists "+driverName, 2*time.Minute, c.proc(n.name+"-kubelet"), func() error {
			out, err := c.kubectl("get", "csinode", n.name, "-o", "jsonpath={.spec.drivers[*].name}")
			if err != nil {
				return err
			}
			if !strings.Contains(out, driverName) {
				return fmt.Errorf("CSINode drivers: %q", out)
			}
			return nil
		}); err != nil {
			return err
		}
	}
	return nil
}

// pluginSteady waits for every container of the release (node plugins,
// controller replicas) to be ready, then checks that none restarted a few
// seconds later: helm's --wait alone passes a sidecar that starts and then
// exits.
func (c *cluster) pluginSteady() error {
	sel := "app.kubernetes.io/instance=qcow2-csi"
	if err := c.waitFor("release containers ready", 3*time.Minute, nil, func() error {
		_, err := c.kubectl("wait", "-n", releaseNS, "--for=condition=Ready", "pod", "-l", sel, "--timeout=10s")
		return err
	}); err != nil {
		return err
	}
	time.Sleep(5 * time.Second)
	out, err := c.kubectl("get", "pods", "-n", releaseNS, "-l", sel, "-o",
		`jsonpath={range .items[*]}{range .status.containerStatuses[*]}{.name}={.restartCount}{" "}{end}{end}`)
	if err != nil {
		return err
	}
	for _, f := range strings.Fields(out) {
		if !strings.HasSuffix(f, "=0") {
			logs, _ := c.kubectl("logs", "-n", releaseNS, "-l", sel, "--all-containers", "--previous", "--tail=5")
			return fmt.Errorf("release containers restarted: %s\n%s", out, logs)
		}
	}
	return nil
}

func (c *cluster) logPods() {
	out, _ := c.kubectl("get", "pods", "-A", "-o", "wide")
	c.t.Logf("pods:\n%s", out)
}

func errOrEmpty(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
