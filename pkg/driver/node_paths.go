package driver

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// The node plugin runs as root and mounts, creates and removes at the paths
// a request names. Only the kubelet should be calling, and it only ever
// names paths below its own directory (plugins/kubernetes.io/csi/... for
// staging, pods/<uid>/volumes/... and pods/<uid>/volumeDevices/... for
// targets), made of real directories. So a path elsewhere, or one that
// passes through a symbolic link below that directory, is a mistake or an
// attack: it would put a volume over a host directory, or make the driver
// remove a file that is not its own.

// checkNodePath confines a staging or target path: strictly below the
// kubelet directory (as configured or as it resolves), with no symbolic
// link from there on.
func (d *Driver) checkNodePath(field, p string) error {
	p = filepath.Clean(p)
	root, ok := d.pathRoot(p)
	if !ok {
		return fmt.Errorf("%w: %s %q is not below the kubelet directory %s (serve --kubelet-dir)", ErrInvalid, field, p, d.opts.KubeletDir)
	}
	return refuseSymlinks(field, root, p)
}

// checkRecordedPath is checkNodePath for a path the driver recorded
// itself, before it unmounts or removes there: a symbolic link that
// appeared since would redirect the unmount or the removal. A path outside
// the kubelet directory can only come from a record made with another
// --kubelet-dir, and is let through: it was checked then.
func (d *Driver) checkRecordedPath(field, p string) error {
	p = filepath.Clean(p)
	root, ok := d.pathRoot(p)
	if !ok {
		return nil
	}
	if err := refuseSymlinks(field, root, p); err != nil {
		return fmt.Errorf("%w: %v; left alone", ErrPrecondition, err)
	}
	return nil
}

// pathRoot is the form of the kubelet directory p lies strictly below.
// Both the configured form and its resolved one count: some nodes have
// /var/lib/kubelet as a link to another disk, and the kubelet uses
// whichever it was given.
func (d *Driver) pathRoot(p string) (string, bool) {
	root := filepath.Clean(d.opts.KubeletDir)
	if below(root, p) {
		return root, true
	}
	if r, err := filepath.EvalSymlinks(root); err == nil && r != root && below(r, p) {
		return r, true
	}
	return "", false
}

// below reports whether the clean path p lies strictly below dir.
func below(dir, p string) bool {
	if dir == "/" {
		return p != "/"
	}
	return strings.HasPrefix(p, dir+"/")
}

// refuseSymlinks walks p's components below root and refuses a symbolic
// link among those that exist. Missing ones are fine: the driver makes
// them as directories.
func refuseSymlinks(field, root, p string) error {
	cur := root
	for _, c := range strings.Split(strings.TrimPrefix(strings.TrimPrefix(p, root), "/"), "/") {
		cur = filepath.Join(cur, c)
		fi, err := os.Lstat(cur)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("%s %q: %w", field, p, err)
		}
		if fi.Mode()&fs.ModeSymlink != 0 {
			return fmt.Errorf("%w: %s %q: %s is a symbolic link; the kubelet makes none below %s", ErrInvalid, field, p, cur, root)
		}
	}
	return nil
}

// checkTargetPlace refuses a target that is, contains or lies inside the
// staging path: a bind mount there would hide the staging mount or mount
// the volume inside itself, and a recorded target there would make
// unpublish unmount the staging mount.
func checkTargetPlace(target, staging string) error {
	t, s := filepath.Clean(target), filepath.Clean(staging)
	switch {
	case t == s:
		return fmt.Errorf("%w: target path %s is the staging path", ErrInvalid, t)
	case below(s, t):
		return fmt.Errorf("%w: target path %s is inside the staging path %s", ErrInvalid, t, s)
	case below(t, s):
		return fmt.Errorf("%w: target path %s contains the staging path %s", ErrInvalid, t, s)
	}
	return nil
}
