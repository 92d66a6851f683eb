package imagetar

import (
	"errors"
	"fmt"

	"github.com/qcow2-csi/qcow2-csi/internal/hostbin"
)

// DriverTools are the host programs the driver runs: formatting, checking
// and growing filesystems (k8s.io/mount-utils calls blkid, fsck, mkfs.*,
// resize2fs, xfs_growfs), mounting, and block devices for the fallback
// attach backend (losetup, blockdev).
var DriverTools = []string{
	"mke2fs", "mkfs.ext4", "e2fsck", "fsck", "fsck.ext4", "resize2fs", "tune2fs", "dumpe2fs",
	"mkfs.xfs", "xfs_repair", "xfs_growfs", "xfs_io",
	"blkid", "mount", "umount", "losetup", "blockdev", "lsblk", "findmnt",
}

// OptionalDriverTools are copied when the build host has them.
var OptionalDriverTools = []string{"fusermount3"}

// Driver returns the node plugin image: the statically linked qcow2-csi
// binary at /usr/bin/qcow2-csi (the entrypoint), DriverTools with their
// libraries, and busybox (static) as /bin/sh for operators.
func Driver(qcow2csi, busybox string) (*Image, error) {
	im := New()
	if err := im.AddFile("/usr/bin/qcow2-csi", qcow2csi); err != nil {
		return nil, err
	}
	if err := im.AddLibraries(qcow2csi); err != nil {
		return nil, err
	}
	for _, t := range DriverTools {
		if err := im.AddProgram(t); err != nil {
			return nil, fmt.Errorf("driver image: %w", err)
		}
	}
	for _, t := range OptionalDriverTools {
		if err := im.AddProgram(t); err != nil && !errors.Is(err, hostbin.ErrNotFound) {
			return nil, fmt.Errorf("driver image: %w", err)
		}
	}
	if err := im.AddFile("/etc/mke2fs.conf", "/etc/mke2fs.conf"); err != nil {
		return nil, err
	}
	if busybox != "" {
		if err := im.AddFile("/usr/bin/busybox", busybox); err != nil {
			return nil, err
		}
		im.AddSymlink("/usr/bin/sh", "busybox")
	}
	im.AddDir("/var/lib/qcow2-csi/pool", 0o755)
	im.AddDir("/csi", 0o755)
	im.Entrypoint = []string{"/usr/bin/qcow2-csi"}
	return im, nil
}

// Single returns an image holding one statically linked program at /name,
// its entrypoint: the form of the upstream CSI sidecar images.
func Single(name, bin string) (*Image, error) {
	im := New()
	if err := im.AddFile("/"+name, bin); err != nil {
		return nil, err
	}
	im.Entrypoint = []string{"/" + name}
	return im, nil
}

// BusyboxApplets are linked in the test workload image.
var BusyboxApplets = []string{
	"sh", "ls", "cat", "echo", "sleep", "mount", "df", "touch", "dd", "sync", "stat", "sha256sum",
	"head", "tail", "rm", "mkdir", "cmp", "wc", "grep", "sed", "awk", "blockdev", "test", "true",
	"false", "env", "printf", "seq", "cut", "od", "date", "kill", "cp", "mv", "find", "du", "tr",
}

// Busybox returns a workload image with the static busybox and its applets
// under /bin (entrypoint /bin/sh).
func Busybox(busybox string) (*Image, error) {
	im := New()
	if err := im.AddFile("/usr/bin/busybox", busybox); err != nil {
		return nil, err
	}
	for _, a := range BusyboxApplets {
		im.AddSymlink("/usr/bin/"+a, "busybox")
	}
	im.Entrypoint = []string{"/bin/sh"}
	return im, nil
}

// Fio returns the Busybox workload image with fio (and the libraries ldd
// lists for it) at /usr/bin/fio: the I/O load of the e2e I/O limits
// scenarios.
func Fio(busybox string) (*Image, error) {
	im, err := Busybox(busybox)
	if err != nil {
		return nil, err
	}
	if err := im.AddProgram("fio"); err != nil {
		return nil, fmt.Errorf("fio image: %w", err)
	}
	return im, nil
}
