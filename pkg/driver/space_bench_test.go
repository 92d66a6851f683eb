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

// BenchmarkCreateVolumeOvercommit: CreateVolume with an overcommit limit,
// which adds up the pool's recorded sizes at every create (b.N volumes
// accumulate in the pool, so late creates scan more), against no limit.
func BenchmarkCreateVolumeOvercommit(b *testing.B) {
	for _, ratio := range []float64{0, driver.DefaultOvercommitRatio} {
		b.Run(fmt.Sprintf("ratio=%g", ratio), func(b *testing.B) {
			srv := drivertest.Start(b, driver.Options{Pool: filepath.Join(b.TempDir(), "pool"), OvercommitRatio: ratio},
				driver.Seams{Images: driver.Qcow2Images{}})
			c := dial(b, srv)
			ctx := context.Background()
			caps := []*csi.VolumeCapability{capMount(rw, "")}
			var l latencies
			b.ResetTimer()
			for i := range b.N {
				t0 := time.Now()
				if _, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: fmt.Sprintf("pvc-%d", i),
					CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30}, VolumeCapabilities: caps}); err != nil {
					b.Fatal(err)
				}
				l = append(l, time.Since(t0))
			}
			b.StopTimer()
			l.report(b)
		})
	}
}
