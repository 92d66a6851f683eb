// Package peer finds the outside programs tests check the project against
// (qemu-img, qemu-io, nbdinfo, fio, a VM kernel, ...). Under CI=true a missing
// peer fails the test, because CI installs every peer and a skip there would
// hide a test that never ran; elsewhere it skips, loudly, naming what to install.
package peer

import (
	"os"
	"os/exec"
	"testing"
)

// CI reports whether the tests run under CI (CI=true), where every peer must
// be present.
func CI() bool { return os.Getenv("CI") == "true" }

// Missing stops the test because something it needs is absent: a failure
// under CI, a skip elsewhere. what names it, hint says how to get it.
func Missing(t testing.TB, what, hint string) {
	t.Helper()
	if CI() {
		t.Fatalf("%s is required under CI=true but missing: %s", what, hint)
	}
	t.Skipf("SKIP (peer missing): %s: %s", what, hint)
}

// Require returns the path of the named program, or stops the test (see
// Missing) when it is not on PATH. Run hack/deps.sh to install the peers.
func Require(t testing.TB, program string) string {
	t.Helper()
	p, err := exec.LookPath(program)
	if err != nil {
		Missing(t, program, "run hack/deps.sh (as root it installs the Debian packages)")
	}
	return p
}

// Root stops the test unless it runs as root (mounts, loop devices, FUSE).
func Root(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Missing(t, "root", "this test mounts filesystems or uses loop devices")
	}
}
