package imagebackend

import "github.com/qcow2-csi/qcow2-csi/pkg/qcow2"

// NewSnapshot serves view, a read-only view of one of img's internal
// snapshots, as qemu-nbd -l does: reads and block status come from the
// snapshot, writes fail with EPERM. Bitmaps in opts are img's (as qemu-nbd,
// which looks them up on the image it loaded the snapshot into). The caller
// closes view, then img.
func NewSnapshot(img *qcow2.Image, view *qcow2.SnapshotView, opts Options) (*Backend, error) {
	b, err := New(img, opts)
	if err != nil {
		return nil, err
	}
	b.src, b.view = view, true
	return b, nil
}
