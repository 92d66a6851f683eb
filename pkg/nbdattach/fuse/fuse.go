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
	// Cache chooses how the kernel caches the devices' FUSE files:
	// CacheNone, CacheWritethrough or CacheWriteback (CacheMode). Default:
	// DefaultCacheMode.
	Cache CacheMode
	// Uring serves the FUSE connection over io_uring (Linux 6.14+ built
	// with CONFIG_FUSE_IO_URING, module parameter fuse.enable_uring=Y)
	// where the kernel offers it, and over /dev/fuse otherwise, saying why
	// in the log. It takes one OS thread and one request buffer of 1 MiB
	// per ring entry: max(1, 8/CPUs) entries per possible CPU.
	Uring bool
}

// CacheMode is how the kernel caches a device's FUSE file, and so whether
// the loop device reaches the plugin on every request.
//
// What every mode keeps (docs/fuse-attach.md has the whole argument, and the
// tests check it): a flush or FUA on the device reaches the image, because
// the loop device's flush is an fsync of the FUSE file, which writes back
// its dirty pages, waits for them, and then sends FSYNC, answered by
// diskNode.Fsync after Backend.Flush. The cache never goes stale, because
// nothing but the file itself changes the volume's contents while it is
// attached: fallocate (discard, write-zeroes) drops the range it zeroes
// from the cache, and Resize truncates the file so that the kernel's size
// follows. What CacheWriteback gives up: a write the device completed is in
// the kernel, not the image, until writeback or the next flush (a plugin
// crash loses it, as a power cut loses a disk's volatile cache), and a
// write error is reported at the next flush instead of on the write.
type CacheMode string

const (
	// CacheNone: the loop device does direct I/O and the file is opened
	// FOPEN_DIRECT_IO, so every block request is a FUSE request. Nothing
	// of the volume is cached between the loop device and the plugin.
	CacheNone CacheMode = "none"
	// CacheWritethrough: the loop device is buffered and the file keeps a
	// page cache (FOPEN_KEEP_CACHE): reads of cached data never reach the
	// plugin, and every write still does before the loop device completes
	// it (one FUSE WRITE per request, synchronously).
	CacheWritethrough CacheMode = "writethrough"
	// CacheWriteback: CacheWritethrough plus the FUSE writeback cache:
	// writes complete once in the file's page cache and reach the plugin at
	// writeback or at the next flush (FUSE FSYNC), which is what a flush or
	// FUA on the device waits for.
	CacheWriteback CacheMode = "writeback"
)

// DefaultCacheMode is Options.Cache when none is given.
const DefaultCacheMode = CacheNone

// ParseCacheMode checks a cache mode as given on a command line; "" is
// DefaultCacheMode.
func ParseCacheMode(s string) (CacheMode, error) {
	switch m := CacheMode(s); m {
	case "":
		return DefaultCacheMode, nil
	case CacheNone, CacheWritethrough, CacheWriteback:
		return m, nil
	}
	return "", fmt.Errorf("nbdattach: fuse: cache mode %q: must be none, writethrough or writeback", s)
}

// cached reports whether the kernel keeps a page cache of the FUSE file.
func (m CacheMode) cached() bool { return m == CacheWritethrough || m == CacheWriteback }

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
