package driver

import (
	"context"
	"fmt"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/klog/v2"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"github.com/qcow2-csi/qcow2-csi/pkg/snapshotter"
)

// The CSI SnapshotMetadata service: allocated extents of a snapshot and
// changed extents between two snapshots of a volume (pkg/snapshotter),
// streamed ascending and non-overlapping, as VARIABLE_LENGTH extents or
// FIXED_LENGTH blocks: whichever the target snapshot was created with
// (snapshot_params.go).

const (
	// defaultMaxResults is the tuples per message when the caller leaves
	// max_results at 0.
	defaultMaxResults = 1024
	// metadataWindow bounds the extents held in memory at once: the disk
	// is scanned in windows of this many bytes.
	metadataWindow = 4 << 30
)

type snapshotMetadataServer struct {
	csi.UnimplementedSnapshotMetadataServer
	d *Driver
}

// SnapshotMetadataServer is the SnapshotMetadata service of d (registered
// by GRPCServer in controller mode with qcow2 images).
func (d *Driver) SnapshotMetadataServer() csi.SnapshotMetadataServer {
	return snapshotMetadataServer{d: d}
}

func checkWindow(startingOffset int64, maxResults int32) error {
	if startingOffset < 0 {
		return fmt.Errorf("%w: starting_offset %d is negative", ErrInvalid, startingOffset)
	}
	if maxResults < 0 {
		return fmt.Errorf("%w: max_results %d is negative", ErrInvalid, maxResults)
	}
	return nil
}

// stream sends ranges computed window by window from start to the end of a
// disk of size bytes, maxResults tuples a message. With block > 0 (FIXED_LENGTH)
// every range is widened to the blocks of that size it touches, each sent
// once as its own tuple; the first is the block holding start.
func stream(size, start int64, maxResults int32, block int64, ranges func(off, n int64) ([]snapshotter.Range, error), send func([]*csi.BlockMetadata) error) error {
	if start >= size && !(start == 0 && size == 0) {
		return fmt.Errorf("%w: starting_offset %d is at or beyond the volume's %d bytes", ErrOutOfRange, start, size)
	}
	if maxResults == 0 {
		maxResults = defaultMaxResults
	}
	var batch []*csi.BlockMetadata
	add := func(off, n int64) error {
		batch = append(batch, &csi.BlockMetadata{ByteOffset: off, SizeBytes: n})
		if len(batch) < int(maxResults) {
			return nil
		}
		err := send(batch)
		batch = nil
		return err
	}
	next := int64(0) // FIXED_LENGTH: the first block not sent yet
	for off := start; off < size; off += metadataWindow {
		rs, err := ranges(off, min(int64(metadataWindow), size-off))
		if err != nil {
			return err
		}
		for _, r := range rs {
			if block == 0 {
				if err := add(r.Offset, r.Length); err != nil {
					return err
				}
				continue
			}
			b := max(r.Offset/block*block, next)
			for ; b < r.Offset+r.Length; b += block {
				if err := add(b, block); err != nil {
					return err
				}
			}
			next = max(next, b)
		}
	}
	if len(batch) > 0 {
		return send(batch)
	}
	return nil
}

// streamSnapshot streams ranges(img, off, n) over the disk of snapshot m from
// start, window by window, holding m's volume's lock and its one open image;
// send gets each batch with the snapshot's disk size and the block metadata
// type m was created with. For FIXED_LENGTH, block(img) is the tuple size.
func (d *Driver) streamSnapshot(ctx context.Context, m *snapshotMeta, start int64, max int32,
	block func(img *qcow2.Image) int64,
	ranges func(img *qcow2.Image, off, n int64) ([]snapshotter.Range, error),
	send func(typ csi.BlockMetadataType, size int64, b []*csi.BlockMetadata) error) error {
	release, err := d.locks.acquireWait(ctx, m.Source, opSnapshot)
	if err != nil {
		return err
	}
	defer release()
	typ := d.blockMetadataType(m)
	return d.withImage(ctx, m.Source, m.Hidden, func(img *qcow2.Image, _ bool) error {
		size, err := snapshotter.Size(img, m.ID)
		if err != nil {
			return driverErr(err)
		}
		bs := int64(0)
		if typ == csi.BlockMetadataType_FIXED_LENGTH {
			bs = block(img)
		}
		return stream(size, start, max, bs,
			func(off, n int64) ([]snapshotter.Range, error) {
				if err := ctx.Err(); err != nil {
					return nil, err
				}
				rs, err := ranges(img, off, n)
				return rs, driverErr(err)
			},
			func(b []*csi.BlockMetadata) error { return send(typ, size, b) })
	})
}

// deltaBlock is the FIXED_LENGTH tuple size of a delta: the coarsest
// granularity of the image's checkpoint bitmaps, at least a cluster, so
// that every bitmap range is whole blocks.
func deltaBlock(img *qcow2.Image) int64 {
	bs := img.ClusterSize()
	for _, b := range img.Bitmaps() {
		if strings.HasPrefix(b.Name, snapshotter.BitmapPrefix) {
			bs = max(bs, b.Granularity)
		}
	}
	return bs
}

func (s snapshotMetadataServer) GetMetadataAllocated(req *csi.GetMetadataAllocatedRequest, srv csi.SnapshotMetadata_GetMetadataAllocatedServer) error {
	d, ctx := s.d, srv.Context()
	if req.GetSnapshotId() == "" {
		return toStatus(fmt.Errorf("%w: snapshot_id is required", ErrInvalid))
	}
	if err := checkWindow(req.GetStartingOffset(), req.GetMaxResults()); err != nil {
		return toStatus(err)
	}
	m, err := d.pool.getSnapshot(req.GetSnapshotId())
	if err != nil {
		return toStatus(err)
	}
	err = d.streamSnapshot(ctx, m, req.GetStartingOffset(), req.GetMaxResults(),
		(*qcow2.Image).ClusterSize,
		func(img *qcow2.Image, off, n int64) ([]snapshotter.Range, error) {
			return snapshotter.Allocated(img, m.ID, off, n)
		},
		func(typ csi.BlockMetadataType, size int64, b []*csi.BlockMetadata) error {
			return srv.Send(&csi.GetMetadataAllocatedResponse{
				BlockMetadataType:   typ,
				VolumeCapacityBytes: size,
				BlockMetadata:       b,
			})
		})
	if err != nil {
		klog.FromContext(ctx).Error(err, "GetMetadataAllocated failed", "snapshotID", m.ID)
	}
	return toStatus(err)
}

func (s snapshotMetadataServer) GetMetadataDelta(req *csi.GetMetadataDeltaRequest, srv csi.SnapshotMetadata_GetMetadataDeltaServer) error {
	d, ctx := s.d, srv.Context()
	if req.GetBaseSnapshotId() == "" || req.GetTargetSnapshotId() == "" {
		return toStatus(fmt.Errorf("%w: base_snapshot_id and target_snapshot_id are required", ErrInvalid))
	}
	if err := checkWindow(req.GetStartingOffset(), req.GetMaxResults()); err != nil {
		return toStatus(err)
	}
	m, err := d.pool.getSnapshot(req.GetTargetSnapshotId())
	if err != nil {
		return toStatus(err)
	}
	// The base may have been deleted: its ID still names its volume and
	// sequence, which is all the checkpoint chain needs.
	baseVol, baseSeq, ok := parseSnapshotID(req.GetBaseSnapshotId())
	if !ok {
		return toStatus(fmt.Errorf("snapshot %q: %w", req.GetBaseSnapshotId(), ErrNotFound))
	}
	if baseVol != m.Source {
		return toStatus(fmt.Errorf("%w: base snapshot %q is not of volume %q", ErrInvalid, req.GetBaseSnapshotId(), m.Source))
	}
	if baseSeq >= m.Seq {
		return toStatus(fmt.Errorf("%w: base snapshot %q is not older than target %q", ErrInvalid, req.GetBaseSnapshotId(), m.ID))
	}
	if b, err := d.pool.getSnapshot(req.GetBaseSnapshotId()); err == nil && b.Hidden != m.Hidden {
		return toStatus(fmt.Errorf("%w: base snapshot %q is of an earlier volume of the same ID", ErrInvalid, b.ID))
	}
	err = d.streamSnapshot(ctx, m, req.GetStartingOffset(), req.GetMaxResults(),
		deltaBlock,
		func(img *qcow2.Image, off, n int64) ([]snapshotter.Range, error) {
			return snapshotter.Delta(img, baseSeq, m.Seq, off, n)
		},
		func(typ csi.BlockMetadataType, size int64, b []*csi.BlockMetadata) error {
			return srv.Send(&csi.GetMetadataDeltaResponse{
				BlockMetadataType:   typ,
				VolumeCapacityBytes: size,
				BlockMetadata:       b,
			})
		})
	if err != nil {
		klog.FromContext(ctx).Error(err, "GetMetadataDelta failed", "snapshotID", m.ID)
	}
	return toStatus(err)
}

// snapshotMetadata reports whether the service is offered: snapshots need
// an Images with internal snapshots (SnapshotImages).
func (d *Driver) snapshotMetadata() bool {
	_, ok := d.snapshotImages()
	return ok
}
