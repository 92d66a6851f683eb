package qcow2

import (
	"os"

	"golang.org/x/sys/unix"
)

// seg is a piece of a host file range that is either data or a hole.
type seg struct {
	off, n int64
	hole   bool
}

// hostSegments splits [off, off+n) of f into data and holes with
// SEEK_DATA/SEEK_HOLE, as qemu's file-posix block status does. When the
// file system cannot tell, everything is data.
func hostSegments(f interface{ Fd() uintptr }, off, n int64) []seg {
	fd := int(f.Fd())
	end := off + n
	var out []seg
	for off < end {
		d, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if err != nil {
			if err == unix.ENXIO { // no data after off: hole to the end
				return append(out, seg{off, end - off, true})
			}
			return append(out, seg{off, end - off, false})
		}
		if d > off {
			h := min(d, end)
			out = append(out, seg{off, h - off, true})
			off = h
			continue
		}
		h, err := unix.Seek(fd, off, unix.SEEK_HOLE)
		if err != nil || h <= off {
			return append(out, seg{off, end - off, false})
		}
		h = min(h, end)
		out = append(out, seg{off, h - off, false})
		off = h
	}
	return out
}

// FileExtents describes [off, off+n) of a raw file as qemu-img map does:
// data regions and holes (which read as zeroes), at depth 0.
func FileExtents(f *os.File, off, n int64) []Extent {
	var out []Extent
	if n <= 0 {
		return nil
	}
	for _, s := range hostSegments(f, off, n) {
		out = append(out, Extent{Start: s.off, Length: s.n, Present: true, Data: !s.hole, Zero: s.hole, Offset: s.off, Filename: f.Name()})
	}
	return out
}
