package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
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
)

func init() {
	registerCommand(command{name: "serve", short: "run the CSI driver (Identity, Controller, Node)", run: runServe})
}

const serveUsage = `Usage: qcow2-csi serve [FLAGS]

Runs the qcow2-csi CSI driver. With no flags it serves every service on a unix
socket in a new temporary directory, with an embedded pool there, and prints
where: enough to point csi-sanity or csc at it. In Kubernetes the Helm chart
runs it as a DaemonSet with --mode=all on each node (see docs/driver.md).

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
	crashConsistentCBT                        bool
	fuseDir                                   string
	controllerExpand                          bool
	blockMetadataType                         string
	overcommitRatio, poolWarningPercent       float64
	kubeletDir                                string
}

func runServe(args []string) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	var f serveFlags
	fs.StringVar(&f.endpoint, "endpoint", "", "CSI endpoint: unix:///path/csi.sock, /path/csi.sock or tcp://host:port (default: csi.sock in a new temporary directory)")
	fs.StringVar(&f.nodeID, "node-id", "", "this node's ID, also the value of the topology key <driver-name>/node (default: the host name)")
	fs.StringVar(&f.pool, "pool", "", "directory holding the node's volumes (<id>.qcow2 + <id>.json) (default: pool/ in the temporary directory)")
	fs.StringVar(&f.mode, "mode", "all", "services to serve: controller, node or all")
	fs.StringVar(&f.driverName, "driver-name", driver.DefaultDriverName, "CSI driver name (GetPluginInfo, StorageClass provisioner)")
	fs.Int64Var(&f.maxVolumes, "max-volumes", 0, "volumes this node may hold staged (NodeGetInfo max_volumes_per_node); 0 means no limit")
	fs.StringVar(&f.metricsAddr, "metrics-address", "", "serve Prometheus metrics at http://ADDRESS/metrics (e.g. :9090); empty disables")
	fs.StringVar(&f.healthAddr, "health-address", "", "serve /healthz (liveness) and /readyz (readiness, as Probe) at ADDRESS (e.g. :9808); may equal --metrics-address; empty disables")
	fs.BoolVar(&f.registerKubelet, "register-with-kubelet", false, "register the driver with the kubelet through its plugin registration socket (replaces node-driver-registrar)")
	fs.StringVar(&f.registrationDir, "registration-dir", "/var/lib/kubelet/plugins_registry", "kubelet plugin registration directory (with --register-with-kubelet)")
	fs.StringVar(&f.kubeletRegistrationPath, "kubelet-registration-path", "", "CSI socket path as the kubelet sees it on the host, e.g. /var/lib/kubelet/plugins/<driver-name>/csi.sock (default: the --endpoint path)")
	fs.BoolVar(&f.crashConsistentCBT, "crash-consistent-cbt", true, "keep the volumes' changed-block-tracking bitmaps correct on disk at every moment (bits made durable before the data they cover), so that a crash of this plugin does not force the next backup to be a full one; costs about one synced bitmap cluster write per MiB first written after each snapshot, fewer for sequential writes (docs/backup.md)")
	fs.StringVar(&f.attachBackend, "attach-backend", "auto", "how the node attaches images: nbd (kernel NBD), fuse (FUSE + loop) or auto (nbd if available, else fuse)")
	fs.StringVar(&f.fuseDir, "fuse-dir", "", "where the fuse attach backend mounts the FUSE filesystem serving its volumes; one per plugin process (default: "+nbdattach.DefaultFuseDir+", or fuse/ in the temporary directory)")
	fs.StringVar(&f.capacityReserve, "capacity-reserve", "0", "pool space kept free: bytes (suffixes Ki, Mi, Gi, Ti) or a percentage of the pool filesystem (e.g. 5%)")
	fs.Float64Var(&f.overcommitRatio, "overcommit-ratio", driver.DefaultOvercommitRatio, "most the volumes' virtual sizes may add up to, as a multiple of the pool filesystem's size minus the reserve; CreateVolume and expansion refuse more (ResourceExhausted); 0 means no limit (docs/operations.md)")
	fs.Float64Var(&f.poolWarningPercent, "pool-warning-percent", driver.DefaultPoolWarningPercent, "how full the pool filesystem may get, in percent, before every volume's condition turns abnormal and qcow2_csi_pool_nearly_full is 1")
	fs.StringVar(&f.defaultSz, "default-volume-size", "1Gi", "size of a volume created without a capacity range")
	fs.BoolVar(&f.controllerExpand, "controller-expand", true, "advertise ControllerExpandVolume; set false when a central csi-resizer serves node-local pools, so that expansion runs entirely in NodeExpandVolume (docs/driver.md)")
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
	mode, err := driver.ParseMode(f.mode)
	if err != nil {
		return err
	}
	opts := driver.Options{
		Mode: mode, DriverName: f.driverName, Version: version, NodeID: f.nodeID, Pool: f.pool,
		MaxVolumes: f.maxVolumes, ControllerExpand: f.controllerExpand, AttachBackend: f.attachBackend,
		BlockMetadataType: f.blockMetadataType,
		OvercommitRatio:   f.overcommitRatio, PoolWarningPercent: f.poolWarningPercent,
		KubeletDir: f.kubeletDir,
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
		f.fuseDir = nbdattach.DefaultFuseDir
	}
	logger := slog.New(logr.ToSlogHandler(klog.Background()))
	opts.Logger = logger
	// In the order --attach-backend=auto tries them.
	attachers := []nbdattach.Attacher{
		nbdattach.NewKernelAttacher(nbdattach.KernelOptions{Logger: logger}),
		nbdattach.NewFuseAttacher(nbdattach.FuseOptions{Dir: f.fuseDir, Logger: logger}),
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
	if err := startHTTP(ctx, d, f, errc); err != nil {
		return err
	}
	if err := d.Start(ctx); err != nil {
		return err
	}
	// On the way out (after Serve returns: no RPC runs) close the images
	// cleanly but leave devices attached: the next process re-attaches them
	// before the kernel's dead-connection timeout (nbd) fails any I/O, and
	// finds their dirty bitmaps stored.
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
		defer cancel()
		if err := d.Shutdown(klog.NewContext(sctx, klog.Background())); err != nil {
			klog.ErrorS(err, "Closing images at exit")
		}
	}()
	if f.registerKubelet {
		kp := f.kubeletRegistrationPath
		if kp == "" {
			network, addr, _ := driver.ParseEndpoint(f.endpoint)
			if network != "unix" {
				return fmt.Errorf("--register-with-kubelet needs a unix --endpoint or --kubelet-registration-path")
			}
			kp = addr
		}
		go func() { errc <- d.ServeKubeletRegistration(ctx, f.registrationDir, kp) }()
	}
	o := d.Options()
	fmt.Fprintf(out, "qcow2-csi %s: %s serving mode %s on %s (node %s, pool %s)\n", version, o.DriverName, o.Mode, f.endpoint, o.NodeID, o.Pool)
	go func() { errc <- d.Serve(ctx, lis) }()
	select {
	case err := <-errc:
		stop()
		return err
	case <-ctx.Done():
		return <-errc
	}
}

func startHTTP(ctx context.Context, d *driver.Driver, f serveFlags, errc chan<- error) error {
	muxes := map[string]*http.ServeMux{}
	get := func(addr string) *http.ServeMux {
		if muxes[addr] == nil {
			muxes[addr] = http.NewServeMux()
		}
		return muxes[addr]
	}
	if f.metricsAddr != "" {
		get(f.metricsAddr).Handle("/metrics", d.MetricsHandler())
	}
	if f.healthAddr != "" {
		h := d.HealthHandler()
		get(f.healthAddr).Handle("/healthz", h)
		get(f.healthAddr).Handle("/readyz", h)
	}
	for addr, mux := range muxes {
		go func() {
			if err := driver.ServeHTTP(ctx, addr, mux); err != nil {
				errc <- fmt.Errorf("http %s: %w", addr, err)
			}
		}()
	}
	return nil
}

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
