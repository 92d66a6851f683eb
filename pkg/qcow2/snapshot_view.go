package qcow2

import (
	"fmt"
	"io"
	"sync"
)

// SnapshotView reads one internal snapshot without reverting to it: an
// io.ReaderAt over the snapshot's disk (its own disk size) with BlockStatus
// like Image.BlockStatus. The clusters a snapshot references are never
// written in place (their refcount is above one, or the snapshot alone
// holds them), so reads need no lock against the active image's writers;
// the snapshot cannot be deleted while a view is open.
type SnapshotView struct {
	img  *Image
	info SnapshotInfo
	l1   []l1Entry
	size int64

	mu     sync.Mutex
	closed bool
}

// OpenSnapshot opens a read-only view of the snapshot with the given ID
// (or, when no ID matches, name). Close it to allow the snapshot's
// deletion.
func (img *Image) OpenSnapshot(idOrName string) (*SnapshotView, error) {
	unlock, err := img.lockShared()
	if err != nil {
		return nil, err
	}
	defer unlock()
	i, err := img.snapshotIndex(idOrName)
	if err != nil {
		return nil, err
	}
	sn := &img.snapshots[i]
	l1, err := img.readSnapshotL1(sn, i)
	if err != nil {
		return nil, err
	}
	info := img.snapshotInfo(sn)
	if img.snapViews == nil {
		img.snapViews = map[string]int{}
	}
	img.snapViews[sn.ID]++
	return &SnapshotView{img: img, info: info, l1: l1, size: int64(info.DiskSize)}, nil
}

// Info describes the snapshot.
func (v *SnapshotView) Info() SnapshotInfo { return v.info }

// Size is the snapshot's virtual disk size.
func (v *SnapshotView) Size() int64 { return v.size }

// Close releases the view.
func (v *SnapshotView) Close() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return ErrClosed
	}
	v.closed = true
	v.img.mu.Lock()
	v.img.snapViews[v.info.ID]--
	if v.img.snapViews[v.info.ID] <= 0 {
		delete(v.img.snapViews, v.info.ID)
	}
	v.img.mu.Unlock()
	return nil
}

func (v *SnapshotView) checkOpen() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return ErrClosed
	}
	return nil
}

// ReadAt reads the snapshot's disk (io.ReaderAt semantics: io.EOF past
// its end).
func (v *SnapshotView) ReadAt(p []byte, off int64) (int, error) {
	if err := v.checkOpen(); err != nil {
		return 0, err
	}
	if off < 0 {
		return 0, fmt.Errorf("%w: negative offset %d", ErrOutOfRange, off)
	}
	if off >= v.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := int64(len(p))
	var eof error
	if n > v.size-off {
		n, eof = v.size-off, io.EOF
	}
	img := v.img
	img.drain.RLock()
	defer img.drain.RUnlock()
	img.mu.Lock()
	err := img.checkOpen()
	img.mu.Unlock()
	if err != nil {
		return 0, err
	}
	if err := img.readRangeL1(v.l1, p[:n], off); err != nil {
		return 0, err
	}
	return int(n), eof
}

// KnownZero is Image.KnownZero for the snapshot's disk.
func (v *SnapshotView) KnownZero(off, n int64) bool {
	if v.checkOpen() != nil || off < 0 || n > v.size-off {
		return false
	}
	return v.img.knownZeroL1(v.l1, off, n)
}

// BlockStatus describes [off, off+n) of the snapshot's disk as extents,
// as Image.BlockStatus does for the active disk.
func (v *SnapshotView) BlockStatus(off, n int64) ([]Extent, error) {
	if err := v.checkOpen(); err != nil {
		return nil, err
	}
	if off < 0 || n < 0 {
		return nil, fmt.Errorf("%w: offset %d length %d", ErrOutOfRange, off, n)
	}
	img := v.img
	img.drain.RLock()
	defer img.drain.RUnlock()
	return img.blockStatusL1(v.l1, v.size, off, n, 0)
}
