package snapshotter

import (
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

// BitmapPrefix starts the names of the checkpoint bitmaps this package
// keeps; other bitmaps in an image are left alone.
const BitmapPrefix = "qcow2-csi-cbt-"

// BitmapName is the checkpoint bitmap of the snapshot with sequence seq.
func BitmapName(seq uint64) string { return BitmapPrefix + strconv.FormatUint(seq, 10) }

// checkpoint is one bitmap of the chain.
type checkpoint struct {
	seq    uint64
	status qcow2.BitmapStatus
}

// chain lists the checkpoint bitmaps of img in sequence order.
func chain(img *qcow2.Image) []checkpoint {
	var c []checkpoint
	for _, b := range img.Bitmaps() {
		s, ok := strings.CutPrefix(b.Name, BitmapPrefix)
		if !ok {
			continue
		}
		seq, err := strconv.ParseUint(s, 10, 64)
		if err != nil || BitmapName(seq) != b.Name {
			continue
		}
		c = append(c, checkpoint{seq: seq, status: b})
	}
	sort.Slice(c, func(i, j int) bool { return c[i].seq < c[j].seq })
	return c
}

// Find returns the internal snapshot named name.
func Find(img *qcow2.Image, name string) (qcow2.SnapshotInfo, error) {
	for _, s := range img.Snapshots() {
		if s.Name == name {
			return s, nil
		}
	}
	return qcow2.SnapshotInfo{}, fmt.Errorf("%w: %q in %s", ErrNotFound, name, img.Path())
}

// Take takes the snapshot name with sequence number seq, or returns it if it
// exists already (a retried request). seq must exceed the sequence of every
// checkpoint in the image, or equal the newest one when a previous Take of
// the same snapshot stopped after adding its bitmap; each snapshot must have
// its own seq (NextSeq), which the caller records with it. It is Prepare,
// Commit and Finish in a row; a caller that holds the image's I/O for the
// snapshot (a group snapshot) calls them apart, holding only Commit.
func Take(img *qcow2.Image, name string, seq uint64) (qcow2.SnapshotInfo, error) {
	if s, err := Find(img, name); err == nil {
		return s, nil
	}
	if err := Prepare(img, name, seq); err != nil {
		return qcow2.SnapshotInfo{}, err
	}
	info, err := Commit(img, name, seq)
	if err != nil {
		return qcow2.SnapshotInfo{}, err
	}
	Finish(img, seq)
	return info, nil
}

// Prepare readies snapshot name (sequence seq) while I/O still flows, so
// that Commit has little left to do: the writes so far and their metadata
// are made durable, and the snapshot's checkpoint bitmap is added and
// recording. A write between Prepare and Commit is in the new checkpoint
// and in the previous one (which records until Finish): both stay
// supersets. A snapshot that exists already needs nothing. After a
// failure, Delete(name, seq) drops what Prepare added.
func Prepare(img *qcow2.Image, name string, seq uint64) error {
	if _, err := Find(img, name); err == nil {
		return nil
	}
	// Commit's flush runs with I/O stalled: have the page cache written
	// back, then the metadata, while I/O still flows.
	if err := img.SyncFile(); err != nil {
		return fmt.Errorf("snapshot %q: %w", name, err)
	}
	if err := img.Flush(); err != nil {
		return fmt.Errorf("snapshot %q: flush: %w", name, err)
	}
	c := chain(img)
	switch {
	case len(c) > 0 && c[len(c)-1].seq == seq && c[len(c)-1].status.Enabled && !c[len(c)-1].status.Inconsistent:
		// A retry after a failure between adding the bitmap and taking
		// the snapshot: the bitmap has recorded since, keep it.
		return nil
	case len(c) > 0 && c[len(c)-1].seq >= seq:
		return fmt.Errorf("%w: sequence %d is not after the newest checkpoint %d", ErrInvalid, seq, c[len(c)-1].seq)
	}
	if err := img.AddBitmap(BitmapName(seq), qcow2.BitmapOptions{}); err != nil {
		return fmt.Errorf("snapshot %q: add checkpoint bitmap: %w", name, err)
	}
	return nil
}

// Commit takes the internal snapshot name that Prepare readied with
// sequence seq, or returns it if it exists already: the one step that
// fixes what the snapshot holds. A failure removes the checkpoint Prepare
// added.
func Commit(img *qcow2.Image, name string, seq uint64) (qcow2.SnapshotInfo, error) {
	if s, err := Find(img, name); err == nil {
		return s, nil
	}
	c := chain(img)
	if len(c) == 0 || c[len(c)-1].seq != seq {
		return qcow2.SnapshotInfo{}, fmt.Errorf("%w: snapshot %q: checkpoint %d is not the newest: not prepared", ErrInvalid, name, seq)
	}
	info, err := img.CreateSnapshot(name)
	if err != nil {
		_ = img.RemoveBitmap(BitmapName(seq))
		return qcow2.SnapshotInfo{}, fmt.Errorf("snapshot %q: %w", name, err)
	}
	return info, nil
}

// Finish freezes the checkpoints before seq once snapshot seq is taken:
// from then on seq's records the changes. It may run after the I/O goes
// on: a write before it is also in the previous checkpoint, which still
// covers its span (a superset), and so does one whose freeze fails.
func Finish(img *qcow2.Image, seq uint64) {
	for _, p := range chain(img) {
		if p.seq < seq && p.status.Enabled && !p.status.Inconsistent {
			_ = img.DisableBitmap(BitmapName(p.seq))
		}
	}
}

// Abandon undoes a Prepare of snapshot name (sequence seq) whose caller
// gives it up, committed or not: a snapshot taken is deleted (Delete);
// one never taken leaves no checkpoint behind, even as the image's only
// one (which Delete keeps, as the start of deltas from its snapshot: this
// one had none).
func Abandon(img *qcow2.Image, name string, seq uint64) error {
	if _, err := Find(img, name); err == nil {
		return Delete(img, name, seq)
	}
	c := chain(img)
	if len(c) == 1 && c[0].seq == seq {
		if err := img.RemoveBitmap(BitmapName(seq)); err != nil {
			return fmt.Errorf("snapshot %q: remove checkpoint: %w", name, err)
		}
		return nil
	}
	return Delete(img, name, seq)
}

// Delete deletes the snapshot name (sequence seq) and folds its checkpoint
// into the predecessor's. Deleting a snapshot that is gone succeeds.
func Delete(img *qcow2.Image, name string, seq uint64) error {
	if err := img.DeleteSnapshot(name); err != nil && !errors.Is(err, qcow2.ErrSnapshotNotFound) {
		return fmt.Errorf("snapshot %q: %w", name, err)
	}
	c := chain(img)
	i := sort.Search(len(c), func(i int) bool { return c[i].seq >= seq })
	if i == len(c) || c[i].seq != seq || i == 0 {
		// Gone already, or the oldest checkpoint: it stays, as the span
		// a delta from this snapshot starts in.
		return nil
	}
	me, pred := c[i], c[i-1]
	switch {
	case me.status.Inconsistent:
		// Its bits are unknown: keep it so that every delta across its
		// span keeps failing.
		return nil
	case pred.status.Inconsistent:
		// The predecessor's span is poisoned already and covers ours.
	default:
		if err := img.MergeBitmap(BitmapName(pred.seq), BitmapName(seq)); err != nil {
			return fmt.Errorf("snapshot %q: merge checkpoint into %s: %w", name, BitmapName(pred.seq), err)
		}
		if i == len(c)-1 && !pred.status.Enabled {
			// The newest snapshot went: its predecessor records again.
			if err := img.EnableBitmap(BitmapName(pred.seq)); err != nil {
				return fmt.Errorf("snapshot %q: enable %s: %w", name, BitmapName(pred.seq), err)
			}
		}
	}
	if err := img.RemoveBitmap(BitmapName(seq)); err != nil {
		return fmt.Errorf("snapshot %q: remove checkpoint: %w", name, err)
	}
	return nil
}

// Range is a byte range of the virtual disk.
type Range struct {
	Offset, Length int64
}

// appendRange adds r to the ascending list rs, merging it with the last
// range when they touch.
func appendRange(rs []Range, r Range) []Range {
	if r.Length <= 0 {
		return rs
	}
	if n := len(rs); n > 0 && rs[n-1].Offset+rs[n-1].Length >= r.Offset {
		if end := r.Offset + r.Length; end > rs[n-1].Offset+rs[n-1].Length {
			rs[n-1].Length = end - rs[n-1].Offset
		}
		return rs
	}
	return append(rs, r)
}

// union merges ascending lists into one ascending, non-overlapping list.
func union(lists ...[]Range) []Range {
	var all []Range
	for _, l := range lists {
		all = append(all, l...)
	}
	sort.Slice(all, func(i, j int) bool { return all[i].Offset < all[j].Offset })
	var out []Range
	for _, r := range all {
		out = appendRange(out, r)
	}
	return out
}

// Delta returns the ranges of [off, off+length) that may differ between the
// snapshot with sequence baseSeq (which may have been deleted) and the one
// with targetSeq (which must exist; the caller checks). Every byte that
// differs is inside a returned range; ranges are ascending, disjoint, at the
// bitmaps' granularity and clipped to the request.
func Delta(img *qcow2.Image, baseSeq, targetSeq uint64, off, length int64) ([]Range, error) {
	if baseSeq >= targetSeq {
		return nil, fmt.Errorf("%w: base sequence %d is not before target %d", ErrInvalid, baseSeq, targetSeq)
	}
	if off < 0 || length < 0 {
		return nil, fmt.Errorf("%w: range [%d, +%d)", ErrInvalid, off, length)
	}
	c := chain(img)
	// The span the base falls in starts at the newest checkpoint at or
	// before it.
	first := sort.Search(len(c), func(i int) bool { return c[i].seq > baseSeq }) - 1
	if first < 0 {
		return nil, fmt.Errorf("%w: no checkpoint covers base sequence %d in %s", ErrUntrusted, baseSeq, img.Path())
	}
	var lists [][]Range
	for _, cp := range c[first:] {
		if cp.seq >= targetSeq {
			break
		}
		if cp.status.Inconsistent {
			return nil, fmt.Errorf("%w: checkpoint %s is inconsistent (the image was not closed cleanly)", ErrUntrusted, BitmapName(cp.seq))
		}
		ext, err := img.BitmapExtents(BitmapName(cp.seq), off, length)
		if errors.Is(err, qcow2.ErrBitmapInconsistent) {
			return nil, fmt.Errorf("%w: %w", ErrUntrusted, err)
		}
		if err != nil {
			return nil, err
		}
		var rs []Range
		for _, e := range ext {
			if e.Dirty {
				rs = appendRange(rs, Range{e.Offset, e.Length})
			}
		}
		lists = append(lists, rs)
	}
	return union(lists...), nil
}

// Allocated returns the ranges of [off, off+length) of snapshot name that
// hold data (neither unallocated nor zero clusters): what a full backup
// must copy onto a zeroed target.
func Allocated(img *qcow2.Image, name string, off, length int64) ([]Range, error) {
	v, err := openView(img, name)
	if err != nil {
		return nil, err
	}
	defer v.Close()
	if off > v.Size() {
		return nil, fmt.Errorf("%w: offset %d, disk size %d", ErrOutOfRange, off, v.Size())
	}
	if length > v.Size()-off {
		length = v.Size() - off
	}
	ext, err := v.BlockStatus(off, length)
	if err != nil {
		return nil, err
	}
	var rs []Range
	for _, e := range ext {
		if e.Data && !e.Zero {
			rs = appendRange(rs, Range{e.Start, e.Length})
		}
	}
	return rs, nil
}

// Size returns the virtual disk size of snapshot name.
func Size(img *qcow2.Image, name string) (int64, error) {
	s, err := Find(img, name)
	if err != nil {
		return 0, err
	}
	return int64(s.DiskSize), nil
}

func openView(img *qcow2.Image, name string) (*qcow2.SnapshotView, error) {
	s, err := Find(img, name)
	if err != nil {
		return nil, err
	}
	v, err := img.OpenSnapshot(s.ID)
	if errors.Is(err, qcow2.ErrSnapshotNotFound) {
		return nil, fmt.Errorf("%w: %w", ErrNotFound, err)
	}
	return v, err
}

// TableDelta returns the ranges of [off, off+length) where the two
// snapshots' L1/L2 tables differ: a cluster both share (same host offset,
// or zero/unallocated in both) is unchanged. It is the cross-check of Delta
// when both snapshots exist: TableDelta must lie inside Delta. Compressed
// clusters have no comparable offset and count as changed.
func TableDelta(img *qcow2.Image, base, target string, off, length int64) ([]Range, error) {
	vb, err := openView(img, base)
	if err != nil {
		return nil, err
	}
	defer vb.Close()
	vt, err := openView(img, target)
	if err != nil {
		return nil, err
	}
	defer vt.Close()
	end := off + length
	if s := min(vb.Size(), vt.Size()); end > s {
		end = s
	}
	var rs []Range
	if off < end {
		eb, err := vb.BlockStatus(off, end-off)
		if err != nil {
			return nil, err
		}
		et, err := vt.BlockStatus(off, end-off)
		if err != nil {
			return nil, err
		}
		i, j, pos := 0, 0, off
		for pos < end && i < len(eb) && j < len(et) {
			a, b := eb[i], et[j]
			stop := min(a.Start+a.Length, b.Start+b.Length)
			if !sameMapping(a, b, pos) {
				rs = appendRange(rs, Range{pos, stop - pos})
			}
			pos = stop
			if a.Start+a.Length == stop {
				i++
			}
			if b.Start+b.Length == stop {
				j++
			}
		}
	}
	// A size change: the part only one of them has differs.
	if hi := max(vb.Size(), vt.Size()); end < hi && off+length > end {
		rs = appendRange(rs, Range{end, min(hi, off+length) - end})
	}
	return rs, nil
}

func sameMapping(a, b qcow2.Extent, pos int64) bool {
	readsZero := func(e qcow2.Extent) bool { return e.Zero || !e.Present }
	if readsZero(a) && readsZero(b) {
		return true
	}
	if a.Compressed || b.Compressed || !a.Data || !b.Data || a.Offset < 0 || b.Offset < 0 {
		return false
	}
	// Offsets compare within one file only: the same offset in the image
	// and in its backing file are different data.
	return a.Depth == b.Depth && a.Offset+(pos-a.Start) == b.Offset+(pos-b.Start)
}

// NextSeq is a sequence number for the next snapshot of img: now (e.g. the
// clock in nanoseconds) unless the newest checkpoint is not older.
func NextSeq(img *qcow2.Image, now uint64) uint64 {
	if c := chain(img); len(c) > 0 && c[len(c)-1].seq >= now {
		return c[len(c)-1].seq + 1
	}
	return now
}
