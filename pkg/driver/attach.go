package driver

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// attacher picks the attach backend for a new NodeStage, re-evaluated each
// time so that a node fixed by its operator (modprobe nbd) works without a
// plugin restart. With --attach-backend=auto it is the first available of
// the configured backends (nbd before fuse); a named backend must be
// available itself. With none available, the error wraps ErrUnavailable
// (FailedPrecondition) and says what each backend lacks: the node never
// silently degrades.
func (d *Driver) attacher() (nbdattach.Attacher, error) {
	var reasons []string
	for _, a := range d.attachers {
		if d.opts.AttachBackend != "auto" && a.Name() != d.opts.AttachBackend {
			continue
		}
		err := a.Available()
		if err == nil {
			return a, nil
		}
		reasons = append(reasons, fmt.Sprintf("%s: %v", a.Name(), err))
	}
	if len(d.attachers) == 0 {
		return nil, fmt.Errorf("%w: node %s: no attach backend is built into this plugin", nbdattach.ErrUnavailable, d.opts.NodeID)
	}
	if len(reasons) == 0 {
		names := make([]string, 0, len(d.attachers))
		for _, a := range d.attachers {
			names = append(names, a.Name())
		}
		return nil, fmt.Errorf("%w: node %s has no %q attach backend built in (have: %s); run with --attach-backend=auto",
			nbdattach.ErrUnavailable, d.opts.NodeID, d.opts.AttachBackend, strings.Join(names, ", "))
	}
	return nil, fmt.Errorf("%w: node %s cannot attach volumes (--attach-backend=%s): %s. Load the nbd kernel module (modprobe nbd) or make /dev/fuse and loop devices available to the plugin",
		nbdattach.ErrUnavailable, d.opts.NodeID, d.opts.AttachBackend, strings.Join(reasons, "; "))
}

// attacherNamed finds the backend a staged volume was attached with.
func (d *Driver) attacherNamed(name string) (nbdattach.Attacher, error) {
	for _, a := range d.attachers {
		if a.Name() == name {
			return a, nil
		}
	}
	return nil, errors.New("attach backend " + name + " is not built into this plugin")
}

// localIDAttacher hands backends a volume's local ID (ids.go) as the
// device ID: device IDs become FUSE file names and the kernel's nbd
// backend identifier, and a device attached before IDs named their node
// keeps being found by the same identifier. The local part is unique on a
// node, which is all a device ID needs.
type localIDAttacher struct{ nbdattach.Attacher }

// CachesIO passes on what the wrapped backend says (ioCacher).
func (a localIDAttacher) CachesIO() string {
	if c, ok := a.Attacher.(ioCacher); ok {
		return c.CachesIO()
	}
	return ""
}

func (a localIDAttacher) Attach(ctx context.Context, id string, b nbdattach.Backend, o nbdattach.AttachOptions) (nbdattach.Device, error) {
	local, _ := splitOwner(id)
	return a.Attacher.Attach(ctx, local, b, o)
}

func (a localIDAttacher) Reattach(ctx context.Context, id string, b nbdattach.Backend, o nbdattach.AttachOptions) (nbdattach.Device, error) {
	local, _ := splitOwner(id)
	return a.Attacher.Reattach(ctx, local, b, o)
}

// Disconnect passes to the backend's nbdattach.Disconnecter; a backend
// without one (fuse: its devices die with their process) has none to
// disconnect: errors.ErrUnsupported.
func (a localIDAttacher) Disconnect(ctx context.Context, id string) error {
	dc, ok := a.Attacher.(nbdattach.Disconnecter)
	if !ok {
		return fmt.Errorf("%s: disconnect without serving: %w", a.Name(), errors.ErrUnsupported)
	}
	local, _ := splitOwner(id)
	return dc.Disconnect(ctx, local)
}

// localIDCleaner is localIDAttacher of a backend whose devices die with
// the process: the driver tells the two kinds apart by staleCleaner.
type localIDCleaner struct {
	localIDAttacher
	staleCleaner
}

func withLocalIDs(as []nbdattach.Attacher) []nbdattach.Attacher {
	out := make([]nbdattach.Attacher, len(as))
	for i, a := range as {
		if c, ok := a.(staleCleaner); ok {
			out[i] = localIDCleaner{localIDAttacher{a}, c}
		} else {
			out[i] = localIDAttacher{a}
		}
	}
	return out
}
