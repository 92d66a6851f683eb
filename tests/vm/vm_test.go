//go:build linux

package vm

import (
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
	"github.com/qcow2-csi/qcow2-csi/tests/vm/vmharness"
)

// TestVM boots one VM for the whole suite and runs every TestGuest* test in
// it; then it checks on the host what the guest left in the share.
func TestVM(t *testing.T) {
	if vmharness.InVM() {
		t.Skip("this is the host-side entry test")
	}
	qemuImg := peer.Require(t, "qemu-img")
	e2fsck := peer.Require(t, "e2fsck")
	xfsRepair := peer.Require(t, "xfs_repair")
	res := vmharness.RunGoTest(t, ".", "^TestGuest", vmharness.Options{})
	if res.ExitCode != 0 {
		return
	}
	share := res.Share
	checks := []struct {
		name string
		cmd  []string
	}{
		{"ext4 clean", []string{e2fsck, "-fn", filepath.Join(share, "ext4.raw")}},
		{"xfs clean", []string{xfsRepair, "-n", "-f", filepath.Join(share, "xfs.raw")}},
		{"qcow2 image consistent", []string{qemuImg, "check", "-f", "qcow2", filepath.Join(share, "vol.qcow2")}},
		{"qcow2 image holds what the kernel read", []string{qemuImg, "compare", "-f", "qcow2", "-F", "raw",
			filepath.Join(share, "vol.qcow2"), filepath.Join(share, "vol.dev.raw")}},
	}
	for _, c := range checks {
		t.Run(c.name, func(t *testing.T) {
			out, err := exec.Command(c.cmd[0], c.cmd[1:]...).CombinedOutput()
			if err != nil {
				t.Errorf("%v: %v\n%s", c.cmd, err, out)
			}
		})
	}
}

// TestGuestAvailable: in the VM the nbd driver is there.
func TestGuestAvailable(t *testing.T) {
	vmharness.Guest(t)
	if err := nbdattach.NewKernelAttacher(nbdattach.KernelOptions{}).Available(); err != nil {
		t.Fatal(err)
	}
}
