package driver

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
	mount "k8s.io/mount-utils"
)

// "Something is mounted here" is not enough for the node: a staging mount
// someone else unmounted leaves an empty directory, and a bind mount of it
// would send the pod's writes to the node's own disk. So the driver checks
// what is mounted, by device: a volume's filesystem has its device's
// number as st_dev (the mountinfo major:minor) and its root as the mount's
// root; a published block volume is the device node itself bind-mounted
// onto a file.

// mountInfoPath is read for the mount table (a variable for tests).
var mountInfoPath = "/proc/self/mountinfo"

// deviceNumber is a device node's "major:minor", as mountinfo writes it.
// Attach backends give block devices; a character device is let through
// for test doubles that hand out /dev/null.
func deviceNumber(dev string) (string, error) {
	var st unix.Stat_t
	if err := unix.Stat(dev, &st); err != nil {
		return "", fmt.Errorf("stat device %s: %w", dev, err)
	}
	if t := st.Mode & unix.S_IFMT; t != unix.S_IFBLK && t != unix.S_IFCHR {
		return "", fmt.Errorf("%s is not a device node", dev)
	}
	return fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev)), nil
}

// topMount is the mount visible at p (the last of those stacked there), or
// nil when p is not a mount point or does not exist.
func topMount(p string) (*mount.MountInfo, error) {
	resolved, err := filepath.EvalSymlinks(p)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, nil
	case err != nil:
		resolved = filepath.Clean(p) // e.g. EIO from a dead device's mount
	}
	infos, err := mount.ParseMountInfo(mountInfoPath)
	if err != nil {
		return nil, fmt.Errorf("read mount table: %w", err)
	}
	var at []*mount.MountInfo
	for i := range infos {
		if unescapeMountPath(infos[i].MountPoint) == resolved {
			at = append(at, &infos[i])
		}
	}
	// A mount stacked on another at the same place has it as parent.
	for _, m := range at {
		covered := false
		for _, o := range at {
			if o.ParentID == m.ID {
				covered = true
				break
			}
		}
		if !covered {
			return m, nil
		}
	}
	return nil, nil
}

// unescapeMountPath undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountPath(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// mountCheck is what is mounted at a path, as far as one volume goes.
type mountCheck struct {
	none bool   // nothing is mounted there
	not  string // non-empty: a mount that is not the volume's, described
}

// checkMount looks at the mount visible at p: the volume's filesystem
// (root of the filesystem on its device) or, with block, its device node.
// A volume recorded before device numbers were (Dev empty) cannot be
// checked; any mount counts as its own, as before.
func (d *Driver) checkMount(v *stagedVolume, field, p string, block bool) (mountCheck, error) {
	m, err := topMount(p)
	if err != nil || m == nil {
		return mountCheck{none: m == nil}, err
	}
	if v.Dev == "" {
		return mountCheck{}, nil
	}
	ours := fmt.Sprintf("%d:%d", m.Major, m.Minor) == v.Dev && m.Root == "/"
	if block {
		n, err := deviceNumber(p)
		ours = err == nil && n == v.Dev
	}
	if ours {
		return mountCheck{}, nil
	}
	return mountCheck{not: fmt.Sprintf("%s %s has a mount that is not volume %q's (%s from %s, device %d:%d, root %s; the volume's device is %s)",
		field, p, v.ID, m.FsType, m.Source, m.Major, m.Minor, m.Root, v.Dev)}, nil
}

// stagingProblem says what is wrong with a mount volume's staging mount,
// or "" when the volume's filesystem is what is mounted there.
func (d *Driver) stagingProblem(v *stagedVolume) (string, error) {
	if v.Block {
		return "", nil // nothing is mounted at a block volume's staging path
	}
	c, err := d.checkMount(v, "staging path", v.StagingPath, false)
	switch {
	case err != nil:
		return "", err
	case c.none:
		return fmt.Sprintf("nothing is mounted at %s: volume %q's staging mount is gone", v.StagingPath, v.ID), nil
	}
	return c.not, nil
}

// requireStaged fails unless the volume's staging mount is in place.
func (d *Driver) requireStaged(v *stagedVolume) error {
	why, err := d.stagingProblem(v)
	if err != nil {
		return err
	}
	if why != "" {
		return fmt.Errorf("%w: %s; stage the volume again", ErrPrecondition, why)
	}
	return nil
}

// unmountOwn unmounts the volume's mounts at p, the topmost first, and
// stops at the first that is not the volume's: that one, and what is
// under it, are someone else's business. A volume recorded without its
// device number (by an older version, and not re-attached since) cannot
// tell its mount from one underneath, so it unmounts the topmost only:
// the driver made one mount there.
func (d *Driver) unmountOwn(v *stagedVolume, field, p string, block bool) error {
	for {
		c, err := d.checkMount(v, field, p, block)
		switch {
		case err != nil:
			return err
		case c.none:
			return nil
		case c.not != "":
			return fmt.Errorf("%w: %s; the driver leaves it alone", ErrPrecondition, c.not)
		}
		// NOFOLLOW: p was checked, but a link swapped in since must not
		// take the unmount to where it points.
		if err := unix.Unmount(p, unix.UMOUNT_NOFOLLOW); err != nil {
			return fmt.Errorf("unmount %s: %w", p, err)
		}
		if v.Dev == "" {
			return nil
		}
	}
}

// prepareTarget looks at what is at a publish target and makes it when
// missing: a directory for a mount volume, an empty file for a block one.
// done reports the volume's own mount already there (a repeated publish);
// made, that the driver created the target, now or in an earlier attempt.
// It refuses a foreign mount, a file or directory of the wrong kind, a
// non-empty directory and a file the driver did not create: a mount would
// hide them, and unpublish would later remove them.
func (d *Driver) prepareTarget(v *stagedVolume, target string) (done, made bool, err error) {
	c, err := d.checkMount(v, "target path", target, v.Block)
	switch {
	case err != nil:
		return false, false, err
	case c.not != "":
		return false, false, fmt.Errorf("%w: %s", ErrPrecondition, c.not)
	case !c.none:
		return true, d.madeTarget(v, target), nil
	}
	fi, err := os.Lstat(target)
	if errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
			return false, false, err
		}
		if v.Block {
			f, err := os.OpenFile(target, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o640)
			if err != nil {
				return false, false, err
			}
			return false, true, f.Close()
		}
		return false, true, os.Mkdir(target, 0o750)
	}
	if err != nil {
		return false, false, err
	}
	made = d.madeTarget(v, target)
	switch {
	case v.Block && !fi.Mode().IsRegular():
		return false, false, fmt.Errorf("%w: target path %s is a %s; a block volume is published on a file", ErrPrecondition, target, fileKind(fi))
	case v.Block && !made:
		return false, false, fmt.Errorf("%w: target path %s is a file the driver did not create; publishing would hide it", ErrPrecondition, target)
	case !v.Block && !fi.IsDir():
		return false, false, fmt.Errorf("%w: target path %s is a %s; a mount volume is published on a directory", ErrPrecondition, target, fileKind(fi))
	case !v.Block:
		ents, err := os.ReadDir(target)
		if err != nil {
			return false, false, err
		}
		if len(ents) > 0 {
			return false, false, fmt.Errorf("%w: target path %s is a directory that is not empty (%s, ...); publishing would hide what it holds", ErrPrecondition, target, ents[0].Name())
		}
	}
	return false, made, nil
}

func fileKind(fi fs.FileInfo) string {
	switch m := fi.Mode(); {
	case m.IsDir():
		return "directory"
	case m.IsRegular():
		return "regular file"
	case m&fs.ModeSymlink != 0:
		return "symbolic link"
	default:
		return "special file (" + m.Type().String() + ")"
	}
}

// removeMade removes a target the driver created, once unmounted. A
// directory that is not empty keeps its content: what is in it was written
// while the volume was not mounted there, and is nobody's to delete.
func removeMade(target string) (kept bool, err error) {
	err = os.Remove(target)
	switch {
	case err == nil, errors.Is(err, fs.ErrNotExist):
		return false, nil
	case errors.Is(err, unix.ENOTEMPTY), errors.Is(err, unix.EEXIST):
		return true, nil
	}
	return false, err
}
