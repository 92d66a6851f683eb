package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
)

// OpenOptions controls Open.
type OpenOptions struct {
	// ReadOnly opens the image without write access (and takes qemu's
	// shared read lock only).
	ReadOnly bool
	// L2CacheSize is the L2 cache size in bytes. 0 means qemu's default:
	// enough to map the whole disk, capped at 32 MiB.
	L2CacheSize int64
	// RefcountCacheSize is the refcount block cache size in bytes. 0 means
	// a quarter of the L2 cache, at least 4 clusters (as qemu).
	RefcountCacheSize int64
	// NoLock skips qemu's OFD image locks (like qemu's locking=off); for
	// tests and for tools that know the image is not in use.
	NoLock bool
	// NoBacking opens the image without its backing file; unallocated
	// clusters then read as zeroes.
	NoBacking bool
	// NoSync never calls fsync (qemu's cache=unsafe, what qemu-img
	// convert uses for its target): metadata is still written in the
	// crash-safe order, but nothing is durable until the OS writes it back.
	// For images that are rebuilt from scratch after a crash.
	NoSync bool
	// CrashConsistentBitmaps keeps the enabled persistent bitmaps correct
	// on disk at every moment: before a write's data is issued, the bits
	// that cover it are written and fsynced (grouped across concurrent
	// writers, and at least 1 MiB of the disk at a time, so that an fsync
	// is paid about once per MiB touched, not per write). After a crash or
	// power loss the bitmaps, though left in_use, are then a superset of
	// the changes and are loaded as consistent (bitmap_durable.go). Off,
	// bitmaps behave as in qemu: a crash leaves the enabled ones
	// inconsistent.
	CrashConsistentBitmaps bool
	// Logger receives debug and warning messages; nil means silent.
	Logger *slog.Logger
	// Passphrase unlocks an encrypted (LUKS) image: Open fails with
	// ErrWrongPassphrase when no key slot opens with it, before anything
	// is written. Without it an encrypted image opens for metadata only
	// (info, check, snapshots, bitmaps, resize, amend) and guest I/O fails
	// with ErrKeyRequired. The bytes are not retained; the master key is
	// kept in memory until Close, which zeroes it.
	Passphrase []byte
	// MasterKey unlocks an encrypted image with its master key itself, as
	// Image.MasterKey gave it (a caller that must re-open the image without
	// the passphrase, such as a restarted node plugin). It is checked
	// against the header's master key digest (the digest's PBKDF2
	// iterations count against MaxPBKDF2Iterations): a wrong key fails
	// with ErrWrongPassphrase and nothing is written. A copy is kept until
	// Close. Not with Passphrase.
	MasterKey []byte
	// MaxPBKDF2Iterations bounds the PBKDF2 iterations one open of an
	// encrypted image may spend over the key slots it tries (each slot's
	// count plus the master key digest's): a hostile image could
	// otherwise ask for billions. 0 means DefaultMaxPBKDF2Iterations.
	MaxPBKDF2Iterations int64

	// checking opens for Check (OpenForCheck): damaged tables load as they
	// are, a dirty image is not repaired on open, the corrupt bit does not
	// forbid writing.
	checking bool
	// wrapFile, in tests, interposes on the image file's I/O (e.g. to
	// model which writes a power loss keeps).
	wrapFile func(*os.File) imageFile
}

// imageFile is the image file as Image uses it; *os.File outside tests.
type imageFile interface {
	io.ReaderAt
	io.WriterAt
	Sync() error
	Stat() (os.FileInfo, error)
	Truncate(size int64) error
	Fd() uintptr
	Close() error
}

// Image is an open qcow2 image. It is safe for concurrent use; I/O to
// different clusters proceeds in parallel.
type Image struct {
	f        imageFile
	path     string
	readOnly bool
	log      *slog.Logger

	clusterBits  uint32
	clusterSize  int64
	l2EntryShift uint32 // 3 (8-byte entries) or 4 (extended L2)
	l2Entries    int64  // entries per L2 table
	sliceSize    int64  // bytes per L2 cache slice
	extL2        bool
	scBits       uint32 // subcluster size bits (extended L2)
	refOrder     uint32
	refBits      int64
	refBlockEnts int64 // refcount entries per block (power of two)
	refBlockBits uint32

	// drain: every I/O request holds it shared; operations that change
	// the image as a whole (snapshots, resize, repair) hold it exclusive.
	drain sync.RWMutex
	// ranges serialises writers to the same guest clusters.
	ranges rangeLock

	// mu guards everything below (the metadata lock). It is never held
	// across data I/O to guest clusters.
	mu        sync.Mutex
	closed    bool
	hdr       *header
	size      int64
	l1        []l1Entry
	refTable  []refTableEntry
	l2Cache   *tableCache
	rcCache   *tableCache
	snapshots []snapshotEntry
	bitmapDir []bitmapDirEntry
	metaMap   map[int64]metaKind // host cluster index -> kind of metadata living there
	fileEnd   int64              // allocation high-water mark (bytes, cluster aligned)
	freeHint  int64              // no free cluster below this cluster index
	// pendingFree holds refcount decrements deferred until the L2/L1
	// tables that dropped the references are durable.
	pendingFree []pendingFree
	rcSynced    bool // every refcount block write so far is fsynced
	// metaUnsynced: L1/L2/refcount-table writes not yet fsynced.
	metaUnsynced bool
	wroteOnce    bool // first-write header updates done
	corrupt      bool
	backing      layer
	err          error // sticky error after a failed metadata write

	// bitmapsTracked is set by the bitmap code (issue 4) when it keeps the
	// persistent bitmaps up to date on writes; until then the first write
	// clears the bitmaps autoclear bit so stale bitmaps are never trusted.
	bitmapsTracked bool
	// snapViews counts open SnapshotViews per snapshot ID: such a
	// snapshot cannot be deleted (snapshot_view.go).
	snapViews map[string]int
	// writeHooks are called (with mu held) for every guest range written,
	// discarded or zeroed; the bitmap code registers here.
	writeHooks []func(off, n int64)
	// bms holds the persistent dirty bitmaps (bitmap_image.go).
	bms bitmapSet
	// durableBitmaps: OpenOptions.CrashConsistentBitmaps on a writable
	// image; journal orders bitmap writes before data (bitmap_durable.go).
	durableBitmaps bool
	journal        bitmapJournal
	// checking: opened by OpenForCheck.
	checking bool

	lock   *imageLock
	noSync bool
	// Cache sizes asked for in OpenOptions (0: qemu's defaults).
	l2CacheOpt, rcCacheOpt int64

	// crypto is the encryption state of a LUKS image (luks_image.go);
	// nil for a plain image.
	crypto *imageCrypto

	// compCursor is the host byte offset where the next compressed
	// cluster may be packed (0: start a new cluster).
	compCursor int64
}

type pendingFree struct {
	off, n int64
	punch  bool
}

// layer is one element of a backing chain as seen from the image above it.
type layer interface {
	readAt(p []byte, off int64) error // zero-fills beyond its end
	blockStatus(off, n int64, depth int) ([]Extent, error)
	virtualSize() int64
	close() error
	describe() (filename, format string)
}

// Open opens a qcow2 image.
func Open(path string, opts OpenOptions) (*Image, error) {
	return openImage(path, opts, 0)
}

const maxBackingDepth = 64

func openImage(path string, opts OpenOptions, depth int) (_ *Image, err error) {
	flag := os.O_RDWR
	if opts.ReadOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("qcow2: open: %w", err)
	}
	var file imageFile = f
	if opts.wrapFile != nil && depth == 0 {
		file = opts.wrapFile(f)
	}
	img := &Image{f: file, path: path, readOnly: opts.ReadOnly, log: opts.Logger, checking: opts.checking, noSync: opts.NoSync}
	img.durableBitmaps = opts.CrashConsistentBitmaps && !opts.ReadOnly && !opts.checking
	defer func() {
		if err != nil {
			img.closeFiles()
		}
	}()
	if !opts.NoLock {
		if img.lock, err = lockImage(f, !opts.ReadOnly); err != nil {
			return nil, err
		}
	}
	if err := img.load(opts); err != nil {
		return nil, err
	}
	if img.hdr.BackingFile != "" && !opts.NoBacking {
		if depth >= maxBackingDepth {
			return nil, unsupportedf("backing_file", hdrBackingFileOffset, "backing chain deeper than %d", maxBackingDepth)
		}
		b, err := openBacking(img, opts, depth)
		if err != nil {
			return nil, err
		}
		img.backing = b
	}
	if !img.readOnly && !img.checking && img.hdr.Incompatible&IncompatDirty != 0 {
		// Lazy refcounts left unflushed by a crash: rebuild refcounts from
		// every reference before anything is allocated (as qemu does).
		if err := img.rebuildRefcounts(); err != nil {
			return nil, fmt.Errorf("qcow2: repairing dirty image: %w", err)
		}
	}
	if depth == 0 { // backing files are never written: their bitmaps do not matter
		if err := img.loadBitmaps(); err != nil {
			return nil, err
		}
	}
	return img, nil
}

func (img *Image) logger() *slog.Logger {
	if img.log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return img.log
}

func (img *Image) load(opts OpenOptions) error {
	st, err := img.f.Stat()
	if err != nil {
		return fmt.Errorf("qcow2: stat: %w", err)
	}
	fileSize := st.Size()
	first := make([]byte, min(fileSize, 1<<maxClusterBits))
	if _, err := io.ReadFull(io.NewSectionReader(img.f, 0, int64(len(first))), first); err != nil {
		return ioErr("read header", err)
	}
	h, err := decodeHeader(first, fileSize)
	if err != nil {
		return err
	}
	if h.Incompatible&IncompatCorrupt != 0 && !img.checking {
		img.corrupt = true
		if !img.readOnly {
			return fmt.Errorf("%w: the corrupt bit is set; open it read-only or repair it", ErrCorrupt)
		}
	}
	img.hdr = h
	img.size = int64(h.Size)
	img.clusterBits = h.ClusterBits
	img.clusterSize = 1 << h.ClusterBits
	img.extL2 = h.Incompatible&IncompatExtendedL2 != 0
	img.l2EntryShift = 3
	if img.extL2 {
		img.l2EntryShift = 4
		img.scBits = h.ClusterBits - 5
	}
	img.l2Entries = img.clusterSize >> img.l2EntryShift
	img.sliceSize = min(img.clusterSize, 4096)
	img.refOrder = h.RefcountOrder
	img.refBits = 1 << h.RefcountOrder
	img.refBlockBits = h.ClusterBits + 3 - h.RefcountOrder
	img.refBlockEnts = 1 << img.refBlockBits
	img.fileEnd = alignUp(fileSize, img.clusterSize)

	if err := img.loadL1(fileSize); err != nil {
		return err
	}
	if err := img.loadRefTable(fileSize); err != nil {
		return err
	}
	if err := img.loadSnapshots(fileSize); err != nil {
		return err
	}
	if err := img.loadBitmapDir(fileSize); err != nil {
		return err
	}
	img.buildMetaMap()
	if err := img.loadCrypto(opts); err != nil {
		return err
	}

	img.l2CacheOpt, img.rcCacheOpt = opts.L2CacheSize, opts.RefcountCacheSize
	img.l2Cache = newTableCache(int(img.sliceSize), 16, img.writeL2Slice)
	img.rcCache = newTableCache(int(img.clusterSize), 4, img.writeRefBlock)
	img.sizeCaches()
	img.rcSynced = true
	return nil
}

// sizeCaches sets the cache capacities from the options or, by default,
// as qemu does: L2 cache enough to map the whole disk, at most 32 MiB;
// refcount cache a quarter of that, at least 4 clusters. Called again when
// the disk grows. A smaller capacity takes effect as entries are evicted.
// mu held (or the image not yet shared).
func (img *Image) sizeCaches() {
	l2Cache := img.l2CacheOpt
	if l2Cache <= 0 {
		l2Cache = min(int64(32<<20), (img.size>>img.clusterBits)<<img.l2EntryShift)
	}
	rcCache := img.rcCacheOpt
	if rcCache <= 0 {
		rcCache = max(l2Cache/4, 4*img.clusterSize)
	}
	img.l2Cache.capacity = int(max(l2Cache/img.sliceSize, 16))
	img.rcCache.capacity = int(max(rcCache/img.clusterSize, 4))
}

func (img *Image) loadL1(fileSize int64) error {
	h := img.hdr
	buf := make([]byte, int(h.L1Size)*8)
	if _, err := img.f.ReadAt(buf, int64(h.L1TableOffset)); err != nil && len(buf) > 0 {
		return ioErr("read L1 table", err)
	}
	img.l1 = make([]l1Entry, h.L1Size)
	for i := range img.l1 {
		e := l1Entry(binary.BigEndian.Uint64(buf[i*8:]))
		at := int64(h.L1TableOffset) + int64(i)*8
		if img.checking {
			img.l1[i] = e
			continue
		}
		if e.reserved() != 0 {
			return corruptf(fmt.Sprintf("l1[%d]", i), at, "reserved bits set in %#x", uint64(e))
		}
		if err := img.checkTableRef("l1", i, at, e.offset(), fileSize, "L2 table"); err != nil {
			return err
		}
		img.l1[i] = e
	}
	return nil
}

// checkTableRef checks the offset o that entry i of table (stored at file
// offset at) holds, 0 meaning none: the what it points to must be a whole
// cluster inside the file.
func (img *Image) checkTableRef(table string, i int, at, o, fileSize int64, what string) error {
	if o == 0 {
		return nil
	}
	if o%img.clusterSize != 0 {
		return corruptf(fmt.Sprintf("%s[%d]", table, i), at, "%s offset %#x is not cluster aligned", what, o)
	}
	if o+img.clusterSize > fileSize {
		return corruptf(fmt.Sprintf("%s[%d]", table, i), at, "%s offset %#x is past end of file (%d bytes)", what, o, fileSize)
	}
	return nil
}

func (img *Image) loadRefTable(fileSize int64) error {
	h := img.hdr
	n := int64(h.RefcountTableClusters) << img.clusterBits
	buf := make([]byte, n)
	if _, err := img.f.ReadAt(buf, int64(h.RefcountTableOffset)); err != nil {
		return ioErr("read refcount table", err)
	}
	img.refTable = make([]refTableEntry, n/8)
	for i := range img.refTable {
		e := refTableEntry(binary.BigEndian.Uint64(buf[i*8:]))
		at := int64(h.RefcountTableOffset) + int64(i)*8
		if img.checking {
			// Check reads the table from disk itself and reports what
			// is wrong; the core keeps only entries it can follow, so
			// that no offset it computes goes negative.
			if _, ok := e.hostOffset(); ok && e.offset()%img.clusterSize == 0 {
				img.refTable[i] = e
			}
			continue
		}
		if err := img.checkRefTableEntry(i, at, e, fileSize); err != nil {
			return err
		}
		img.refTable[i] = e
	}
	return nil
}

// checkRefTableEntry validates refcount table entry i (stored at file
// offset at), with the words qemu-img check uses for the same faults.
func (img *Image) checkRefTableEntry(i int, at int64, e refTableEntry, fileSize int64) error {
	field := fmt.Sprintf("refcount_table[%d]", i)
	if r := uint64(e) & refTableReservedMask; r != 0 {
		return corruptf(field, at, "refcount table entry %d has reserved bits %#x set (entry %#x)", i, r, uint64(e))
	}
	if _, ok := e.hostOffset(); !ok {
		return corruptf(field, at, "refcount block %d is outside image (offset %#x, file %d bytes)", i, e.rawOffset(), fileSize)
	}
	return img.checkTableRef("refcount_table", i, at, e.offset(), fileSize, "refcount block")
}

func (img *Image) loadSnapshots(fileSize int64) error {
	h := img.hdr
	if h.NbSnapshots == 0 {
		return nil
	}
	maxLen := int64(h.NbSnapshots) * (snapshotFixedLen + maxSnapshotExtraData + 2*65535 + 8)
	// Never allocate more than qemu's table limit (QCOW_MAX_SNAPSHOTS_SIZE)
	// from the untrusted count; the decoder refuses a longer table.
	n := min(maxLen, fileSize-int64(h.SnapshotsOffset), maxSnapshotsTableBytes+snapshotFixedLen)
	buf := make([]byte, n)
	if _, err := img.f.ReadAt(buf, int64(h.SnapshotsOffset)); err != nil && !errors.Is(err, io.EOF) {
		return ioErr("read snapshot table", err)
	}
	snaps, _, err := decodeSnapshotTable(buf, h.NbSnapshots, int64(h.SnapshotsOffset), img.clusterBits, fileSize)
	if err != nil {
		return err
	}
	img.snapshots = snaps
	return nil
}

func (img *Image) loadBitmapDir(fileSize int64) error {
	b := img.hdr.Bitmaps
	if b == nil || b.NbBitmaps == 0 {
		return nil
	}
	buf := make([]byte, b.DirSize)
	if _, err := img.f.ReadAt(buf, int64(b.DirOffset)); err != nil {
		return ioErr("read bitmap directory", err)
	}
	dir, err := decodeBitmapDirectory(buf, b.NbBitmaps, int64(b.DirOffset), img.clusterBits, fileSize)
	if err != nil {
		return err
	}
	img.bitmapDir = dir
	return nil
}

// Size returns the virtual disk size in bytes.
func (img *Image) Size() int64 {
	img.mu.Lock()
	defer img.mu.Unlock()
	return img.size
}

// ClusterSize returns the cluster size in bytes.
func (img *Image) ClusterSize() int64 { return img.clusterSize }

// ReadOnly reports whether the image was opened (or forced) read-only.
func (img *Image) ReadOnly() bool {
	img.mu.Lock()
	defer img.mu.Unlock()
	return img.readOnly
}

// SyncFile fsyncs the image file without taking any lock and without
// writing metadata: what was written so far reaches the disk while I/O goes
// on. Operations that flush with I/O stopped or the metadata lock held
// (CreateSnapshot, AddBitmap) then have little left to write; calling it
// just before them shortens the stall they cause under a write load.
func (img *Image) SyncFile() error {
	if img.readOnly || img.noSync {
		return nil
	}
	if err := img.f.Sync(); err != nil {
		return ioErr("fsync", err)
	}
	return nil
}

// Path returns the file name the image was opened with.
func (img *Image) Path() string { return img.path }

// Close flushes (when writable), clears the dirty bit of lazy-refcount
// images, releases the locks and closes the files.
func (img *Image) Close() error {
	img.drain.Lock()
	defer img.drain.Unlock()
	img.mu.Lock()
	if img.closed {
		img.mu.Unlock()
		return ErrClosed
	}
	var err error
	if !img.readOnly && img.err == nil {
		// An image opened for Check changes only what the check repairs:
		// storing bitmaps would allocate through refcounts the check may
		// have found broken, and the check clears the dirty bit itself
		// once a repair leaves nothing wrong (markCleanAndConsistent).
		if !img.checking {
			err = img.storeBitmapsLocked(true)
		}
		if err == nil {
			err = img.flushLocked(true)
		}
		if err == nil && !img.checking && img.hdr.Incompatible&IncompatDirty != 0 {
			img.hdr.Incompatible &^= IncompatDirty
			err = img.writeHeader()
			if err == nil {
				err = img.fsync()
			}
		}
	}
	img.closed = true
	img.mu.Unlock()
	if cerr := img.closeFiles(); err == nil {
		err = cerr
	}
	return err
}

func (img *Image) closeFiles() error {
	img.crypto.wipeKey()
	var err error
	if img.backing != nil {
		err = img.backing.close()
	}
	if img.lock != nil {
		img.lock.release()
	}
	if cerr := img.f.Close(); err == nil {
		err = cerr
	}
	return err
}

// checkOpen returns an error when the image cannot take I/O; mu held.
func (img *Image) checkOpen() error {
	if img.closed {
		return ErrClosed
	}
	return nil
}

func alignUp(x, a int64) int64   { return (x + a - 1) &^ (a - 1) }
func alignDown(x, a int64) int64 { return x &^ (a - 1) }
