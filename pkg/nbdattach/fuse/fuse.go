package fuse

import (
	"fmt"
	"log/slog"
	"strings"
)

// Options configure the fuse attach backend (NewAttacher).
type Options struct {
	// Dir is where the backend mounts the one FUSE filesystem that serves
	// all its devices, at Dir/srv@<random> while any is attached, holding a
	// regular file Dir/srv@<random>/<id> per device that a loop device is
	// bound to. Stale mounts are looked for here only (of this layout, and
	// Dir/<id> of earlier versions), so two processes must not share a Dir.
	// Default: DefaultDir.
	Dir string
	// Logger receives backend errors served to the kernel and the choices
	// the backend made (direct I/O, IO flusher). Nil logs nothing.
	Logger *slog.Logger
	// Passthrough lets the kernel read and write an nbdattach.Passthrougher
	// backend's host file itself (FUSE passthrough, Linux 6.9+), where the
	// kernel accepts it. Off by default: measured on Linux 6.18 it was at or
	// above the loop floor on most rows of tests/bench/attach.sh (column
	// fusept), but 4k random writes at queue depth 32 on a file written just
	// before fell to 2.6-3.5k IOPS against 13-19k on the floor, reproducibly
	// and not yet explained (perf: the loop workers' writes in
	// fuse_passthrough_write_iter spend their time in ext4_block_write_begin).
	// Only raw images have such a backend; the driver's volumes are qcow2.
	Passthrough bool
}

// DefaultDir is Options.Dir when none is given.
const DefaultDir = "/run/qcow2-csi/fuse"

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
