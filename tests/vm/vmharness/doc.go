// Package vmharness runs Go tests inside a real Linux kernel: Debian's
// linux-image-amd64 booted with qemu-system-x86_64 -accel tcg from an
// initramfs this package builds. It exists because the kernel these tests
// run on may lack modules the project needs (nbd above all) and cannot load
// them; a VM has them all, and root inside it may do anything.
//
// The model, in the order things happen:
//
//   - Assets: the kernel package and busybox-static are fetched with
//     `apt-get download` and unpacked (`dpkg-deb`) once, into the module
//     root's ignored .cache/vm directory; a warm run touches no network.
//   - Initramfs: an uncompressed newc cpio (uncompressed because under TCG
//     gunzip costs more than reading the bytes) holding busybox, the kernel
//     modules asked for and their dependencies (read from each module's
//     .modinfo), host programs (mkfs.ext4, mkfs.xfs, resize2fs, xfs_growfs,
//     blkid, ...) with the libraries ldd lists (internal/hostbin, which
//     hack/image shares), extra files, and the statically built
//     (CGO_ENABLED=0) test binary.
//   - Boot: one VM per RunGoTest call, so a suite batches its tests into one
//     boot. /init loads the modules, mounts proc, sys, devtmpfs, a tmpfs on
//     /tmp and the host directory Options.Share (9p) on /share, runs the
//     test binary as root and powers off.
//   - Results: the test binary's output goes to the second serial port,
//     which the host tails line by line into the test log; a final marker
//     line carries its exit status. The kernel's own console (first serial
//     port) is kept and shown when the run fails.
//
// A package that runs inside the VM has a host-side entry test that calls
// RunGoTest on its own directory, and guest tests that call Guest(t) first
// so that they skip on the host and run in the VM.
package vmharness
