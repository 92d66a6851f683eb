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
	// One fsync of the finished file instead of one per metadata step:
	// nobody sees the file before the caller renames it into place.
	img, err := qcow2.Create(dst, qcow2.CreateOptions{Size: o.Size, ClusterSize: cs, BackingFile: rel, BackingFormat: "qcow2", Mode: 0o600, NoSync: true})
	if err == nil {
		err = img.Close()
	}
	if err == nil {
		err = syncFile(dst)
	}
	if err != nil {
		_ = os.Remove(dst)
		return err
	}
	return nil
}

func syncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// FlattenStepSize is how much of the disk one FlattenStep copies up: the
// unit between which the caller may stop, and the guest range one copy-up
// holds.
const FlattenStepSize = 64 << 20

// FlattenStep copies up into img the data it reads from its backing chain
// in [from, from+FlattenStepSize) and returns where the next step starts.
// A step at or past the end of the disk drops the backing file instead and
// reports done; when a snapshot still reads the backing file that error
// wraps qcow2.ErrBackingNeeded (the disk is copied up all the same). Steps
// run beside guest I/O on an open image; after an interruption they start
// again from any offset already reached (or from 0: what is copied is
// skipped).
func FlattenStep(img *qcow2.Image, from int64) (next int64, done bool, err error) {
	size := img.Size()
	if from >= size {
		if err := img.Flush(); err != nil {
			return from, false, err
		}
		if err := img.DetachBacking(); err != nil {
			return from, false, err
		}
		return from, true, nil
	}
	end := min(from+FlattenStepSize, size)
	if _, err := img.Stream(from, end-from); err != nil {
		return from, false, fmt.Errorf("copy up at %d: %w", from, err)
	}
	return end, false, nil
}

// Flatten runs FlattenStep from from to the end, calling step (when not
// nil) with the offset reached after each copy-up.
func Flatten(img *qcow2.Image, from int64, step func(off int64) error) error {
	for {
		next, done, err := FlattenStep(img, from)
		if err != nil || done {
			return err
		}
		if step != nil {
			if err := step(next); err != nil {
				return err
			}
		}
		from = next
	}
}
