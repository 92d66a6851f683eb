package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"time"
)

// Internal snapshots, with qemu's refcount model (block/qcow2-snapshot.c and
// qcow2_update_snapshot_refcount):
//
//   - A snapshot owns a copy of the active L1 table. Taking it adds one to the
//     refcount of every L2 table the active L1 references and one to every
//     data cluster those L2 tables reference (a data cluster's refcount
//     counts the L1 tables that reach it, even through a shared L2 table).
//   - COPIED (bit 63 of L1/L2 entries) is set exactly where the refcount is
//     one; writes go in place only there, everything else copies on write.
//   - Deleting drops those references again and restores COPIED where
//     refcounts return to one; reverting references the snapshot's tree from
//     the active L1 and drops the old active tree.
//
// Crash safety: on compat=1.1 images every multi-step change runs with the
// dirty bit set (durably) and cleared only once everything else is durable,
// so a crash anywhere leaves an image that the next read-write open (qemu's
// or ours) repairs by recomputing refcounts and COPIED flags. compat=0.10 has
// no dirty bit; there the steps are ordered as qemu orders them (refcounts
// durable before the tables that rely on them, the new snapshot table
// durable before the header points at it), so a crash leaves at worst leaked
// clusters and COPIED flags that are clear where they could be set.

// Errors returned by the snapshot operations.
var (
	// ErrSnapshotNotFound means no snapshot has the given ID or name.
	ErrSnapshotNotFound = errors.New("qcow2: snapshot not found")
	// ErrSnapshotInUse means the snapshot is open through OpenSnapshot and
	// cannot be deleted until the view is closed.
	ErrSnapshotInUse = errors.New("qcow2: snapshot is in use")
	// ErrTooLarge means a size or count would exceed qemu's limits (L1
	// table size, snapshot count or snapshot table size).
	ErrTooLarge = errors.New("qcow2: too large")
)

const (
	// maxSnapshotsTableBytes is QCOW_MAX_SNAPSHOTS_SIZE.
	maxSnapshotsTableBytes = 1024 * maxSnapshots
	// maxSnapshotNameLen: qemu copies names into a 256-byte buffer
	// (QEMUSnapshotInfo.name), so a longer name could not be addressed by
	// qemu-img snapshot -a/-d.
	maxSnapshotNameLen = 255
	// snapshotExtraLen is the extra data qemu writes: 64-bit VM state
	// size, disk size, icount.
	snapshotExtraLen = 24
)

// Date returns the creation time.
func (s SnapshotInfo) Date() time.Time { return time.Unix(int64(s.DateSec), int64(s.DateNsec)) }

func (img *Image) snapshotInfo(s *snapshotEntry) SnapshotInfo {
	info := SnapshotInfo{
		ID: s.ID, Name: s.Name, DateSec: s.DateSec, DateNsec: s.DateNsec,
		VMClockNsec: s.VMClockNsec, VMStateSize: uint64(s.VMStateSize),
		DiskSize: s.DiskSize, Icount: s.Icount,
	}
	if len(s.ExtraData) >= 8 {
		info.VMStateSize = s.VMStateSizeLarge
	}
	if len(s.ExtraData) < 16 {
		info.DiskSize = uint64(img.size)
	}
	return info
}

// Snapshots lists the internal snapshots in table order.
func (img *Image) Snapshots() []SnapshotInfo {
	img.mu.Lock()
	defer img.mu.Unlock()
	out := make([]SnapshotInfo, len(img.snapshots))
	for i := range img.snapshots {
		out[i] = img.snapshotInfo(&img.snapshots[i])
	}
	return out
}

// findSnapshot is qemu's find_snapshot_by_id_or_name: an ID match first,
// then a name match. mu held.
func (img *Image) findSnapshot(idOrName string) int {
	for i := range img.snapshots {
		if img.snapshots[i].ID == idOrName {
			return i
		}
	}
	for i := range img.snapshots {
		if img.snapshots[i].Name == idOrName {
			return i
		}
	}
	return -1
}

// snapshotIndex is findSnapshot with ErrSnapshotNotFound naming idOrName
// when nothing matches. mu held.
func (img *Image) snapshotIndex(idOrName string) (int, error) {
	i := img.findSnapshot(idOrName)
	if i < 0 {
		return -1, fmt.Errorf("%w: %q", ErrSnapshotNotFound, idOrName)
	}
	return i, nil
}

// nextSnapshotID is qemu's find_new_snapshot_id: one more than the largest
// numeric ID (non-numeric IDs count as 0, as strtoul makes them).
func (img *Image) nextSnapshotID() string {
	var maxID uint64
	for i := range img.snapshots {
		if v := leadingUint(img.snapshots[i].ID); v > maxID {
			maxID = v
		}
	}
	return strconv.FormatUint(maxID+1, 10)
}

// leadingUint parses the leading decimal digits of s, saturating, as
// strtoul does.
func leadingUint(s string) uint64 {
	var v uint64
	for i := 0; i < len(s) && s[i] >= '0' && s[i] <= '9'; i++ {
		d := uint64(s[i] - '0')
		if v > (^uint64(0)-d)/10 {
			return ^uint64(0)
		}
		v = v*10 + d
	}
	return v
}

// lockShared takes mu for metadata work that requests in flight may overlap
// (drain held shared, before mu as everywhere) and checks that the image is
// open. On success the caller defers unlock; on error nothing is held.
func (img *Image) lockShared() (unlock func(), err error) {
	img.drain.RLock()
	img.mu.Lock()
	if err := img.checkOpen(); err != nil {
		img.mu.Unlock()
		img.drain.RUnlock()
		return nil, err
	}
	return func() {
		img.mu.Unlock()
		img.drain.RUnlock()
	}, nil
}

// lockMetaOp takes the locks of a metadata operation, drain first (no
// request in flight) then mu, and checks that the image can take one. On
// success the caller defers unlock; on error nothing is held.
func (img *Image) lockMetaOp() (unlock func(), err error) {
	img.drain.Lock()
	img.mu.Lock()
	if err := img.writableForMetaOp(); err != nil {
		img.mu.Unlock()
		img.drain.Unlock()
		return nil, err
	}
	return func() {
		img.mu.Unlock()
		img.drain.Unlock()
	}, nil
}

// writableForMetaOp checks that the image can take a whole-image metadata
// change. mu held.
func (img *Image) writableForMetaOp() error {
	if err := img.checkOpen(); err != nil {
		return err
	}
	if img.readOnly {
		return ErrReadOnly
	}
	if img.err != nil {
		return img.err
	}
	if img.hdr.DataFile != "" || img.hdr.Incompatible&IncompatExternalData != 0 {
		return fmt.Errorf("%w: internal snapshots of images with an external data file", ErrUnsupported)
	}
	return nil
}

// CreateSnapshot takes a disk-only internal snapshot of the current disk
// state and returns its description. Like qemu it allows duplicate names;
// the ID is new. Only metadata is written: the active L1 table is copied
// and refcounts raised. Guest I/O waits only while the metadata changes.
func (img *Image) CreateSnapshot(name string) (SnapshotInfo, error) {
	if len(name) > maxSnapshotNameLen {
		return SnapshotInfo{}, fmt.Errorf("%w: snapshot name is %d bytes, limit %d", ErrInvalidOption, len(name), maxSnapshotNameLen)
	}
	for i := 0; i < len(name); i++ {
		if name[i] == 0 {
			return SnapshotInfo{}, fmt.Errorf("%w: snapshot name contains a NUL byte", ErrInvalidOption)
		}
	}
	now := time.Now()
	unlock, err := img.lockMetaOp()
	if err != nil {
		return SnapshotInfo{}, err
	}
	defer unlock()
	if len(img.snapshots) >= maxSnapshots {
		return SnapshotInfo{}, fmt.Errorf("%w: the image already has %d snapshots, the limit", ErrTooLarge, maxSnapshots)
	}
	sn := snapshotEntry{
		L1Size:   uint32(len(img.l1)),
		ID:       img.nextSnapshotID(),
		Name:     name,
		DateSec:  uint32(now.Unix()),
		DateNsec: uint32(now.Nanosecond()),
		DiskSize: uint64(img.size),
		Icount:   -1,
	}
	sn.ExtraData = encodeSnapshotExtra(0, sn.DiskSize, -1, nil)
	newList := append(append([]snapshotEntry(nil), img.snapshots...), sn)
	if n := len(encodeSnapshotTable(newList)); n > maxSnapshotsTableBytes {
		return SnapshotInfo{}, fmt.Errorf("%w: snapshot table would be %d bytes, limit %d", ErrTooLarge, n, maxSnapshotsTableBytes)
	}

	op, err := img.beginMetaOp()
	if err != nil {
		return SnapshotInfo{}, err
	}
	// Everything written before the snapshot belongs in it. Protected
	// (the dirty bit is set and durable), the earlier writes' metadata
	// still in the caches is written with the snapshot's and made
	// durable by endMetaOp before the header names the new table: a
	// crash in between is repaired at the next open, so no flush (and
	// its syncs) is needed first; this runs while a group snapshot holds
	// its volumes' I/O. Without the dirty bit (compat=0.10) that
	// metadata is made durable first, outside the crash window below.
	if !op.protected {
		if err := img.flushLocked(false); err != nil {
			return SnapshotInfo{}, img.failMetaOp(err)
		}
	}
	// Copy of the active L1 table, flags included, as qemu writes it.
	l1Bytes := int64(len(img.l1)) * 8
	if l1Bytes > 0 {
		off, err := img.allocClusters(clustersFor(l1Bytes, img.clusterSize))
		if err != nil {
			return SnapshotInfo{}, img.failMetaOp(err)
		}
		buf := encodeL1(img.l1)
		if err := img.checkOverlap(off, l1Bytes, 0); err != nil {
			return SnapshotInfo{}, img.failMetaOp(err)
		}
		if _, err := img.f.WriteAt(buf, off); err != nil {
			return SnapshotInfo{}, img.failMetaOp(ioErr("write snapshot L1 table", err))
		}
		img.markMeta(off, l1Bytes, metaInactiveL1)
		sn.L1TableOffset = uint64(off)
		newList[len(newList)-1] = sn
	}
	// Raise the refcounts of the whole active tree; COPIED goes away
	// everywhere (every count is now at least two).
	if err := img.updateTreeRefcounts(img.l1, true, +1); err != nil {
		return SnapshotInfo{}, img.failMetaOp(err)
	}
	if !op.protected {
		// compat=0.10: refcounts durable before the snapshot table
		// that needs them.
		if err := img.flushLocked(true); err != nil {
			return SnapshotInfo{}, img.failMetaOp(err)
		}
	}
	if err := img.writeSnapshotTable(newList, op); err != nil {
		return SnapshotInfo{}, img.failMetaOp(err)
	}
	if err := img.endMetaOp(op); err != nil {
		return SnapshotInfo{}, err
	}
	return img.snapshotInfo(&img.snapshots[len(img.snapshots)-1]), nil
}

// DeleteSnapshot removes the snapshot with the given ID (or, when no ID
// matches, the first with that name) and frees the clusters only it used.
func (img *Image) DeleteSnapshot(idOrName string) error {
	unlock, err := img.lockMetaOp()
	if err != nil {
		return err
	}
	defer unlock()
	i, err := img.snapshotIndex(idOrName)
	if err != nil {
		return err
	}
	sn := img.snapshots[i]
	if img.snapViews[sn.ID] > 0 {
		return fmt.Errorf("%w: %q is open for reading", ErrSnapshotInUse, idOrName)
	}
	snL1, err := img.readSnapshotL1(&sn, i)
	if err != nil {
		return err
	}
	if err := img.flushLocked(false); err != nil {
		return err
	}
	op, err := img.beginMetaOp()
	if err != nil {
		return err
	}
	newList := append(append([]snapshotEntry(nil), img.snapshots[:i]...), img.snapshots[i+1:]...)
	// The table no longer names the snapshot before its clusters go: a
	// crash in between leaks, it never frees what a table still uses.
	if err := img.writeSnapshotTable(newList, op); err != nil {
		return img.failMetaOp(err)
	}
	if err := img.updateTreeRefcounts(snL1, false, -1); err != nil {
		return img.failMetaOp(err)
	}
	if l1Bytes := int64(sn.L1Size) * 8; l1Bytes > 0 {
		img.unmarkMeta(int64(sn.L1TableOffset), l1Bytes)
		if err := img.freeClustersNow(int64(sn.L1TableOffset), l1Bytes); err != nil {
			return img.failMetaOp(err)
		}
	}
	// Refcounts that fell back to one give the active tree its COPIED
	// flags back.
	if err := img.updateTreeRefcounts(img.l1, true, 0); err != nil {
		return img.failMetaOp(err)
	}
	return img.endMetaOp(op)
}

// RevertToSnapshot makes the snapshot's disk state the current one (qemu's
// "apply", qemu-img snapshot -a): the active L1 table becomes a copy of the
// snapshot's and the virtual size becomes the snapshot's disk size. The
// snapshot itself stays. Persistent bitmaps are not changed, as in qemu.
func (img *Image) RevertToSnapshot(idOrName string) error {
	unlock, err := img.lockMetaOp()
	if err != nil {
		return err
	}
	defer unlock()
	i, err := img.snapshotIndex(idOrName)
	if err != nil {
		return err
	}
	sn := img.snapshots[i]
	info := img.snapshotInfo(&sn)
	snL1, err := img.readSnapshotL1(&sn, i)
	if err != nil {
		return err
	}
	newSize := int64(info.DiskSize)
	if newSize != img.size {
		if err := img.resizeAllowed(newSize); err != nil {
			return err
		}
	}
	if err := img.flushLocked(false); err != nil {
		return err
	}
	op, err := img.beginMetaOp()
	if err != nil {
		return err
	}
	// The active L1 must hold the snapshot's whole table and cover the
	// snapshot's disk size.
	need := max(int64(len(snL1)), img.sizeToL1(newSize))
	if need > int64(len(img.l1)) {
		if err := img.growL1(need); err != nil {
			return img.failMetaOp(err)
		}
	}
	if err := img.updateTreeRefcounts(snL1, false, +1); err != nil {
		return img.failMetaOp(err)
	}
	if !op.protected {
		if err := img.flushLocked(true); err != nil {
			return img.failMetaOp(err)
		}
	}
	old := img.l1
	newL1 := make([]l1Entry, len(old))
	copy(newL1, snL1)
	if err := img.writeWholeL1(newL1); err != nil {
		return img.failMetaOp(err)
	}
	// The overlap map covers the active L2 tables: add the snapshot's.
	for _, e := range newL1 {
		if o := e.offset(); o != 0 {
			img.metaMap[o>>img.clusterBits] = metaL2
		}
	}
	if !op.protected {
		if err := img.fsync(); err != nil {
			return img.failMetaOp(err)
		}
	}
	// The old tree loses the active table's reference.
	if err := img.updateTreeRefcounts(old, false, -1); err != nil {
		return img.failMetaOp(err)
	}
	if err := img.updateTreeRefcounts(img.l1, true, 0); err != nil {
		return img.failMetaOp(err)
	}
	if newSize != img.size {
		if err := img.setVirtualSize(newSize); err != nil {
			return img.failMetaOp(err)
		}
	}
	return img.endMetaOp(op)
}

// readSnapshotL1 loads and validates a snapshot's L1 table (qemu validates
// it the same way before goto and delete). mu held.
func (img *Image) readSnapshotL1(sn *snapshotEntry, idx int) ([]l1Entry, error) {
	field := fmt.Sprintf("snapshot[%d].l1_table_offset", idx)
	if uint64(sn.L1Size)*8 > maxL1Bytes {
		return nil, corruptf(fmt.Sprintf("snapshot[%d].l1_size", idx), -1, "%d exceeds limit %d", sn.L1Size, maxL1Bytes/8)
	}
	if sn.L1Size == 0 {
		return []l1Entry{}, nil // not nil: nil means the active table to the readers
	}
	if sn.L1TableOffset%uint64(img.clusterSize) != 0 {
		return nil, corruptf(field, -1, "L1 table offset %#x is not cluster aligned", sn.L1TableOffset)
	}
	n := int64(sn.L1Size) * 8
	if int64(sn.L1TableOffset)+n > img.fileEnd || sn.L1TableOffset == 0 {
		return nil, corruptf(field, -1, "L1 table at %#x (%d bytes) is outside the file", sn.L1TableOffset, n)
	}
	buf := make([]byte, n)
	if _, err := img.f.ReadAt(buf, int64(sn.L1TableOffset)); err != nil {
		return nil, ioErr("read snapshot L1 table", err)
	}
	l1 := make([]l1Entry, sn.L1Size)
	for i := range l1 {
		e := l1Entry(binary.BigEndian.Uint64(buf[i*8:]))
		if o := e.offset(); o != 0 && (o%img.clusterSize != 0 || o+img.clusterSize > img.fileEnd) {
			return nil, corruptf(fmt.Sprintf("snapshot %q l1[%d]", sn.ID, i), int64(sn.L1TableOffset)+int64(i)*8,
				"L2 table offset %#x is unaligned or past the end of the file", o)
		}
		l1[i] = e
	}
	return l1, nil
}

// encodeL1 serialises an L1 table.
func encodeL1(l1 []l1Entry) []byte {
	buf := make([]byte, len(l1)*8)
	for i, e := range l1 {
		binary.BigEndian.PutUint64(buf[i*8:], uint64(e))
	}
	return buf
}

func clustersFor(n, clusterSize int64) int64 { return (n + clusterSize - 1) / clusterSize }

// encodeSnapshotExtra builds the extra data qemu writes: 64-bit VM state
// size, disk size and icount, followed by any extra data qemu did not know
// about (preserved from the original entry).
func encodeSnapshotExtra(vmState, diskSize uint64, icount int64, unknown []byte) []byte {
	x := make([]byte, snapshotExtraLen, snapshotExtraLen+len(unknown))
	binary.BigEndian.PutUint64(x, vmState)
	binary.BigEndian.PutUint64(x[8:], diskSize)
	binary.BigEndian.PutUint64(x[16:], uint64(icount))
	return append(x, unknown...)
}

// normalizeSnapshotEntry gives an entry the extra data qemu's
// qcow2_write_snapshots writes (at least 24 bytes: VM state size, disk
// size, icount). Entries that already have it are kept byte for byte, so
// VM state snapshots written by qemu stay untouched.
func (img *Image) normalizeSnapshotEntry(s *snapshotEntry) {
	if len(s.ExtraData) >= snapshotExtraLen {
		return
	}
	vm := uint64(s.VMStateSize)
	if len(s.ExtraData) >= 8 {
		vm = s.VMStateSizeLarge
	}
	disk := s.DiskSize
	if len(s.ExtraData) < 16 {
		disk = uint64(img.size)
	}
	s.ExtraData = encodeSnapshotExtra(vm, disk, s.Icount, nil)
	s.VMStateSizeLarge, s.DiskSize = vm, disk
	if vm > 0xffffffff {
		s.VMStateSize = 0
	}
}

// writeSnapshotTable writes list as a new snapshot table in newly
// allocated clusters, makes it durable, points the header at it and frees
// the old table (qcow2_write_snapshots). mu held.
func (img *Image) writeSnapshotTable(list []snapshotEntry, op *metaOp) error {
	for i := range list {
		img.normalizeSnapshotEntry(&list[i])
	}
	buf := encodeSnapshotTable(list)
	if len(buf) > maxSnapshotsTableBytes {
		return fmt.Errorf("%w: snapshot table would be %d bytes, limit %d", ErrTooLarge, len(buf), maxSnapshotsTableBytes)
	}
	var newOff int64
	if len(list) > 0 {
		var err error
		if newOff, err = img.allocClusters(clustersFor(int64(len(buf)), img.clusterSize)); err != nil {
			return err
		}
		if err := img.checkOverlap(newOff, int64(len(buf)), 0); err != nil {
			return err
		}
		if _, err := img.f.WriteAt(buf, newOff); err != nil {
			return ioErr("write snapshot table", err)
		}
		img.markMeta(newOff, int64(len(buf)), metaSnapshotTable)
	}
	var hb [12]byte
	binary.BigEndian.PutUint32(hb[:], uint32(len(list)))
	binary.BigEndian.PutUint64(hb[4:], uint64(newOff))
	if op != nil && op.protected {
		// endMetaOp points the header at the table after its sync.
		op.snapTable = &hb
	} else {
		// The table and the refcounts that protect it are durable
		// before the header points at it.
		if err := img.flushLocked(true); err != nil {
			return err
		}
		if _, err := img.f.WriteAt(hb[:], hdrNbSnapshots); err != nil {
			return ioErr("write header", err)
		}
		if err := img.fsync(); err != nil {
			return err
		}
	}
	oldOff, oldLen := int64(img.hdr.SnapshotsOffset), int64(len(encodeSnapshotTable(img.snapshots)))
	hadOld := img.hdr.NbSnapshots > 0
	img.hdr.NbSnapshots = uint32(len(list))
	img.hdr.SnapshotsOffset = uint64(newOff)
	img.snapshots = list
	if hadOld && oldLen > 0 {
		// Protected: the dirty bit covers the window where the on-disk
		// header still names the old table. Otherwise the header no
		// longer does.
		img.unmarkMeta(oldOff, oldLen)
		if err := img.freeClustersNow(oldOff, oldLen); err != nil {
			return err
		}
	}
	return nil
}

// markMeta and unmarkMeta keep the overlap-check map in step with the
// metadata this file allocates and frees. mu held.
func (img *Image) markMeta(off, n int64, k metaKind) {
	for c := off >> img.clusterBits; c <= (off+n-1)>>img.clusterBits; c++ {
		img.metaMap[c] = k
	}
}

func (img *Image) unmarkMeta(off, n int64) {
	for c := off >> img.clusterBits; c <= (off+n-1)>>img.clusterBits; c++ {
		delete(img.metaMap, c)
	}
}

// freeClustersNow drops one reference from every cluster of [off, off+n)
// immediately, forgetting cached tables of clusters that become free. Used
// where the references were already removed from durable metadata (or the
// dirty bit covers the step). mu held.
func (img *Image) freeClustersNow(off, n int64) error {
	for ci := off >> img.clusterBits; ci <= (off+n-1)>>img.clusterBits; ci++ {
		if err := img.dropRef(ci); err != nil {
			return err
		}
	}
	return nil
}

// dropRef drops one reference from host cluster ci. mu held.
func (img *Image) dropRef(ci int64) error {
	v, err := img.addRefcount(ci, -1)
	if err != nil {
		return err
	}
	if v == 0 {
		img.forgetFreedCluster(ci)
	}
	return nil
}

// FindSnapshot looks a snapshot up as qemu-img convert -l does: by ID and
// name when both are given (both must match), else by the one given.
func (img *Image) FindSnapshot(id, name string) (SnapshotInfo, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	for i := range img.snapshots {
		s := &img.snapshots[i]
		if (id == "" || s.ID == id) && (name == "" || s.Name == name) && (id != "" || name != "") {
			return img.snapshotInfo(s), nil
		}
	}
	return SnapshotInfo{}, fmt.Errorf("%w: id %q name %q", ErrSnapshotNotFound, id, name)
}
