//go:build linux

package driver_test

import (
	"flag"
	"strings"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/tests/vm/vmharness"
)

// TestNodeInVM boots a real kernel with nbd.ko (tests/vm/vmharness) and runs
// the TestGuest* tests of this package there: the node tests that need what
// this host lacks, nbd above all, and CAP_SYS_RESOURCE for ext4's online
// resize.
func TestNodeInVM(t *testing.T) {
	if vmharness.InVM() {
		t.Skip("host-side entry test")
	}
	vmharness.RunGoTest(t, ".", guestRun(), vmharness.Options{Tools: []string{"losetup"}})
}

// guestRun selects the guest tests: all TestGuest* tests, or those the
// host's -run names after "TestNodeInVM/", as if they were its subtests:
// go test -run '^TestNodeInVM$/^TestGuestNBDEncryptedRestart$' boots the
// VM for that one test.
func guestRun() string {
	if f := flag.Lookup("test.run"); f != nil {
		if _, sub, ok := strings.Cut(f.Value.String(), "/"); ok && sub != "" {
			return sub
		}
	}
	return "^TestGuest"
}

// TestGuestNBDRestart: volumes staged through /dev/nbdN survive a kill -9
// of the node plugin; the new process re-attaches them (nbdattach Reattach)
// before it reports ready, and I/O goes on through the new server.
func TestGuestNBDRestart(t *testing.T) {
	vmharness.Guest(t)
	testNodeRestart(t, "nbd")
}

// TestGuestNBDConcurrent: the 1000-call mix on qcow2 images and /dev/nbdN,
// with the plugin killed and restarted halfway.
func TestGuestNBDConcurrent(t *testing.T) {
	vmharness.Guest(t)
	testConcurrentMixedCalls(t, "nbd", 6)
}

// TestGuestNBDLifecycle: stage, publish, read-only, online expansion of
// qcow2 images on /dev/nbdN, ext4 and xfs, where ext4's online resize is
// allowed (root in the VM has CAP_SYS_RESOURCE).
func TestGuestNBDLifecycle(t *testing.T) {
	vmharness.Guest(t)
	if !canGrowOnline("ext4") {
		t.Fatal("no CAP_SYS_RESOURCE in the VM")
	}
	testNodeFilesystemLifecycle(t, "nbd")
}

// TestGuestLoopExpansion: offline expansion, ext4 growing online.
func TestGuestLoopExpansion(t *testing.T) {
	vmharness.Guest(t)
	t.Run("offline", TestNodeOfflineExpand)
}

// TestGuestNBDSIGTERM: a node plugin stopped with SIGTERM while a writer is
// busy on an nbd-staged volume closes the image cleanly (library check
// clean, no bitmap in use or inconsistent) and leaves /dev/nbdN attached;
// the writer's requests wait in the kernel, the restarted plugin re-attaches
// the device (the volume is not abnormal), the write completes with the
// right data, and a delta across the restart is answered.
func TestGuestNBDSIGTERM(t *testing.T) {
	vmharness.Guest(t)
	testNodeSIGTERMNBD(t)
}

// TestGuestNBDQoS: I/O limits on /dev/nbdN, changed live, and kept across
// a kill -9 of the node plugin (the re-attached device is throttled again).
func TestGuestNBDQoS(t *testing.T) {
	vmharness.Guest(t)
	testNodeQoSLive(t, "nbd")
}

// TestGuestNBDUnstageLiftsLimits: a kernel NBD device's detach waits for
// the requests queued in it; unstaging under a low limit does not wait for
// them to trickle through it.
func TestGuestNBDUnstageLiftsLimits(t *testing.T) {
	vmharness.Guest(t)
	testNodeUnstageLiftsLimits(t, "nbd")
}
