package qcow2

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
)

// powerLossFile is the image file under a power-loss model, the one the
// power-loss tests share. It records, for every write since the last sync,
// the bytes it replaced, and before every operation (a write or a sync)
// asks a trigger whether the power is lost just before it. Then it saves
// the file a disk could be left with: the file as it is now, with the
// unsynced writes the adversary drops undone, newest first. A durable
// write (WriteAtDsync, RWF_DSYNC) is a write whose range is synced when it
// returns.
type powerLossFile struct {
	*os.File
	mu       sync.Mutex
	unsynced []preImage // oldest first
	ops      int        // writes and syncs so far
	writes   int
	crashAt  func(op powerLossOp) bool // nil: the power stays on
	drop     powerLossAdversary
	dir      string   // where the crash images go
	crashes  []string // crash images made so far
	err      error
}

// powerLossOp is the operation the trigger may lose the power before.
type powerLossOp struct {
	n        int  // writes and syncs so far, this one included
	write    bool // a write; a sync otherwise
	unsynced int  // unsynced writes before it
}

// preImage is what an unsynced write replaced: old at off.
type preImage struct {
	off int64
	old []byte
}

// powerLossAdversary chooses which of the unsynced writes (oldest first)
// the disk loses, whole or in part: it returns the preimages to put back.
// crash is the crash image before the undo (its layout may decide).
type powerLossAdversary func(crash string, unsynced []preImage) ([]preImage, error)

// dropUnsynced: the disk kept no unsynced write.
func dropUnsynced(_ string, unsynced []preImage) ([]preImage, error) {
	return unsynced, nil
}

// keepLatestUnsynced: the disk kept only the latest unsynced write, the
// others dropped; with dropUnsynced, the two that break an ordering that
// counts on a sync the code skipped.
func keepLatestUnsynced(_ string, unsynced []preImage) ([]preImage, error) {
	if len(unsynced) > 0 {
		unsynced = unsynced[:len(unsynced)-1]
	}
	return unsynced, nil
}

// dropBitmapClusters: every unsynced write reached the disk except its
// parts in the bitmap data clusters of the crash image's bitmaps, the
// adversary that matters for bitmaps.
func dropBitmapClusters(crash string, unsynced []preImage) ([]preImage, error) {
	img, err := Open(crash, OpenOptions{ReadOnly: true, NoLock: true})
	if err != nil {
		return nil, fmt.Errorf("crash image %s before undo: %w", crash, err)
	}
	var clusters []int64
	for _, b := range img.bms.list {
		for _, te := range b.table {
			if te.offset() != 0 {
				clusters = append(clusters, te.offset())
			}
		}
	}
	cs := img.clusterSize
	img.Close()
	var out []preImage
	for _, u := range unsynced {
		for _, c := range clusters {
			lo, hi := max(u.off, c), min(u.off+int64(len(u.old)), c+cs)
			if lo < hi {
				out = append(out, preImage{lo, u.old[lo-u.off : hi-u.off]})
			}
		}
	}
	return out, nil
}

func (p *powerLossFile) WriteAt(b []byte, off int64) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.writes++
	p.step(true)
	old := make([]byte, len(b))
	n, err := p.File.ReadAt(old, off)
	if err != nil && err != io.EOF {
		return 0, err
	}
	p.unsynced = append(p.unsynced, preImage{off, old[:n]})
	return p.File.WriteAt(b, off)
}

// WriteAtDsync is a write whose range is durable when it returns (and so
// is every earlier write inside that range).
func (p *powerLossFile) WriteAtDsync(b []byte, off int64) (int, error) {
	n, err := p.WriteAt(b, off)
	if err != nil {
		return n, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	kept := p.unsynced[:0]
	for _, u := range p.unsynced {
		if u.off < off || u.off+int64(len(u.old)) > off+int64(len(b)) {
			kept = append(kept, u)
		}
	}
	p.unsynced = kept
	return n, nil
}

func (p *powerLossFile) Sync() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.step(false)
	if err := p.File.Sync(); err != nil {
		return err
	}
	p.unsynced = nil
	return nil
}

// step counts an operation, and loses the power before it if the trigger
// says so. p.mu held.
func (p *powerLossFile) step(write bool) {
	p.ops++
	if p.crashAt != nil && p.crashAt(powerLossOp{p.ops, write, len(p.unsynced)}) {
		p.saveCrashImage()
	}
}

// saveCrashImage saves the file a power loss now leaves in p.dir and adds
// it to p.crashes: the file as it is, with the preimages the adversary
// chooses put back, newest first. p.mu held.
func (p *powerLossFile) saveCrashImage() {
	path := filepath.Join(p.dir, fmt.Sprintf("crash-%d.qcow2", len(p.crashes)))
	p.crashes = append(p.crashes, path)
	if err := copyFileRange(p.File, path); err != nil {
		p.err = err
		return
	}
	undo, err := p.drop(path, p.unsynced)
	if err != nil {
		p.err = err
		return
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		p.err = err
		return
	}
	defer f.Close()
	for i := len(undo) - 1; i >= 0; i-- {
		if _, err := f.WriteAt(undo[i].old, undo[i].off); err != nil {
			p.err = err
		}
	}
}

func copyFileRange(src *os.File, dst string) error {
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	defer out.Close()
	_, err = io.Copy(out, io.NewSectionReader(src, 0, 1<<62))
	return err
}
