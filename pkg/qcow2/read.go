package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// run is a stretch of guest bytes with one mapping.
type run struct {
	guest int64
	n     int64
	kind  clusterKind
	host  int64   // host offset of guest (kindNormal, kindZeroAlloc)
	entry l2Entry // kindCompressed
}

// maxMapChunk bounds the guest range mapped under one hold of the metadata
// lock, so large requests do not starve others.
const maxMapChunk = 8 << 20

// mapRangeL1 describes [off, off+n) as runs, through the given L1 table;
// nil means the active one. mu held.
func (img *Image) mapRangeL1(l1 []l1Entry, off, n int64, runs []run) ([]run, error) {
	return img.mapRuns(l1, off, n, runs, false)
}

// errNotCached: a mapping from memory alone met an L2 slice that is not in
// the cache.
var errNotCached = errors.New("qcow2: L2 slice not cached")

// mapRuns is mapRangeL1; with cachedOnly it reads no L2 slice from the file
// and fails with errNotCached instead. mu held.
func (img *Image) mapRuns(l1 []l1Entry, off, n int64, runs []run, cachedOnly bool) ([]run, error) {
	if l1 == nil {
		l1 = img.l1
	}
	end := off + n
	perSlice := img.sliceSize >> img.l2EntryShift
	for off < end {
		vc := off >> img.clusterBits
		i1 := img.l1Index(vc)
		var l2Off int64
		if i1 < int64(len(l1)) {
			l2Off = l1[i1].offset()
		}
		if l2Off == 0 {
			// No L2 table: its whole range reads as unallocated
			// entries, one run without a look at each cluster.
			tEnd := min(end, (i1+1)*img.l2Entries<<img.clusterBits)
			runs = appendRun(runs, run{guest: off, n: tEnd - off, kind: kindUnallocated})
			off = tEnd
			continue
		}
		var s *cacheEntry
		var i int64
		var err error
		if cachedOnly {
			if s, i = img.cachedL2Slice(l2Off, img.l2Index(vc)); s == nil {
				return runs, errNotCached
			}
		} else if s, i, err = img.l2Slice(l2Off, img.l2Index(vc)); err != nil {
			return runs, err
		}
		// The clusters of this slice of the table, decoded from the
		// slice in hand rather than looked up in the cache one by one
		// (mu is held: the slice stays put).
		sEnd := min(end, (vc-i+perSlice)<<img.clusterBits)
		for ; off < sEnd; i++ {
			if z := zeroEntries(s.buf, i, img.l2EntryShift); z > 0 {
				// Unallocated entries (most of a sparse disk's table):
				// one run for them all.
				zEnd := min(sEnd, ((off>>img.clusterBits)+z)<<img.clusterBits)
				runs = appendRun(runs, run{guest: off, n: zEnd - off, kind: kindUnallocated})
				off = zEnd
				i += z - 1
				continue
			}
			cEnd := min(sEnd, ((off>>img.clusterBits)+1)<<img.clusterBits)
			if runs, err = img.mapCluster(s.buf, i, l2Off, off, cEnd, runs); err != nil {
				return runs, err
			}
			off = cEnd
		}
	}
	return runs, nil
}

// zeroEntries counts the all-zero L2 entries (extended bitmap included) of
// the slice buf from entry i on; an all-zero entry is an unallocated
// cluster in every kind of image.
func zeroEntries(buf []byte, i int64, entryShift uint32) int64 {
	p := int(i << entryShift)
	for p < len(buf) && binary.LittleEndian.Uint64(buf[p:]) == 0 &&
		(entryShift < 4 || binary.LittleEndian.Uint64(buf[p+8:]) == 0) {
		p += 1 << entryShift
	}
	return int64(p>>entryShift) - i
}

// mapCluster appends the runs of [off, cEnd), inside one guest cluster
// whose L2 entry is entry i of the L2 slice buf (of the table at l2Off).
func (img *Image) mapCluster(buf []byte, i, l2Off, off, cEnd int64, runs []run) ([]run, error) {
	vc := off >> img.clusterBits
	e, bm, err := img.decodeL2(buf, i, l2Off)
	if err != nil {
		return runs, err
	}
	where := func() string { return fmt.Sprintf("l2 entry of guest cluster %d", vc) }
	for off < cEnd {
		sc := -1
		pieceEnd := cEnd
		if img.extL2 {
			sc = int((off & (img.clusterSize - 1)) >> img.scBits)
			pieceEnd = min(cEnd, (vc<<img.clusterBits)+int64(sc+1)<<img.scBits)
		}
		k, err := img.classify(e, bm, sc, where)
		if err != nil {
			return runs, err
		}
		r := run{guest: off, n: pieceEnd - off, kind: k}
		switch k {
		case kindNormal, kindZeroAlloc, kindUnallocatedAlloc:
			r.host = e.offset() + off&(img.clusterSize-1)
		case kindCompressed:
			r.entry = e
		}
		runs = appendRun(runs, r)
		off = pieceEnd
	}
	return runs, nil
}

func appendRun(runs []run, r run) []run {
	if len(runs) > 0 {
		p := &runs[len(runs)-1]
		if p.kind == r.kind && p.guest+p.n == r.guest && r.kind != kindCompressed &&
			(r.kind == kindZero || r.kind == kindUnallocated || p.host+p.n == r.host) {
			p.n += r.n
			return runs
		}
	}
	return append(runs, r)
}

// ReadAt reads len(p) bytes at guest offset off (io.ReaderAt).
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%w: negative offset %d", ErrOutOfRange, off)
	}
	img.drain.RLock()
	defer img.drain.RUnlock()
	size, err := img.openSize()
	if err != nil {
		return 0, err
	}
	if off >= size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := int64(len(p))
	var eof error
	if n > size-off {
		n, eof = size-off, io.EOF
	}
	tok := img.ranges.lock(alignDown(off, img.clusterSize), alignUp(off+n, img.clusterSize), false)
	defer img.ranges.unlock(tok)
	if err := img.readRange(p[:n], off); err != nil {
		return 0, err
	}
	return int(n), eof
}

// KnownZero reports whether [off, off+n) of the disk reads as zeroes,
// judged from the metadata in memory alone: unallocated clusters without a
// backing file, and zero clusters. It never waits, for I/O or for a lock
// that a request or a metadata operation holds: the answer is false
// whenever it is not at hand. The NBD server asks it before handing a read
// to a worker, to answer reads of space never written on its receiving
// goroutine (nbdattach.ZeroProber).
//
// No range lock is taken, as none is needed: a cluster whose L2 entry is
// still unallocated or zero has none of a concurrent write's data yet, so
// zeroes are what the read would have returned had it run first.
func (img *Image) KnownZero(off, n int64) bool {
	return img.knownZeroL1(nil, off, n)
}

// knownZeroL1 is KnownZero through the given L1 table (nil: the active one).
func (img *Image) knownZeroL1(l1 []l1Entry, off, n int64) bool {
	if off < 0 || n <= 0 || !img.drain.TryRLock() {
		return false
	}
	defer img.drain.RUnlock()
	if !img.mu.TryLock() {
		return false
	}
	defer img.mu.Unlock()
	if img.checkOpen() != nil || n > img.size-off {
		return false // (a snapshot view past the active disk's end too: ReadAt answers)
	}
	if _, err := img.dataCipher(); err != nil {
		return false // without the key even holes fail to read, as ReadAt does
	}
	var buf [4]run
	runs, err := img.mapRuns(l1, off, n, buf[:0], true)
	if err != nil {
		return false
	}
	for _, r := range runs {
		switch r.kind {
		case kindZero, kindZeroAlloc:
		case kindUnallocated, kindUnallocatedAlloc:
			if img.backing != nil {
				return false
			}
		default:
			return false
		}
	}
	return true
}

// openSize is the disk size of an image still open. Like every section
// under mu it unlocks by defer: the NBD and FUSE servers and the gRPC
// handlers recover a panic (a bug met by hostile metadata) into one failed
// request, and a lock left held would hang every later request instead.
func (img *Image) openSize() (int64, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	if err := img.checkOpen(); err != nil {
		return 0, err
	}
	return img.size, nil
}

// mapRangeLocked is mapRangeL1 under mu (openSize says why by defer).
func (img *Image) mapRangeLocked(l1 []l1Entry, off, n int64, runs []run) ([]run, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	return img.mapRangeL1(l1, off, n, runs)
}

// readRange fills p from guest offset off; the caller holds the range.
func (img *Image) readRange(p []byte, off int64) error {
	return img.readRangeL1(nil, p, off)
}

// readRangeL1 is readRange through the given L1 table (nil: the active one).
func (img *Image) readRangeL1(l1 []l1Entry, p []byte, off int64) error {
	if _, err := img.dataCipher(); err != nil {
		return err
	}
	var runs []run
	var cbuf []byte
	for len(p) > 0 {
		chunk := min(int64(len(p)), maxMapChunk)
		var err error
		runs, err = img.mapRangeLocked(l1, off, chunk, runs[:0])
		if err != nil {
			return err
		}
		for _, r := range runs {
			dst := p[r.guest-off : r.guest-off+r.n]
			switch r.kind {
			case kindNormal:
				if err := img.readGuestData(dst, r.host); err != nil {
					return err
				}
			case kindZero, kindZeroAlloc:
				clear(dst)
			case kindUnallocated, kindUnallocatedAlloc:
				if img.backing != nil {
					if err := img.backing.readAt(dst, r.guest); err != nil {
						return err
					}
				} else {
					clear(dst)
				}
			case kindCompressed:
				if cbuf == nil {
					cbuf = make([]byte, img.clusterSize)
				}
				if err := img.readCompressed(r.entry, cbuf); err != nil {
					return err
				}
				copy(dst, cbuf[r.guest&(img.clusterSize-1):])
			}
		}
		p = p[chunk:]
		off += chunk
	}
	return nil
}

// preadData reads host data; bytes past the end of the file read as zeroes.
func (img *Image) preadData(dst []byte, host int64) error {
	n, err := img.f.ReadAt(dst, host)
	if errors.Is(err, io.EOF) {
		clear(dst[n:])
		return nil
	}
	return ioErr("read data", err)
}

// readCompressed inflates the cluster described by e into dst.
func (img *Image) readCompressed(e l2Entry, dst []byte) error {
	off, size := e.compressedRange(img.clusterBits)
	src := make([]byte, size)
	n, err := img.f.ReadAt(src, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return ioErr("read compressed cluster", err)
	}
	if err := decompressCluster(img.hdr.CompressionType, src[:n], dst); err != nil {
		return fmt.Errorf("%w (cluster data at %#x)", err, off)
	}
	return nil
}

// Extent is one stretch of the disk with a uniform status, as qemu-img map
// reports it.
type Extent struct {
	Start  int64
	Length int64
	// Depth is the backing chain layer the data comes from (0 = this image).
	// For unallocated ranges it is the depth of the last layer consulted.
	Depth int
	// Present: allocated (as data or as zeroes) in some layer.
	Present bool
	// Zero: reads as zeroes.
	Zero bool
	// Data: backed by data in a file.
	Data bool
	// Compressed: the data is stored compressed.
	Compressed bool
	// Offset is the host offset in the file of layer Depth, or -1 when
	// there is none (compressed, zero, unallocated).
	Offset int64
	// Filename is the file of layer Depth that holds the data ("" when
	// not Present).
	Filename string
}

// BlockStatus describes [off, off+n) as extents (clipped to the disk).
func (img *Image) BlockStatus(off, n int64) ([]Extent, error) {
	if off < 0 || n < 0 {
		return nil, fmt.Errorf("%w: offset %d length %d", ErrOutOfRange, off, n)
	}
	img.drain.RLock()
	defer img.drain.RUnlock()
	return img.blockStatus(off, n, 0)
}

func (img *Image) blockStatus(off, n int64, depth int) ([]Extent, error) {
	size, err := img.openSize()
	if err != nil {
		return nil, err
	}
	return img.blockStatusL1(nil, size, off, n, depth)
}

// blockStatusL1 is blockStatus through the given L1 table (nil: the active
// one) of a disk of the given size.
func (img *Image) blockStatusL1(l1 []l1Entry, size, off, n int64, depth int) ([]Extent, error) {
	var tail []Extent
	if depth > 0 && off+n > size {
		// A backing file shorter than its overlay reads as zeroes past
		// its end; qemu reports that at the overlay's depth.
		s := max(off, size)
		tail = []Extent{backingBeyondEnd(s, off+n-s, depth)}
	}
	if off >= size {
		return tail, nil
	}
	n = min(n, size-off)
	var out []Extent
	var runs []run
	var dr dataRegion // for this scan only: writes may punch holes after it
	for n > 0 {
		chunk := min(n, maxMapChunk*64)
		var err error
		runs, err = img.mapRangeLocked(l1, off, chunk, runs[:0])
		if err != nil {
			return nil, err
		}
		for _, r := range runs {
			x := Extent{Start: r.guest, Length: r.n, Depth: depth, Offset: -1, Filename: img.path}
			switch r.kind {
			case kindNormal:
				// Like qemu, data over a hole in the host file reads as
				// zeroes and says so.
				for _, s := range hostSegments(img.f, r.host, r.n, &dr) {
					y := x
					y.Start, y.Length = r.guest+s.off-r.host, s.n
					y.Present, y.Data, y.Zero, y.Offset = true, true, s.hole, s.off
					out = appendExtent(out, y)
				}
				continue
			case kindZeroAlloc:
				x.Present, x.Zero, x.Offset = true, true, r.host
			case kindZero:
				x.Present, x.Zero = true, true
			case kindCompressed:
				x.Present, x.Data, x.Compressed = true, true, true
			case kindUnallocated, kindUnallocatedAlloc:
				if img.backing != nil {
					sub, err := img.backing.blockStatus(r.guest, r.n, depth+1)
					if err != nil {
						return nil, err
					}
					for _, s := range sub {
						out = appendExtent(out, s)
					}
					continue
				}
				x.Zero, x.Filename = true, ""
				if r.kind == kindUnallocatedAlloc {
					x.Offset = r.host
				}
			}
			out = appendExtent(out, x)
		}
		off += chunk
		n -= chunk
	}
	for _, t := range tail {
		out = appendExtent(out, t)
	}
	return out, nil
}

func appendExtent(out []Extent, x Extent) []Extent {
	if len(out) > 0 {
		p := &out[len(out)-1]
		if p.Start+p.Length == x.Start && p.Depth == x.Depth && p.Present == x.Present &&
			p.Zero == x.Zero && p.Data == x.Data && p.Compressed == x.Compressed && p.Filename == x.Filename &&
			((p.Offset < 0 && x.Offset < 0) || (p.Offset >= 0 && p.Offset+p.Length == x.Offset)) {
			p.Length += x.Length
			return out
		}
	}
	return append(out, x)
}

// layer implementation for a qcow2 image used as a backing file.
func (img *Image) readAt(p []byte, off int64) error {
	size := img.Size()
	if off >= size {
		clear(p)
		return nil
	}
	n := min(int64(len(p)), size-off)
	clear(p[n:])
	if !img.readOnly {
		tok := img.ranges.lock(alignDown(off, img.clusterSize), alignUp(off+n, img.clusterSize), false)
		defer img.ranges.unlock(tok)
	}
	// A backing file is opened read-only: nothing in this process writes
	// it, and readers do not exclude each other, so its range lock would
	// only cost every read of an overlay a second lock round.
	return img.readRange(p[:n], off)
}

func (img *Image) virtualSize() int64 { return img.Size() }
func (img *Image) close() error       { return img.Close() }
func (img *Image) describe() (string, string) {
	return img.path, "qcow2"
}

// backingBeyondEnd describes the part of a range past a backing file's end:
// it reads as zeroes and is not allocated anywhere.
func backingBeyondEnd(off, n int64, depth int) Extent {
	return Extent{Start: off, Length: n, Depth: depth - 1, Zero: true, Offset: -1}
}
