package snapshotter

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/qcow2-csi/qcow2-csi/pkg/imgcopy"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

// Method says how Restore made the new image.
type Method string

const (
	MethodReflink Method = "reflink"
	MethodCopy    Method = "copy"
)

// RestoreOptions configures Restore.
type RestoreOptions struct {
	// Size of the new disk; 0 keeps the snapshot's size. Smaller than the
	// snapshot is refused.
	Size int64
	// SourceClosed says that nothing writes srcPath's file while Restore
	// runs (the image is opened only by the caller, for this restore), so
	// a reflink of the file is a consistent copy. When false only the
	// copy path is used.
	SourceClosed bool
	// NoReflink forces the copy path.
	NoReflink bool
	// ClusterSize of a copied image; 0 takes the source's.
	ClusterSize int64
	// fixBacking, when set, is run on a reflinked file before it is
	// opened (Freeze renames the backing file there).
	fixBacking func(path string) error
}

// copyWorkers read the source in parallel on the copy path; writes stay in
// order, so two (one reading while the other writes) keep the target busy.
// More measured no faster on two cores (BenchmarkRestore512MiB).
const copyWorkers = 2

// TempPrefix starts the names of the temporary internal snapshots Restore
// takes of an open image's current disk. They have no checkpoint bitmap and
// no record of the caller's; one left by a crash is dropped by the next
// restore of the image's current disk.
const TempPrefix = "qcow2-csi-tmp-"

// Restore makes dst, a new independent image holding snapshot name of src
// (a snapshot name of "" means src's current disk). dst must not exist. It
// returns how the image was made.
//
// A current disk that may be written meanwhile (!o.SourceClosed: the image
// is the node's one open image of a staged volume) is first frozen in a
// temporary internal snapshot, crash-consistent as a CSI snapshot is
// (qcow2.Image.CreateSnapshot waits for writes in flight), copied from it,
// and the snapshot deleted again, also when the copy fails. The temporary
// snapshot takes no checkpoint bitmap, so the checkpoint chain is not
// touched: every bitmap keeps recording as before.
func Restore(src *qcow2.Image, name, dst string, o RestoreOptions) (m Method, err error) {
	if name == "" && !o.SourceClosed {
		tmp, terr := takeTemp(src)
		if terr != nil {
			return "", terr
		}
		defer func() {
			if derr := src.DeleteSnapshot(tmp.ID); derr != nil && err == nil {
				err = fmt.Errorf("drop temporary snapshot %q: %w", tmp.Name, derr)
			}
		}()
		name = tmp.Name
	}
	if _, err := os.Lstat(dst); err == nil {
		return "", fmt.Errorf("%w: %s", ErrExists, dst)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return "", err
	}
	size := src.Size()
	if name != "" {
		s, err := Find(src, name)
		if err != nil {
			return "", err
		}
		size = int64(s.DiskSize)
	}
	if o.Size != 0 && o.Size < size {
		return "", fmt.Errorf("%w: restore of %d bytes into %d bytes", ErrInvalid, size, o.Size)
	}
	if o.Size == 0 {
		o.Size = size
	}
	if o.SourceClosed && !o.NoReflink && name != "" {
		err := reflinkRestore(src, name, dst, o.Size, o.fixBacking)
		if err == nil {
			return MethodReflink, nil
		}
		_ = os.Remove(dst)
		if !errors.Is(err, errNoReflink) {
			return "", err
		}
	}
	if err := copyRestore(src, name, dst, o); err != nil {
		_ = os.Remove(dst)
		return "", err
	}
	return MethodCopy, nil
}

// takeTemp drops temporary snapshots a crash left, then takes a new one.
// The caller serialises restores of one image.
func takeTemp(img *qcow2.Image) (qcow2.SnapshotInfo, error) {
	for _, s := range img.Snapshots() {
		if strings.HasPrefix(s.Name, TempPrefix) {
			if err := img.DeleteSnapshot(s.ID); err != nil {
				return qcow2.SnapshotInfo{}, fmt.Errorf("drop stale temporary snapshot %q: %w", s.Name, err)
			}
		}
	}
	name := TempPrefix + strconv.FormatInt(time.Now().UnixNano(), 10)
	s, err := img.CreateSnapshot(name)
	if err != nil {
		return qcow2.SnapshotInfo{}, fmt.Errorf("temporary snapshot %q: %w", name, err)
	}
	return s, nil
}

var errNoReflink = errors.New("file system cannot reflink")

// reflinkRestore clones the file (shares its extents), then makes the clone
// the snapshot alone: revert, delete every snapshot, remove the checkpoints.
func reflinkRestore(src *qcow2.Image, name, dst string, size int64, fixBacking func(string) error) error {
	if err := src.Flush(); err != nil {
		return err
	}
	in, err := os.Open(src.Path())
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	err = unix.IoctlFileClone(int(out.Fd()), int(in.Fd()))
	if err == nil {
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	switch {
	case errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.ENOTTY), errors.Is(err, unix.EXDEV), errors.Is(err, unix.EINVAL):
		return fmt.Errorf("%w: %w", errNoReflink, err)
	case err != nil:
		return fmt.Errorf("reflink %s to %s: %w", src.Path(), dst, err)
	}
	if fixBacking != nil {
		if err := fixBacking(dst); err != nil {
			return fmt.Errorf("clone %s: backing file: %w", dst, err)
		}
	}
	img, err := qcow2.Open(dst, qcow2.OpenOptions{})
	if err != nil {
		return fmt.Errorf("open clone %s: %w", dst, err)
	}
	err = makeSole(img, name, size)
	if cerr := img.Close(); err == nil {
		err = cerr
	}
	return err
}

func makeSole(img *qcow2.Image, name string, size int64) error {
	s, err := Find(img, name)
	if err != nil {
		return err
	}
	if err := img.RevertToSnapshot(s.ID); err != nil {
		return fmt.Errorf("revert clone to %q: %w", name, err)
	}
	for _, sn := range img.Snapshots() {
		if err := img.DeleteSnapshot(sn.ID); err != nil {
			return fmt.Errorf("drop snapshot %s of clone: %w", sn.ID, err)
		}
	}
	for _, b := range img.Bitmaps() {
		if err := img.RemoveBitmap(b.Name); err != nil {
			return fmt.Errorf("drop bitmap %s of clone: %w", b.Name, err)
		}
	}
	if size > img.Size() {
		if err := img.Resize(size, qcow2.ResizeOptions{}); err != nil {
			return fmt.Errorf("grow clone to %d: %w", size, err)
		}
	}
	return img.Flush()
}

func copyRestore(src *qcow2.Image, name, dst string, o RestoreOptions) error {
	var r imgcopy.Source = src
	size := src.Size()
	if name != "" {
		v, err := openView(src, name)
		if err != nil {
			return err
		}
		defer v.Close()
		r, size = v, v.Size()
	}
	cs := o.ClusterSize
	if cs == 0 {
		cs = src.ClusterSize()
	}
	// 0600 as the reflink path: a restored volume is a disk's data.
	co := qcow2.CreateOptions{Size: o.Size, ClusterSize: cs, Mode: 0o600}
	if src.Encrypted() {
		// The copy stays encrypted under the same key slots: the data is
		// re-encrypted for its new place with the same master key.
		co.EncryptionFrom = src
	}
	img, err := qcow2.Create(dst, co)
	if err != nil {
		return err
	}
	// Only the data clusters are copied: holes and zero clusters stay
	// unallocated in the new image, which reads them as zeroes.
	err = imgcopy.Copy(img, r, size, imgcopy.Options{Workers: copyWorkers})
	if err == nil {
		err = img.Flush()
	}
	if cerr := img.Close(); err == nil {
		err = cerr
	}
	return err
}
