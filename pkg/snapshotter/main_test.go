package snapshotter

import (
	"os"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/tests/mntns"
)

// TestMain runs the package's tests in a mount namespace of their own, so
// that a mount namespace another process creates meanwhile (an e2e node's,
// on a shared machine) cannot copy a test's mount and keep its loop device
// busy after the test unmounts it (see package mntns).
func TestMain(m *testing.M) {
	mntns.Isolate()
	os.Exit(m.Run())
}
