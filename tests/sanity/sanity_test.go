// Package sanity runs the kubernetes-csi csi-test sanity suite, in process,
// against the whole driver (Identity, Controller, Node): real image files in
// a temporary pool, real block devices, real mkfs and mounts.
package sanity

import (
	"path/filepath"
	"testing"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// TestSanity runs the suite on this host: raw images attached as loop
// devices (drivertest), which exercises everything of the driver but the
// qcow2 library and the NBD/FUSE data path.
func TestSanity(t *testing.T) {
	peer.Root(t)
	peer.Require(t, "losetup")
	peer.Require(t, "mkfs.ext4")
	runSanity(t, driver.Seams{
		Images:    drivertest.RawImages{},
		Attachers: []nbdattach.Attacher{&drivertest.LoopAttacher{}},
	}, "auto")
}

// runSanity serves a driver with seams and runs the whole suite against it.
// The Ginkgo suite can run once per process: each test binary (host, VM)
// calls this once.
func runSanity(t *testing.T, seams driver.Seams, backend string) {
	srv := drivertest.Start(t, driver.Options{ControllerExpand: true, AttachBackend: backend}, seams)
	dir := t.TempDir()
	cfg := sanity.NewTestConfig()
	cfg.Address = srv.Endpoint
	cfg.TargetPath = filepath.Join(dir, "target")
	cfg.StagingPath = filepath.Join(dir, "staging")
	cfg.TestVolumeSize = 64 << 20
	cfg.TestVolumeExpandSize = 128 << 20
	cfg.IdempotentCount = 3
	sanity.Test(t, cfg)
}
