package qcow2

import (
	"errors"
	"fmt"
)

// Streaming is qemu's block-stream: the data an overlay reads from its
// backing chain is copied up into the overlay, cluster by cluster, while
// the guest keeps reading and writing; when nothing is left below, the
// backing file is dropped from the header and the image stands alone.
//
// A copy-up holds its guest range exclusively (as a write does), looks at
// the allocation again under that hold and copies only what is still
// unallocated in the overlay, so a guest write that got there first is never
// overwritten with older data. A copy-up changes no guest byte: it is not
// recorded in the dirty bitmaps, so changed-block deltas stay exact.
// Streaming needs no record of its progress: what was copied is allocated
// in the overlay and is skipped when a stream starts again after a restart.

// ErrBackingNeeded means the backing file cannot be dropped yet: some part
// of the disk or of an internal snapshot still reads from it.
var ErrBackingNeeded = errors.New("qcow2: backing file still needed")

// streamChunk bounds one copy-up step: the guest range it holds and the
// memory it uses.
const streamChunk = 1 << 20

// Stream copies up into img the data of [off, off+n) that img reads from its
// backing chain. It returns the number of bytes copied. An image without a
// backing file has nothing to copy.
func (img *Image) Stream(off, n int64) (int64, error) {
	var copied int64
	end := off + n
	for o := off; o < end; {
		k := min(int64(streamChunk)-o%streamChunk, end-o)
		c, err := img.streamChunk(o, k)
		copied += c
		if err != nil {
			return copied, err
		}
		o += k
	}
	return copied, nil
}

func (img *Image) streamChunk(off, n int64) (int64, error) {
	img.drain.RLock()
	defer img.drain.RUnlock()
	if err := img.startWriteLocked(off, n); err != nil {
		return 0, err
	}
	if img.backing == nil || n == 0 {
		return 0, nil
	}
	tok := img.ranges.lock(alignDown(off, img.clusterSize), alignUp(off+n, img.clusterSize), true)
	defer img.ranges.unlock(tok)
	ext, err := img.blockStatus(off, n, 0)
	if err != nil {
		return 0, err
	}
	var copied int64
	var buf []byte
	for _, e := range ext {
		if e.Depth == 0 || !e.Data || e.Zero {
			// Ours already, or zeroes below, which an image without a
			// backing file reads from unallocated clusters as well.
			continue
		}
		if buf == nil {
			buf = make([]byte, streamChunk)
		}
		p := buf[:e.Length]
		if err := img.readBacking(p, e.Start); err != nil {
			return copied, err
		}
		if err := img.writeRangeHooks(p, e.Start, false); err != nil {
			return copied, err
		}
		copied += e.Length
	}
	return copied, nil
}

// BackingDepth is the length of the image's backing chain as opened: 0
// without a backing file.
func (img *Image) BackingDepth() int {
	d := 0
	for l := img.backing; l != nil; {
		d++
		q, ok := l.(*Image)
		if !ok {
			break
		}
		l = q.backing
	}
	return d
}

// DetachBacking drops the backing file from the header once nothing reads
// from it: neither the disk nor any internal snapshot (Stream copies up the
// disk only; a snapshot taken before the stream still reads the backing
// file until it is deleted). It fails with ErrBackingNeeded, naming the
// first place that still needs it, and changes nothing then. An image
// without a backing file is left as it is.
func (img *Image) DetachBacking() error {
	unlock, err := img.lockMetaOp()
	if err != nil {
		return err
	}
	defer unlock()
	if img.backing == nil && img.hdr.BackingFile == "" {
		return nil
	}
	if img.backing == nil {
		return fmt.Errorf("%w: image opened without its backing file %q", ErrBackingNeeded, img.hdr.BackingFile)
	}
	if err := img.needsBacking(nil, img.size, "the disk"); err != nil {
		return err
	}
	for i := range img.snapshots {
		sn := &img.snapshots[i]
		l1, err := img.readSnapshotL1(sn, i)
		if err != nil {
			return err
		}
		if err := img.needsBacking(l1, int64(img.snapshotInfo(sn).DiskSize), fmt.Sprintf("snapshot %s (%q)", sn.ID, sn.Name)); err != nil {
			return err
		}
	}
	h := *img.hdr
	h.BackingFile, h.BackingFormat = "", ""
	if err := img.rewriteHeader(&h); err != nil {
		return err
	}
	b := img.backing
	img.backing = nil
	return b.close()
}

// needsBacking reports, as ErrBackingNeeded, data that the disk seen
// through l1 (nil: the active one) reads from the backing chain. mu held.
func (img *Image) needsBacking(l1 []l1Entry, size int64, what string) error {
	for off := int64(0); off < size; off += maxMapChunk * 64 {
		n := min(int64(maxMapChunk*64), size-off)
		runs, err := img.mapRangeL1(l1, off, n, nil)
		if err != nil {
			return err
		}
		for _, r := range runs {
			if r.kind != kindUnallocated && r.kind != kindUnallocatedAlloc {
				continue
			}
			ext, err := img.backing.blockStatus(r.guest, r.n, 1)
			if err != nil {
				return err
			}
			for _, e := range ext {
				if e.Data && !e.Zero {
					return fmt.Errorf("%w: %s reads %d bytes at %d from it", ErrBackingNeeded, what, e.Length, e.Start)
				}
			}
		}
	}
	return nil
}
