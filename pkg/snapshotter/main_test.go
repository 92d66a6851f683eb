package snapshotter

import (
	"testing"

	"github.com/qcow2-csi/qcow2-csi/tests/mntns"
)

// TestMain runs the package's tests in a mount namespace of their own: see
// package mntns.
func TestMain(m *testing.M) { mntns.Main(m) }
