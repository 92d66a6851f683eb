package fuse_test

import (
	"testing"

	"github.com/qcow2-csi/qcow2-csi/tests/mntns"
)

// TestMain runs the package's tests in a mount namespace of their own: a
// mount namespace that another process creates while a test's filesystem is
// mounted (an e2e node's, on a shared machine) would otherwise keep that
// filesystem, and so its loop device, busy after the test unmounts it.
func TestMain(m *testing.M) { mntns.Main(m) }
