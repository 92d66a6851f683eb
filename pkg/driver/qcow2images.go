package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"time"

	"github.com/qcow2-csi/qcow2-csi/pkg/imagebackend"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

// Qcow2Images is the production Images: pkg/qcow2 images served through the
// NBD adapter (pkg/imagebackend). It translates the library's lock and
// existence errors to the driver's sentinels, which the driver's logic tests
// for; every other qcow2 error keeps its sentinel for toStatus.
type Qcow2Images struct {
	// Logger receives the library's messages; nil is silent.
	Logger *slog.Logger
	// CrashConsistentBitmaps opens writable images with
	// qcow2.OpenOptions.CrashConsistentBitmaps: the checkpoint bitmaps of
	// a volume then survive a crash of the node plugin, and the next
	// GetMetadataDelta stays incremental instead of FAILED_PRECONDITION.
	CrashConsistentBitmaps bool
	// EncryptionIterTime is how long unlocking a new encrypted volume's
	// key slot takes (PBKDF2); 0 is qemu's default, 2 s. Every NodeStage
	// of the volume pays it once.
	EncryptionIterTime time.Duration
}

var (
	_ Images         = Qcow2Images{}
	_ GrowthReporter = Qcow2Images{}
	_ SnapshotImages = Qcow2Images{}
)

// CanGrow reports that qcow2 images grow (GrowthReporter): pkg/qcow2 has
// Image.Resize.
func (Qcow2Images) CanGrow() bool { return true }

// Qcow2 implements SnapshotImages: img is a qcow2 image when this Images
// opened it.
func (Qcow2Images) Qcow2(img Image) (*qcow2.Image, bool) {
	qi, ok := img.(*qcow2Image)
	if !ok {
		return nil, false
	}
	return qi.img, true
}

// imageErr names the image in err and gives it the driver's meaning: a
// missing image file is a volume not found, the rest is driverErr's.
func imageErr(path string, err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("image %s: %w: %w", path, ErrNotFound, err)
	}
	return fmt.Errorf("image %s: %w", path, driverErr(err))
}

func (q Qcow2Images) Create(_ context.Context, path string, size int64, o ImageCreateOptions) error {
	co := qcow2.CreateOptions{
		Size:          size,
		ClusterSize:   o.ClusterSize,
		LazyRefcounts: o.LazyRefcounts,
		Preallocation: o.Preallocation,
		ExtendedL2:    o.ExtendedL2,
		Logger:        q.Logger,
	}
	if o.Passphrase != nil {
		co.Encryption = &qcow2.EncryptionOptions{Passphrase: o.Passphrase, IterTime: q.EncryptionIterTime}
	}
	img, err := qcow2.Create(path, co)
	if err != nil {
		_ = os.Remove(path)
		return imageErr(path, err)
	}
	if err := img.Close(); err != nil {
		_ = os.Remove(path)
		return imageErr(path, err)
	}
	return nil
}

func (q Qcow2Images) Open(_ context.Context, path string, o ImageOpenOptions) (Image, error) {
	img, err := qcow2.Open(path, qcow2.OpenOptions{ReadOnly: o.ReadOnly, CrashConsistentBitmaps: q.CrashConsistentBitmaps, Logger: q.Logger,
		Passphrase: o.Passphrase, MasterKey: o.MasterKey})
	if err != nil {
		return nil, imageErr(path, err)
	}
	if img.Encrypted() && o.Passphrase == nil && o.MasterKey == nil && !o.MetadataOnly {
		_ = img.Close()
		return nil, imageErr(path, qcow2.ErrKeyRequired)
	}
	b, err := imagebackend.New(img, imagebackend.Options{})
	if err != nil {
		_ = img.Close()
		return nil, imageErr(path, err)
	}
	return &qcow2Image{img: img, backend: b}, nil
}

// Size reads the header without taking the image's locks (qemu-img info -U
// does the same): the image may be open by the node.
func (q Qcow2Images) Size(_ context.Context, path string) (int64, error) {
	img, err := qcow2.Open(path, qcow2.OpenOptions{ReadOnly: true, NoLock: true, Logger: q.Logger})
	if err != nil {
		return 0, imageErr(path, err)
	}
	defer img.Close()
	return img.Size(), nil
}

func (q Qcow2Images) Resize(ctx context.Context, path string, size int64) error {
	img, err := q.Open(ctx, path, ImageOpenOptions{MetadataOnly: true})
	if err != nil {
		return err
	}
	rerr := img.Resize(ctx, size)
	if err := img.Close(); rerr == nil {
		rerr = err
	}
	return rerr
}

type qcow2Image struct {
	img     *qcow2.Image
	backend *imagebackend.Backend
}

func (i *qcow2Image) Size() int64                { return i.img.Size() }
func (i *qcow2Image) Encrypted() bool            { return i.img.Encrypted() }
func (i *qcow2Image) MasterKey() ([]byte, error) { return i.img.MasterKey() }
func (i *qcow2Image) Backend() nbdattach.Backend { return i.backend }
func (i *qcow2Image) Close() error               { return imageErr(i.img.Path(), i.img.Close()) }
func (i *qcow2Image) Resize(_ context.Context, size int64) error {
	cur := i.img.Size()
	if size == cur {
		return nil
	}
	if size < cur {
		return fmt.Errorf("image %s: shrinking from %d to %d bytes: %w", i.img.Path(), cur, size, ErrOutOfRange)
	}
	return imageErr(i.img.Path(), i.img.Resize(size, qcow2.ResizeOptions{}))
}
