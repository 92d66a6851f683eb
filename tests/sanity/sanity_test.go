// Package sanity runs the kubernetes-csi csi-test sanity suite, in process,
// against the whole driver (Identity, Controller, Node): qcow2 images in a
// temporary pool, real block devices, real mkfs and mounts.
package sanity

import (
	"path/filepath"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/fuse"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
	"github.com/qcow2-csi/qcow2-csi/tests/sanity/sanityrun"
)

// TestSanity runs the suite on this host with the product's own parts:
// qcow2 images attached through the fuse backend (FUSE file + loop device),
// since this host's kernel has no nbd. The nbd backend runs the same suite in
// a real kernel (TestSanityInVM).
func TestSanity(t *testing.T) {
	peer.Root(t)
	peer.Require(t, "mkfs.ext4")
	fa := fuse.NewAttacher(fuse.Options{Dir: filepath.Join(t.TempDir(), "fuse")})
	if err := fa.Available(); err != nil {
		peer.Missing(t, "the fuse attach backend", err.Error())
	}
	sanityrun.Run(t, driver.Seams{
		Images:    driver.Qcow2Images{},
		Attachers: []nbdattach.Attacher{fa},
	}, "fuse")
}
