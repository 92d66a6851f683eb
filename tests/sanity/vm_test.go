//go:build linux

package sanity

import (
	"testing"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/kernel"
	"github.com/qcow2-csi/qcow2-csi/tests/sanity/sanityrun"
	"github.com/qcow2-csi/qcow2-csi/tests/vm/vmharness"
)

// TestSanityInVM boots a real kernel with nbd.ko (tests/vm/vmharness) and
// runs the whole suite there on qcow2 images attached through the kernel NBD
// driver: real /dev/nbdN, real mkfs and mounts.
func TestSanityInVM(t *testing.T) {
	if vmharness.InVM() {
		t.Skip("host-side entry test")
	}
	vmharness.RunGoTest(t, ".", "^TestGuestSanity$", vmharness.Options{})
}

// TestGuestSanity is the guest half of TestSanityInVM.
func TestGuestSanity(t *testing.T) {
	vmharness.Guest(t)
	sanityrun.Run(t, driver.Seams{
		Images:    driver.Qcow2Images{},
		Attachers: []nbdattach.Attacher{kernel.NewAttacher(kernel.Options{})},
	}, "nbd")
}
