package driver

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// serveForTest serves s on a unix socket of the test's, stopped at the
// end, and dials it.
func serveForTest(t *testing.T, s *grpc.Server) *grpc.ClientConn {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "grpc.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(lis)
	t.Cleanup(s.Stop)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

type panicIdentity struct {
	csi.UnimplementedIdentityServer
}

func (panicIdentity) Probe(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	var m map[string]int
	m["x"]++ // a nil map write: the kind of bug a handler meets at run time
	return &csi.ProbeResponse{}, nil
}

func (panicIdentity) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: "still.serving", VendorVersion: "1"}, nil
}

type panicMetadata struct {
	csi.UnimplementedSnapshotMetadataServer
}

func (panicMetadata) GetMetadataAllocated(*csi.GetMetadataAllocatedRequest, csi.SnapshotMetadata_GetMetadataAllocatedServer) error {
	var s []int
	_ = s[3]
	return nil
}

// A handler that panics fails its own request with Internal, is counted
// in handler_panics_total and logged, and the server goes on serving the
// next requests on the same connection: unary and streaming calls alike.
func TestHandlerPanicBecomesInternal(t *testing.T) {
	d := &Driver{}
	d.metrics = newMetrics(d)
	s := grpc.NewServer(d.serverOptions()...)
	csi.RegisterIdentityServer(s, panicIdentity{})
	csi.RegisterSnapshotMetadataServer(s, panicMetadata{})
	conn := serveForTest(t, s)
	ctx := context.Background()

	probes := counterValue(t, handlerPanics.WithLabelValues("Probe"))
	streams := counterValue(t, handlerPanics.WithLabelValues("GetMetadataAllocated"))
	id := csi.NewIdentityClient(conn)
	for i := 0; i < 2; i++ {
		_, err := id.Probe(ctx, &csi.ProbeRequest{})
		if status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "Probe: internal error") || !strings.Contains(err.Error(), "nil map") {
			t.Fatalf("Probe #%d: %v; want Internal naming the method and the panic", i, err)
		}
	}
	if r, err := id.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{}); err != nil || r.Name != "still.serving" {
		t.Fatalf("GetPluginInfo after the panics: %v %v", r, err)
	}

	st, err := csi.NewSnapshotMetadataClient(conn).GetMetadataAllocated(ctx, &csi.GetMetadataAllocatedRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "index out of range") {
		t.Fatalf("stream Recv: %v; want Internal naming the panic", err)
	}
	if r, err := id.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{}); err != nil || r.Name != "still.serving" {
		t.Fatalf("GetPluginInfo after the stream panic: %v %v", r, err)
	}

	if got := counterValue(t, handlerPanics.WithLabelValues("Probe")) - probes; got != 2 {
		t.Errorf("handler_panics_total{method=Probe} rose by %v, want 2", got)
	}
	if got := counterValue(t, handlerPanics.WithLabelValues("GetMetadataAllocated")) - streams; got != 1 {
		t.Errorf("handler_panics_total{method=GetMetadataAllocated} rose by %v, want 1", got)
	}
	if got := counterValue(t, d.metrics.ops.WithLabelValues("Probe", codes.Internal.String())); got != 2 {
		t.Errorf("operations_total{Probe,Internal} = %v, want 2", got)
	}
}

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}
