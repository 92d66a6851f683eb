//go:build linux

package vm

import (
	"testing"

	"github.com/qcow2-csi/qcow2-csi/tests/attachcases"
	"github.com/qcow2-csi/qcow2-csi/tests/vm/vmharness"
)

// TestGuestAttachCases runs the shared case table (tests/attachcases) for
// the kernel NBD attacher on raw and qcow2 images: the cases the fuse
// backend runs on the host (pkg/nbdattach), with fio, the mkfs tools and
// qemu-img (the qcow2 oracle: map, check, compare) running in the guest
// beside the kernel that made the device.
//
// What differs from the host run is said here, not skipped in the cases:
//   - Debian's kernel 6.1 nbd driver has no write-zeroes, so the zeroes case
//     expects punch-hole to fail with EOPNOTSUPP (and checks sysfs agrees).
//   - Under TCG every byte costs: ext4 only, on 64 MiB images with 8 MiB of
//     fio and file data. xfs on the kernel attach is covered by
//     TestGuestFilesystems (mkfs, remount, online grow, xfs_repair on the
//     host); xfs needs 300 MiB devices, which would double this suite.
func TestGuestAttachCases(t *testing.T) {
	vmharness.Guest(t)
	attachcases.Run(t, attachcases.Target{
		Attacher:      kernelAttacher(),
		Formats:       []attachcases.Format{attachcases.Raw, attachcases.Qcow2},
		Filesystems:   []string{"ext4"},
		Size:          64 << 20,
		IOSize:        8 << 20,
		NoWriteZeroes: "Linux 6.1's nbd driver never sends NBD_CMD_WRITE_ZEROES",
	})
}
