package driver

import (
	"fmt"

	mount "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"
)

// Mounter is the node's view of formatting and mounting, narrow enough to be
// replaced in tests and implemented on k8s.io/mount-utils in production.
type Mounter interface {
	// FormatAndMount mounts source at target, first making a filesystem of
	// fsType with formatOptions if source has none. An existing filesystem is
	// never reformatted.
	FormatAndMount(source, target, fsType string, options, formatOptions []string) error
	// Mount mounts (bind mounts with the "bind" option) source at target.
	Mount(source, target, fsType string, options []string) error
	// IsMountPoint reports whether path is a mount point; a missing path is
	// an error satisfying os.IsNotExist.
	IsMountPoint(path string) (bool, error)
	// ResizeFS grows the filesystem on devicePath, mounted at mountPath, to
	// the device's size.
	ResizeFS(devicePath, mountPath string) error
}

type nodeMounter struct {
	*mount.SafeFormatAndMount
	resizer *mount.ResizeFs
}

// NewMounter is the production Mounter: mount(8), mkfs.ext4/mkfs.xfs,
// fsck, resize2fs and xfs_growfs through k8s.io/mount-utils.
func NewMounter() Mounter {
	ex := utilexec.New()
	// Without systemd: the plugin runs in a container where mounts need no
	// systemd-run scope, and mount.New's lazy systemd detection is a data
	// race under concurrent mounts.
	return &nodeMounter{
		SafeFormatAndMount: mount.NewSafeFormatAndMount(mount.NewWithoutSystemd(""), ex),
		resizer:            mount.NewResizeFs(ex),
	}
}

func (m *nodeMounter) FormatAndMount(source, target, fsType string, options, formatOptions []string) error {
	return m.SafeFormatAndMount.FormatAndMountSensitiveWithFormatOptions(source, target, fsType, options, nil, formatOptions)
}

func (m *nodeMounter) Mount(source, target, fsType string, options []string) error {
	return m.SafeFormatAndMount.Mount(source, target, fsType, options)
}

func (m *nodeMounter) IsMountPoint(path string) (bool, error) {
	return m.SafeFormatAndMount.IsMountPoint(path)
}

func (m *nodeMounter) ResizeFS(devicePath, mountPath string) error {
	// Only when the filesystem is smaller than the device: a repeated
	// NodeExpandVolume then costs a read of the superblock, and needs none of
	// the privileges an online resize does (ext4's needs CAP_SYS_RESOURCE).
	need, err := m.resizer.NeedResize(devicePath, mountPath)
	if err != nil {
		return fmt.Errorf("compare filesystem and device size of %s: %w", devicePath, err)
	}
	if !need {
		return nil
	}
	if _, err := m.resizer.Resize(devicePath, mountPath); err != nil {
		return fmt.Errorf("grow filesystem on %s at %s: %w", devicePath, mountPath, err)
	}
	return nil
}
