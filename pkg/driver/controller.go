package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/types/known/wrapperspb"
	"k8s.io/klog/v2"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/throttle"
)

// minFreeForThin is the headroom a thin (preallocation=off) image needs: its
// header, L1 and refcount tables. A pool with less than this free is full
// (space.go).
const minFreeForThin = 4 << 20

func (d *Driver) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	_, snapshots := d.snapshotImages()
	return controllerCapabilities(snapshots, d.opts.ControllerExpand && d.canGrow(), d.opts.EnableGetSnapshot), nil
}

// controllerCapabilities is the controller capability list, of a node's
// driver and of the router alike. MODIFY_VOLUME for I/O limits (qos.go)
// unless the plugin is built without throttling, and for flatten
// (flatten.go) with snapshots.
func controllerCapabilities(snapshots, expand, getSnapshot bool) *csi.ControllerGetCapabilitiesResponse {
	rpcs := []csi.ControllerServiceCapability_RPC_Type{
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csi.ControllerServiceCapability_RPC_GET_CAPACITY,
		csi.ControllerServiceCapability_RPC_LIST_VOLUMES,
		csi.ControllerServiceCapability_RPC_GET_VOLUME,
		csi.ControllerServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
		csi.ControllerServiceCapability_RPC_VOLUME_CONDITION,
	}
	if throttle.Enabled || snapshots {
		rpcs = append(rpcs, csi.ControllerServiceCapability_RPC_MODIFY_VOLUME)
	}
	if snapshots {
		rpcs = append(rpcs, csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT,
			csi.ControllerServiceCapability_RPC_LIST_SNAPSHOTS,
			csi.ControllerServiceCapability_RPC_CLONE_VOLUME)
		if getSnapshot {
			rpcs = append(rpcs, csi.ControllerServiceCapability_RPC_GET_SNAPSHOT)
		}
	}
	if expand {
		rpcs = append(rpcs, csi.ControllerServiceCapability_RPC_EXPAND_VOLUME)
	}
	caps := make([]*csi.ControllerServiceCapability, 0, len(rpcs))
	for _, c := range rpcs {
		caps = append(caps, &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{
			Rpc: &csi.ControllerServiceCapability_RPC{Type: c}}})
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: caps}
}

// topology is where this node's volumes are accessible: this node only.
func (d *Driver) topology() *csi.Topology {
	return &csi.Topology{Segments: map[string]string{d.opts.TopologyKey(): d.opts.NodeID}}
}

// reachable reports whether an accessibility requirement admits this node.
// Requisite topologies, when given, must include it; preferred ones are only
// preferences.
func (d *Driver) reachable(req *csi.TopologyRequirement) bool {
	if len(req.GetRequisite()) == 0 {
		return true
	}
	for _, t := range req.GetRequisite() {
		if d.matches(t) {
			return true
		}
	}
	return false
}

// matches reports whether a topology names this node (segments of other keys
// are not ours to judge and are ignored).
func (d *Driver) matches(t *csi.Topology) bool {
	v, ok := t.GetSegments()[d.opts.TopologyKey()]
	return !ok || v == d.opts.NodeID
}

func (d *Driver) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	if err := validateCreateVolumeRequest(req); err != nil {
		return nil, toStatus(err)
	}
	params, err := parseParams(req.GetParameters())
	if err != nil {
		return nil, toStatus(err)
	}
	size, err := volumeSize(req.GetCapacityRange(), d.opts.DefaultVolumeSize, params)
	if err != nil {
		return nil, toStatus(err)
	}
	if !d.reachable(req.GetAccessibilityRequirements()) {
		return nil, toStatus(fmt.Errorf("%w: node %s is not in the requisite topology: this driver provisions on the node that runs it (topology key %s)",
			ErrNoSpace, d.opts.NodeID, d.opts.TopologyKey()))
	}
	if fs := mountFSType(req.GetVolumeCapabilities()); fs != "" {
		if params.FSType != "" && params.FSType != fs {
			return nil, toStatus(fmt.Errorf("%w: parameter %s=%s contradicts the capability's fs_type %s", ErrInvalid, paramFSType, params.FSType, fs))
		}
		params.FSType = fs
	}

	local := volumeIDForName(req.GetName())
	id := qualifiedVolumeID(local, d.opts.NodeID)
	var pass []byte
	if params.Encrypted {
		if pass, err = passphraseFrom(req.GetSecrets(), id, "provisioner"); err != nil {
			return nil, toStatus(err)
		}
		defer clear(pass)
	}
	release, err := d.locks.acquire(id, opCreate)
	if err != nil {
		return nil, toStatus(err)
	}
	defer release()
	logger := klog.FromContext(ctx).WithValues("volumeID", id)

	// By file, not by ID: a retry of a create that a driver issuing
	// legacy IDs began finds that volume under its legacy ID.
	if m, err := d.pool.getFile(local); err == nil {
		if err := compatible(m, req.GetName(), req.GetCapacityRange(), params); err != nil {
			return nil, toStatus(err)
		}
		logger.V(2).Info("Volume exists", "name", req.GetName())
		return &csi.CreateVolumeResponse{Volume: d.csiVolume(m)}, nil
	} else if !errors.Is(err, ErrNotFound) {
		return nil, toStatus(err)
	}

	releaseSpace, err := d.claimSpace(d.createClaim(id, size, req.GetCapacityRange() != nil, params, req.GetVolumeContentSource()))
	if err != nil {
		return nil, toStatus(err)
	}
	defer releaseSpace() // after the record is written: then the volume counts itself
	// Build the image under a temporary name and rename it into place, so
	// that an interrupted create leaves only a temporary file (removed on
	// start) and never a half-made image under a volume's name.
	tmp := d.pool.tempPath(id, imageSuffix)
	_ = os.Remove(tmp)
	start := time.Now()
	base := "" // the clone base an overlay reads (bases.go)
	undo := func() {
		if base != "" {
			if err := d.releaseImageBase(base, id); err != nil {
				logger.Error(err, "Clone base reference left for the next start's recovery", "base", base)
			}
		}
	}
	if src := req.GetVolumeContentSource(); src != nil {
		// Restore or clone (snapshots.go); without a capacity range the
		// volume takes the source's size.
		want := size
		if req.GetCapacityRange() == nil {
			want = 0
		}
		got, b, err := d.restoreSource(ctx, src, id, tmp, want, params, pass)
		if err != nil {
			_ = os.Remove(tmp)
			return nil, toStatus(fmt.Errorf("volume %q: from content source: %w", id, err))
		}
		base = b
		if err := d.checkRestoredEncryption(ctx, tmp, id, params.Encrypted, pass); err != nil {
			_ = os.Remove(tmp)
			undo()
			return nil, toStatus(err)
		}
		if l := req.GetCapacityRange().GetLimitBytes(); l > 0 && got > l {
			_ = os.Remove(tmp)
			undo()
			return nil, toStatus(fmt.Errorf("%w: volume %q: the source needs %d bytes, limit_bytes is %d", ErrOutOfRange, id, got, l))
		}
		size = got
	} else if err := d.images.Create(ctx, tmp, size, ImageCreateOptions{
		ClusterSize:   params.ClusterSize,
		Preallocation: params.Preallocation,
		LazyRefcounts: params.LazyRefcounts,
		ExtendedL2:    params.extendedL2(),
		Passphrase:    pass,
	}); err != nil {
		_ = os.Remove(tmp)
		return nil, toStatus(fmt.Errorf("volume %q: create image: %w", id, err))
	}
	if err := os.Rename(tmp, d.pool.imagePath(id)); err != nil {
		_ = os.Remove(tmp)
		undo()
		return nil, toStatus(err)
	}
	m := &volumeMeta{ID: id, Name: req.GetName(), Capacity: size, Params: params, Created: time.Now().UTC()}
	// Validated whole with the request. A repeated CreateVolume does not
	// compare them: they are mutable, and ControllerModifyVolume changes them.
	rest, _, _ := takeFlatten(req.GetMutableParameters())
	limits, _ := parseLimits(rest)
	m.setLimits(limits)
	// A clone asked to stand alone: by its StorageClass, or by the
	// VolumeAttributesClass its claim names (validated with the request).
	_, vacFlatten, _ := takeFlatten(req.GetMutableParameters())
	if base != "" && (params.Flatten || vacFlatten) {
		m.Flatten = &flattenState{}
	}
	if err := d.pool.put(m); err != nil {
		_ = os.Remove(d.pool.imagePath(id))
		undo()
		return nil, toStatus(fmt.Errorf("volume %q: write metadata: %w", id, err))
	}
	if m.Flatten != nil {
		d.startFlatten(id)
	}
	logger.Info("Volume created", "name", req.GetName(), "capacity", size, "params", params, "limits", formatLimits(limits), "took", since(start))
	v := d.csiVolume(m)
	v.ContentSource = req.GetVolumeContentSource()
	return &csi.CreateVolumeResponse{Volume: v}, nil
}

// compatible decides whether an existing volume satisfies a repeated
// CreateVolume: same name, a size within the requested range, and the same
// parameters.
func compatible(m *volumeMeta, name string, cr *csi.CapacityRange, p volumeParams) error {
	if m.Name != name {
		// Two names hashing to one ID: never silently share a volume.
		return fmt.Errorf("%w: volume %q belongs to name %q, not %q", ErrAlreadyExists, m.ID, m.Name, name)
	}
	if m.Capacity < cr.GetRequiredBytes() || (cr.GetLimitBytes() > 0 && m.Capacity > cr.GetLimitBytes()) {
		return fmt.Errorf("%w: volume %q (name %q) has %d bytes, the request asks for [%d, %d]",
			ErrAlreadyExists, m.ID, name, m.Capacity, cr.GetRequiredBytes(), cr.GetLimitBytes())
	}
	if m.Params != p {
		return fmt.Errorf("%w: volume %q (name %q) was created with parameters %+v, the request has %+v",
			ErrAlreadyExists, m.ID, name, m.Params, p)
	}
	return nil
}

func mountFSType(cs []*csi.VolumeCapability) string {
	for _, c := range cs {
		if fs := c.GetMount().GetFsType(); fs != "" {
			return fs
		}
	}
	return ""
}

func (d *Driver) csiVolume(m *volumeMeta) *csi.Volume {
	vc := map[string]string{}
	if m.Params.FSType != "" {
		vc[ctxFSType] = m.Params.FSType
	}
	if m.Params.MkfsOptions != "" {
		vc[ctxMkfsOptions] = m.Params.MkfsOptions
	}
	return &csi.Volume{
		VolumeId:           m.ID,
		CapacityBytes:      m.Capacity,
		VolumeContext:      vc,
		AccessibleTopology: []*csi.Topology{d.topology()},
	}
}

func (d *Driver) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	if err := validateDeleteVolumeRequest(req); err != nil {
		return nil, toStatus(err)
	}
	if err := d.ownVolume(req.GetVolumeId()); err != nil {
		return nil, toStatus(err)
	}
	id := req.GetVolumeId()
	release, err := d.locks.acquire(id, opDelete)
	if err != nil {
		return nil, toStatus(err)
	}
	defer release()
	base := baseOf(d.pool.imagePath(id)) // read before the image goes
	if _, err := d.pool.get(id); errors.Is(err, ErrNotFound) {
		// Deleting what does not exist succeeds: the CO may retry a delete
		// whose answer it lost. Remove a stray image all the same.
		if err := d.pool.remove(id); err != nil {
			return nil, toStatus(err)
		}
		if err := d.releaseImageBase(base, id); err != nil {
			return nil, toStatus(err)
		}
		return &csi.DeleteVolumeResponse{}, nil
	} else if err != nil {
		return nil, toStatus(err)
	}
	if d.isStaged(id) {
		return nil, toStatus(fmt.Errorf("%w: volume %q is staged on node %s; unstage it first", ErrInUse, id, d.opts.NodeID))
	}
	// Not staged: a key a crashed stage or unstage left goes now.
	if m, err := d.pool.get(id); err == nil && m.Params.Encrypted {
		d.forgetKey(ctx, id)
	}
	// A probe open takes the image's locks: if another process (an operator's
	// qemu-img, a node plugin in a separate process) holds the image, the
	// delete is refused instead of pulling the file from under it.
	// An image that does not open for another reason (corrupt, not qcow2)
	// is deleted all the same: that is what its owner asks for.
	img, err := d.images.Open(ctx, d.pool.imagePath(id), ImageOpenOptions{MetadataOnly: true})
	switch {
	case err == nil:
		_ = img.Close()
	case errors.Is(err, ErrInUse):
		return nil, toStatus(fmt.Errorf("volume %q: %w", id, err))
	default:
		klog.FromContext(ctx).Info("Deleting a volume whose image does not open", "volumeID", id, "err", err)
	}
	if snaps, err := d.pool.snapshotsOf(id); err != nil {
		return nil, toStatus(err)
	} else if snaps, err = d.dropPendingLeftovers(ctx, snaps); err != nil {
		return nil, toStatus(fmt.Errorf("volume %q: %w", id, err))
	} else if live := liveSnapshots(snaps); len(live) > 0 {
		// Snapshots outlive their volume (snapshots.go).
		if err := d.hideVolume(ctx, id, live); err != nil {
			return nil, toStatus(err)
		}
		return &csi.DeleteVolumeResponse{}, nil
	}
	d.flattens.stop(id)
	if err := d.pool.remove(id); err != nil {
		return nil, toStatus(err)
	}
	if err := d.releaseImageBase(base, id); err != nil {
		return nil, toStatus(err)
	}
	klog.FromContext(ctx).Info("Volume deleted", "volumeID", id, "base", base)
	return &csi.DeleteVolumeResponse{}, nil
}

// dropPendingLeftovers deletes the pending records among snaps that no
// group snapshot on the node is preparing or committing (a crash's
// leftovers: once their volume is gone nothing else would delete them,
// and they would keep its image) and returns the others. The caller holds
// the volume's delete lock, which excludes its snapshot operations.
func (d *Driver) dropPendingLeftovers(ctx context.Context, snaps []*snapshotMeta) ([]*snapshotMeta, error) {
	var keep []*snapshotMeta
	for _, m := range snaps {
		ref, ok := parseSnapshotRef(m.ID)
		if !m.Pending || !ok || d.groups.get(m.Group) != nil {
			keep = append(keep, m)
			continue
		}
		klog.FromContext(ctx).Info("Deleting a group snapshot member a crash left pending", "snapshotID", m.ID, "groupSnapshotID", m.Group)
		if err := d.deleteSnapshot(ctx, m.ID, ref); err != nil {
			return nil, err
		}
	}
	return keep, nil
}

func (d *Driver) ControllerGetVolume(ctx context.Context, req *csi.ControllerGetVolumeRequest) (*csi.ControllerGetVolumeResponse, error) {
	if err := validateControllerGetVolumeRequest(req); err != nil {
		return nil, toStatus(err)
	}
	if err := d.ownVolume(req.GetVolumeId()); err != nil {
		return nil, toStatus(err)
	}
	release, err := d.locks.acquire(req.GetVolumeId(), opRead)
	if err != nil {
		return nil, toStatus(err)
	}
	defer release()
	m, err := d.pool.get(req.GetVolumeId())
	if err != nil {
		return nil, toStatus(err)
	}
	return &csi.ControllerGetVolumeResponse{
		Volume: d.csiVolume(m),
		Status: &csi.ControllerGetVolumeResponse_VolumeStatus{VolumeCondition: d.condition(m.ID)},
	}, nil
}

// condition reports whether a volume's image is there and its pool has
// room, for ControllerGetVolume.
func (d *Driver) condition(id string) *csi.VolumeCondition {
	if _, err := os.Stat(d.pool.imagePath(id)); err != nil {
		return &csi.VolumeCondition{Abnormal: true, Message: fmt.Sprintf("image: %v", err)}
	}
	return d.withSpaceCondition(&csi.VolumeCondition{Message: "image present"})
}

func (d *Driver) ValidateVolumeCapabilities(ctx context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	if err := validateValidateVolumeCapabilitiesRequest(req); err != nil {
		return nil, toStatus(err)
	}
	if err := d.ownVolume(req.GetVolumeId()); err != nil {
		return nil, toStatus(err)
	}
	release, err := d.locks.acquire(req.GetVolumeId(), opRead)
	if err != nil {
		return nil, toStatus(err)
	}
	defer release()
	m, err := d.pool.get(req.GetVolumeId())
	if err != nil {
		return nil, toStatus(err)
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	if fs := mountFSType(req.GetVolumeCapabilities()); fs != "" && m.Params.FSType != "" && fs != m.Params.FSType {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: fmt.Sprintf("volume %q is formatted %s, not %s", m.ID, m.Params.FSType, fs)}, nil
	}
	if _, err := parseParams(req.GetParameters()); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext:      req.GetVolumeContext(),
		VolumeCapabilities: req.GetVolumeCapabilities(),
		Parameters:         req.GetParameters(),
	}}, nil
}

// listToken is the prefix of ListVolumes' next_token: the token names the
// first volume ID of the next page, so pages stay correct when volumes are
// created or deleted between calls (IDs are listed in sorted order).
const listToken = "next:"

func (d *Driver) ListVolumes(ctx context.Context, req *csi.ListVolumesRequest) (*csi.ListVolumesResponse, error) {
	if err := validateListVolumesRequest(req); err != nil {
		return nil, toStatus(err)
	}
	from := ""
	if t := req.GetStartingToken(); t != "" {
		from = strings.TrimPrefix(t, listToken)
		if !strings.HasPrefix(t, listToken) || checkVolumeID(from) != nil {
			return nil, toStatus(fmt.Errorf("%w: starting_token %q was not issued by this driver", ErrBadToken, t))
		}
	}
	ids, err := d.pool.list()
	if err != nil {
		return nil, toStatus(err)
	}
	i := sort.SearchStrings(ids, from)
	ids = ids[i:]
	var next string
	if n := int(req.GetMaxEntries()); n > 0 && len(ids) > n {
		next = listToken + ids[n]
		ids = ids[:n]
	}
	resp := &csi.ListVolumesResponse{NextToken: next}
	for _, id := range ids {
		m, err := d.pool.getFile(id)
		if errors.Is(err, ErrNotFound) {
			continue // deleted since listed
		}
		if err != nil {
			return nil, toStatus(err)
		}
		resp.Entries = append(resp.Entries, &csi.ListVolumesResponse_Entry{
			Volume: d.csiVolume(m),
			Status: &csi.ListVolumesResponse_VolumeStatus{VolumeCondition: d.condition(m.ID)},
		})
	}
	return resp, nil
}

func (d *Driver) GetCapacity(ctx context.Context, req *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error) {
	for _, c := range req.GetVolumeCapabilities() {
		if err := checkCapability(c); err != nil {
			// A capability the driver cannot give has no capacity.
			return &csi.GetCapacityResponse{}, nil
		}
	}
	params, err := parseParams(req.GetParameters())
	if err != nil {
		return nil, toStatus(err)
	}
	if t := req.GetAccessibleTopology(); t != nil && !d.matches(t) {
		return &csi.GetCapacityResponse{}, nil
	}
	avail, err := d.capacityFor(params)
	if err != nil {
		return nil, toStatus(err)
	}
	return &csi.GetCapacityResponse{
		AvailableCapacity: avail,
		MaximumVolumeSize: wrapperspb.Int64(maxVirtualSize(DefaultClusterSize, false)),
	}, nil
}

func (d *Driver) ControllerExpandVolume(ctx context.Context, req *csi.ControllerExpandVolumeRequest) (*csi.ControllerExpandVolumeResponse, error) {
	if err := validateControllerExpandVolumeRequest(req); err != nil {
		return nil, toStatus(err)
	}
	if err := d.ownVolume(req.GetVolumeId()); err != nil {
		return nil, toStatus(err)
	}
	id := req.GetVolumeId()
	release, err := d.locks.acquire(id, opExpand)
	if err != nil {
		return nil, toStatus(err)
	}
	defer release()
	m, err := d.pool.get(id)
	if err != nil {
		return nil, toStatus(err)
	}
	block := isBlock(req.GetVolumeCapability())
	size, err := expandedSize(m, req.GetCapacityRange())
	if err != nil {
		return nil, toStatus(err)
	}
	logger := klog.FromContext(ctx).WithValues("volumeID", id)
	releaseSpace, err := d.claimGrowth(m, size)
	if err != nil {
		return nil, toStatus(err)
	}
	defer releaseSpace()

	// Staged here: grow the open image and its device online (there is only
	// ever one open of an image). Otherwise grow the closed image.
	grown, err := d.growStaged(ctx, id, size)
	if err != nil {
		return nil, toStatus(err)
	}
	if !grown {
		err := d.images.Resize(ctx, d.pool.imagePath(id), size)
		if errors.Is(err, ErrInUse) {
			// Opened by a node plugin in another process: leave the whole
			// growth to its NodeExpandVolume.
			m.Capacity = size
			if err := d.pool.put(m); err != nil {
				return nil, toStatus(err)
			}
			logger.Info("Image in use by another process: expansion left to NodeExpandVolume", "capacity", size)
			return &csi.ControllerExpandVolumeResponse{CapacityBytes: size, NodeExpansionRequired: true}, nil
		}
		if err != nil {
			return nil, toStatus(fmt.Errorf("volume %q: resize image: %w", id, err))
		}
	}
	if m.Capacity != size {
		m.Capacity = size
		if err := d.pool.put(m); err != nil {
			return nil, toStatus(err)
		}
	}
	logger.Info("Volume expanded by the controller", "capacity", size, "online", grown)
	// A filesystem must still be grown on the node; a block volume is done.
	return &csi.ControllerExpandVolumeResponse{CapacityBytes: size, NodeExpansionRequired: !block}, nil
}

// expandedSize is the size a volume grows to: the requested bytes rounded up
// to its cluster size, never less than it has (shrinking is refused).
func expandedSize(m *volumeMeta, cr *csi.CapacityRange) (int64, error) {
	req, lim := cr.GetRequiredBytes(), cr.GetLimitBytes()
	if req < 0 || lim < 0 || (lim > 0 && req > lim) {
		return 0, fmt.Errorf("%w: capacity_range required_bytes %d / limit_bytes %d is inconsistent", ErrInvalid, req, lim)
	}
	if req <= m.Capacity {
		if lim > 0 && m.Capacity > lim {
			return 0, fmt.Errorf("%w: volume %q has %d bytes, above limit_bytes %d; shrinking is not supported", ErrOutOfRange, m.ID, m.Capacity, lim)
		}
		return m.Capacity, nil
	}
	cs := m.Params.ClusterSize
	if max := m.Params.maxSize(); req > max {
		return 0, fmt.Errorf("%w: %d bytes requested, at most %d with cluster size %d", ErrOutOfRange, req, max, cs)
	}
	size := (req + cs - 1) / cs * cs
	if lim > 0 && size > lim {
		return 0, fmt.Errorf("%w: no multiple of the cluster size %d lies in [%d, %d]", ErrOutOfRange, cs, req, lim)
	}
	return size, nil
}
