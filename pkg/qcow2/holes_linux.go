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

// dataRegion remembers the last data region of a host file that
// hostSegments found, [start, end), for the rest of one block-status scan.
// Without it, a scan over many runs of one large data region asks
// SEEK_HOLE once per run, and the kernel walks from each run to the end of
// the region every time (quadratic: 9 s for 16384 runs of a 1 GiB region on
// ext4). qemu's block-status cache does the same for the same reason.
type dataRegion struct{ start, end int64 }

// hostSegments splits [off, off+n) of f into data and holes with
// SEEK_DATA/SEEK_HOLE, as qemu's file-posix block status does. When the
// file system cannot tell, everything is data. dr, when not nil, is
// consulted first and updated with the data region found; its holder must
// drop it when the file's holes may have changed.
func hostSegments(f interface{ Fd() uintptr }, off, n int64, dr *dataRegion) []seg {
	if dr != nil && off >= dr.start && off+n <= dr.end {
		return []seg{{off, n, false}}
	}
	fd := int(f.Fd())
	end := off + n
	var out []seg
	for off < end {
		if dr != nil && off >= dr.start && off < dr.end {
			h := min(dr.end, end)
			out = append(out, seg{off, h - off, false})
			off = h
			continue
		}
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
		if dr != nil {
			*dr = dataRegion{off, h}
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
	for _, s := range hostSegments(f, off, n, nil) {
		out = append(out, Extent{Start: s.off, Length: s.n, Present: true, Data: !s.hole, Zero: s.hole, Offset: s.off, Filename: f.Name()})
	}
	return out
}
