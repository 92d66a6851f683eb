package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/types/known/timestamppb"
	"k8s.io/klog/v2"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"github.com/qcow2-csi/qcow2-csi/pkg/snapshotter"
)

// snapNameLock is the lock key that serialises CreateSnapshot calls of one
// name (which may name different source volumes).
func snapNameLock(name string) string { return "snapshot-name\x00" + name }

func csiSnapshot(m *snapshotMeta) *csi.Snapshot {
	return &csi.Snapshot{
		SnapshotId:      m.ID,
		SourceVolumeId:  m.Source,
		SizeBytes:       m.Size,
		CreationTime:    timestamppb.New(m.Created),
		ReadyToUse:      true,
		GroupSnapshotId: m.Group,
	}
}

func validateCreateSnapshotRequest(r *csi.CreateSnapshotRequest) error {
	if r.GetName() == "" {
		return fmt.Errorf("%w: snapshot name is required", ErrInvalid)
	}
	if len(r.GetName()) > maxSnapshotNameLen || strings.ContainsRune(r.GetName(), 0) {
		return fmt.Errorf("%w: snapshot name must be 1..%d bytes without NUL", ErrInvalid, maxSnapshotNameLen)
	}
	if r.GetSourceVolumeId() == "" {
		return fmt.Errorf("%w: source_volume_id is required", ErrInvalid)
	}
	return nil
}

func (d *Driver) CreateSnapshot(ctx context.Context, req *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	if err := validateCreateSnapshotRequest(req); err != nil {
		return nil, toStatus(err)
	}
	params, err := parseSnapshotParams(req.GetParameters(), d.opts.BlockMetadataType)
	if err != nil {
		return nil, toStatus(err)
	}
	name, vol := req.GetName(), req.GetSourceVolumeId()
	releaseName, err := d.locks.acquire(snapNameLock(name), opSnapshot)
	if err != nil {
		return nil, toStatus(err)
	}
	defer releaseName()
	all, err := d.pool.listSnapshots()
	if err != nil {
		return nil, toStatus(err)
	}
	var existing *snapshotMeta
	for _, m := range all {
		if m.Name == name {
			existing = m
		}
	}
	if existing != nil && existing.Source != vol {
		return nil, toStatus(fmt.Errorf("%w: snapshot name %q is taken by %q of volume %q", ErrAlreadyExists, name, existing.ID, existing.Source))
	}
	if existing != nil && d.blockMetadataType(existing) != blockMetadataTypes[params.BlockMetadataType] {
		return nil, toStatus(fmt.Errorf("%w: snapshot %q exists as %q with %s %s, not %s", ErrAlreadyExists, name, existing.ID,
			paramBlockMetadataType, d.blockMetadataType(existing), params.BlockMetadataType))
	}
	if checkVolumeID(vol) != nil {
		return nil, toStatus(fmt.Errorf("volume %q: %w", vol, ErrNotFound))
	}
	if err := d.ownVolume(vol); err != nil {
		return nil, toStatus(err)
	}
	release, err := d.locks.acquireWait(ctx, vol, opSnapshot)
	if err != nil {
		return nil, toStatus(err)
	}
	defer release()
	if _, err := d.pool.get(vol); err != nil {
		return nil, toStatus(err)
	}
	logger := klog.FromContext(ctx).WithValues("volumeID", vol, "name", name)
	start := time.Now()
	m, err := d.takeSnapshot(ctx, vol, existing, snapshotMeta{Name: name, Source: vol, BlockMetadataType: params.BlockMetadataType})
	if err != nil {
		return nil, toStatus(fmt.Errorf("snapshot %q of volume %q: %w", name, vol, err))
	}
	logger.Info("Snapshot created", "snapshotID", m.ID, "took", since(start))
	return &csi.CreateSnapshotResponse{Snapshot: csiSnapshot(m)}, nil
}

// takeSnapshot takes the snapshot want describes (Name, Source,
// BlockMetadataType) of want.Source, through its open image when it is
// staged, or completes existing, the record of an earlier create of the
// same name: CreateSnapshot's. A group snapshot's members take the same
// steps apart, around their hold (group.go). The caller holds the
// volume's snapshot lock.
func (d *Driver) takeSnapshot(ctx context.Context, vol string, existing *snapshotMeta, want snapshotMeta) (*snapshotMeta, error) {
	m := existing
	fresh := func(img *qcow2.Image) error {
		m = newSnapshotMeta(img, vol, want)
		return d.pool.putSnapshot(m)
	}
	err := d.withImage(ctx, vol, false, func(img *qcow2.Image, _ bool) error {
		if m == nil {
			// The record goes first: a crash after it leaves a record
			// whose retry completes the snapshot below.
			if err := fresh(img); err != nil {
				return err
			}
		}
		info, err := snapshotter.Take(img, m.ID, m.Seq)
		if errors.Is(err, snapshotter.ErrInvalid) && existing != nil {
			// The record of an interrupted create whose sequence a newer
			// snapshot overtook: its ID was never returned, so it is
			// replaced by one with a fresh sequence.
			if err := d.pool.removeSnapshot(m.ID); err != nil {
				return err
			}
			existing = nil
			if err := fresh(img); err != nil {
				return err
			}
			info, err = snapshotter.Take(img, m.ID, m.Seq)
		}
		if err != nil {
			return driverErr(err)
		}
		if int64(info.DiskSize) != m.Size {
			m.Size = int64(info.DiskSize)
			return d.pool.putSnapshot(m)
		}
		return nil
	})
	if err != nil {
		if existing == nil && m != nil {
			_ = d.pool.removeSnapshot(m.ID)
		}
		return nil, err
	}
	return m, nil
}

// newSnapshotMeta is the record of a new snapshot of volume vol (open as
// img) that want describes, with a fresh sequence number.
func newSnapshotMeta(img *qcow2.Image, vol string, want snapshotMeta) *snapshotMeta {
	seq := snapshotter.NextSeq(img, uint64(time.Now().UnixNano()))
	m := want
	m.ID, m.Seq, m.Created, m.Size = snapshotID(vol, seq), seq, time.Now().UTC(), img.Size()
	return &m
}

func (d *Driver) DeleteSnapshot(ctx context.Context, req *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	id := req.GetSnapshotId()
	if id == "" {
		return nil, toStatus(fmt.Errorf("%w: snapshot_id is required", ErrInvalid))
	}
	ref, ok := parseSnapshotRef(id)
	if !ok {
		// Not an ID this driver issued: nothing to delete.
		return &csi.DeleteSnapshotResponse{}, nil
	}
	if err := d.checkOwner("snapshot", id, ref.Owner); err != nil {
		return nil, toStatus(err)
	}
	release, err := d.locks.acquireWait(ctx, ref.Volume, opSnapshot)
	if err != nil {
		return nil, toStatus(err)
	}
	defer release()
	if err := d.deleteSnapshot(ctx, id, ref); err != nil {
		return nil, toStatus(err)
	}
	return &csi.DeleteSnapshotResponse{}, nil
}

// deleteSnapshot deletes snapshot id (parsed: ref) of this node, and the
// image of a deleted volume with its last snapshot; an unknown one is
// gone already. A pending record (a group member a crash left before its
// commit completed it) is abandoned: its checkpoint, never answered, goes
// even as the image's only one, which Delete would keep. The caller holds
// the volume's snapshot lock.
func (d *Driver) deleteSnapshot(ctx context.Context, id string, ref snapshotRef) error {
	vol, seq := ref.Volume, ref.Seq
	m, err := d.pool.getRecord(id)
	if errors.Is(err, ErrNotFound) {
		return nil
	} else if err != nil {
		return err
	}
	drop := snapshotter.Delete
	if m.Pending {
		drop = snapshotter.Abandon
	}
	err = d.withImage(ctx, vol, m.Hidden, func(img *qcow2.Image, _ bool) error {
		return driverErr(drop(img, id, seq))
	})
	if err != nil && !(m.Hidden && errors.Is(err, ErrNotFound)) {
		return fmt.Errorf("snapshot %q: %w", id, err)
	}
	if err := d.pool.removeSnapshot(id); err != nil {
		return err
	}
	if m.Hidden {
		// The image of a deleted volume goes with its last snapshot.
		left, err := d.pool.snapshotsOf(vol)
		if err != nil {
			return err
		}
		if !anyHidden(left) {
			base := baseOf(d.pool.hiddenImagePath(vol))
			if err := os.Remove(d.pool.hiddenImagePath(vol)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
			if err := d.releaseImageBase(base, vol); err != nil {
				return err
			}
			klog.FromContext(ctx).Info("Image of a deleted volume removed with its last snapshot", "volumeID", vol, "base", base)
		}
	} else if vm, err := d.pool.get(vol); err == nil && vm.Flatten != nil {
		// A flatten waiting for the volume's snapshots to let go of its
		// base tries again.
		d.startFlatten(vol)
	}
	klog.FromContext(ctx).Info("Snapshot deleted", "snapshotID", id, "pending", m.Pending)
	return nil
}

func anyHidden(ms []*snapshotMeta) bool {
	for _, m := range ms {
		if m.Hidden {
			return true
		}
	}
	return false
}

// snapListToken prefixes ListSnapshots' next_token, which names the first
// snapshot ID of the next page (IDs are listed sorted).
const snapListToken = "snap:"

func (d *Driver) ListSnapshots(ctx context.Context, req *csi.ListSnapshotsRequest) (*csi.ListSnapshotsResponse, error) {
	if req.GetMaxEntries() < 0 {
		return nil, toStatus(fmt.Errorf("%w: max_entries %d is negative", ErrInvalid, req.GetMaxEntries()))
	}
	from := ""
	if t := req.GetStartingToken(); t != "" {
		from = strings.TrimPrefix(t, snapListToken)
		if _, _, ok := parseSnapshotID(from); !strings.HasPrefix(t, snapListToken) || !ok {
			return nil, toStatus(fmt.Errorf("%w: starting_token %q was not issued by this driver", ErrBadToken, t))
		}
	}
	var ms []*snapshotMeta
	if id := req.GetSnapshotId(); id != "" {
		m, err := d.pool.getSnapshot(id)
		if errors.Is(err, ErrNotFound) {
			return &csi.ListSnapshotsResponse{}, nil
		} else if err != nil {
			return nil, toStatus(err)
		}
		ms = []*snapshotMeta{m}
	} else {
		all, err := d.pool.listSnapshots()
		if err != nil {
			return nil, toStatus(err)
		}
		ms = all
	}
	if v := req.GetSourceVolumeId(); v != "" {
		var f []*snapshotMeta
		for _, m := range ms {
			if m.Source == v && !m.Hidden {
				f = append(f, m)
			}
		}
		ms = f
	}
	i := sort.Search(len(ms), func(i int) bool { return ms[i].ID >= from })
	ms = ms[i:]
	resp := &csi.ListSnapshotsResponse{}
	if n := int(req.GetMaxEntries()); n > 0 && len(ms) > n {
		resp.NextToken = snapListToken + ms[n].ID
		ms = ms[:n]
	}
	for _, m := range ms {
		resp.Entries = append(resp.Entries, &csi.ListSnapshotsResponse_Entry{Snapshot: csiSnapshot(m)})
	}
	return resp, nil
}

// hideVolume is DeleteVolume of a volume with snapshots left: the active
// layer is discarded, the image moves out of the pool's sight and the
// records are marked, so the volume is gone while its snapshots stay.
// The caller holds the volume's delete lock.
func (d *Driver) hideVolume(ctx context.Context, vol string, snaps []*snapshotMeta) error {
	if _, err := os.Stat(d.pool.hiddenImagePath(vol)); err == nil {
		return fmt.Errorf("%w: volume %q: an earlier volume of this ID still has snapshots; delete them first", ErrInUse, vol)
	}
	if baseOf(d.pool.imagePath(vol)) != "" {
		// The image's backing file name must resolve from .snapshots.
		if err := d.pool.linkSnapshotBases(); err != nil {
			return err
		}
	}
	d.flattens.stop(vol)
	err := d.withImage(ctx, vol, false, func(img *qcow2.Image, _ bool) error {
		return img.Discard(0, img.Size())
	})
	if err != nil {
		return fmt.Errorf("volume %q: discard active layer: %w", vol, err)
	}
	for _, m := range snaps {
		m.Hidden = true
		if err := d.pool.putSnapshot(m); err != nil {
			return err
		}
	}
	if err := os.Rename(d.pool.imagePath(vol), d.pool.hiddenImagePath(vol)); err != nil {
		return err
	}
	if err := syncDir(d.pool.snapDir()); err != nil {
		return err
	}
	if err := os.Remove(d.pool.metaPath(vol)); err != nil {
		return err
	}
	klog.FromContext(ctx).Info("Volume deleted; its image stays for its snapshots", "volumeID", vol, "snapshots", len(snaps))
	return syncDir(d.pool.dir)
}

// restoreSource makes the image tmp of new volume id from a content
// source: a snapshot or another volume, by the volume's clone mode. size is
// the requested size (0: the source's). It returns the size made and, for
// an overlay, the base it reads, whose reference the caller drops
// (releaseImageBase) if the volume is not committed after all.
//
// An encrypted source (passphrase set) is restored by reflink or copy
// whatever the clone mode: bases are not encrypted (docs/backup.md).
func (d *Driver) restoreSource(ctx context.Context, src *csi.VolumeContentSource, id, tmp string, size int64, params volumeParams, passphrase []byte) (int64, string, error) {
	var vol, snapName string
	hidden := false
	switch {
	case src.GetSnapshot() != nil:
		sid := src.GetSnapshot().GetSnapshotId()
		if ref, ok := parseSnapshotRef(sid); ok {
			if err := d.checkOwner("source snapshot", sid, ref.Owner); err != nil {
				return 0, "", err
			}
		}
		m, err := d.pool.getSnapshot(sid)
		if err != nil {
			return 0, "", err
		}
		vol, snapName, hidden = m.Source, m.ID, m.Hidden
	case src.GetVolume() != nil:
		vol = src.GetVolume().GetVolumeId()
		if checkVolumeID(vol) != nil {
			return 0, "", fmt.Errorf("source volume %q: %w", vol, ErrNotFound)
		}
		if err := d.ownVolume(vol); err != nil {
			return 0, "", err
		}
		if _, err := d.pool.get(vol); err != nil {
			return 0, "", err
		}
	default:
		return 0, "", fmt.Errorf("%w: unknown volume content source", ErrInvalid)
	}
	release, err := d.locks.acquireWait(ctx, vol, opSnapshot)
	if err != nil {
		return 0, "", toStatus(err)
	}
	defer release()
	logger := klog.FromContext(ctx).WithValues("sourceVolumeID", vol, "snapshot", snapName, "cloneMode", params.cloneMode())
	var got int64
	srcSize := func(img *qcow2.Image) (int64, error) {
		n := img.Size()
		if snapName != "" {
			s, err := snapshotter.Size(img, snapName)
			if err != nil {
				return 0, driverErr(err)
			}
			n = s
		}
		if size != 0 && size < n {
			return 0, fmt.Errorf("%w: source has %d bytes, the request allows %d", ErrOutOfRange, n, size)
		}
		got = max(size, n)
		return n, nil
	}
	overlay := params.cloneMode() == cloneOverlay && passphrase == nil
	if overlay {
		// Bases are never encrypted: an encrypted source is copied under
		// its key below, which refuses a class without one (encryption.go).
		if err := d.withImageKey(ctx, vol, hidden, nil, func(img *qcow2.Image, _ bool) error {
			overlay = !img.Encrypted()
			return nil
		}); err != nil {
			return 0, "", err
		}
	}
	if overlay {
		base := volBasePrefix + d.pool.file(id)
		if snapName != "" {
			// Named by the snapshot's volume file and sequence: unique in
			// the pool, legacy IDs included.
			ref, _ := parseSnapshotRef(snapName)
			base = snapBasePrefix + d.pool.file(ref.Volume) + snapshotIDSep + strconv.FormatUint(ref.Seq, 10)
		}
		if err := d.makeBase(ctx, id, base, vol, snapName, hidden, size, params, srcSize); err != nil {
			return 0, "", err
		}
		if err := snapshotter.Overlay(d.pool.basePath(base), tmp, snapshotter.OverlayOptions{Size: size, ClusterSize: params.ClusterSize}); err != nil {
			_ = d.releaseImageBase(base, id)
			return 0, "", driverErr(err)
		}
		n, err := imageSize(tmp)
		if err != nil {
			_ = os.Remove(tmp)
			_ = d.releaseImageBase(base, id)
			return 0, "", err
		}
		got = n
		logger.Info("Volume content restored", "method", cloneOverlay, "base", base)
		return got, base, nil
	}
	err = d.withImageKey(ctx, vol, hidden, passphrase, func(img *qcow2.Image, closed bool) error {
		if img.Encrypted() != (passphrase != nil) {
			return encryptionMismatch(img.Encrypted(), passphrase != nil)
		}
		if _, err := srcSize(img); err != nil {
			return err
		}
		// A staged source is copied through the node's open image from a
		// temporary internal snapshot (see snapshotter.Restore); the
		// volume lock keeps other snapshot operations out meanwhile.
		m, err := snapshotter.Restore(img, snapName, tmp, snapshotter.RestoreOptions{
			Size: size, SourceClosed: closed, ClusterSize: params.ClusterSize, NoReflink: params.cloneMode() == cloneCopy})
		if err != nil {
			return driverErr(err)
		}
		logger.Info("Volume content restored", "method", m)
		return nil
	})
	return got, "", err
}

// makeBase makes sure base exists, frozen from snapshot snapName of volume
// vol ("": its current disk), checks that it fits in size (0: any), and
// records new volume id's reference to it (bases.go says in which order,
// and why). The caller holds vol's snapshot lock.
func (d *Driver) makeBase(ctx context.Context, id, base, vol, snapName string, hidden bool, size int64, params volumeParams, srcSize func(*qcow2.Image) (int64, error)) error {
	unlock := d.bases.lock(base)
	defer unlock()
	path := d.pool.basePath(base)
	_, err := os.Stat(path)
	switch {
	case err == nil:
		// Made by an earlier clone: constant time from here on.
	case errors.Is(err, os.ErrNotExist):
		if err := os.MkdirAll(d.pool.baseDir(), poolDirMode); err != nil {
			return err
		}
		tmp := d.pool.baseTemp(base)
		_ = os.Remove(tmp)
		start := time.Now()
		var method snapshotter.Method
		var depth int
		err := d.withImage(ctx, vol, hidden, func(img *qcow2.Image, closed bool) error {
			if _, err := srcSize(img); err != nil {
				return err
			}
			var err error
			method, depth, err = snapshotter.Freeze(img, snapName, tmp, params.maxChainDepth(), snapshotter.RestoreOptions{SourceClosed: closed})
			return driverErr(err)
		})
		if err == nil && depth > 0 {
			// A chain: this base is a user of the one it reads.
			err = d.pool.addRef(baseOf(tmp), refBase+base)
		}
		if err == nil {
			err = os.Rename(tmp, path)
		}
		if err == nil {
			err = syncDir(d.pool.baseDir())
		}
		if err != nil {
			_ = os.Remove(tmp)
			return fmt.Errorf("base %q: %w", base, err)
		}
		klog.FromContext(ctx).Info("Clone base made", "base", base, "sourceVolumeID", vol, "snapshot", snapName, "method", method, "chainDepth", depth, "took", since(start))
	default:
		return err
	}
	n, err := imageSize(path)
	if err != nil {
		return fmt.Errorf("base %q: %w", base, err)
	}
	if size != 0 && size < n {
		return fmt.Errorf("%w: source has %d bytes, the request allows %d", ErrOutOfRange, n, size)
	}
	// The reference goes before the overlay exists (bases.go).
	return d.pool.addRef(base, d.pool.volRef(id))
}

// imageSize is the virtual size of the image at path, read without its
// locks or chain.
func imageSize(path string) (int64, error) {
	img, err := qcow2.Open(path, qcow2.OpenOptions{ReadOnly: true, NoLock: true, NoBacking: true})
	if err != nil {
		return 0, imageErr(path, err)
	}
	defer img.Close()
	return img.Size(), nil
}

// liveSnapshots are the records of the volume now in the pool (not of an
// earlier, deleted volume of the same ID whose image is hidden).
func liveSnapshots(ms []*snapshotMeta) []*snapshotMeta {
	var out []*snapshotMeta
	for _, m := range ms {
		if !m.Hidden {
			out = append(out, m)
		}
	}
	return out
}

func (d *Driver) GetSnapshot(ctx context.Context, req *csi.GetSnapshotRequest) (*csi.GetSnapshotResponse, error) {
	if req.GetSnapshotId() == "" {
		return nil, toStatus(fmt.Errorf("%w: snapshot_id is required", ErrInvalid))
	}
	m, err := d.pool.getSnapshot(req.GetSnapshotId())
	if err != nil {
		return nil, toStatus(err)
	}
	return &csi.GetSnapshotResponse{Snapshot: csiSnapshot(m)}, nil
}
