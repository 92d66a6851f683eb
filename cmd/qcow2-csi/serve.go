package main

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/klog/v2"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/fuse"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/kernel"
)

func init() {
	registerCommand(command{name: "serve", short: "run the CSI driver (Identity, Controller, Node)", run: runServe})
}

const serveUsage = `Usage: qcow2-csi serve [FLAGS]

Runs the qcow2-csi CSI driver. With no flags (--mode=all) it serves every
service on a unix socket in a new temporary directory, with an embedded pool
there, and prints where: enough to point csi-sanity or csc at it.

In Kubernetes (the Helm chart, docs/driver.md "Topology"):
  --mode=node        the DaemonSet on each node: Identity and Node on
                     --endpoint for the kubelet, and the node agent
                     (Identity, Controller, SnapshotMetadata of this node's
                     pool) on --agent-address, mutual TLS only.
  --mode=controller  one Deployment beside the central sidecars: Identity,
                     Controller and SnapshotMetadata on --endpoint, each call
                     routed to the agent of the node that owns the volume
                     (found with --agent-selector, or --agent). No pool, no
                     --node-id.

Flags:
`

// shutdownTimeout bounds the wait for device requests in flight at exit; it
// must leave the restart well inside the nbd dead-connection timeout (120 s).
const shutdownTimeout = 20 * time.Second

type serveFlags struct {
	endpoint, nodeID, pool, mode, driverName  string
	maxVolumes                                int64
	metricsAddr, healthAddr                   string
	registerKubelet                           bool
	registrationDir, kubeletRegistrationPath  string
	attachBackend, capacityReserve, defaultSz string
	crashConsistentCBT, fuseUring             bool
	fuseDir, fuseCache                        string
	controllerExpand                          bool
	blockMetadataType                         string
	overcommitRatio, poolWarningPercent       float64
	kubeletDir                                string
	enableGetSnapshot                         bool
	groupHoldTimeout                          time.Duration

	// The agent connection (docs/driver.md "Topology").
	agentAddress, tlsCA, tlsCert, tlsKey string
	agentClientName, agentServerName     string
	agentPort                            int
	agentNamespace, agentSelector        string
	agents                               agentList
}

// agentList is the repeatable --agent NODE=HOST:PORT.
type agentList []string

func (a *agentList) String() string     { return strings.Join(*a, ",") }
func (a *agentList) Set(v string) error { *a = append(*a, v); return nil }

func runServe(args []string) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	var f serveFlags
	fs.StringVar(&f.endpoint, "endpoint", "", "CSI endpoint, a unix socket: unix:///path/csi.sock or /path/csi.sock (default: csi.sock in a new temporary directory); tcp:// is refused, the CSI services have no authentication (the node agent on --agent-address is the TCP listener, mutual TLS only)")
	fs.StringVar(&f.nodeID, "node-id", "", "this node's ID, also the value of the topology key <driver-name>/node and the suffix of the IDs this node issues (default: the host name; not with --mode=controller)")
	fs.StringVar(&f.pool, "pool", "", "directory holding the node's volumes (<id>.qcow2 + <id>.json) (default: pool/ in the temporary directory)")
	fs.StringVar(&f.mode, "mode", "all", "what to run: all (the embedded single-process driver), node (node plugin + agent) or controller (the router)")
	fs.StringVar(&f.driverName, "driver-name", driver.DefaultDriverName, "CSI driver name (GetPluginInfo, StorageClass provisioner)")
	fs.Int64Var(&f.maxVolumes, "max-volumes", 0, "volumes this node may hold staged (NodeGetInfo max_volumes_per_node); 0 means no limit")
	fs.StringVar(&f.metricsAddr, "metrics-address", "", "serve Prometheus metrics at http://ADDRESS/metrics (e.g. :9090); empty disables")
	fs.StringVar(&f.healthAddr, "health-address", "", "serve /healthz (liveness) and /readyz (readiness, as Probe) at ADDRESS (e.g. :9808); may equal --metrics-address; empty disables")
	fs.BoolVar(&f.registerKubelet, "register-with-kubelet", false, "register the driver with the kubelet through its plugin registration socket (replaces node-driver-registrar)")
	fs.StringVar(&f.registrationDir, "registration-dir", "/var/lib/kubelet/plugins_registry", "kubelet plugin registration directory (with --register-with-kubelet)")
	fs.StringVar(&f.kubeletRegistrationPath, "kubelet-registration-path", "", "CSI socket path as the kubelet sees it on the host, e.g. /var/lib/kubelet/plugins/<driver-name>/csi.sock (default: the --endpoint path)")
	fs.BoolVar(&f.crashConsistentCBT, "crash-consistent-cbt", true, "keep the volumes' changed-block-tracking bitmaps correct on disk at every moment (bits made durable before the data they cover), so that a crash of this plugin does not force the next backup to be a full one; costs about one synced bitmap cluster write per MiB first written after each snapshot, fewer for sequential writes (docs/backup.md)")
	fs.StringVar(&f.attachBackend, "attach-backend", "auto", "how the node attaches images: nbd (kernel NBD), fuse (FUSE + loop) or auto (nbd if available, else fuse)")
	fs.StringVar(&f.fuseDir, "fuse-dir", "", "where the fuse attach backend mounts the FUSE filesystem serving its volumes; one per plugin process (default: "+fuse.DefaultDir+", or fuse/ in the temporary directory)")
	fs.StringVar(&f.fuseCache, "fuse-cache", string(fuse.DefaultCacheMode), "how the kernel caches the fuse backend's files: none (every block request reaches this process), writethrough (reads of cached data do not; writes do before they complete) or writeback (writes wait in the kernel's cache until the filesystem flushes or the kernel writes them back); docs/fuse-attach.md")
	fs.BoolVar(&f.fuseUring, "fuse-uring", false, "serve the fuse backend's requests over io_uring (Linux 6.14+ with the module parameter fuse.enable_uring=Y) where the kernel offers it, else over /dev/fuse, logging why; docs/fuse-attach.md")
	fs.StringVar(&f.capacityReserve, "capacity-reserve", "0", "pool space kept free: bytes (suffixes Ki, Mi, Gi, Ti) or a percentage of the pool filesystem (e.g. 5%)")
	fs.Float64Var(&f.overcommitRatio, "overcommit-ratio", driver.DefaultOvercommitRatio, "most the volumes' virtual sizes may add up to, as a multiple of the pool filesystem's size minus the reserve; CreateVolume and expansion refuse more (ResourceExhausted); 0 means no limit (docs/operations.md)")
	fs.Float64Var(&f.poolWarningPercent, "pool-warning-percent", driver.DefaultPoolWarningPercent, "how full the pool filesystem may get, in percent, before every volume's condition turns abnormal and qcow2_csi_pool_nearly_full is 1")
	fs.StringVar(&f.defaultSz, "default-volume-size", "1Gi", "size of a volume created without a capacity range")
	fs.BoolVar(&f.controllerExpand, "controller-expand", true, "advertise ControllerExpandVolume on this process's own controller service (--mode=all); false leaves expansion to NodeExpandVolume. The --mode=controller router always advertises it and passes it to the owning node's agent (docs/driver.md)")
	fs.BoolVar(&f.enableGetSnapshot, "enable-get-snapshot", false, "advertise the GET_SNAPSHOT controller capability (CSI 1.12, alpha); off by default because csi-test v5.4.0 fails a driver listing it (GetSnapshot answers either way)")
	fs.DurationVar(&f.groupHoldTimeout, "group-hold-timeout", driver.DefaultGroupHoldTimeout, "longest a VolumeGroupSnapshot holds its members' I/O: the controller gives the nodes this long to quiesce, and a node releases on its own at this deadline if no commit came (the group snapshot then fails and is retried); at most "+driver.MaxGroupHoldTimeout.String()+" (docs/group-snapshots.md)")
	fs.StringVar(&f.agentAddress, "agent-address", "", "node: serve the node agent (for the controller) on this TCP address, e.g. :9821; mutual TLS only (--tls-*); required with --mode=node")
	fs.StringVar(&f.tlsCA, "tls-ca", "", "agent connection: PEM CA that signs both the agents' and the controller's certificates")
	fs.StringVar(&f.tlsCert, "tls-cert", "", "agent connection: this side's PEM certificate (node: the agent's server certificate; controller: its client certificate); re-read when it changes")
	fs.StringVar(&f.tlsKey, "tls-key", "", "agent connection: this side's PEM private key")
	fs.StringVar(&f.agentClientName, "agent-client-name", driver.DefaultAgentClientName, "node: the name (CN or DNS SAN) the controller's client certificate must carry; any other client is refused")
	fs.StringVar(&f.agentServerName, "agent-server-name", driver.DefaultAgentServerName, "controller: the DNS name the agents' server certificate must carry (pod IPs are dialled, this fixed name is verified)")
	fs.IntVar(&f.agentPort, "agent-port", driver.DefaultAgentPort, "controller: the agents' port (with --agent-selector)")
	fs.StringVar(&f.agentNamespace, "agent-namespace", "", "controller: namespace of the node plugin Pods (default: this Pod's namespace)")
	fs.StringVar(&f.agentSelector, "agent-selector", "", "controller: label selector of the node plugin Pods; the Pod on node N (spec.nodeName, status.podIP) is N's agent, found through the Kubernetes API with the Pod's service account")
	fs.Var(&f.agents, "agent", "controller: NODE=HOST:PORT, a static agent address instead of --agent-selector (repeatable; tests, csi-sanity, benchmarks)")
	fs.StringVar(&f.blockMetadataType, "block-metadata-type", "VARIABLE_LENGTH", "how SnapshotMetadata reports a snapshot's ranges when its VolumeSnapshotClass has no blockMetadataType parameter: VARIABLE_LENGTH (extents) or FIXED_LENGTH (cluster-size blocks)")
	fs.StringVar(&f.kubeletDir, "kubelet-dir", "", "the kubelet's --root-dir: the node stages and publishes only at paths below it, with no symbolic link below it (default "+driver.DefaultKubeletDir+"; for the ad hoc run without --endpoint or --pool, the system's temporary directory, where csi-sanity makes its paths)")
	klogFlags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(klogFlags)
	klogFlags.VisitAll(func(kf *flag.Flag) {
		if kf.Name == "v" || kf.Name == "vmodule" {
			fs.Var(kf.Value, kf.Name, kf.Usage)
		}
	})
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), serveUsage)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if err == flag.ErrHelp {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "qcow2-csi serve: unexpected arguments %q\n", fs.Args())
		return 2
	}
	if !(f.poolWarningPercent > 0 && f.poolWarningPercent <= 100) { // (0 means the default to driver.Options)
		fmt.Fprintf(os.Stderr, "qcow2-csi serve: --pool-warning-percent %g: want more than 0 and at most 100\n", f.poolWarningPercent)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := serve(ctx, f, os.Stdout); err != nil {
		fmt.Fprintf(os.Stderr, "qcow2-csi serve: %v\n", err)
		return 1
	}
	return 0
}

// serve runs the driver until ctx ends, printing where it serves to out.
func serve(ctx context.Context, f serveFlags, out io.Writer) error {
	fuseCache, err := fuse.ParseCacheMode(f.fuseCache)
	if err != nil {
		return fmt.Errorf("--fuse-cache: %w", err)
	}
	mode, err := driver.ParseMode(f.mode)
	if err != nil {
		return err
	}
	if mode == driver.ModeController {
		return serveController(ctx, f, out)
	}
	if f.agentAddress == "" && mode == driver.ModeNode {
		return fmt.Errorf("--mode=node needs --agent-address (and --tls-ca, --tls-cert, --tls-key): the controller reaches the node's pool through it")
	}
	if len(f.agents) > 0 || f.agentSelector != "" {
		return fmt.Errorf("--agent and --agent-selector are for --mode=controller")
	}
	var agentTLS *tls.Config
	if f.agentAddress != "" {
		// Before anything starts: no agent without TLS.
		if agentTLS, err = driver.AgentServerTLS(driver.TLSFiles{CA: f.tlsCA, Cert: f.tlsCert, Key: f.tlsKey}, f.agentClientName); err != nil {
			return fmt.Errorf("--agent-address: %w", err)
		}
	}
	opts := driver.Options{
		Mode: mode, DriverName: f.driverName, Version: version, NodeID: f.nodeID, Pool: f.pool,
		MaxVolumes: f.maxVolumes, ControllerExpand: f.controllerExpand, AttachBackend: f.attachBackend,
		BlockMetadataType: f.blockMetadataType, EnableGetSnapshot: f.enableGetSnapshot,
		OvercommitRatio: f.overcommitRatio, PoolWarningPercent: f.poolWarningPercent,
		KubeletDir: f.kubeletDir, GroupHoldTimeout: f.groupHoldTimeout,
	}
	if opts.CapacityReserve, opts.CapacityReservePercent, err = parseReserve(f.capacityReserve); err != nil {
		return err
	}
	if opts.DefaultVolumeSize, err = parseQuantity(f.defaultSz); err != nil {
		return fmt.Errorf("--default-volume-size: %w", err)
	}
	if opts.NodeID == "" {
		if opts.NodeID, err = os.Hostname(); err != nil {
			return err
		}
	}
	// Without an endpoint or a pool: the ad hoc run, with what is missing in
	// one new temporary directory.
	if f.endpoint == "" || opts.Pool == "" {
		tmp, err := os.MkdirTemp("", "qcow2-csi-")
		if err != nil {
			return err
		}
		if f.endpoint == "" {
			f.endpoint = "unix://" + filepath.Join(tmp, "csi.sock")
		}
		if opts.Pool == "" {
			opts.Pool = filepath.Join(tmp, "pool")
		}
		if f.fuseDir == "" {
			f.fuseDir = filepath.Join(tmp, "fuse")
		}
		if opts.KubeletDir == "" {
			opts.KubeletDir = os.TempDir()
		}
	}
	if f.fuseDir == "" {
		f.fuseDir = fuse.DefaultDir
	}
	logger := slog.New(logr.ToSlogHandler(klog.Background()))
	opts.Logger = logger
	// In the order --attach-backend=auto tries them.
	attachers := []nbdattach.Attacher{
		kernel.NewAttacher(kernel.Options{Logger: logger}),
		fuse.NewAttacher(fuse.Options{Dir: f.fuseDir, Logger: logger, Cache: fuseCache, Uring: f.fuseUring}),
	}
	d, err := driver.New(opts, driver.Seams{Images: driver.Qcow2Images{Logger: logger, CrashConsistentBitmaps: f.crashConsistentCBT}, Attachers: attachers})
	if err != nil {
		return err
	}
	ctx, stop := context.WithCancel(klog.NewContext(ctx, klog.Background()))
	defer stop()

	lis, err := driver.Listen(f.endpoint)
	if err != nil {
		return err
	}
	errc := make(chan error, 4)
	startHTTP(ctx, d.MetricsHandler(), d.HealthHandler(), f, errc)
	if err := d.Start(ctx); err != nil {
		return err
	}
	// On the way out close the images cleanly but leave devices attached:
	// the next process re-attaches them before the kernel's dead-connection
	// timeout (nbd) fails any I/O, and finds their dirty bitmaps stored.
	// Deferred here, it runs only after awaitServers has seen both gRPC
	// servers (CSI socket and node agent) stop; an agent's CreateSnapshot or
	// ControllerExpandVolume would otherwise find its image closed under it.
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
		defer cancel()
		if err := d.Shutdown(klog.NewContext(sctx, klog.Background())); err != nil {
			klog.ErrorS(err, "Closing images at exit")
		}
	}()
	// One done channel per gRPC server running, for awaitServers.
	var done []<-chan error
	if f.registerKubelet {
		kp := f.kubeletRegistrationPath
		if kp == "" {
			_, kp, _ = driver.ParseEndpoint(f.endpoint) // a socket path: Listen took it
		}
		go func() { errc <- d.ServeKubeletRegistration(ctx, f.registrationDir, kp) }()
	}
	if agentTLS != nil {
		alis, err := net.Listen("tcp", f.agentAddress)
		if err != nil {
			return fmt.Errorf("--agent-address: %w", err)
		}
		agentDone := make(chan error, 1)
		done = append(done, agentDone)
		go func() { agentDone <- d.ServeAgent(ctx, alis, agentTLS) }()
		fmt.Fprintf(out, "qcow2-csi %s: node agent on %s (mutual TLS, client %q)\n", version, alis.Addr(), f.agentClientName)
	}
	o := d.Options()
	fmt.Fprintf(out, "qcow2-csi %s: %s serving mode %s on %s (node %s, pool %s)\n", version, o.DriverName, o.Mode, f.endpoint, o.NodeID, o.Pool)
	csiDone := make(chan error, 1)
	done = append(done, csiDone)
	go func() { csiDone <- d.Serve(ctx, lis) }()
	return awaitServers(ctx, stop, errc, done...)
}

// awaitServers returns once ctx has ended or something failed (an error on
// errc, or any server stopping), and every server has stopped: it cancels
// the rest with stop and waits for each one's done channel, which gets the
// result of its Serve (so pass only servers that run). Cleanup deferred by
// the caller thus never races an RPC still running. The first error wins.
func awaitServers(ctx context.Context, stop context.CancelFunc, errc <-chan error, done ...<-chan error) error {
	stopped := make(chan error, len(done))
	for _, c := range done {
		go func() { stopped <- <-c }()
	}
	var err error
	n := 0
	select {
	case err = <-errc:
	case err = <-stopped:
		n++
	case <-ctx.Done():
	}
	stop()
	for ; n < len(done); n++ {
		if e := <-stopped; err == nil {
			err = e
		}
	}
	return err
}

// startHTTP serves metrics and health where the flags ask.
func startHTTP(ctx context.Context, metrics, health http.Handler, f serveFlags, errc chan<- error) {
	muxes := map[string]*http.ServeMux{}
	get := func(addr string) *http.ServeMux {
		if muxes[addr] == nil {
			muxes[addr] = http.NewServeMux()
		}
		return muxes[addr]
	}
	if f.metricsAddr != "" {
		get(f.metricsAddr).Handle("/metrics", metrics)
	}
	if f.healthAddr != "" {
		get(f.healthAddr).Handle("/healthz", health)
		get(f.healthAddr).Handle("/readyz", health)
	}
	for addr, mux := range muxes {
		go func() {
			if err := driver.ServeHTTP(ctx, addr, mux); err != nil {
				errc <- fmt.Errorf("http %s: %w", addr, err)
			}
		}()
	}
}

// serveController runs the router (--mode=controller) until ctx ends.
func serveController(ctx context.Context, f serveFlags, out io.Writer) error {
	if f.pool != "" || f.nodeID != "" || f.agentAddress != "" {
		return fmt.Errorf("--mode=controller owns no pool: --pool, --node-id and --agent-address are for --mode=node")
	}
	tlsCfg, err := driver.AgentClientTLS(driver.TLSFiles{CA: f.tlsCA, Cert: f.tlsCert, Key: f.tlsKey}, f.agentServerName)
	if err != nil {
		return fmt.Errorf("--mode=controller: %w", err)
	}
	ropts := driver.RouterOptions{DriverName: f.driverName, Version: version, TLS: tlsCfg, EnableGetSnapshot: f.enableGetSnapshot,
		GroupHoldTimeout: f.groupHoldTimeout}
	switch {
	case len(f.agents) > 0 && f.agentSelector != "":
		return fmt.Errorf("--agent and --agent-selector exclude each other")
	case len(f.agents) > 0:
		static := driver.StaticAgents{}
		for _, a := range f.agents {
			node, addr, err := driver.ParseStaticAgent(a)
			if err != nil {
				return err
			}
			static[node] = addr
		}
		ropts.Agents = static
	case f.agentSelector != "":
		ns := f.agentNamespace
		if ns == "" {
			b, err := os.ReadFile("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
			if err != nil {
				return fmt.Errorf("--agent-namespace not given and not in a Pod: %w", err)
			}
			ns = strings.TrimSpace(string(b))
		}
		ropts.Agents = &driver.KubeAgents{Namespace: ns, Selector: f.agentSelector, Port: f.agentPort}
		// A Pod being replaced leaves its node briefly without one: only
		// a node missing this long counts as gone (deletes then succeed).
		ropts.NodeGoneAfter = nodeGoneAfter
	default:
		return fmt.Errorf("--mode=controller needs --agent-selector (Kubernetes) or --agent NODE=HOST:PORT")
	}
	r, err := driver.NewRouter(ropts)
	if err != nil {
		return err
	}
	defer r.Close()
	if f.endpoint == "" {
		tmp, err := os.MkdirTemp("", "qcow2-csi-")
		if err != nil {
			return err
		}
		f.endpoint = "unix://" + filepath.Join(tmp, "csi.sock")
	}
	ctx, stop := context.WithCancel(klog.NewContext(ctx, klog.Background()))
	defer stop()
	lis, err := driver.Listen(f.endpoint)
	if err != nil {
		return err
	}
	errc := make(chan error, 4)
	startHTTP(ctx, r.MetricsHandler(), r.HealthHandler(), f, errc)
	fmt.Fprintf(out, "qcow2-csi %s: %s serving mode controller on %s (routing to node agents)\n", version, f.driverName, f.endpoint)
	done := make(chan error, 1)
	go func() { done <- r.Serve(ctx, lis) }()
	return awaitServers(ctx, stop, errc, done)
}

// nodeGoneAfter: see RouterOptions.NodeGoneAfter.
const nodeGoneAfter = 5 * time.Minute

// parseReserve reads --capacity-reserve: a quantity or a percentage.
func parseReserve(s string) (bytes int64, percent float64, err error) {
	if p, ok := strings.CutSuffix(s, "%"); ok {
		percent, err = strconv.ParseFloat(p, 64)
		if err != nil || percent < 0 || percent > 100 {
			return 0, 0, fmt.Errorf("--capacity-reserve %q: want a percentage from 0 to 100", s)
		}
		return 0, percent, nil
	}
	bytes, err = parseQuantity(s)
	if err != nil {
		return 0, 0, fmt.Errorf("--capacity-reserve: %w", err)
	}
	return bytes, 0, nil
}

// parseQuantity reads a byte count with an optional Kubernetes binary suffix.
func parseQuantity(s string) (int64, error) {
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		m      int64
	}{{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"Ti", 1 << 40}} {
		if n, ok := strings.CutSuffix(s, u.suffix); ok {
			s, mult = n, u.m
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("%q: want a byte count like 1073741824 or 10Gi", s)
	}
	return n * mult, nil
}
