package qcow2

import (
	"path/filepath"
	"strings"
	"syscall"
)

// Info is what `qemu-img info` reports about a qcow2 image.
type Info struct {
	Filename        string
	Format          string // "qcow2"
	VirtualSize     int64
	ActualSize      int64 // bytes allocated to the file on the host
	ClusterSize     int64
	Version         int
	Compat          string // "0.10" or "1.1"
	CompressionType string // "zlib" or "zstd"
	LazyRefcounts   bool
	RefcountBits    int
	Corrupt         bool
	ExtendedL2      bool
	Dirty           bool
	// BackingFile is the name stored in the image; FullBackingFile is it
	// combined with the image's directory as qemu does; BackingFormat is
	// the backing format extension ("" when absent).
	BackingFile     string
	FullBackingFile string
	BackingFormat   string
	Snapshots       []SnapshotInfo
	Bitmaps         []BitmapInfo
}

// SnapshotInfo describes one internal snapshot.
type SnapshotInfo struct {
	ID          string
	Name        string
	VMStateSize uint64
	DateSec     uint32
	DateNsec    uint32
	VMClockNsec uint64
	Icount      int64 // -1 when the image does not record it
	DiskSize    uint64
}

// BitmapInfo describes one persistent dirty bitmap.
type BitmapInfo struct {
	Name        string
	Granularity int64
	Flags       []string // "in-use", "auto"
}

// Info returns what qemu-img info prints for the image.
func (img *Image) Info() (Info, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	if err := img.checkOpen(); err != nil {
		return Info{}, err
	}
	h := img.hdr
	in := Info{
		Filename:        img.path,
		Format:          "qcow2",
		VirtualSize:     img.size,
		ClusterSize:     img.clusterSize,
		Version:         int(h.Version),
		Compat:          "1.1",
		CompressionType: "zlib",
		LazyRefcounts:   h.Compatible&CompatLazyRefcounts != 0,
		RefcountBits:    int(img.refBits),
		Corrupt:         h.Incompatible&IncompatCorrupt != 0,
		ExtendedL2:      img.extL2,
		Dirty:           h.Incompatible&IncompatDirty != 0,
		BackingFile:     h.BackingFile,
		BackingFormat:   h.BackingFormat,
	}
	if h.Version == 2 {
		in.Compat = "0.10"
	}
	if h.CompressionType == CompressionZstd {
		in.CompressionType = "zstd"
	}
	if h.BackingFile != "" {
		in.FullBackingFile = CombineBackingPath(img.path, h.BackingFile)
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(int(img.f.Fd()), &st); err == nil {
		in.ActualSize = st.Blocks * 512
	}
	for i := range img.snapshots {
		in.Snapshots = append(in.Snapshots, img.snapshotInfo(&img.snapshots[i]))
	}
	for _, b := range img.bitmapDir {
		bi := BitmapInfo{Name: b.Name, Granularity: int64(1) << b.GranularityBits, Flags: []string{}}
		if b.Flags&bitmapFlagInUse != 0 {
			bi.Flags = append(bi.Flags, "in-use")
		}
		if b.Flags&bitmapFlagAuto != 0 {
			bi.Flags = append(bi.Flags, "auto")
		}
		in.Bitmaps = append(in.Bitmaps, bi)
	}
	return in, nil
}

// CombineBackingPath is qemu's path_combine for local files: a relative
// backing name is taken relative to the directory part of the image name,
// without normalising it (so "sub/top.qcow2" + "../b" = "sub/../b").
func CombineBackingPath(imagePath, backing string) string {
	if filepath.IsAbs(backing) || backing == "" {
		return backing
	}
	i := strings.LastIndexByte(imagePath, '/')
	return imagePath[:i+1] + backing
}
