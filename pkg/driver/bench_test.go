package driver_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/fuse"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// Benchmarks of the RPCs a user waits on, through the gRPC socket. Each
// reports p50 and p99 latencies besides ns/op; tests/bench/driver.sh runs them
// with -benchtime=200x. Images are qcow2 (pkg/qcow2); the attach backend is
// fuse, since this host's kernel has no nbd (the NBD data path is measured by
// tests/bench/nbd.sh).

type latencies []time.Duration

func (l latencies) report(b *testing.B) {
	if len(l) == 0 {
		return
	}
	p50, p99 := l.quantiles()
	b.ReportMetric(p50, "p50-ms")
	b.ReportMetric(p99, "p99-ms")
}

// quantiles are the p50 and p99 in milliseconds (l is sorted in place).
func (l latencies) quantiles() (p50, p99 float64) {
	if len(l) == 0 {
		return 0, 0
	}
	slices.Sort(l)
	q := func(p float64) float64 { return float64(l[int(p*float64(len(l)-1))].Microseconds()) / 1000 }
	return q(0.50), q(0.99)
}

func benchServer(b *testing.B, attachers ...nbdattach.Attacher) (clients, string) {
	b.Helper()
	dir := b.TempDir()
	srv := drivertest.Start(b, driver.Options{Pool: filepath.Join(dir, "pool"), ControllerExpand: true},
		driver.Seams{Images: benchImages(), Attachers: attachers})
	return dial(b, srv), dir
}

func BenchmarkCreateVolume1TiB(b *testing.B) {
	c, _ := benchServer(b)
	ctx := context.Background()
	var l latencies
	caps := []*csi.VolumeCapability{capMount(rw, "")}
	b.ResetTimer()
	for i := range b.N {
		t0 := time.Now()
		if _, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: fmt.Sprintf("pvc-%d", i),
			CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 40}, VolumeCapabilities: caps}); err != nil {
			b.Fatal(err)
		}
		l = append(l, time.Since(t0))
	}
	b.StopTimer()
	l.report(b)
}

func BenchmarkDeleteVolume(b *testing.B) {
	c, _ := benchServer(b)
	ctx := context.Background()
	caps := []*csi.VolumeCapability{capMount(rw, "")}
	ids := make([]string, b.N)
	for i := range b.N {
		r, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: fmt.Sprintf("pvc-%d", i),
			CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 40}, VolumeCapabilities: caps})
		if err != nil {
			b.Fatal(err)
		}
		ids[i] = r.Volume.VolumeId
	}
	var l latencies
	b.ResetTimer()
	for _, id := range ids {
		t0 := time.Now()
		if _, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			b.Fatal(err)
		}
		l = append(l, time.Since(t0))
	}
	b.StopTimer()
	l.report(b)
}

// BenchmarkNodeStagePublish times NodeStageVolume (open, attach, mkfs.ext4
// on first use, mount) plus NodePublishVolume (bind mount) of a fresh 1 GiB
// volume; unpublish, unstage and delete run outside the timer.
func BenchmarkNodeStagePublish(b *testing.B) {
	peer.Root(b)
	peer.Require(b, "mkfs.ext4")
	fa := fuse.NewAttacher(fuse.Options{Dir: filepath.Join(b.TempDir(), "fuse")})
	if err := fa.Available(); err != nil {
		peer.Missing(b, "the fuse attach backend", err.Error())
	}
	c, dir := benchServer(b, fa)
	ctx := context.Background()
	capab := capMount(rw, "ext4")
	var l latencies
	b.ResetTimer()
	for i := range b.N {
		b.StopTimer()
		r, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: fmt.Sprintf("pvc-%d", i),
			CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30}, VolumeCapabilities: []*csi.VolumeCapability{capab}})
		if err != nil {
			b.Fatal(err)
		}
		id := r.Volume.VolumeId
		staging, target := filepath.Join(dir, "staging", id), filepath.Join(dir, "pods", id)
		os.MkdirAll(staging, 0o750)
		b.StartTimer()
		t0 := time.Now()
		if _, err := c.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: capab, VolumeContext: r.Volume.VolumeContext}); err != nil {
			b.Fatal(err)
		}
		if _, err := c.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: capab}); err != nil {
			b.Fatal(err)
		}
		l = append(l, time.Since(t0))
		b.StopTimer()
		if _, err := c.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
			b.Fatal(err)
		}
		if _, err := c.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
			b.Fatal(err)
		}
		if _, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.StopTimer()
	l.report(b)
}

// benchImages is the image library the benchmarks run on.
func benchImages() driver.Images { return driver.Qcow2Images{} }
