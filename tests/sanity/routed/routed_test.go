// Package routed runs the csi-test sanity suite through the cluster
// topology: csi-sanity's Controller calls go to a controller
// (serve --mode=controller) that routes them over mutual TLS to a node
// agent, its Node calls to that node's own socket. (The Ginkgo suite runs
// once per process: a package of its own.)
package routed

import (
	"path/filepath"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/fuse"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
	"github.com/qcow2-csi/qcow2-csi/tests/sanity/sanityrun"
)

// TestSanityRouted: the whole suite, zero failures, through controller and
// agent, on qcow2 images attached with the fuse backend (as TestSanity).
func TestSanityRouted(t *testing.T) {
	peer.Root(t)
	peer.Require(t, "mkfs.ext4")
	fa := fuse.NewAttacher(fuse.Options{Dir: filepath.Join(t.TempDir(), "fuse")})
	if err := fa.Available(); err != nil {
		peer.Missing(t, "the fuse attach backend", err.Error())
	}
	sanityrun.RunRouted(t, driver.Seams{
		Images:    driver.Qcow2Images{},
		Attachers: []nbdattach.Attacher{fa},
	}, "fuse")
}
