package nbdattach

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
)

// FuseOptions configure the fuse attach backend (NewFuseAttacher).
type FuseOptions struct {
	// Dir is where the backend mounts the one FUSE filesystem that serves
	// all its devices, at Dir/srv@<random> while any is attached, holding a
	// regular file Dir/srv@<random>/<id> per device that a loop device is
	// bound to. Stale mounts are looked for here only (of this layout, and
	// Dir/<id> of earlier versions), so two processes must not share a Dir.
	// Default: DefaultFuseDir.
	Dir string
	// Logger receives backend errors served to the kernel and the choices
	// the backend made (direct I/O, IO flusher). Nil logs nothing.
	Logger *slog.Logger
}

// DefaultFuseDir is FuseOptions.Dir when none is given.
const DefaultFuseDir = "/run/qcow2-csi/fuse"

// StaleCleaner is implemented by attach backends whose devices cannot be
// taken over by a new process (fuse): the caller runs CleanStale once at
// start, before attaching anything.
type StaleCleaner interface {
	// CleanStale finds the devices and mounts a previous, dead process left
	// behind and releases what it safely can: loop devices no one uses are
	// unbound, loop devices still mounted are set to unbind when unmounted,
	// dead FUSE mounts are detached. It returns what it found (Connected is
	// false for each; Path is empty for a dead mount whose device the kernel
	// released already) and the errors it met, joined.
	CleanStale(ctx context.Context) ([]DeviceInfo, error)
}

// validFuseID checks an identifier before it becomes a directory and a file
// name: the driver validates volume IDs strictly already, this is the last
// line before a path is built.
func validFuseID(id string) error {
	if id == "" || len(id) > 200 || id == "." || id == ".." {
		return fmt.Errorf("nbdattach: fuse: invalid device id %q: must be 1-200 bytes, not . or ..", id)
	}
	if i := strings.IndexFunc(id, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.')
	}); i >= 0 {
		return fmt.Errorf("nbdattach: fuse: invalid device id %q: byte %d is not one of [A-Za-z0-9._-]", id, i)
	}
	return nil
}
