package driver

import (
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type panicRegistrar struct {
	registerapi.UnimplementedRegistrationServer
}

func (panicRegistrar) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	var p *registerapi.PluginInfo
	return &registerapi.PluginInfo{Name: p.Name}, nil // a nil dereference
}

func (panicRegistrar) NotifyRegistrationStatus(context.Context, *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	return &registerapi.RegistrationStatusResponse{}, nil
}

// TestRegistrationPanicRecovered: a panic while answering the kubelet on
// the registration socket fails that call with Internal and the server
// (the process) goes on. Without the driver's interceptors the panic
// ends the test binary.
func TestRegistrationPanicRecovered(t *testing.T) {
	d := &Driver{}
	d.metrics = newMetrics(d)
	s := d.registrationServer(panicRegistrar{})
	conn := serveForTest(t, s)
	rc := registerapi.NewRegistrationClient(conn)
	ctx := context.Background()
	before := counterValue(t, handlerPanics.WithLabelValues("GetInfo"))
	_, err := rc.GetInfo(ctx, &registerapi.InfoRequest{})
	if status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "GetInfo: internal error") {
		t.Fatalf("GetInfo: %v; want Internal naming the method", err)
	}
	if got := counterValue(t, handlerPanics.WithLabelValues("GetInfo")); got != before+1 {
		t.Errorf("handler_panics_total{method=GetInfo} = %v, want %v", got, before+1)
	}
	if _, err := rc.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatalf("after the panic: %v", err)
	}
}
