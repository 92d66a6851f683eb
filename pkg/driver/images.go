package driver

import (
	"context"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

// Images is what the driver needs from the image library: the whole of its
// use of pkg/qcow2 goes through here (wired in qcow2images.go), so that tests
// can substitute a double and the library can evolve behind it.
//
// Implementations must wrap ErrInUse when an image is opened (locked) by
// another process or open handle, ErrOutOfRange for a size the format cannot
// represent or a shrink, and ErrNotFound for a missing file.
type Images interface {
	// Create makes a new image file at path of the given virtual size. path
	// does not exist; on error nothing is left at path.
	Create(ctx context.Context, path string, size int64, opts ImageCreateOptions) error
	// Open opens an image for exclusive use by this process (qemu's OFD
	// locks), read-write unless o.ReadOnly. An encrypted image needs
	// o.Passphrase for its data (wrap ErrPrecondition when it is missing,
	// ErrInvalid when it is wrong) unless o.MetadataOnly.
	Open(ctx context.Context, path string, o ImageOpenOptions) (Image, error)
	// Size reads the virtual size of an image that may be open elsewhere.
	Size(ctx context.Context, path string) (int64, error)
	// Resize grows a closed image to size; equal size is a no-op.
	Resize(ctx context.Context, path string, size int64) error
}

// ImageCreateOptions are the format options of a new image.
type ImageCreateOptions struct {
	ClusterSize   int64
	Preallocation string // off, metadata, falloc, full
	LazyRefcounts bool
	// ExtendedL2 gives the image subclusters (qcow2 extended_l2=on).
	ExtendedL2 bool
	// Passphrase, when set, makes the image encrypted (qcow2 LUKS) with a
	// key slot it opens. The Images does not keep it.
	Passphrase []byte
}

// ImageOpenOptions say how to open an image.
type ImageOpenOptions struct {
	ReadOnly bool
	// Passphrase unlocks an encrypted image; the Images does not keep it
	// (the image library keeps the master key in memory until Close).
	Passphrase []byte
	// MasterKey unlocks an encrypted image with the key a previous open
	// gave (a restarted node plugin: encryption_keys.go); checked against
	// the image, a wrong one is refused like a wrong passphrase.
	MasterKey []byte
	// MetadataOnly opens an encrypted image without its key: for
	// operations that never read or write its data (delete probe,
	// resize).
	MetadataOnly bool
}

// Image is an open image.
type Image interface {
	// Size is the current virtual size.
	Size() int64
	// Resize grows the open image (online expansion); equal size is a no-op.
	Resize(ctx context.Context, size int64) error
	// Backend serves the image's data to an attach backend.
	Backend() nbdattach.Backend
	// Encrypted reports whether the image's data is encrypted.
	Encrypted() bool
	// Close flushes and closes the image, releasing its locks.
	Close() error
}

// GrowthReporter is implemented by an Images that may be unable to grow
// images (an image library without resize). When CanGrow is false the driver
// advertises no expansion at all rather than accept expansions it would fail.
type GrowthReporter interface {
	CanGrow() bool
}

func (d *Driver) canGrow() bool {
	g, ok := d.images.(GrowthReporter)
	return !ok || g.CanGrow()
}

// SnapshotImages is implemented by an Images whose images hold internal
// snapshots. The driver offers CSI snapshots, volumes made from them and
// the SnapshotMetadata service only when its Images implements it. Those
// work on the qcow2 library's image (pkg/snapshotter): Qcow2 hands it over,
// so every image the driver touches is opened by Images.Open, with its
// options, whether for I/O or for a snapshot.
type SnapshotImages interface {
	// Qcow2 returns the library image behind img, an Image this Images
	// opened, or false when img has none.
	Qcow2(img Image) (*qcow2.Image, bool)
}

// snapshotImages is the Images' snapshot capability, when it has one.
func (d *Driver) snapshotImages() (SnapshotImages, bool) {
	s, ok := d.images.(SnapshotImages)
	return s, ok
}
