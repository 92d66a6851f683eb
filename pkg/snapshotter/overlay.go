package snapshotter

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

// Overlays: a clone or restore as a qcow2 image whose unwritten clusters
// read from an immutable base (its backing file). The base is a snapshot
// frozen once (Freeze); every clone of it is a new, empty overlay (Overlay)
// made in constant time whatever the size of the disk and the file system.
// Flatten copies the base's data up into an overlay while it is in use and
// then drops the backing file (qemu's block-stream).

// Freeze makes base, an immutable image holding snapshot name of src (""
// is src's current disk, see Restore), for overlays to read from. It is
// Restore to a new file: a reflink where the file system has it, else a
// copy of the snapshot's data clusters. A src that is itself an overlay
// gives a base that is one too, over the same backing file, when reflinked
// and while the chain stays within maxDepth layers below an overlay of the
// new base; otherwise the copy reads through the chain and the base stands
// alone (the chain is flattened there). It returns how the base was made
// and how many backing layers it has.
func Freeze(src *qcow2.Image, name, base string, maxDepth int, o RestoreOptions) (Method, int, error) {
	depth := src.BackingDepth()
	o.Size = 0
	if depth > 0 && depth+1 > maxDepth {
		o.NoReflink = true
	}
	if depth > 0 && !o.NoReflink {
		// The reflinked header names the backing file relative to src:
		// rename it relative to the base before the base is opened.
		info, err := src.Info()
		if err != nil {
			return "", 0, err
		}
		rel, err := filepath.Rel(filepath.Dir(base), info.FullBackingFile)
		if err != nil {
			return "", 0, err
		}
		o.fixBacking = func(path string) error { return renameBacking(path, rel) }
	}
	m, err := Restore(src, name, base, o)
	if err != nil {
		return "", 0, err
	}
	if m == MethodCopy {
		depth = 0
	}
	return m, depth, nil
}

// renameBacking rewrites the backing file name of a closed image without
// opening its chain.
func renameBacking(path, backing string) error {
	img, err := qcow2.Open(path, qcow2.OpenOptions{NoBacking: true})
	if err != nil {
		return err
	}
	err = img.Amend(qcow2.AmendOptions{BackingFile: &backing})
	if cerr := img.Close(); err == nil {
		err = cerr
	}
	return err
}

// OverlayOptions configures Overlay.
type OverlayOptions struct {
	// Size of the new disk; 0 is the base's. Smaller is refused.
	Size int64
	// ClusterSize of the overlay; 0 takes the base's.
	ClusterSize int64
}

// Overlay makes dst, a new empty image over base: its backing file is
// base's name relative to dst's directory, its backing format qcow2. dst
// must not exist; on error nothing is left there. The time it takes does
// not depend on the size of base.
func Overlay(base, dst string, o OverlayOptions) error {
	if _, err := os.Lstat(dst); err == nil {
		return fmt.Errorf("%w: %s", ErrExists, dst)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	b, err := qcow2.Open(base, qcow2.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		return fmt.Errorf("base %s: %w", base, err)
	}
	size, cs := b.Size(), b.ClusterSize()
	if err := b.Close(); err != nil {
		return err
	}
	if o.Size != 0 && o.Size < size {
		return fmt.Errorf("%w: overlay of %d bytes over a base of %d bytes", ErrInvalid, o.Size, size)
	}
	if o.Size == 0 {
		o.Size = size
	}
	if o.ClusterSize != 0 {
		cs = o.ClusterSize
	}
	rel, err := filepath.Rel(filepath.Dir(dst), base)
	if err != nil {
		return err
	}
	img, err := qcow2.Create(dst, qcow2.CreateOptions{Size: o.Size, ClusterSize: cs, BackingFile: rel, BackingFormat: "qcow2", Mode: 0o600})
	if err != nil {
		_ = os.Remove(dst)
		return err
	}
	if err := img.Close(); err != nil {
		_ = os.Remove(dst)
		return err
	}
	return nil
}

// FlattenStep is how much of the disk one Flatten step copies up: the unit
// between which the caller may stop, and the guest range one copy-up holds.
const FlattenStep = 64 << 20

// Flatten copies up into img, from offset from on, the data it reads from
// its backing chain, one FlattenStep at a time, calling step after each
// with the offset reached (a non-nil error from step stops it). Then it
// drops the backing file. It runs beside guest I/O on an open image and
// can start again from 0 (or a saved offset) after an interruption. When a
// snapshot still reads the backing file the disk is copied up all the same
// and the error wraps qcow2.ErrBackingNeeded.
func Flatten(img *qcow2.Image, from int64, step func(off int64) error) error {
	for off := from; off < img.Size(); off += FlattenStep {
		if _, err := img.Stream(off, min(FlattenStep, img.Size()-off)); err != nil {
			return fmt.Errorf("copy up at %d: %w", off, err)
		}
		if step != nil {
			if err := step(min(off+FlattenStep, img.Size())); err != nil {
				return err
			}
		}
	}
	if err := img.Flush(); err != nil {
		return err
	}
	return img.DetachBacking()
}
