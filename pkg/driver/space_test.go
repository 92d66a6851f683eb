package driver_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// tmpfsPool mounts a tmpfs of size bytes and returns a pool directory in
// it: a pool filesystem of a known size that a test can fill.
func tmpfsPool(t *testing.T, size int64) string {
	t.Helper()
	peer.Root(t)
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", fmt.Sprintf("size=%d", size), "tmpfs", dir).CombinedOutput(); err != nil {
		peer.Missing(t, "tmpfs mount", string(out))
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v\n%s", dir, err, out)
		}
	})
	return filepath.Join(dir, "pool")
}

// fill writes a file in dir until its filesystem is full, and returns its
// path.
func fill(t *testing.T, dir string) string {
	t.Helper()
	p := filepath.Join(dir, "filler")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for {
		if _, err := f.Write(buf); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			return p
		}
	}
}

func volumeReq(name string, size int64, params map[string]string) *csi.CreateVolumeRequest {
	return &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{capBlock(rw)}, Parameters: params}
}

// metricsHas fails unless the driver's metrics contain every line.
func metricsHas(t *testing.T, d *driver.Driver, lines ...string) {
	t.Helper()
	_, body := get(t, d.MetricsHandler(), "/metrics")
	for _, l := range lines {
		if !strings.Contains(body, l+"\n") {
			t.Errorf("/metrics lacks %q", l)
		}
	}
}

// TestHealthFullPool: a full pool is not a dead plugin. Liveness (/healthz)
// stays OK, so the kubelet does not restart the plugin in a loop (with
// fuse each restart would drop every device); the fullness shows in
// readiness (/readyz), the volumes' condition and the metrics, and goes
// away when space is freed. Probe stays ready: the upstream livenessprobe
// sidecar turns "not ready" into a failed liveness check.
func TestHealthFullPool(t *testing.T) {
	ctx := context.Background()
	pool := tmpfsPool(t, 32<<20)
	srv := drivertest.Start(t, driver.Options{Mode: driver.ModeController, Pool: pool}, driver.Seams{Images: drivertest.RawImages{}})
	c := dial(t, srv)
	h := srv.Driver.HealthHandler()
	v, err := c.CreateVolume(ctx, volumeReq("v", 1<<30, nil))
	if err != nil {
		t.Fatal(err)
	}
	vol := v.Volume.VolumeId
	condition := func() *csi.VolumeCondition {
		t.Helper()
		r, err := c.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: vol})
		if err != nil {
			t.Fatal(err)
		}
		return r.GetStatus().GetVolumeCondition()
	}
	if cond := condition(); cond.Abnormal {
		t.Fatalf("empty pool: condition %v", cond)
	}
	metricsHas(t, srv.Driver, "qcow2_csi_pool_full 0", "qcow2_csi_pool_nearly_full 0")

	filler := fill(t, filepath.Dir(pool))
	if code, body := get(t, h, "/healthz"); code != 200 || body != "ok\n" {
		t.Errorf("full pool: /healthz = %d %q, want 200: liveness must not depend on free space", code, body)
	}
	if code, body := get(t, h, "/readyz"); code != 503 || !strings.Contains(body, "is full") {
		t.Errorf("full pool: /readyz = %d %q, want 503 saying the pool is full", code, body)
	}
	if r, err := c.Probe(ctx, &csi.ProbeRequest{}); err != nil || !r.GetReady().GetValue() {
		t.Errorf("full pool: Probe = %v, %v; want ready", r, err)
	}
	if cond := condition(); !cond.Abnormal || !strings.Contains(cond.Message, "is full") {
		t.Errorf("full pool: condition %v, want abnormal saying the pool is full", cond)
	}
	metricsHas(t, srv.Driver, "qcow2_csi_pool_full 1", "qcow2_csi_pool_nearly_full 1")
	_, err = c.CreateVolume(ctx, volumeReq("w", 1<<20, nil))
	wantCode(t, err, codes.ResourceExhausted, "available above the reserve")

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	if code, body := get(t, h, "/readyz"); code != 200 {
		t.Errorf("space freed: /readyz = %d %q", code, body)
	}
	if cond := condition(); cond.Abnormal {
		t.Errorf("space freed: condition %v", cond)
	}
}

// TestHealthNearlyFull: above the warning threshold the volumes' condition
// turns abnormal and says how full the pool is, before writes fail; the
// plugin stays live and ready.
func TestHealthNearlyFull(t *testing.T) {
	ctx := context.Background()
	pool := tmpfsPool(t, 32<<20)
	srv := drivertest.Start(t, driver.Options{Mode: driver.ModeController, Pool: pool, PoolWarningPercent: 50}, driver.Seams{Images: drivertest.RawImages{}})
	c := dial(t, srv)
	v, err := c.CreateVolume(ctx, volumeReq("v", 64<<20, nil))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(filepath.Dir(pool), "filler"), make([]byte, 20<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := c.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: v.Volume.VolumeId})
	if err != nil {
		t.Fatal(err)
	}
	if cond := r.GetStatus().GetVolumeCondition(); !cond.Abnormal || !strings.Contains(cond.Message, "warning threshold 50%") {
		t.Errorf("condition %v, want abnormal naming the threshold", cond)
	}
	h := srv.Driver.HealthHandler()
	if code, _ := get(t, h, "/healthz"); code != 200 {
		t.Errorf("/healthz = %d", code)
	}
	if code, body := get(t, h, "/readyz"); code != 200 || !strings.Contains(body, "warning") {
		t.Errorf("/readyz = %d %q, want 200 with a warning", code, body)
	}
	metricsHas(t, srv.Driver, "qcow2_csi_pool_full 0", "qcow2_csi_pool_nearly_full 1")
}

// TestLivenessNeedsGRPC: liveness means the CSI server answers. With its
// socket gone (the kubelet can no longer reach it either) /healthz fails,
// so that a restart makes a new one.
func TestLivenessNeedsGRPC(t *testing.T) {
	srv := drivertest.Start(t, driver.Options{Mode: driver.ModeController}, driver.Seams{Images: drivertest.RawImages{}})
	// An answer means Serve runs (before, the process is starting, which
	// is alive).
	if _, err := dial(t, srv).GetPluginInfo(context.Background(), &csi.GetPluginInfoRequest{}); err != nil {
		t.Fatal(err)
	}
	h := srv.Driver.HealthHandler()
	if code, body := get(t, h, "/healthz"); code != 200 || body != "ok\n" {
		t.Fatalf("/healthz = %d %q", code, body)
	}
	if err := os.Remove(srv.Socket); err != nil {
		t.Fatal(err)
	}
	if code, body := get(t, h, "/healthz"); code != 500 || !strings.Contains(body, "CSI server does not answer") {
		t.Fatalf("socket gone: /healthz = %d %q, want 500", code, body)
	}
	srv.Stop(t)
	if code, body := get(t, h, "/healthz"); code != 500 || !strings.Contains(body, "CSI server has stopped") {
		t.Fatalf("server stopped: /healthz = %d %q, want 500", code, body)
	}
}

// TestOvercommitRatio: thin volumes may provision at most ratio times the
// pool (minus its reserve); CreateVolume and ControllerExpandVolume refuse
// more with ResourceExhausted naming the numbers; ratio 0 is unlimited.
func TestOvercommitRatio(t *testing.T) {
	ctx := context.Background()
	pool := tmpfsPool(t, 64<<20)
	srv := drivertest.Start(t, driver.Options{Pool: pool, OvercommitRatio: 10, ControllerExpand: true}, driver.Seams{Images: drivertest.RawImages{}})
	c := dial(t, srv)
	_, err := c.CreateVolume(ctx, volumeReq("huge", 2<<50, nil))
	wantCode(t, err, codes.ResourceExhausted, "2251799813685248 bytes would bring the pool's provisioned total to 2251799813685248, above the overcommit limit 671088640 (ratio 10 × 67108864 bytes of pool after the reserve")
	// GetCapacity answers what CreateVolume would accept: provisioning room
	// for thin volumes, disk space for preallocated ones.
	capacity := func(params map[string]string) int64 {
		t.Helper()
		r, err := c.GetCapacity(ctx, &csi.GetCapacityRequest{Parameters: params})
		if err != nil {
			t.Fatal(err)
		}
		return r.AvailableCapacity
	}
	if got := capacity(nil); got != 640<<20 {
		t.Errorf("thin capacity %d, want the limit %d", got, 640<<20)
	}
	if got := capacity(map[string]string{"preallocation": "full"}); got <= 0 || got > 64<<20 {
		t.Errorf("preallocated capacity %d, want the free space", got)
	}
	a, err := c.CreateVolume(ctx, volumeReq("a", 600<<20, nil))
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.CreateVolume(ctx, volumeReq("b", 100<<20, nil))
	wantCode(t, err, codes.ResourceExhausted, "104857600 bytes would bring the pool's provisioned total to 734003200, above the overcommit limit 671088640")
	cv, err := c.CreateVolume(ctx, volumeReq("c", 40<<20, nil))
	if err != nil {
		t.Fatal(err)
	}
	if got := capacity(nil); got != 0 {
		t.Errorf("thin capacity %d with the limit reached, want 0", got)
	}
	_, err = c.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: a.Volume.VolumeId,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 700 << 20}, VolumeCapability: capBlock(rw)})
	wantCode(t, err, codes.ResourceExhausted, "104857600 bytes would bring the pool's provisioned total to 775946240, above the overcommit limit 671088640")
	metricsHas(t, srv.Driver, "qcow2_csi_pool_provisioned_bytes 6.7108864e+08", "qcow2_csi_pool_provisioned_limit_bytes 6.7108864e+08",
		"qcow2_csi_pool_reserved_bytes 0")
	// A repeated create of an existing volume is not new provisioning.
	if _, err := c.CreateVolume(ctx, volumeReq("a", 600<<20, nil)); err != nil {
		t.Fatalf("repeated create: %v", err)
	}
	// Space freed by a delete is provisioning room again.
	if _, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: a.Volume.VolumeId}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CreateVolume(ctx, volumeReq("b", 100<<20, nil)); err != nil {
		t.Fatal(err)
	}
	// An expansion's new size counts once its record says so (the claim is
	// gone by then): 100 + 540 MiB is the limit exactly.
	if _, err := c.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: cv.Volume.VolumeId,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 540 << 20}, VolumeCapability: capBlock(rw)}); err != nil {
		t.Fatal(err)
	}
	_, err = c.CreateVolume(ctx, volumeReq("d", 1<<20, nil))
	wantCode(t, err, codes.ResourceExhausted, "1048576 bytes would bring the pool's provisioned total to 672137216")
	srv.Stop(t)

	srv = drivertest.Start(t, driver.Options{Pool: pool}, driver.Seams{Images: drivertest.RawImages{}})
	if _, err := dial(t, srv).CreateVolume(ctx, volumeReq("huge", 2<<50, nil)); err != nil {
		t.Fatalf("ratio 0 (unlimited): %v", err)
	}
}

// TestConcurrentSpaceReservation: creates and expansions that run at once
// claim space from one ledger. Of three preallocated creates of which only
// one fits, exactly one succeeds (before, all three passed the free-space
// check and raced for the blocks); of three thin expansions of which two
// fit under the overcommit limit, exactly two do.
func TestConcurrentSpaceReservation(t *testing.T) {
	ctx := context.Background()
	pool := tmpfsPool(t, 64<<20)
	srv := drivertest.Start(t, driver.Options{Pool: pool, OvercommitRatio: 5, ControllerExpand: true}, driver.Seams{Images: driver.Qcow2Images{}})
	c := dial(t, srv)
	run := func(n int, op func(i int) error) (ok int, errs []error) {
		var mu sync.Mutex
		var wg sync.WaitGroup
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				err := op(i)
				mu.Lock()
				defer mu.Unlock()
				if err == nil {
					ok++
				} else {
					errs = append(errs, err)
				}
			}()
		}
		wg.Wait()
		return ok, errs
	}
	check := func(what string, ok, want int, errs []error) {
		t.Helper()
		if ok != want {
			t.Fatalf("%s: %d succeeded, want %d; errors %v", what, ok, want, errs)
		}
		for _, err := range errs {
			if status.Code(err) != codes.ResourceExhausted {
				t.Fatalf("%s: %v, want ResourceExhausted", what, err)
			}
		}
	}
	prealloc := map[string]string{"preallocation": "falloc"}
	ok, errs := run(3, func(i int) error {
		_, err := c.CreateVolume(ctx, volumeReq(fmt.Sprintf("p%d", i), 36<<20, prealloc))
		return err
	})
	check("36 MiB preallocated creates in 64 MiB", ok, 1, errs)
	images, _ := filepath.Glob(filepath.Join(pool, "*.qcow2"))
	temps, _ := filepath.Glob(filepath.Join(pool, ".tmp-*"))
	if len(images) != 1 || len(temps) != 0 {
		t.Errorf("pool holds images %v and temporary files %v after the creates, want one image", images, temps)
	}

	// Ratio 5 of 64 MiB is 320 MiB: with 36 + 3 × 64 MiB provisioned, 92
	// MiB are left, room for two of three expansions to 100 MiB (+36 MiB).
	var vols []string
	for i := range 3 {
		v, err := c.CreateVolume(ctx, volumeReq(fmt.Sprintf("t%d", i), 64<<20, nil))
		if err != nil {
			t.Fatal(err)
		}
		vols = append(vols, v.Volume.VolumeId)
	}
	ok, errs = run(3, func(i int) error {
		_, err := c.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: vols[i],
			CapacityRange: &csi.CapacityRange{RequiredBytes: 100 << 20}, VolumeCapability: capBlock(rw)})
		return err
	})
	check("thin expansions to 100 MiB", ok, 2, errs)
	metricsHas(t, srv.Driver, "qcow2_csi_pool_reserved_bytes 0")
}

// TestCloneClaimsSourceData: a clone copies its source's data, so it is
// refused up front, with the numbers, when that does not fit, instead of
// failing with ENOSPC halfway through the copy.
func TestCloneClaimsSourceData(t *testing.T) {
	ctx := context.Background()
	pool := tmpfsPool(t, 64<<20)
	srv := drivertest.Start(t, driver.Options{Pool: pool}, driver.Seams{Images: driver.Qcow2Images{}})
	c := dial(t, srv)
	v, err := c.CreateVolume(ctx, volumeReq("src", 64<<20, nil))
	if err != nil {
		t.Fatal(err)
	}
	img, err := qcow2.Open(imageFile(pool, v.Volume.VolumeId), qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 36<<20)
	for i := range data {
		data[i] = byte(i>>12) | 1
	}
	if _, err := img.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	src := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: v.Volume.VolumeId}}}
	req := volumeReq("clone", 64<<20, nil)
	req.VolumeContentSource = src
	_, err = c.CreateVolume(ctx, req)
	wantCode(t, err, codes.ResourceExhausted, "bytes needed")
	if temps, _ := filepath.Glob(filepath.Join(pool, ".tmp-*")); len(temps) != 0 {
		t.Errorf("temporary files left: %v", temps)
	}
}
