package driver_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
)

func TestParseEndpoint(t *testing.T) {
	// The CSI services are unauthenticated: no plaintext TCP listener.
	const tcpRefused = `endpoint "%s": plaintext TCP is not served, it would expose the CSI services unauthenticated; ` +
		`use a unix socket (unix:///path/csi.sock); the node agent, served over mutual TLS on --agent-address, is the only TCP listener`
	tests := []struct{ in, network, addr, err string }{
		{"unix:///run/csi.sock", "unix", "/run/csi.sock", ""},
		{"unix:/run/csi.sock", "unix", "/run/csi.sock", ""},
		{"/run/csi.sock", "unix", "/run/csi.sock", ""},
		{"unix://relative/csi.sock", "", "", `endpoint "unix://relative/csi.sock": want unix:///absolute/path`},
		{"http://x", "", "", `endpoint "http://x": scheme "http" not supported (unix only)`},
		{"tcp://127.0.0.1:10000", "", "", fmt.Sprintf(tcpRefused, "tcp://127.0.0.1:10000")},
		{"tcp://", "", "", fmt.Sprintf(tcpRefused, "tcp://")},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			n, a, err := driver.ParseEndpoint(tc.in)
			if n != tc.network || a != tc.addr || (err == nil) != (tc.err == "") || (err != nil && err.Error() != tc.err) {
				t.Fatalf("ParseEndpoint(%q) = %q, %q, %v; want %q, %q, %q", tc.in, n, a, err, tc.network, tc.addr, tc.err)
			}
		})
	}
}

func get(t *testing.T, h http.Handler, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
	b, _ := io.ReadAll(rec.Body)
	return rec.Code, string(b)
}

func TestMetricsAndHealth(t *testing.T) {
	srv, c := startRaw(t, driver.Options{})
	ctx := context.Background()
	if _, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-m", CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30},
		VolumeCapabilities: []*csi.VolumeCapability{capMount(rw, "")}}); err != nil {
		t.Fatal(err)
	}
	c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: "../bad"})
	code, body := get(t, srv.Driver.MetricsHandler(), "/metrics")
	if code != 200 {
		t.Fatalf("/metrics: %d", code)
	}
	for _, want := range []string{
		`qcow2_csi_operations_total{code="OK",method="CreateVolume"} 1`,
		`qcow2_csi_operations_total{code="InvalidArgument",method="DeleteVolume"} 1`,
		`qcow2_csi_operation_duration_seconds_count{method="CreateVolume"} 1`,
		"qcow2_csi_pool_volumes 1",
		"qcow2_csi_pool_provisioned_bytes 1.073741824e+09",
		"qcow2_csi_attached_volumes 0",
		"qcow2_csi_pool_available_bytes ",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	h := srv.Driver.HealthHandler()
	if code, body := get(t, h, "/healthz"); code != 200 || body != "ok\n" {
		t.Errorf("/healthz = %d %q", code, body)
	}
	// No attach backend: alive, but not ready, saying why.
	if code, body := get(t, h, "/readyz"); code != 503 || !strings.Contains(body, "no attach backend is built into this plugin") {
		t.Errorf("/readyz = %d %q", code, body)
	}
	ctrl := drivertest.Start(t, driver.Options{Mode: driver.ModeController}, driver.Seams{Images: drivertest.RawImages{}})
	if code, body := get(t, ctrl.Driver.HealthHandler(), "/readyz"); code != 200 {
		t.Errorf("controller /readyz = %d %q", code, body)
	}
}

// TestModes: each mode registers exactly its services.
func TestModes(t *testing.T) {
	for _, m := range []driver.Mode{driver.ModeController, driver.ModeNode, driver.ModeAll} {
		t.Run(string(m), func(t *testing.T) {
			srv := drivertest.Start(t, driver.Options{Mode: m}, driver.Seams{Images: drivertest.RawImages{}})
			c := dial(t, srv)
			ctx := context.Background()
			_, cerr := c.ControllerGetCapabilities(ctx, &csi.ControllerGetCapabilitiesRequest{})
			_, nerr := c.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
			if (cerr == nil) != (m != driver.ModeNode) || (nerr == nil) != (m != driver.ModeController) {
				t.Fatalf("mode %s: controller %v, node %v", m, cerr, nerr)
			}
			// Every mode answers NodeGetCapabilities: a central csi-resizer
			// asks the controller whether expansion is node-side.
			ncaps, err := c.NodeGetCapabilities(ctx, &csi.NodeGetCapabilitiesRequest{})
			if err != nil {
				t.Fatalf("mode %s: NodeGetCapabilities: %v", m, err)
			}
			hasExpand := false
			for _, cp := range ncaps.Capabilities {
				hasExpand = hasExpand || cp.GetRpc().GetType() == csi.NodeServiceCapability_RPC_EXPAND_VOLUME
			}
			if !hasExpand {
				t.Fatalf("mode %s: no node EXPAND_VOLUME", m)
			}
			pc, err := c.GetPluginCapabilities(ctx, &csi.GetPluginCapabilitiesRequest{})
			if err != nil {
				t.Fatal(err)
			}
			hasCtrl := false
			for _, cp := range pc.Capabilities {
				if cp.GetService().GetType() == csi.PluginCapability_Service_CONTROLLER_SERVICE {
					hasCtrl = true
				}
			}
			if hasCtrl != (m != driver.ModeNode) {
				t.Fatalf("mode %s advertises CONTROLLER_SERVICE = %v", m, hasCtrl)
			}
			info, err := c.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
			if m != driver.ModeController && (err != nil || info.NodeId != "test-node" || info.AccessibleTopology.Segments[driver.DefaultDriverName+"/node"] != "test-node") {
				t.Fatalf("NodeGetInfo = %v, %v", info, err)
			}
		})
	}
}

// TestKubeletRegistration plays the kubelet's plugin watcher against the
// registration socket.
func TestKubeletRegistration(t *testing.T) {
	srv, _ := startRaw(t, driver.Options{})
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Driver.ServeKubeletRegistration(ctx, dir, "/var/lib/kubelet/plugins/x/csi.sock") }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	sock := filepath.Join(dir, driver.DefaultDriverName+"-reg.sock")
	if got := srv.Driver.RegistrationSocket(dir); got != sock {
		t.Fatalf("RegistrationSocket = %s, want %s", got, sock)
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rc := registerapi.NewRegistrationClient(conn)
	cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
	defer ccancel()
	info, err := rc.GetInfo(cctx, &registerapi.InfoRequest{}, grpc.WaitForReady(true))
	if err != nil {
		t.Fatal(err)
	}
	if info.Type != registerapi.CSIPlugin || info.Name != driver.DefaultDriverName || info.Endpoint != "/var/lib/kubelet/plugins/x/csi.sock" || len(info.SupportedVersions) != 1 || info.SupportedVersions[0] != "1.0.0" {
		t.Fatalf("GetInfo = %v", info)
	}
	if _, err := rc.NotifyRegistrationStatus(cctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatal(err)
	}
}
