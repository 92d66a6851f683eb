// Package imagebackend adapts an open qcow2 image to nbdattach.Backend: the
// data path of every attached volume (kernel NBD or fuse) and of
// `qcow2-csi nbd`. It maps the library's errors to the sentinels the NBD
// server and the fuse backend turn into errnos, and serves base:allocation,
// qemu:allocation-depth and qemu:dirty-bitmap:NAME as qemu-nbd does. It
// knows nothing of CSI: pkg/driver, cmd/qcow2-csi and the tests use it alike.
package imagebackend

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

// Backend serves an open qcow2 image as an nbdattach.Backend. The image
// stays owned by the caller (Backend never closes it).
type Backend struct {
	img  *qcow2.Image
	opts Options
	// src serves reads and block status: the image itself, or a read-only
	// view of one of its internal snapshots (then view is set and every
	// write is refused).
	src  dataSource
	view bool
}

// dataSource is what both *qcow2.Image and *qcow2.SnapshotView offer.
type dataSource interface {
	Size() int64
	ReadAt(p []byte, off int64) (int, error)
	BlockStatus(off, n int64) ([]qcow2.Extent, error)
	KnownZero(off, n int64) bool
}

// Options choose what a Backend exposes beyond the data.
type Options struct {
	// AllocationDepth serves the qemu:allocation-depth metadata context
	// (qemu-nbd -A): 0 unallocated, 1 allocated in the image itself, 2 and
	// up in its backing chain.
	AllocationDepth bool
	// Bitmaps are persistent dirty bitmaps served as the metadata contexts
	// qemu:dirty-bitmap:NAME (qemu-nbd -B): flag 1 marks dirty extents, at
	// the bitmap's granularity.
	Bitmaps []string
}

// New adapts img. Each bitmap in opts must exist and be
// consistent (qemu-nbd refuses to start otherwise).
func New(img *qcow2.Image, opts Options) (*Backend, error) {
	have := map[string]qcow2.BitmapStatus{}
	for _, bi := range img.Bitmaps() {
		have[bi.Name] = bi
	}
	for _, name := range opts.Bitmaps {
		bi, ok := have[name]
		switch {
		case !ok:
			return nil, fmt.Errorf("bitmap %q is not found in %s", name, img.Path())
		case bi.Inconsistent:
			return nil, fmt.Errorf("bitmap %q in %s is inconsistent: it can only be removed", name, img.Path())
		}
	}
	return &Backend{img: img, opts: opts, src: img}, nil
}

// errView refuses writes to a snapshot view.
var errView = fmt.Errorf("%w: an internal snapshot is exported read-only", nbdattach.ErrPermission)

// Image returns the adapted image.
func (b *Backend) Image() *qcow2.Image { return b.img }

// Size implements nbdattach.Backend.
func (b *Backend) Size() int64 { return b.src.Size() }

// ReadAt implements nbdattach.Backend.
func (b *Backend) ReadAt(_ context.Context, p []byte, off int64) error {
	_, err := b.src.ReadAt(p, off)
	return mapImageErr(err)
}

// KnownZero implements nbdattach.ZeroProber.
func (b *Backend) KnownZero(off, n int64) bool { return b.src.KnownZero(off, n) }

// WriteAt implements nbdattach.Backend.
func (b *Backend) WriteAt(_ context.Context, p []byte, off int64, fua bool) error {
	if b.view {
		return errView
	}
	if _, err := b.img.WriteAt(p, off); err != nil {
		return mapImageErr(err)
	}
	if fua {
		return mapImageErr(b.img.Flush())
	}
	return nil
}

// Flush implements nbdattach.Backend.
func (b *Backend) Flush(context.Context) error {
	if b.view {
		return nil // nothing is ever written through a view
	}
	return mapImageErr(b.img.Flush())
}

// Trim implements nbdattach.Backend: whole clusters are discarded.
func (b *Backend) Trim(_ context.Context, off, n int64) error {
	if b.view {
		return errView
	}
	return mapImageErr(b.img.Discard(off, n))
}

// WriteZeroes implements nbdattach.Backend. A fast zero is refused (as qemu
// does for qcow2) when the range does not cover whole clusters, because the
// partial clusters would have to be written.
func (b *Backend) WriteZeroes(_ context.Context, off, n int64, fl nbdattach.ZeroFlags) error {
	if b.view {
		return errView
	}
	if fl.Fast {
		cs := b.img.ClusterSize()
		end := off + n
		if off%cs != 0 || (end%cs != 0 && end != b.img.Size()) {
			return fmt.Errorf("%w: zeroing [%d, %d) touches partial %d-byte clusters", nbdattach.ErrNotSupported, off, end, cs)
		}
	}
	var flags qcow2.ZeroFlags
	if !fl.NoHole {
		flags |= qcow2.ZeroMayUnmap
	}
	if err := b.img.WriteZeroes(off, n, flags); err != nil {
		return mapImageErr(err)
	}
	if fl.FUA {
		return mapImageErr(b.img.Flush())
	}
	return nil
}

// BlockStatus implements nbdattach.BlockStatuser for base:allocation the way
// qemu-nbd reports a qcow2 image: a hole is what holds no data (zero and
// unallocated clusters), zero is what reads as zeroes.
func (b *Backend) BlockStatus(_ context.Context, off, n int64) ([]nbdattach.Extent, error) {
	exts, err := b.src.BlockStatus(off, n)
	if err != nil {
		return nil, mapImageErr(err)
	}
	out := make([]nbdattach.Extent, 0, len(exts))
	for _, e := range exts {
		var fl uint32
		if !e.Data {
			fl |= nbdattach.StateHole
		}
		if e.Zero {
			fl |= nbdattach.StateZero
		}
		out = appendExtent(out, e.Length, fl)
	}
	return out, nil
}

// MetaContexts implements nbdattach.MetaContextProvider.
func (b *Backend) MetaContexts() []string {
	var out []string
	if b.opts.AllocationDepth {
		out = append(out, nbdattach.ContextAllocationDepth)
	}
	for _, n := range b.opts.Bitmaps {
		out = append(out, nbdattach.ContextDirtyBitmapPrefix+n)
	}
	return out
}

// MetaContextStatus implements nbdattach.MetaContextProvider.
func (b *Backend) MetaContextStatus(_ context.Context, name string, off, n int64) ([]nbdattach.Extent, error) {
	if bm, ok := strings.CutPrefix(name, nbdattach.ContextDirtyBitmapPrefix); ok && slices.Contains(b.opts.Bitmaps, bm) {
		exts, err := b.img.BitmapExtents(bm, off, n)
		if err != nil {
			return nil, mapImageErr(err)
		}
		out := make([]nbdattach.Extent, 0, len(exts))
		for _, e := range exts {
			var fl uint32
			if e.Dirty {
				fl = 1
			}
			out = appendExtent(out, e.Length, fl)
		}
		return out, nil
	}
	if name != nbdattach.ContextAllocationDepth || !b.opts.AllocationDepth {
		return nil, fmt.Errorf("%w: metadata context %q is not served", nbdattach.ErrInvalid, name)
	}
	exts, err := b.src.BlockStatus(off, n)
	if err != nil {
		return nil, mapImageErr(err)
	}
	out := make([]nbdattach.Extent, 0, len(exts))
	for _, e := range exts {
		var depth uint32
		if e.Present {
			depth = uint32(e.Depth) + 1
		}
		out = appendExtent(out, e.Length, depth)
	}
	return out, nil
}

func appendExtent(out []nbdattach.Extent, n int64, fl uint32) []nbdattach.Extent {
	if k := len(out); k > 0 && out[k-1].Flags == fl {
		out[k-1].Length += n
		return out
	}
	return append(out, nbdattach.Extent{Length: n, Flags: fl})
}

// mapImageErr gives image errors the NBD meaning a client should see.
// ENOSPC already travels as a syscall.Errno inside qcow2.ErrNoSpace.
func mapImageErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, qcow2.ErrReadOnly):
		return fmt.Errorf("%w: %w", nbdattach.ErrPermission, err)
	case errors.Is(err, qcow2.ErrOutOfRange), errors.Is(err, io.EOF):
		// io.EOF: a read past the end (io.ReaderAt), possible only when the
		// disk shrank after the server checked the request.
		return fmt.Errorf("%w: %w", nbdattach.ErrInvalid, err)
	case errors.Is(err, qcow2.ErrUnsupported):
		return fmt.Errorf("%w: %w", nbdattach.ErrNotSupported, err)
	}
	return err
}
