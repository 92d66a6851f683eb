package qcow2

import (
	"fmt"
	"io"
	"sync"
)

// bitmapSet is an open image's persistent dirty bitmaps.
//
// The list and every bitmap's flags are guarded by Image.mu, under which the
// write hooks also run; the bits are atomics (see dirtyBitmap), so tracking
// a write costs one atomic OR per enabled bitmap word touched.
//
// Lifecycle, as qemu's block/qcow2-bitmap.c: every bitmap in the directory is
// loaded on open (those with the auto flag enabled, the others disabled); a
// bitmap found with in_use set was left by a writer that did not close the
// image and is inconsistent: listed, never used, only removable. On a
// read-write open the enabled bitmaps are marked in_use on disk before any
// write can happen, and Close stores every bitmap and clears in_use.
//
// Where we differ from qemu, on purpose: qemu also marks disabled bitmaps
// in_use for the whole read-write session and keeps API changes in memory
// until close. Here a disabled bitmap never changes with writes, so it stays
// consistent on disk while the image is open, and every API change (add,
// remove, clear, enable, disable, merge, resize) is stored before it returns.
// A crash then loses only the bitmaps that were tracking writes, which is
// what changed-block tracking needs: the checkpoints of past snapshots
// survive a crash of the node plugin.
type bitmapSet struct {
	list     []*imgBitmap
	tracking []*dirtyBitmap // bits of the enabled consistent bitmaps
}

type imgBitmap struct {
	name         string
	granBits     uint8
	enabled      bool // tracks writes; stored as the auto flag
	inconsistent bool // found in_use or unusable: bits unknown, kept as found

	disk  *bitmapDirEntry    // as last stored on disk; nil until stored
	table []bitmapTableEntry // disk's bitmap table, when loaded

	// rw excludes resizing the bits (exclusive, with Image.mu also held)
	// against extent readers, which do not take Image.mu.
	rw   sync.RWMutex
	bits *dirtyBitmap // nil when inconsistent
	// shadow: the durableUnit spans made dirty on disk ahead of data
	// since the last store; nil unless crash-consistent and enabled
	// (bitmap_durable.go). Image.mu.
	shadow *dirtyBitmap
}

func (s *bitmapSet) find(name string) *imgBitmap {
	for _, b := range s.list {
		if b.name == name {
			return b
		}
	}
	return nil
}

func (s *bitmapSet) retrack() {
	s.tracking = s.tracking[:0]
	for _, b := range s.list {
		if b.enabled && !b.inconsistent {
			s.tracking = append(s.tracking, b.bits)
		}
	}
}

// trackBitmapWrite is the write hook: every guest range written, zeroed or
// discarded becomes dirty in every enabled bitmap. Image.mu held.
func (img *Image) trackBitmapWrite(off, n int64) {
	if img.durableBitmaps {
		// bitmapWriteAhead set them before the data, durably. Setting
		// bits here (in a bitmap enabled while the request was in
		// flight) would make memory claim bits the disk lacks.
		return
	}
	for _, b := range img.bms.tracking {
		b.setRange(uint64(off), uint64(n))
	}
}

// markWritten runs the write hooks for a whole request. Discard uses it so
// that dirty bitmaps record the range asked for, as qemu's write-request
// completion does, also where partial clusters were left alone.
func (img *Image) markWritten(off, n int64) {
	img.mu.Lock()
	defer img.mu.Unlock()
	for _, h := range img.writeHooks {
		h(off, n)
	}
}

// loadBitmaps loads the directory the core decoded (img.bitmapDir) and the
// bitmaps' data, and on a read-write open marks the enabled bitmaps in_use.
// Called once from open, before the image is shared.
func (img *Image) loadBitmaps() error {
	img.bms = bitmapSet{}
	img.writeHooks = append(img.writeHooks, img.trackBitmapWrite)
	img.bitmapsTracked = true
	h := img.hdr
	if h.Bitmaps == nil || h.Bitmaps.NbBitmaps == 0 {
		return nil
	}
	if h.Version < 3 || h.Autoclear&AutoclearBitmaps == 0 {
		// The autoclear bit is gone: a program without bitmap support
		// wrote the image, so every bitmap may miss writes. qemu drops the
		// extension (the clusters leak until check -r leaks); so do we.
		img.logger().Warn("qcow2: a program lacking bitmap support modified this image, so its bitmaps are dropped as inconsistent; run check -r leaks to reclaim their clusters", "path", img.path, "bitmaps", h.Bitmaps.NbBitmaps)
		h.Bitmaps = nil
		img.bitmapDir = nil
		img.buildMetaMap()
		if img.readOnly {
			return nil
		}
		if err := img.writeHeader(); err != nil {
			return err
		}
		return img.fsync()
	}
	st, err := img.f.Stat()
	if err != nil {
		return ioErr("stat", err)
	}
	// In-use bitmaps of a crash-consistent writer hold a superset of the
	// writes: trust them while the writer's autoclear bit says nobody else
	// wrote since.
	durable := h.Autoclear&AutoclearCrashConsistentBitmaps != 0
	list := make([]*imgBitmap, 0, len(img.bitmapDir))
	for i := range img.bitmapDir {
		e := img.bitmapDir[i]
		b := &imgBitmap{name: e.Name, granBits: e.GranularityBits, enabled: e.auto(), disk: &e}
		switch {
		case !e.usable(), e.inUse() && !durable:
			b.inconsistent = true
		default:
			b.bits, b.table, err = img.readBitmapData(i, &e, st.Size())
			if err != nil && e.inUse() {
				// A superset we cannot read is no superset.
				img.logger().Warn("qcow2: in-use bitmap of a crash-consistent writer is unreadable; it is inconsistent", "path", img.path, "bitmap", e.Name, "err", err)
				b.inconsistent, b.bits, b.table, err = true, nil, nil, nil
			}
			if err != nil {
				return err
			}
		}
		list = append(list, b)
	}
	img.bms.list = list
	img.bms.retrack()
	// A check writes no guest data, so its bitmaps stay as they are on
	// disk: nothing to mark in use, nothing to store at Close.
	if img.readOnly || img.checking || (len(img.bms.tracking) == 0 && !durable) {
		return nil
	}
	if img.durableBitmaps {
		// Lay the enabled bitmaps out for in-place bit writes, in_use,
		// and publish them with the autoclear bit in one header write.
		return img.storeBitmapsLocked(false)
	}
	for _, b := range list {
		if b.enabled && !b.inconsistent {
			b.disk.Flags |= bitmapFlagInUse
		}
	}
	return img.rewriteBitmapDirInPlace()
}

// readBitmapData reads bitmap i's table and data clusters.
func (img *Image) readBitmapData(i int, e *bitmapDirEntry, fileSize int64) (*dirtyBitmap, []bitmapTableEntry, error) {
	cs := img.clusterSize
	bits := newDirtyBitmap(uint64(img.size), uint(e.GranularityBits))
	if want := bits.tableSize(uint64(cs)); uint64(e.TableSize) != want {
		return nil, nil, corruptf(fmt.Sprintf("bitmap[%d].bitmap_table_size", i), -1,
			"%d entries, but bitmap %q of granularity %d over a %d-byte disk needs %d", e.TableSize, shortName(e.Name), int64(1)<<e.GranularityBits, img.size, want)
	}
	buf := make([]byte, int64(e.TableSize)*bitmapTableEntrySize)
	if _, err := img.f.ReadAt(buf, int64(e.TableOffset)); err != nil {
		return nil, nil, ioErr(fmt.Sprintf("read bitmap table of %q", shortName(e.Name)), err)
	}
	table, err := decodeBitmapTable(buf, i, int64(e.TableOffset), cs)
	if err != nil {
		return nil, nil, err
	}
	data := make([]byte, cs)
	for j, te := range table {
		switch {
		case te.offset() != 0:
			if te.offset() > fileSize-cs {
				return nil, nil, corruptf(fmt.Sprintf("bitmap[%d].bitmap_table[%d]", i, j), int64(e.TableOffset)+int64(j)*8,
					"data cluster %#x lies past the end of the file (%d bytes)", te.offset(), fileSize)
			}
			if _, err := img.f.ReadAt(data, te.offset()); err != nil && err != io.EOF {
				return nil, nil, ioErr(fmt.Sprintf("read bitmap data of %q", shortName(e.Name)), err)
			}
			bits.deserializeChunk(uint64(j), data)
		case te.allOnes():
			bits.setChunk(uint64(j), uint64(cs))
		}
	}
	return bits, table, nil
}

// rewriteBitmapDirInPlace writes the directory over itself after a flags
// change, the way qemu does: the autoclear bit is cleared (and durable)
// before the directory is touched and set again once it is durable, so a
// torn directory write can only make the bitmaps inconsistent, never wrong.
// mu held (or the image not yet shared).
func (img *Image) rewriteBitmapDirInPlace() error {
	h := img.hdr
	dir := make([]bitmapDirEntry, len(img.bms.list))
	for i, b := range img.bms.list {
		dir[i] = *b.disk
	}
	buf := encodeBitmapDirectory(dir)
	if h.Bitmaps == nil || uint64(len(buf)) != h.Bitmaps.DirSize {
		return fmt.Errorf("qcow2: internal: in-place bitmap directory rewrite of %d bytes over %v", len(buf), h.Bitmaps)
	}
	// The crash-consistent marker goes too and stays off: the in-place
	// directory write is for flags of bitmaps tracked the qemu way (or
	// about to change size), whose in_use must not be trusted.
	h.Autoclear &^= AutoclearBitmaps | AutoclearCrashConsistentBitmaps
	if err := img.writeHeader(); err != nil {
		return err
	}
	if err := img.fsync(); err != nil {
		return err
	}
	if err := img.checkOverlap(int64(h.Bitmaps.DirOffset), int64(len(buf)), metaBitmapDir); err != nil {
		return err
	}
	if _, err := img.f.WriteAt(buf, int64(h.Bitmaps.DirOffset)); err != nil {
		return ioErr("write bitmap directory", err)
	}
	if err := img.fsync(); err != nil {
		return err
	}
	h.Autoclear |= AutoclearBitmaps
	if err := img.writeHeader(); err != nil {
		return err
	}
	if err := img.fsync(); err != nil {
		return err
	}
	img.bitmapDir = dir
	return nil
}

// storeBitmapsLocked writes every consistent bitmap's data and a new
// directory, then switches the header to it, then frees what the old
// directory referenced (qemu's store + update_ext_header_and_dir order:
// nothing the durable header references is ever overwritten). closing
// clears in_use of the enabled bitmaps; otherwise they stay in_use because
// writes keep changing them. Inconsistent bitmaps are carried over as found.
// mu held.
func (img *Image) storeBitmapsLocked(closing bool) (err error) {
	if img.readOnly {
		return nil
	}
	if len(img.bms.list) == 0 && len(img.bitmapDir) == 0 && img.hdr.Bitmaps == nil {
		return nil
	}
	fresh := &bitmapAllocs{img: img}
	defer func() {
		if err != nil {
			fresh.undo()
		}
	}()
	dir := make([]bitmapDirEntry, 0, len(img.bms.list))
	tables := make([][]bitmapTableEntry, len(img.bms.list))
	for i, b := range img.bms.list {
		if b.inconsistent {
			dir = append(dir, *b.disk)
			tables[i] = b.table
			continue
		}
		e, table, err := img.writeBitmap(b, closing, fresh)
		if err != nil {
			return err
		}
		dir = append(dir, e)
		tables[i] = table
	}
	ext, err := img.writeBitmapDirectory(dir, fresh)
	if err != nil {
		return err
	}
	oldExt, oldDir := img.hdr.Bitmaps, img.bitmapDir
	oldTables := map[string][]bitmapTableEntry{}
	for _, b := range img.bms.list {
		if !b.inconsistent && b.disk != nil {
			oldTables[b.disk.Name] = b.table
		}
	}
	if err := img.switchBitmapHeader(ext, closing); err != nil {
		return err
	}
	fresh.fresh = nil // the header owns them now
	img.bitmapDir = dir
	for i, b := range img.bms.list {
		if !b.inconsistent {
			e := dir[i]
			b.disk, b.table = &e, tables[i]
		}
		img.resetShadow(b)
	}
	return img.freeOldBitmaps(oldExt, oldDir, oldTables)
}

// bitmapAllocs is what one storeBitmapsLocked allocated: freed again if it
// fails before the header switch.
type bitmapAllocs struct {
	img   *Image
	fresh [][2]int64
}

func (a *bitmapAllocs) alloc(n int64) (int64, error) {
	off, err := a.img.allocClusters(n)
	if err == nil {
		a.fresh = append(a.fresh, [2]int64{off, n * a.img.clusterSize})
	}
	return off, err
}

func (a *bitmapAllocs) undo() {
	for _, r := range a.fresh {
		_ = a.img.freeNow(r[0], r[1])
	}
	a.fresh = nil
}

// writeBitmap writes b's data clusters and its table into new clusters and
// returns its directory entry and table. All-zero chunks get no cluster and
// all-one chunks are marked in the table, except for a crash-consistent
// tracker, which sets bits in place: every chunk of an enabled bitmap then
// gets a data cluster. mu held.
func (img *Image) writeBitmap(b *imgBitmap, closing bool, fresh *bitmapAllocs) (bitmapDirEntry, []bitmapTableEntry, error) {
	cs := img.clusterSize
	n := b.bits.tableSize(uint64(cs))
	table := make([]bitmapTableEntry, n)
	inPlace := img.durableBitmaps && b.enabled && !closing
	buf := make([]byte, cs)
	for j := uint64(0); j < n; j++ {
		zero, ones := b.bits.chunkState(j, uint64(cs))
		if zero && !inPlace {
			continue
		}
		if ones && !inPlace {
			table[j] = bitmapTableEntryAllOnes
			continue
		}
		off, err := fresh.alloc(1)
		if err != nil {
			return bitmapDirEntry{}, nil, err
		}
		b.bits.serializeChunk(j, buf)
		if err := img.writeMeta(buf, off, 0, "bitmap data"); err != nil {
			return bitmapDirEntry{}, nil, err
		}
		table[j] = bitmapTableEntry(off)
	}
	tb := encodeBitmapTable(table)
	toff, err := fresh.alloc((int64(len(tb)) + cs - 1) / cs)
	if err != nil {
		return bitmapDirEntry{}, nil, err
	}
	if err := img.writeMeta(padCluster(tb, cs), toff, metaBitmapTable, "bitmap table"); err != nil {
		return bitmapDirEntry{}, nil, err
	}
	flags := uint32(0)
	if b.enabled {
		flags |= bitmapFlagAuto
		if !closing {
			flags |= bitmapFlagInUse
		}
	}
	e := bitmapDirEntry{TableOffset: uint64(toff), TableSize: uint32(n), Flags: flags, Type: bitmapTypeDirty, GranularityBits: b.granBits, Name: b.name}
	if b.disk != nil && len(b.disk.ExtraData) > 0 {
		e.ExtraData, e.Flags = b.disk.ExtraData, e.Flags|b.disk.Flags&bitmapFlagExtraComp
	}
	return e, table, nil
}

// writeBitmapDirectory writes dir into new clusters and returns the header
// extension that names it (nil for no bitmaps). mu held.
func (img *Image) writeBitmapDirectory(dir []bitmapDirEntry, fresh *bitmapAllocs) (*bitmapsExt, error) {
	if len(dir) == 0 {
		return nil, nil
	}
	cs := img.clusterSize
	db := encodeBitmapDirectory(dir)
	if len(db) > maxBitmapDirSize {
		return nil, fmt.Errorf("%w: bitmap directory of %d bytes exceeds limit %d", ErrBitmapInvalid, len(db), maxBitmapDirSize)
	}
	doff, err := fresh.alloc((int64(len(db)) + cs - 1) / cs)
	if err != nil {
		return nil, err
	}
	if err := img.writeMeta(padCluster(db, cs), doff, metaBitmapDir, "bitmap directory"); err != nil {
		return nil, err
	}
	return &bitmapsExt{NbBitmaps: uint32(len(dir)), DirSize: uint64(len(db)), DirOffset: uint64(doff)}, nil
}

// switchBitmapHeader makes everything new and its refcounts durable, then
// the header that names ext, with the autoclear bits to match. On failure
// the in-memory header is as before. mu held.
func (img *Image) switchBitmapHeader(ext *bitmapsExt, closing bool) error {
	if err := img.syncRefcounts(true); err != nil {
		return err
	}
	if err := img.fsync(); err != nil {
		return err
	}
	h := img.hdr
	oldExt, oldAuto := h.Bitmaps, h.Autoclear
	h.Bitmaps = ext
	if ext != nil {
		h.Autoclear |= AutoclearBitmaps
	} else {
		h.Autoclear &^= AutoclearBitmaps
	}
	if ext != nil && img.durableBitmaps && !closing {
		h.Autoclear |= AutoclearCrashConsistentBitmaps
	} else {
		h.Autoclear &^= AutoclearCrashConsistentBitmaps
	}
	err := img.writeHeader()
	if err == nil {
		err = img.fsync()
	}
	if err != nil {
		h.Bitmaps, h.Autoclear = oldExt, oldAuto
	}
	return err
}

// freeOldBitmaps frees what only the old directory referenced, once the
// header no longer names it: the old directory, and the tables and data of
// every bitmap rewritten or removed (oldTables by name; a bitmap not there
// has its table read from disk). Inconsistent bitmaps still present keep
// theirs. mu held.
func (img *Image) freeOldBitmaps(oldExt *bitmapsExt, oldDir []bitmapDirEntry, oldTables map[string][]bitmapTableEntry) error {
	// No crash-consistent journal write may still be on its way to an old
	// bitmap cluster once it is freed (and can be reused).
	img.journal.io.Lock()
	img.journal.io.Unlock()
	keep := map[uint64]bool{}
	for _, b := range img.bms.list {
		if b.inconsistent {
			keep[b.disk.TableOffset] = true
		}
	}
	var ferr error
	if oldExt != nil {
		ferr = img.freeIfReferenced(int64(oldExt.DirOffset), int64(oldExt.DirSize))
	}
	for i := range oldDir {
		e := &oldDir[i]
		if keep[e.TableOffset] {
			continue
		}
		t, ok := oldTables[e.Name]
		if !ok {
			t = img.readTableForFree(i, e)
		}
		for _, te := range t {
			if te.offset() != 0 {
				if err := img.freeIfReferenced(te.offset(), img.clusterSize); err != nil && ferr == nil {
					ferr = err
				}
			}
		}
		if err := img.freeIfReferenced(int64(e.TableOffset), int64(e.TableSize)*bitmapTableEntrySize); err != nil && ferr == nil {
			ferr = err
		}
	}
	img.buildMetaMap()
	if ferr == nil {
		// Write the decrements out (no fsync needed: nothing durable
		// references the freed clusters), so that a process killed later
		// leaks nothing.
		ferr = img.syncRefcounts(false)
	}
	return ferr
}

// readTableForFree reads an inconsistent bitmap's table so that removing it
// can free its clusters; a table that does not decode frees nothing (its
// clusters leak, as in qemu, until check -r leaks).
func (img *Image) readTableForFree(i int, e *bitmapDirEntry) []bitmapTableEntry {
	buf := make([]byte, int64(e.TableSize)*bitmapTableEntrySize)
	if _, err := img.f.ReadAt(buf, int64(e.TableOffset)); err != nil {
		return nil
	}
	t, err := decodeBitmapTable(buf, i, int64(e.TableOffset), img.clusterSize)
	if err != nil {
		return nil
	}
	return t
}

// freeIfReferenced drops one reference from each cluster of [off, off+n)
// that still has one: a damaged image must not make us underflow a refcount.
func (img *Image) freeIfReferenced(off, n int64) error {
	if n <= 0 {
		return nil
	}
	for c := off >> img.clusterBits; c <= (off+n-1)>>img.clusterBits; c++ {
		rc, err := img.getRefcount(c)
		if err != nil || rc == 0 {
			continue
		}
		if err := img.freeNow(c<<img.clusterBits, img.clusterSize); err != nil {
			return err
		}
	}
	return nil
}

func (img *Image) writeMeta(buf []byte, off int64, kind metaKind, what string) error {
	if err := img.checkOverlap(off, int64(len(buf)), kind); err != nil {
		return err
	}
	if _, err := img.f.WriteAt(buf, off); err != nil {
		return ioErr("write "+what, err)
	}
	return nil
}

func padCluster(b []byte, cs int64) []byte {
	n := (int64(len(b)) + cs - 1) / cs * cs
	if int64(len(b)) == n {
		return b
	}
	p := make([]byte, n)
	copy(p, b)
	return p
}
