package driver

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sort"
	"time"

	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
)

// Snapshot records live in <pool>/.snapshots/<snapshot-id>.json. A volume
// deleted while it still has snapshots is hidden: its image moves to
// <pool>/.snapshots/<volume-id>.qcow2 (out of sight of the pool's listing
// and recovery) until its last snapshot goes.
const (
	snapshotsDir       = ".snapshots"
	snapshotMetaV      = 1
	maxSnapshotIDLen   = 128
	snapshotIDSep      = "@"
	maxSnapshotNameLen = 255 // qcow2 internal snapshot names are bounded so
)

// snapshotMeta is the committed record of a CSI snapshot. Its ID is
// "<local volume-id>@<seq>" plus the volume's owner suffix (ids.go): the
// volume whose image holds it and the sequence number that names its
// checkpoint bitmap, so that an ID still resolves (for GetMetadataDelta)
// after its record is gone.
type snapshotMeta struct {
	Version int       `json:"version"`
	ID      string    `json:"id"`
	Name    string    `json:"name"`
	Source  string    `json:"sourceVolumeId"`
	Seq     uint64    `json:"seq"`
	Size    int64     `json:"sizeBytes"`
	Created time.Time `json:"created"`
	// Hidden: the source volume was deleted; its image lives in the
	// snapshots directory.
	Hidden bool `json:"hidden,omitempty"`
	// BlockMetadataType is FIXED_LENGTH or VARIABLE_LENGTH: how the
	// SnapshotMetadata service reports ranges when this snapshot is the
	// target. Empty in records written before it existed: the driver's
	// default then.
	BlockMetadataType string `json:"blockMetadataType,omitempty"`
	// Group is the ID of the group snapshot this one is a member of
	// (group.go), GroupName that group's CSI name and GroupMembers the
	// source volumes of the whole group, on every node: what a retry of
	// the create is checked against. Members have no Name of their own.
	Group        string   `json:"group,omitempty"`
	GroupName    string   `json:"groupName,omitempty"`
	GroupMembers []string `json:"groupMembers,omitempty"`
	// GroupAttempt is the create that took the member (groupPrepare.Attempt):
	// the abort of another create of the same name, whose commit failed,
	// must not delete it. Empty in records of an older release.
	GroupAttempt string `json:"groupAttempt,omitempty"`
	// Pending: a group member whose record and checkpoint a prepare wrote
	// ahead of the hold, and whose internal snapshot may not be taken yet
	// (group.go). It is no snapshot until its commit clears the flag: no
	// CSI call sees it (getSnapshot), and it is deleted with its group
	// when the group is not committed, leaving no checkpoint.
	Pending bool `json:"pending,omitempty"`
}

func (p *pool) snapDir() string               { return p.snapshots().dir }
func (p *pool) snapMetaPath(id string) string { return p.snapshots().path(id) }
func (p *pool) hiddenImagePath(vol string) string {
	return filepath.Join(p.snapDir(), p.file(vol)+imageSuffix)
}

// getSnapshot returns snapshot id as CSI sees it: a pending record (a
// group member not committed, or a crash's leftover of one) is no
// snapshot, ErrNotFound, as its ID was never answered. The group code and
// deletion read records through getRecord.
func (p *pool) getSnapshot(id string) (*snapshotMeta, error) {
	m, err := p.getRecord(id)
	if err == nil && m.Pending {
		return nil, fmt.Errorf("snapshot %q: %w (a group snapshot member not committed)", id, ErrNotFound)
	}
	return m, err
}

// getRecord returns the record of snapshot id, pending or not.
func (p *pool) getRecord(id string) (*snapshotMeta, error) {
	if _, _, ok := parseSnapshotID(id); !ok {
		return nil, fmt.Errorf("snapshot %q: %w", id, ErrNotFound)
	}
	var m snapshotMeta
	if err := p.snapshots().get(id, &m); err != nil {
		return nil, err
	}
	if m.ID != id || m.Version != snapshotMetaV {
		return nil, fmt.Errorf("snapshot %q: record %s names %q version %d", id, p.snapMetaPath(id), m.ID, m.Version)
	}
	return &m, nil
}

func (p *pool) putSnapshot(m *snapshotMeta) error {
	m.Version = snapshotMetaV
	return p.snapshots().put(m.ID, m)
}

func (p *pool) removeSnapshot(id string) error {
	return p.snapshots().remove(id)
}

// listSnapshots returns the snapshots as CSI sees them (no pending
// record: getSnapshot), sorted by ID.
func (p *pool) listSnapshots() ([]*snapshotMeta, error) {
	all, err := p.listRecords()
	return slices.DeleteFunc(all, func(m *snapshotMeta) bool { return m.Pending }), err
}

// listRecords returns every snapshot record, pending ones too, sorted by
// ID.
func (p *pool) listRecords() ([]*snapshotMeta, error) {
	ids, err := p.snapshots().names()
	if err != nil {
		return nil, err
	}
	var out []*snapshotMeta
	for _, id := range ids {
		m, err := p.getRecord(id)
		if errors.Is(err, ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// snapshotsOf returns the records of volume vol's snapshots, pending
// ones too.
func (p *pool) snapshotsOf(vol string) ([]*snapshotMeta, error) {
	all, err := p.listRecords()
	if err != nil {
		return nil, err
	}
	var out []*snapshotMeta
	for _, m := range all {
		if m.Source == vol {
			out = append(out, m)
		}
	}
	return out, nil
}

// withImage runs fn on volume vol's image: the node's open image when the
// volume is staged here (there is only ever one open of an image), the
// hidden image of a deleted volume when hidden, otherwise the closed image
// opened for the call through Images.Open. closed tells fn whether nothing
// else writes the file.
func (d *Driver) withImage(ctx context.Context, vol string, hidden bool, fn func(img *qcow2.Image, closed bool) error) error {
	return d.withImageKey(ctx, vol, hidden, nil, fn)
}

// withImageKey is withImage that opens a closed encrypted image with
// passphrase (a staged one is open with its key already), for copying its
// data (restore, clone); without one the image is opened for its metadata
// only.
func (d *Driver) withImageKey(ctx context.Context, vol string, hidden bool, passphrase []byte, fn func(img *qcow2.Image, closed bool) error) error {
	si, ok := d.snapshotImages()
	if !ok {
		return needQcow2(vol)
	}
	if !hidden {
		if v := d.lookupStaged(vol); v != nil {
			if v.image == nil {
				return fmt.Errorf("%w: volume %q lost its device at a plugin restart (%s); unstage it first", ErrPrecondition, vol, v.lostReason)
			}
			q, ok := si.Qcow2(v.image)
			if !ok {
				return needQcow2(vol)
			}
			return fn(q, false)
		}
	}
	path := d.pool.imagePath(vol)
	if hidden {
		path = d.pool.hiddenImagePath(vol)
	}
	img, err := d.images.Open(ctx, path, ImageOpenOptions{Passphrase: passphrase, MetadataOnly: passphrase == nil})
	if err != nil {
		return err
	}
	ferr := needQcow2(vol)
	if q, ok := si.Qcow2(img); ok {
		ferr = fn(q, true)
	}
	if err := img.Close(); ferr == nil && err != nil {
		ferr = err
	}
	return ferr
}

func needQcow2(vol string) error {
	return fmt.Errorf("%w: volume %q: snapshots need the qcow2 image library", ErrPrecondition, vol)
}
