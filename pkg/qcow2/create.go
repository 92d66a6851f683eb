package qcow2

import (
	"encoding/binary"
	"fmt"
	"io/fs"
	"log/slog"
	"math/bits"
	"os"

	"golang.org/x/sys/unix"
)

// Preallocation modes (qemu-img create -o preallocation=).
const (
	PreallocOff      = "off"
	PreallocMetadata = "metadata"
	PreallocFalloc   = "falloc"
	PreallocFull     = "full"
)

// CreateOptions are qemu-img's qcow2 creation options.
type CreateOptions struct {
	// Size is the virtual disk size in bytes (any value up to qemu's
	// limits; need not be a multiple of the cluster size).
	Size int64
	// Version is 2 (compat=0.10) or 3 (compat=1.1, the default).
	Version int
	// ClusterSize is a power of two from 512 to 2 MiB; default 64 KiB.
	ClusterSize int64
	// RefcountBits is 1, 2, 4, 8, 16 (default), 32 or 64 (v3 only for
	// anything but 16).
	RefcountBits int
	// LazyRefcounts sets the lazy refcounts compatible feature (v3).
	LazyRefcounts bool
	// ExtendedL2 enables subcluster allocation (v3, clusters >= 16 KiB).
	ExtendedL2 bool
	// CompressionType is "zlib" (default) or "zstd" (v3).
	CompressionType string
	// Preallocation is off (default), metadata, falloc or full.
	Preallocation string
	// BackingFile is stored verbatim (relative names are relative to the
	// new image's directory when opened).
	BackingFile string
	// BackingFormat is "qcow2" or "raw"; empty probes the backing file.
	BackingFormat string
	// Encryption, when set, makes the image encrypted (qemu-img's
	// encrypt.format=luks): compat 1.1 and preallocation off only. The
	// returned Image is unlocked with its passphrase.
	Encryption *EncryptionOptions
	// EncryptionFrom, when set, encrypts the image like that open,
	// unlocked image: the same LUKS header and key slots (so the same
	// passphrases open it) and the same master key. For copies of an
	// encrypted image that must stay under its keys (restore, clone).
	EncryptionFrom *Image
	// NoSync opens the new image with OpenOptions.NoSync.
	NoSync bool
	// Mode is the permission bits of a newly made file, before the umask
	// (an existing file keeps its own). The default is 0600: an image holds
	// a whole disk's data, so a caller that does not think about it must
	// not leave it readable by every local user. qemu-img uses 0644; the
	// img face asks for that to behave the same.
	Mode fs.FileMode
	// Logger receives messages; nil is silent.
	Logger *slog.Logger
}

func (o *CreateOptions) normalize() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalidOption, fmt.Sprintf(format, args...))
	}
	if o.Version == 0 {
		o.Version = 3
	}
	if o.ClusterSize == 0 {
		o.ClusterSize = 65536
	}
	if o.RefcountBits == 0 {
		o.RefcountBits = 16
	}
	if o.CompressionType == "" {
		o.CompressionType = "zlib"
	}
	if o.Preallocation == "" {
		o.Preallocation = PreallocOff
	}
	if o.Mode == 0 {
		o.Mode = 0o600
	}
	switch {
	case o.Size < 0:
		return bad("negative size %d", o.Size)
	case o.Version != 2 && o.Version != 3:
		return bad("compat level must be 0.10 or 1.1")
	case o.ClusterSize < 512 || o.ClusterSize > 2<<20 || o.ClusterSize&(o.ClusterSize-1) != 0:
		return bad("cluster size must be a power of two between 512 and 2048k")
	case o.RefcountBits < 1 || o.RefcountBits > 64 || o.RefcountBits&(o.RefcountBits-1) != 0:
		return bad("refcount width must be a power of two and may not exceed 64 bits")
	case o.Version == 2 && o.RefcountBits != 16:
		return bad("different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
	case o.Version == 2 && o.LazyRefcounts:
		return bad("lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")
	case o.ExtendedL2 && o.Version == 2:
		return bad("extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")
	case o.ExtendedL2 && o.ClusterSize < 16384:
		return bad("extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
	case o.CompressionType != "zlib" && o.CompressionType != "zstd":
		return bad("invalid compression type %q (zlib or zstd)", o.CompressionType)
	case o.CompressionType != "zlib" && o.Version == 2:
		return bad("non-zlib compression type is only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")
	case o.BackingFormat != "" && o.BackingFile == "":
		return bad("backing format cannot be used without backing file")
	case o.BackingFormat != "" && o.BackingFormat != "qcow2" && o.BackingFormat != "raw":
		return bad("backing format %q is not supported (qcow2 or raw)", o.BackingFormat)
	case len(o.BackingFile) > maxBackingFileName:
		return bad("backing file name too long")
	case o.Mode&^fs.ModePerm != 0:
		return bad("file mode %v has bits other than permissions", o.Mode)
	}
	switch o.Preallocation {
	case PreallocOff, PreallocMetadata, PreallocFalloc, PreallocFull:
	default:
		return bad("invalid preallocation mode %q (off, metadata, falloc, full)", o.Preallocation)
	}
	if o.Encryption != nil && o.EncryptionFrom != nil {
		return bad("Encryption and EncryptionFrom are exclusive")
	}
	if o.EncryptionFrom != nil {
		if _, err := o.EncryptionFrom.dataCipher(); err != nil || o.EncryptionFrom.crypto == nil {
			return bad("EncryptionFrom needs an encrypted image opened with its passphrase")
		}
	}
	if o.Encryption != nil || o.EncryptionFrom != nil {
		if o.Encryption != nil {
			if err := o.Encryption.normalize(); err != nil {
				return err
			}
		}
		switch {
		case o.Version < 3:
			return bad("LUKS encryption needs compat=1.1")
		case o.Preallocation != PreallocOff:
			// Preallocated clusters would hold clear zeroes that decrypt
			// to noise.
			return bad("preallocation=%s cannot be used with encryption", o.Preallocation)
		}
	}
	if o.BackingFile != "" && o.Preallocation != PreallocOff && !o.ExtendedL2 {
		return bad("backing file and preallocation can only be used at the same time if extended_l2 is on")
	}
	return nil
}

// Create makes a new qcow2 image at path (truncating an existing file) and
// returns it open read-write.
func Create(path string, opts CreateOptions) (*Image, error) {
	if err := opts.normalize(); err != nil {
		return nil, err
	}
	clusterBits := uint32(bits.TrailingZeros64(uint64(opts.ClusterSize)))
	refOrder := uint32(bits.TrailingZeros64(uint64(opts.RefcountBits)))
	// Check the size against the L1 limit before touching the file.
	entryShift := uint32(3)
	if opts.ExtendedL2 {
		entryShift = 4
	}
	l2Cov := int64(1) << (2*clusterBits - entryShift)
	if (opts.Size+l2Cov-1)/l2Cov > maxL1Bytes/8 {
		return nil, fmt.Errorf("%w: image size %d is too large for cluster size %d (L1 table would exceed %d bytes)", ErrInvalidOption, opts.Size, opts.ClusterSize, maxL1Bytes)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, opts.Mode)
	if err != nil {
		return nil, fmt.Errorf("qcow2: create: %w", err)
	}
	lk, err := lockImage(f, true)
	if err != nil {
		f.Close()
		return nil, err
	}
	err = writeEmptyImage(f, &opts, clusterBits, refOrder)
	lk.release()
	f.Close()
	if err != nil {
		return nil, err
	}
	img, err := Open(path, OpenOptions{Logger: opts.Logger, NoSync: opts.NoSync, NoBacking: opts.BackingFile != "" && opts.Preallocation == PreallocOff})
	if err != nil {
		return nil, err
	}
	if err := img.createFinish(&opts); err != nil {
		img.Close()
		return nil, err
	}
	return img, nil
}

// writeEmptyImage writes a zero-sized image: header, a one-cluster
// refcount table and one refcount block, no L1 table yet.
func writeEmptyImage(f *os.File, o *CreateOptions, clusterBits, refOrder uint32) error {
	cs := int64(1) << clusterBits
	h := &header{
		Version:               uint32(o.Version),
		ClusterBits:           clusterBits,
		RefcountTableOffset:   uint64(cs),
		RefcountTableClusters: 1,
		RefcountOrder:         refOrder,
		BackingFile:           o.BackingFile,
		BackingFormat:         o.BackingFormat,
	}
	if o.Version >= 3 {
		h.HeaderLength = headerV3FullLen
		h.Features = defaultFeatureTable()
		if o.LazyRefcounts {
			h.Compatible |= CompatLazyRefcounts
		}
		if o.ExtendedL2 {
			h.Incompatible |= IncompatExtendedL2
		}
		if o.CompressionType == "zstd" {
			h.Incompatible |= IncompatCompressionType
			h.CompressionType = CompressionZstd
		}
	}
	hb, err := h.encode()
	if err != nil {
		return err
	}
	if err := f.Truncate(0); err != nil {
		return ioErr("truncate", err)
	}
	buf := make([]byte, 3*cs)
	copy(buf, hb)
	binary.BigEndian.PutUint64(buf[cs:], uint64(2*cs))
	for i := int64(0); i < 3; i++ {
		setRefEntry(buf[2*cs:], refOrder, i, 1)
	}
	if _, err := f.WriteAt(buf, 0); err != nil {
		return ioErr("write new image", err)
	}
	return ioErr("fsync", f.Sync())
}

func (img *Image) createFinish(o *CreateOptions) error {
	img.drain.Lock()
	defer img.drain.Unlock()
	img.mu.Lock()
	defer img.mu.Unlock()
	if o.Encryption != nil || o.EncryptionFrom != nil {
		if err := img.setupEncryption(o.Encryption, o.EncryptionFrom); err != nil {
			return err
		}
	}
	if err := img.growLocked(o.Size); err != nil {
		return err
	}
	if o.Preallocation != PreallocOff {
		if err := img.preallocate(o.Preallocation); err != nil {
			return err
		}
	}
	return img.flushLocked(true)
}

// growLocked enlarges the virtual disk to newSize, growing the L1 table
// when needed (new table written and durable before the header points to
// it). Shrinking is the resize code's business. drain held exclusively, mu
// held.
func (img *Image) growLocked(newSize int64) error {
	if newSize < img.size {
		return fmt.Errorf("%w: growLocked cannot shrink (%d < %d)", ErrInvalidOption, newSize, img.size)
	}
	l2Cov := img.l2Entries << img.clusterBits
	needL1 := (newSize + l2Cov - 1) / l2Cov
	if needL1 > maxL1Bytes/8 {
		return fmt.Errorf("%w: size %d needs an L1 table beyond %d bytes", ErrInvalidOption, newSize, maxL1Bytes)
	}
	var b [8]byte
	if needL1 > int64(len(img.l1)) {
		if err := img.growL1(needL1); err != nil {
			return err
		}
	}
	binary.BigEndian.PutUint64(b[:], uint64(newSize))
	if _, err := img.f.WriteAt(b[:], hdrSize); err != nil {
		return ioErr("write header", err)
	}
	if err := img.fsync(); err != nil {
		return err
	}
	img.size = newSize
	img.hdr.Size = uint64(newSize)
	img.sizeCaches()
	return nil
}

// growL1 moves the active L1 table to a new, larger place. mu held.
func (img *Image) growL1(n int64) error {
	cs := img.clusterSize
	nClusters := (n*8 + cs - 1) / cs
	newOff, err := img.allocClusters(nClusters)
	if err != nil {
		return err
	}
	buf := make([]byte, nClusters*cs)
	for i, e := range img.l1 {
		binary.BigEndian.PutUint64(buf[i*8:], uint64(e))
	}
	if err := img.checkOverlap(newOff, int64(len(buf)), 0); err != nil {
		return err
	}
	if err := img.syncRefcounts(false); err != nil {
		return err
	}
	var hb [12]byte
	binary.BigEndian.PutUint32(hb[:], uint32(n))
	binary.BigEndian.PutUint64(hb[4:], uint64(newOff))
	if err := img.switchTable("L1 table", buf, newOff, hb[:], hdrL1Size); err != nil {
		return err
	}
	oldOff, oldN := int64(img.hdr.L1TableOffset), int64(len(img.l1))
	img.hdr.L1TableOffset, img.hdr.L1Size = uint64(newOff), uint32(n)
	l1 := make([]l1Entry, n)
	copy(l1, img.l1)
	img.l1 = l1
	if oldN > 0 {
		for c := oldOff >> img.clusterBits; c <= (oldOff+oldN*8-1)>>img.clusterBits; c++ {
			delete(img.metaMap, c)
		}
		if err := img.freeNow(oldOff, oldN*8); err != nil {
			return err
		}
	}
	for c := newOff >> img.clusterBits; c < newOff>>img.clusterBits+nClusters; c++ {
		img.metaMap[c] = metaActiveL1
	}
	return nil
}

// preallocate allocates every cluster of the disk (metadata mode) and, for
// falloc/full, reserves or writes the data space. mu held.
func (img *Image) preallocate(mode string) error {
	nClusters := (img.size + img.clusterSize - 1) >> img.clusterBits
	for vc := int64(0); vc < nClusters; {
		// One L2 table's worth at a time: the table first, then its data.
		if _, err := img.l2ForWrite(img.l1Index(vc)); err != nil {
			return err
		}
		n := min(nClusters-vc, img.l2Entries-img.l2Index(vc))
		host, err := img.allocClusters(n)
		if err != nil {
			return err
		}
		for i := int64(0); i < n; i++ {
			var bm l2Bitmap
			if img.extL2 {
				bm = l2Bitmap(l2BitmapAllAlloc)
				if img.hdr.BackingFile != "" {
					bm = 0
				}
			}
			if err := img.setL2(vc+i, l2Entry(uint64(host+i*img.clusterSize)|oflagCopied), bm); err != nil {
				return err
			}
		}
		switch mode {
		case PreallocFalloc:
			if err := unix.Fallocate(int(img.f.Fd()), 0, host, n*img.clusterSize); err != nil {
				return ioErr("fallocate", err)
			}
		case PreallocFull:
			zero := make([]byte, min(n*img.clusterSize, 4<<20))
			for o := int64(0); o < n*img.clusterSize; o += int64(len(zero)) {
				if _, err := img.f.WriteAt(zero[:min(int64(len(zero)), n*img.clusterSize-o)], host+o); err != nil {
					return ioErr("write zeroes", err)
				}
			}
		case PreallocMetadata:
			// qemu extends the file over the data area too.
			if err := img.f.Truncate(max(img.fileEnd, host+n*img.clusterSize)); err != nil {
				return ioErr("truncate", err)
			}
		}
		vc += n
	}
	return nil
}
