// Package sanity runs the kubernetes-csi csi-test sanity suite, in process,
// against the whole driver (Identity, Controller, Node) on this host: real
// image files in a temporary pool, real block devices, real mkfs and mounts.
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

func TestSanity(t *testing.T) {
	peer.Root(t)
	peer.Require(t, "losetup")
	peer.Require(t, "mkfs.ext4")
	srv := drivertest.Start(t, driver.Options{ControllerExpand: true}, driver.Seams{
		Images:    drivertest.RawImages{},
		Attachers: []nbdattach.Attacher{&drivertest.LoopAttacher{}},
	})
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
