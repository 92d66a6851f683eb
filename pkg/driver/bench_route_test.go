package driver_test

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
)

// BenchmarkRoute: what the controller and the agent connection add to the
// calls a provisioning or a backup waits on. Each iteration makes the same
// call twice, once on the node's own socket (direct) and once through a
// controller (mutual TLS to the agent on 127.0.0.1), alternating so that
// both see the same pool; it reports both p50/p99 and the difference of
// the medians. tests/bench/route.sh runs it with -benchtime=200x.
func BenchmarkRoute(b *testing.B) {
	dir := b.TempDir()
	certs := drivertest.MakeCerts(b, b.TempDir())
	node := drivertest.Start(b, driver.Options{Pool: filepath.Join(dir, "pool"), NodeID: "bench-node"}, driver.Seams{Images: benchImages()})
	agent := drivertest.StartAgent(b, node, certs)
	ctl := drivertest.StartController(b, driver.StaticAgents{"bench-node": agent.Addr}, certs, driver.RouterOptions{})
	direct := dial(b, node).ControllerClient
	routed := csi.NewControllerClient(dialConn(b, ctl.Endpoint))
	ctx := context.Background()
	caps := []*csi.VolumeCapability{capMount(rw, "")}
	topo := onNode("bench-node")
	create := func(c csi.ControllerClient, name string) error {
		_, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30},
			VolumeCapabilities: caps, AccessibilityRequirements: topo})
		return err
	}
	// One source volume per path for the snapshots, so that each path's
	// image holds only its own.
	src := map[string]string{}
	for _, p := range []string{"direct", "routed"} {
		v, err := direct.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "src-" + p, CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30},
			VolumeCapabilities: caps, AccessibilityRequirements: topo})
		if err != nil {
			b.Fatal(err)
		}
		src[p] = v.Volume.VolumeId
	}
	snapshot := func(c csi.ControllerClient, path, name string) error {
		_, err := c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: src[path]})
		return err
	}
	for _, op := range []struct {
		name string
		call func(c csi.ControllerClient, path string, i int) error
	}{
		{"CreateVolume", func(c csi.ControllerClient, path string, i int) error {
			return create(c, fmt.Sprintf("%s-%d", path, i))
		}},
		{"CreateSnapshot", func(c csi.ControllerClient, path string, i int) error {
			return snapshot(c, path, fmt.Sprintf("%s-snap-%d", path, i))
		}},
		// No disk write: the routing and the connection alone.
		{"ControllerGetVolume", func(c csi.ControllerClient, path string, _ int) error {
			_, err := c.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: src[path]})
			return err
		}},
	} {
		b.Run(op.name, func(b *testing.B) {
			var d, r latencies
			for i := range b.N {
				for _, p := range []struct {
					path string
					c    csi.ControllerClient
					l    *latencies
				}{{"direct", direct, &d}, {"routed", routed, &r}} {
					t0 := time.Now()
					if err := op.call(p.c, p.path, i); err != nil {
						b.Fatal(err)
					}
					*p.l = append(*p.l, time.Since(t0))
				}
			}
			b.StopTimer()
			dp50, dp99 := d.quantiles()
			rp50, rp99 := r.quantiles()
			b.ReportMetric(dp50, "direct-p50-ms")
			b.ReportMetric(dp99, "direct-p99-ms")
			b.ReportMetric(rp50, "routed-p50-ms")
			b.ReportMetric(rp99, "routed-p99-ms")
			b.ReportMetric(rp50-dp50, "added-p50-ms")
		})
	}
}
