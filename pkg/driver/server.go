package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-lib-utils/protosanitizer"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

// ParseEndpoint splits a CSI endpoint into a network and an address:
// unix:///path, unix:/path or a bare absolute path. The network is always
// unix: the CSI services carry no authentication of their own (the socket's
// file mode is what keeps other users out), so a tcp:// endpoint would serve
// them, the router included, to anyone who can reach the port. The node
// agent (--agent-address) is the one TCP listener, and it is mutual TLS only.
func ParseEndpoint(ep string) (network, addr string, err error) {
	if strings.HasPrefix(ep, "/") {
		return "unix", ep, nil
	}
	u, err := url.Parse(ep)
	if err != nil {
		return "", "", fmt.Errorf("endpoint %q: %v", ep, err)
	}
	switch u.Scheme {
	case "unix":
		p := u.Path
		if p == "" {
			p = u.Opaque
		}
		if u.Host != "" || !filepath.IsAbs(p) {
			return "", "", fmt.Errorf("endpoint %q: want unix:///absolute/path", ep)
		}
		return "unix", p, nil
	case "tcp":
		return "", "", fmt.Errorf("endpoint %q: plaintext TCP is not served, it would expose the CSI services unauthenticated; "+
			"use a unix socket (unix:///path/csi.sock); the node agent, served over mutual TLS on --agent-address, is the only TCP listener", ep)
	}
	return "", "", fmt.Errorf("endpoint %q: scheme %q not supported (unix only)", ep, u.Scheme)
}

// Listen opens a CSI endpoint. A unix socket left by a previous process is
// removed first (only if it is a socket: never delete a file by mistake).
func Listen(endpoint string) (net.Listener, error) {
	network, addr, err := ParseEndpoint(endpoint)
	if err != nil {
		return nil, err
	}
	if network == "unix" {
		if err := os.MkdirAll(filepath.Dir(addr), 0o750); err != nil {
			return nil, err
		}
		if fi, err := os.Lstat(addr); err == nil {
			if fi.Mode().Type() != fs.ModeSocket {
				return nil, fmt.Errorf("endpoint %s exists and is not a socket", addr)
			}
			if err := os.Remove(addr); err != nil {
				return nil, err
			}
		}
	}
	return net.Listen(network, addr)
}

// serverOptions are the interceptors every gRPC server of the driver runs:
// logging and metrics for unary calls, and recovery from handler panics for
// unary and streaming calls alike.
func (d *Driver) serverOptions() []grpc.ServerOption {
	_ = d.metrics.reg.Register(handlerPanics) // once per registry; a second GRPCServer finds it there
	return []grpc.ServerOption{grpc.UnaryInterceptor(d.intercept), grpc.StreamInterceptor(interceptStream)}
}

// GRPCServer returns a gRPC server with the services of the driver's mode
// registered and the logging/metrics interceptor installed.
func (d *Driver) GRPCServer() *grpc.Server {
	s := grpc.NewServer(d.serverOptions()...)
	csi.RegisterIdentityServer(s, d)
	if d.opts.Mode.controller() {
		csi.RegisterControllerServer(s, d)
		if d.snapshotMetadata() {
			csi.RegisterSnapshotMetadataServer(s, d.SnapshotMetadataServer())
			csi.RegisterGroupControllerServer(s, d.GroupControllerServer())
		}
	}
	if d.opts.Mode.node() {
		csi.RegisterNodeServer(s, d)
	} else {
		csi.RegisterNodeServer(s, nodeCapabilitiesOnly{d: d})
	}
	return s
}

// nodeCapabilitiesOnly is the Node service of a controller-only process:
// NodeGetCapabilities and nothing else. A central csi-resizer next to a
// controller run with --controller-expand=false asks NodeGetCapabilities to
// learn that expansion happens on the nodes (it then only records the new
// size); without an answer it refuses to start. Every other node RPC is
// Unimplemented here: volumes are staged by the node plugins.
type nodeCapabilitiesOnly struct {
	csi.UnimplementedNodeServer
	d *Driver
}

func (n nodeCapabilitiesOnly) NodeGetCapabilities(ctx context.Context, r *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return n.d.NodeGetCapabilities(ctx, r)
}

var requestSeq atomic.Uint64

// intercept gives each request a logger carrying the method and a request
// number (handlers take it with klog.FromContext), logs the request with its
// secrets stripped, and records the outcome in the metrics.
func (d *Driver) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	return logCall(ctx, req, info, h, d.metrics.observe)
}

// logCall is the driver's and the router's interceptor, recording into
// observe.
func logCall(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler, observe func(string, codes.Code, time.Duration)) (any, error) {
	method := info.FullMethod[strings.LastIndex(info.FullMethod, "/")+1:]
	logger := klog.LoggerWithValues(klog.FromContext(ctx), "method", method, "request", requestSeq.Add(1))
	ctx = klog.NewContext(ctx, logger)
	quiet := method == "Probe" || method == "NodeGetCapabilities" || method == "GetPluginInfo" || method == "NodeGetVolumeStats"
	v := logger.V(4)
	if !quiet {
		v = logger.V(2)
	}
	v.Info("Request", "body", protosanitizer.StripSecrets(req).String())
	start := time.Now()
	resp, err := recoverHandler(logger, method, func() (any, error) { return h(ctx, req) })
	took := time.Since(start)
	code := status.Code(err)
	observe(method, code, took)
	if err != nil {
		logger.Info("Request failed", "code", code.String(), "err", status.Convert(err).Message(), "took", took.String())
	} else {
		v.Info("Response", "body", protosanitizer.StripSecrets(resp).String(), "took", took.String())
	}
	return resp, err
}

// interceptStream recovers from panics of streaming handlers (the
// SnapshotMetadata service) as intercept does for unary ones.
func interceptStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	method := info.FullMethod[strings.LastIndex(info.FullMethod, "/")+1:]
	logger := klog.LoggerWithValues(klog.FromContext(ss.Context()), "method", method, "request", requestSeq.Add(1))
	_, err := recoverHandler(logger, method, func() (any, error) { return nil, h(srv, ss) })
	return err
}

// handlerPanics counts recovered handler panics. A panic is a bug of the
// binary, so one counter serves the process; serverOptions registers it
// on each driver's registry.
var handlerPanics = prometheus.NewCounterVec(prometheus.CounterOpts{
	Namespace: metricsNamespace, Name: "handler_panics_total",
	Help: "CSI handler panics recovered into an Internal error, by method.",
}, []string{"method"})

// recoverHandler runs one handler and turns a panic into an Internal
// error for that request: the node plugin serves every volume of its node,
// so a bug met by one request must not take the others down with the
// process. Deferred unlocks in the handler have run by the time it
// returns; a panic in a goroutine the handler started is out of reach.
func recoverHandler(logger klog.Logger, method string, h func() (any, error)) (resp any, err error) {
	defer func() {
		r := recover()
		if r == nil {
			return
		}
		handlerPanics.WithLabelValues(method).Inc()
		logger.Error(fmt.Errorf("panic: %v", r), "Handler panicked; the request fails with Internal", "stack", string(debug.Stack()))
		// %v, not %w: whatever the panic carried, the answer is Internal.
		resp, err = nil, toStatus(fmt.Errorf("%s: internal error (a bug; the plugin logged the stack): %v", method, r))
	}()
	return h()
}

// Serve serves the CSI services on lis until ctx ends, then stops gracefully.
func (d *Driver) Serve(ctx context.Context, lis net.Listener) error {
	s := d.GRPCServer()
	d.serving.Store(&serveState{addr: lis.Addr()})
	defer d.serving.Store(&serveState{stopped: true})
	return serveGRPC(ctx, s, lis)
}

// serveGRPC serves s on lis until ctx ends, then stops gracefully.
func serveGRPC(ctx context.Context, s *grpc.Server, lis net.Listener) error {
	errc := make(chan error, 1)
	go func() { errc <- s.Serve(lis) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	done := make(chan struct{})
	go func() { s.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		s.Stop()
	}
	if err := <-errc; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return err
	}
	return nil
}
