// Package sanityrun runs the csi-test sanity suite against a driver served
// in process. The Ginkgo suite can run once per process, so each test binary
// (tests/sanity on qcow2, tests/sanity/raw on raw images, the VM run) calls
// Run once.
package sanityrun

import (
	"path/filepath"
	"testing"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
)

// Run serves a driver built from seams, with the given --attach-backend, and
// runs the whole suite against it.
func Run(t *testing.T, seams driver.Seams, backend string) {
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
