// Package peer finds the outside programs tests check the project against
// (qemu-img, qemu-io, nbdinfo, fio, a VM kernel, ...). Under CI=true a missing
// peer fails the test, because CI installs every peer and a skip there would
// hide a test that never ran; elsewhere it skips, loudly, naming what to install.
package peer

import (
	"bytes"
	"context"
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

// pbkdfCalibration is what qemu prints when creating a LUKS key slot fails
// only because its PBKDF2 calibration (crypto/pbkdf.c) measured a trial run
// as taking 0 ms of thread CPU time: on a fast CPU the first trial of 2^15
// iterations can finish inside one millisecond tick.
const pbkdfCalibration = "Unable to get accurate CPU usage"

// calibrationTries bounds Run's retries: at one failure in five, eight
// failures in a row come about once in 400,000 runs.
const calibrationTries = 8

// Run runs a peer program (see Require) and returns its stdout and stderr.
// qemu-img and qemu-io fail now and then while creating a LUKS key slot (see
// pbkdfCalibration: about one run in five on this project's 2-core machine);
// Run tries such a run up to calibrationTries times, logging each retry, and
// retries nothing else.
func Run(ctx context.Context, t testing.TB, program string, args ...string) (stdout, stderr []byte, err error) {
	t.Helper()
	path := Require(t, program)
	for attempt := 1; ; attempt++ {
		var out, errb bytes.Buffer
		cmd := exec.CommandContext(ctx, path, args...)
		cmd.Stdout, cmd.Stderr = &out, &errb
		err = cmd.Run()
		if err == nil || attempt == calibrationTries || !bytes.Contains(errb.Bytes(), []byte(pbkdfCalibration)) {
			return out.Bytes(), errb.Bytes(), err
		}
		t.Logf("%s: %q (PBKDF2 calibration saw no CPU time); try %d of %d", program, pbkdfCalibration, attempt+1, calibrationTries)
	}
}
