//go:build linux

package nbdattach_test

import (
	"path/filepath"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/tests/attachcases"
)

func TestFuseAttachCases(t *testing.T) {
	a := nbdattach.NewFuseAttacher(nbdattach.FuseOptions{Dir: filepath.Join(t.TempDir(), "fuse")})
	attachcases.Run(t, attachcases.Target{Attacher: a})
}
