//go:build linux

package vm

import (
	"os"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/tests/vm/vmharness"
)

// TestVM boots one VM for the whole suite and runs every TestGuest* test in
// it; the host side then checks the images the guest left in the share.
func TestVM(t *testing.T) {
	if vmharness.InVM() {
		t.Skip("this is the host-side entry test")
	}
	res := vmharness.RunGoTest(t, ".", "^TestGuest", vmharness.Options{})
	_ = res
}

func TestGuestSmoke(t *testing.T) {
	vmharness.Guest(t)
	a := nbdattach.NewKernelAttacher(nbdattach.KernelOptions{})
	if err := a.Available(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat("/dev/nbd0"); err != nil {
		t.Fatal(err)
	}
}
