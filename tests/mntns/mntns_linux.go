// Package mntns runs a test binary in a mount namespace of its own, so that
// the filesystems its tests mount cannot be copied into namespaces that other
// processes of the machine create meanwhile.
//
// Why: the host's root mount is private here (no "shared:" in mountinfo), and
// `unshare --mount` (the e2e harness makes one per node, cbt_test one per
// check) copies every mount of the host namespace, including a test's ext4
// or xfs on a loop device. An unmount in the test's namespace then does not
// propagate to the copy: the superblock stays alive and keeps its exclusive
// claim on the device until the other namespace exits, and Detach rightly
// answers ErrDeviceBusy. A test whose mounts live in its own namespace is not
// visible to such clones.
package mntns

import (
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
)

// env marks the re-executed binary (and its own children, which inherit it)
// as already isolated.
const env = "QCOW2_CSI_TEST_MNTNS"

// Isolate re-executes the test binary in a new mount namespace with private
// propagation and exits with its status; in that child (and for a caller that
// is not root, which cannot unshare and mounts nothing) it returns at once.
// Call it first in TestMain.
func Isolate() {
	if os.Getenv(env) != "" || os.Geteuid() != 0 {
		return
	}
	cmd := exec.Command("/proc/self/exe", os.Args[1:]...)
	cmd.Args[0] = os.Args[0]
	cmd.Env = append(os.Environ(), env+"=1")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	// os/exec makes / recursively private in the child when it unshares
	// CLONE_NEWNS, so nothing the child mounts propagates back either.
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS, Pdeathsig: syscall.SIGKILL}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGQUIT)
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "mntns: re-executing the test binary in a new mount namespace: %v\n", err)
		os.Exit(2)
	}
	go func() {
		for s := range sigs {
			_ = cmd.Process.Signal(s)
		}
	}()
	err := cmd.Wait()
	if ee, ok := err.(*exec.ExitError); ok {
		os.Exit(ee.ExitCode())
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "mntns: %v\n", err)
		os.Exit(2)
	}
	os.Exit(0)
}
