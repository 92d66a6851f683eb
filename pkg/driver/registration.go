package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"

	"google.golang.org/grpc"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// registrar answers the kubelet's plugin watcher (pluginregistration v1), the
// job node-driver-registrar usually does: the kubelet finds
// <dir>/<driver>-reg.sock, asks GetInfo for the CSI endpoint and reports
// whether registration worked.
type registrar struct {
	registerapi.UnimplementedRegistrationServer
	name, endpoint string
}

func (r *registrar) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.name,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registrar) NotifyRegistrationStatus(ctx context.Context, s *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if !s.PluginRegistered {
		klog.FromContext(ctx).Error(fmt.Errorf("kubelet refused the plugin registration: %s", s.Error), "Kubelet registration failed")
	} else {
		klog.FromContext(ctx).Info("Registered with the kubelet")
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// RegistrationSocket is where the kubelet looks for this driver's
// registration socket in its plugin registration directory.
func (d *Driver) RegistrationSocket(dir string) string {
	return filepath.Join(dir, d.opts.DriverName+"-reg.sock")
}

// registrationServer is the gRPC server of the registration socket, with
// the driver's interceptors: a panic while answering the kubelet fails that
// call, it does not take down the node plugin and every volume it serves.
func (d *Driver) registrationServer(r registerapi.RegistrationServer) *grpc.Server {
	s := grpc.NewServer(d.serverOptions()...)
	registerapi.RegisterRegistrationServer(s, r)
	return s
}

// ServeKubeletRegistration serves the kubelet plugin registration API on
// <dir>/<driver>-reg.sock until ctx ends. kubeletEndpoint is the CSI socket
// path as the kubelet sees it on the host (it differs from --endpoint inside
// a container).
func (d *Driver) ServeKubeletRegistration(ctx context.Context, dir, kubeletEndpoint string) error {
	sock := d.RegistrationSocket(dir)
	lis, err := Listen(sock)
	if err != nil {
		return fmt.Errorf("kubelet registration socket: %w", err)
	}
	s := d.registrationServer(&registrar{name: d.opts.DriverName, endpoint: kubeletEndpoint})
	go func() {
		<-ctx.Done()
		s.Stop()
	}()
	klog.FromContext(ctx).Info("Serving kubelet plugin registration", "socket", sock, "csiEndpoint", kubeletEndpoint)
	if err := s.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return err
	}
	return nil
}

// HealthHandler serves /healthz (liveness: the CSI server answers; see
// liveness) and /readyz (readiness: what Probe answers, and 503 when the
// pool is full; a nearly full pool is a warning in the body). Liveness
// deliberately does not include readiness: a node without nbd must not
// crash-loop, it must answer NodeStage with a clear FailedPrecondition, and
// a full pool must not either (with fuse a restart drops every device).
func (d *Driver) HealthHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		if err := d.liveness(r.Context()); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if err := d.readiness(); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		switch lvl, msg := d.spaceState(); lvl {
		case spaceFull:
			http.Error(w, msg, http.StatusServiceUnavailable)
		case spaceLow:
			fmt.Fprintf(w, "ok\nwarning: %s\n", msg)
		default:
			fmt.Fprintln(w, "ok")
		}
	})
	return mux
}

// ServeHTTP serves handlers on addr until ctx ends.
func ServeHTTP(ctx context.Context, addr string, h http.Handler) error {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: h}
	go func() {
		<-ctx.Done()
		_ = srv.Close()
	}()
	if err := srv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
