// Package raw runs the csi-test sanity suite against the driver's own logic
// on raw image files attached as loop devices (pkg/driver/drivertest): the
// same suite as tests/sanity minus the qcow2 library and the NBD/FUSE data
// path, with every feature of the driver's advertised, expansion included.
package raw

import (
	"testing"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
	"github.com/qcow2-csi/qcow2-csi/tests/sanity/sanityrun"
)

func TestSanityRaw(t *testing.T) {
	peer.Root(t)
	peer.Require(t, "losetup")
	peer.Require(t, "mkfs.ext4")
	sanityrun.Run(t, driver.Seams{
		Images:    drivertest.RawImages{},
		Attachers: []nbdattach.Attacher{&drivertest.LoopAttacher{}},
	}, "auto")
}
