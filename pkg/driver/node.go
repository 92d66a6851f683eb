package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/throttle"
)

func (d *Driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{
		NodeId:             d.opts.NodeID,
		MaxVolumesPerNode:  d.opts.MaxVolumes,
		AccessibleTopology: d.topology(),
	}, nil
}

func (d *Driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	rpcs := []csi.NodeServiceCapability_RPC_Type{
		csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csi.NodeServiceCapability_RPC_VOLUME_CONDITION,
		csi.NodeServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
	}
	if d.canGrow() {
		rpcs = append(rpcs, csi.NodeServiceCapability_RPC_EXPAND_VOLUME)
	}
	caps := make([]*csi.NodeServiceCapability, 0, len(rpcs))
	for _, c := range rpcs {
		caps = append(caps, &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{
			Rpc: &csi.NodeServiceCapability_RPC{Type: c}}})
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}

// fsTypeFor picks a mount volume's filesystem: the capability's fs_type (the
// StorageClass csi.storage.k8s.io/fstype), else the volume context's (the
// fsType parameter), else ext4.
func fsTypeFor(c *csi.VolumeCapability, vctx map[string]string) string {
	if fs := c.GetMount().GetFsType(); fs != "" {
		return fs
	}
	if fs := vctx[ctxFSType]; fs != "" {
		return fs
	}
	return DefaultFSType
}

func (d *Driver) NodeStageVolume(ctx context.Context, req *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	if err := validateNodeStageVolumeRequest(req); err != nil {
		return nil, toStatus(err)
	}
	if err := d.checkNodePath("staging target path", req.GetStagingTargetPath()); err != nil {
		return nil, toStatus(err)
	}
	id := req.GetVolumeId()
	release, err := d.locks.acquire(id, opStage)
	if err != nil {
		return nil, toStatus(err)
	}
	defer release()
	logger := klog.FromContext(ctx).WithValues("volumeID", id)

	capab := req.GetVolumeCapability()
	want := stageRecord{
		ID: id,
		// Cleaned: "/x/staging/" and "/x/staging" are one place, and
		// later requests and stats are compared with the clean form.
		StagingPath: filepath.Clean(req.GetStagingTargetPath()),
		Block:       isBlock(capab),
		ReadOnly:    isReadOnlyMode(capab),
	}
	if !want.Block {
		want.FSType = fsTypeFor(capab, req.GetVolumeContext())
	}
	if v := d.lookupStaged(id); v != nil {
		same := sameStagingPath(v, want.StagingPath) && v.Block == want.Block && v.ReadOnly == want.ReadOnly && v.FSType == want.FSType
		if !same {
			return nil, toStatus(fmt.Errorf("%w: volume %q is staged at %s (block %v, read-only %v, fs %q); asked for %s (block %v, read-only %v, fs %q)",
				ErrAlreadyExists, id, v.StagingPath, v.Block, v.ReadOnly, v.FSType, want.StagingPath, want.Block, want.ReadOnly, want.FSType))
		}
		if v.device != nil {
			return d.restage(ctx, v, req)
		}
		// Lost at a plugin restart: tear down what remains, stage afresh.
		logger.Info("Restaging a volume lost at plugin restart", "reason", v.lostReason)
		if err := d.teardown(ctx, v); err != nil {
			return nil, toStatus(err)
		}
	}
	m, err := d.pool.get(id)
	if err != nil {
		return nil, toStatus(err)
	}
	var pass []byte
	if m.Params.Encrypted {
		if pass, err = passphraseFrom(req.GetSecrets(), id, "node-stage"); err != nil {
			return nil, toStatus(err)
		}
		defer clear(pass)
	}
	a, err := d.attacher()
	if err != nil {
		return nil, toStatus(err)
	}
	mkfsOpts, _ := stageMkfsOptions(req) // validated above

	img, err := d.images.Open(ctx, d.pool.imagePath(id), ImageOpenOptions{ReadOnly: want.ReadOnly, Passphrase: pass})
	if err != nil {
		return nil, toStatus(fmt.Errorf("volume %q: open image: %w", id, err))
	}
	v := &stagedVolume{stageRecord: want, image: img}
	v.Backend = a.Name()
	var dev nbdattach.Device
	// Until a device serves it, the image is this call's to close: on an
	// attach error, and on a panic (recovered into Internal: server.go),
	// which would otherwise leave it open and locked against every retry.
	defer func() {
		if dev == nil {
			_ = img.Close()
		}
	}()
	be, err := v.gated(a, img, m.limits())
	if err != nil {
		return nil, toStatus(err)
	}
	d.withDevMu(func() {
		dev, err = a.Attach(ctx, id, be, nbdattach.AttachOptions{ReadOnly: want.ReadOnly})
		if errors.Is(err, nbdattach.ErrAlreadyAttached) {
			// A device for this volume outlived a process that crashed before
			// recording it: take it over rather than fail forever.
			logger.Info("Taking over a device attached by a previous process", "backend", a.Name(), "err", err)
			dev, err = a.Reattach(ctx, id, be, nbdattach.AttachOptions{ReadOnly: want.ReadOnly})
		}
	})
	if err != nil {
		dev = nil // whatever came back with the error serves nothing
		return nil, toStatus(fmt.Errorf("volume %q: %s attach: %w", id, a.Name(), err))
	}
	v.device, v.DevicePath = dev, dev.Path()
	if v.Dev, err = deviceNumber(dev.Path()); err != nil {
		d.undoAttach(ctx, v)
		return nil, toStatus(fmt.Errorf("volume %q: %w", id, err))
	}
	// Record before mounting: from here on a crash leaves a device that the
	// next process must find again.
	if err := d.saveRecord(&v.stageRecord); err != nil {
		d.undoAttach(ctx, v)
		return nil, toStatus(err)
	}
	if !want.Block {
		if err := os.MkdirAll(want.StagingPath, 0o750); err != nil {
			d.undoAttach(ctx, v)
			return nil, toStatus(err)
		}
		if err := d.mountStaging(v, req, mkfsOpts); err != nil {
			d.undoAttach(ctx, v)
			return nil, toStatus(err)
		}
	}
	if m.Params.Encrypted {
		d.keepKey(ctx, id, img)
	}
	d.setStaged(v)
	logger.Info("Volume staged", "device", dev.Path(), "backend", a.Name(), "staging", want.StagingPath, "block", want.Block, "fsType", want.FSType, "readOnly", want.ReadOnly)
	return &csi.NodeStageVolumeResponse{}, nil
}

// mountStaging formats (when it has no filesystem) and mounts a staged
// volume's device at its staging path, unless the volume's filesystem is
// mounted there already. Someone else's mount there is refused: mounting
// over it would hide it, and unstage could not tell the two apart.
func (d *Driver) mountStaging(v *stagedVolume, req *csi.NodeStageVolumeRequest, mkfsOpts []string) error {
	c, err := d.checkMount(v, "staging path", v.StagingPath, false)
	switch {
	case err != nil:
		return err
	case c.not != "":
		return fmt.Errorf("%w: %s", ErrPrecondition, c.not)
	case !c.none:
		return nil
	}
	opts := append([]string{}, req.GetVolumeCapability().GetMount().GetMountFlags()...)
	if v.ReadOnly {
		opts = append(opts, "ro")
	}
	if v.FSType == "xfs" && !slices.Contains(opts, "nouuid") {
		// A restore or clone carries its source's filesystem UUID, and xfs
		// refuses to mount a second filesystem with a UUID already mounted
		// on this node: the source and its copy could never be used side by
		// side. The node, not xfs, keeps volumes apart (by device).
		opts = append(opts, "nouuid")
	}
	if err := d.mounter.FormatAndMount(v.device.Path(), v.StagingPath, v.FSType, opts, mkfsOpts); err != nil {
		return fmt.Errorf("volume %q: format and mount %s (%s) at %s: %w", v.ID, v.device.Path(), v.FSType, v.StagingPath, err)
	}
	return nil
}

// restage answers a NodeStageVolume for a volume staged here already. A
// mount volume's staging mount is checked, not assumed: when it is gone
// (someone unmounted it) it is mounted again, so that publish binds the
// volume and not an empty directory of the node's disk.
func (d *Driver) restage(ctx context.Context, v *stagedVolume, req *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	if v.Block {
		return &csi.NodeStageVolumeResponse{}, nil
	}
	why, err := d.stagingProblem(v)
	if err != nil {
		return nil, toStatus(err)
	}
	if why == "" {
		return &csi.NodeStageVolumeResponse{}, nil
	}
	klog.FromContext(ctx).Info("Staging mount is not in place; mounting it again", "volumeID", v.ID, "problem", why)
	mkfsOpts, _ := stageMkfsOptions(req) // validated
	if err := d.mountStaging(v, req, mkfsOpts); err != nil {
		return nil, toStatus(err)
	}
	return &csi.NodeStageVolumeResponse{}, nil
}

// undoAttach reverses a NodeStage that failed after attaching.
func (d *Driver) undoAttach(ctx context.Context, v *stagedVolume) {
	if err := d.detach(ctx, v.device); err != nil {
		klog.FromContext(ctx).Error(err, "Detach after failed stage", "volumeID", v.ID)
		return // keep the record: the next process finds the device
	}
	_ = v.image.Close()
	_ = d.removeRecord(v.ID)
}

// teardown unmounts a staged volume, detaches its device, closes its image
// and forgets it. Each step tolerates having been done before, so an
// interrupted unstage can be repeated.
func (d *Driver) teardown(ctx context.Context, v *stagedVolume) error {
	if v.device == nil {
		if err := d.reviveLost(ctx, v); err != nil {
			return err
		}
	}
	// The last writeback (the unmount's, the detach's fsync) and the
	// requests queued in the device go unthrottled: Detach waits for them
	// whatever ctx says, and under a low limit unstaging would wait until
	// they trickled through. The limits come back if the volume stays.
	if held := v.throttle.Limits(); !held.Unlimited() {
		v.throttle.Set(throttle.Limits{})
		defer func() {
			if d.lookupStaged(v.ID) == v {
				v.throttle.Set(held)
			}
		}()
	}
	if !v.Block {
		if err := d.checkRecordedPath("staging path", v.StagingPath); err != nil {
			return fmt.Errorf("volume %q: %w", v.ID, err)
		}
		if err := d.unmountOwn(v, "staging path", v.StagingPath, false); err != nil {
			return fmt.Errorf("volume %q: %w", v.ID, err)
		}
	}
	if v.device != nil {
		if err := d.detach(ctx, v.device); err != nil {
			return fmt.Errorf("volume %q: detach %s: %w", v.ID, v.device.Path(), err)
		}
		v.device = nil
	}
	if v.image != nil {
		if err := v.image.Close(); err != nil {
			return fmt.Errorf("volume %q: close image: %w", v.ID, err)
		}
		v.image = nil
	}
	if err := d.removeRecord(v.ID); err != nil {
		return err
	}
	d.forgetKey(ctx, v.ID)
	d.dropStaged(v.ID)
	return nil
}

// reviveLost is the first step of tearing down a volume a restarted
// plugin could not re-attach, before anything unmounts it: what is queued
// in its device, and what the unmount writes, must not wait for a server
// until the kernel's timeouts fail it (the I/O timeout, then the
// dead-connection timeout: minutes). If the volume can be served now (the
// cause has gone: an image lock released, the key back in the keyring), it
// is re-attached as at start and torn down like any staged volume, its
// data flushed. Otherwise its device is disconnected without being served
// (nbdattach.Disconnecter): the kernel fails that I/O at once, and nothing
// is read from or written to an image that cannot be opened (an encrypted
// one without its key). A backend whose devices die with their process
// (fuse) has nothing left to detach.
func (d *Driver) reviveLost(ctx context.Context, v *stagedVolume) error {
	logger := klog.FromContext(ctx).WithValues("volumeID", v.ID, "backend", v.Backend)
	err := d.reattach(ctx, v)
	if err == nil {
		v.lostReason = ""
		logger.Info("Re-attached a volume lost at plugin restart, to unstage it with its data flushed", "device", v.device.Path())
		return nil
	}
	a, aerr := d.attacherNamed(v.Backend)
	if aerr != nil {
		return nil
	}
	dc, ok := a.(nbdattach.Disconnecter)
	if !ok {
		return nil
	}
	var derr error
	d.withDevMu(func() { derr = dc.Disconnect(ctx, v.ID) })
	switch {
	case derr == nil:
		logger.Info("Disconnected the device of a volume that cannot be served, without serving it: its pending I/O fails", "reason", err)
		return nil
	case errors.Is(derr, nbdattach.ErrNotAttached), errors.Is(derr, errors.ErrUnsupported):
		return nil // no device left (the node rebooted, or fuse)
	}
	return fmt.Errorf("volume %q: its device could not be served (%v) nor disconnected: %w", v.ID, err, derr)
}

// withDevMu runs f holding devMu, released even when f panics: a handler
// panic is recovered (server.go), and must not leave every later stage and
// unstage on the node waiting for this lock.
func (d *Driver) withDevMu(f func()) {
	d.devMu.Lock()
	defer d.devMu.Unlock()
	f()
}

// detach disconnects a device under devMu. Right after an unmount a device
// can stay busy for a moment (seen with the fuse backend's loop devices: a
// probe of the device after the unmount, or the last writeback, holds it),
// so a busy device is retried for a few seconds before the error goes back
// to the CO, which retries on its own schedule.
func (d *Driver) detach(ctx context.Context, dev nbdattach.Device) error {
	wait := 20 * time.Millisecond
	deadline := time.Now().Add(5 * time.Second)
	for {
		var err error
		d.withDevMu(func() { err = dev.Detach(ctx) })
		if !errors.Is(err, nbdattach.ErrDeviceBusy) || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(wait):
		}
		wait = min(2*wait, 500*time.Millisecond)
	}
}

func (d *Driver) NodeUnstageVolume(ctx context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	if err := validateNodeUnstageVolumeRequest(req); err != nil {
		return nil, toStatus(err)
	}
	id := req.GetVolumeId()
	release, err := d.locks.acquire(id, opUnstage)
	if err != nil {
		return nil, toStatus(err)
	}
	defer release()
	v := d.lookupStaged(id)
	if v == nil {
		// Not staged (any more). Whatever is mounted there is not this
		// driver's: its mounts are recorded before they are made, and
		// their record goes only once they are gone.
		klog.FromContext(ctx).V(2).Info("Volume not staged here; nothing to unstage", "volumeID", id, "staging", req.GetStagingTargetPath())
		return &csi.NodeUnstageVolumeResponse{}, nil
	}
	if !sameStagingPath(v, req.GetStagingTargetPath()) {
		return nil, toStatus(fmt.Errorf("%w: volume %q is staged at %s, not %s", ErrNotFound, id, v.StagingPath, req.GetStagingTargetPath()))
	}
	if t := d.targets(v); len(t) > 0 {
		return nil, toStatus(fmt.Errorf("%w: volume %q is still published at %v; unpublish it first", ErrInUse, id, t))
	}
	if err := d.teardown(ctx, v); err != nil {
		return nil, toStatus(err)
	}
	klog.FromContext(ctx).Info("Volume unstaged", "volumeID", id)
	return &csi.NodeUnstageVolumeResponse{}, nil
}

func (d *Driver) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	if err := validateNodePublishVolumeRequest(req); err != nil {
		return nil, toStatus(err)
	}
	if err := checkTargetPlace(req.GetTargetPath(), req.GetStagingTargetPath()); err != nil {
		return nil, toStatus(err)
	}
	if err := d.checkNodePath("staging target path", req.GetStagingTargetPath()); err != nil {
		return nil, toStatus(err)
	}
	if err := d.checkNodePath("target path", req.GetTargetPath()); err != nil {
		return nil, toStatus(err)
	}
	id := req.GetVolumeId()
	release, err := d.locks.acquire(id, opPublish)
	if err != nil {
		return nil, toStatus(err)
	}
	defer release()
	v := d.lookupStaged(id)
	if v == nil {
		if _, err := d.pool.get(id); err != nil {
			return nil, toStatus(err)
		}
		return nil, toStatus(fmt.Errorf("%w: volume %q is not staged on node %s", ErrPrecondition, id, d.opts.NodeID))
	}
	if !sameStagingPath(v, req.GetStagingTargetPath()) {
		return nil, toStatus(fmt.Errorf("%w: volume %q is staged at %s, not %s", ErrPrecondition, id, v.StagingPath, req.GetStagingTargetPath()))
	}
	if v.device == nil {
		return nil, toStatus(fmt.Errorf("%w: volume %q lost its device at a plugin restart (%s); unstage and stage it again", ErrPrecondition, id, v.lostReason))
	}
	capab := req.GetVolumeCapability()
	if isBlock(capab) != v.Block {
		return nil, toStatus(fmt.Errorf("%w: volume %q is staged as block=%v, publish asks block=%v", ErrInvalid, id, v.Block, isBlock(capab)))
	}
	// The bind mount takes whatever is at the staging path: it must be
	// the volume, not the empty directory a lost mount leaves.
	if err := d.requireStaged(v); err != nil {
		return nil, toStatus(err)
	}
	target := filepath.Clean(req.GetTargetPath())
	done, made, err := d.prepareTarget(v, target)
	if err != nil {
		return nil, toStatus(fmt.Errorf("volume %q: %w", id, err))
	}
	if done {
		if !d.hasTarget(v, target) {
			if err := d.setTarget(v, target, true, made); err != nil {
				return nil, toStatus(err)
			}
		}
		return &csi.NodePublishVolumeResponse{}, nil
	}
	opts := []string{"bind"}
	if req.GetReadonly() || v.ReadOnly {
		opts = append(opts, "ro")
	}
	source := v.StagingPath
	if v.Block {
		source = v.device.Path()
	} else {
		opts = append(opts, capab.GetMount().GetMountFlags()...)
	}
	// Record first: an unpublish after a crash must know the target, and
	// whether the driver made it.
	if err := d.setTarget(v, target, true, made); err != nil {
		return nil, toStatus(err)
	}
	if err := d.mounter.Mount(source, target, "", opts); err != nil {
		_ = d.setTarget(v, target, false, false)
		if made {
			_, _ = removeMade(target)
		}
		return nil, toStatus(fmt.Errorf("volume %q: bind mount %s at %s: %w", id, source, target, err))
	}
	klog.FromContext(ctx).Info("Volume published", "volumeID", id, "target", target, "options", opts)
	return &csi.NodePublishVolumeResponse{}, nil
}

func (d *Driver) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	if err := validateNodeUnpublishVolumeRequest(req); err != nil {
		return nil, toStatus(err)
	}
	id := req.GetVolumeId()
	release, err := d.locks.acquire(id, opUnpublish)
	if err != nil {
		return nil, toStatus(err)
	}
	defer release()
	target := filepath.Clean(req.GetTargetPath())
	logger := klog.FromContext(ctx).WithValues("volumeID", id, "target", target)
	v := d.lookupStaged(id)
	if v == nil || !d.hasTarget(v, target) {
		// Not published there by this driver (records are written before
		// the mount): what is at the path, file, directory or mount, is
		// someone else's.
		logger.V(2).Info("Volume not published at this target; nothing to do")
		return &csi.NodeUnpublishVolumeResponse{}, nil
	}
	if err := d.checkRecordedPath("target path", target); err != nil {
		return nil, toStatus(fmt.Errorf("volume %q: %w", id, err))
	}
	if err := d.unmountOwn(v, "target path", target, v.Block); err != nil {
		return nil, toStatus(fmt.Errorf("volume %q: %w", id, err))
	}
	// The CSI spec: the plugin deletes the file or directory it created,
	// and only that.
	if d.madeTarget(v, target) {
		kept, err := removeMade(target)
		if err != nil {
			return nil, toStatus(fmt.Errorf("volume %q: remove %s: %w", id, target, err))
		}
		if kept {
			logger.Info("Target directory the driver made is not empty once unmounted; keeping what it holds")
		}
	}
	if err := d.setTarget(v, target, false, false); err != nil {
		return nil, toStatus(err)
	}
	logger.Info("Volume unpublished")
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// sameStagingPath compares a request's staging path with the recorded one,
// both cleaned: a record from an older version may hold the path as sent,
// trailing slash and all.
func sameStagingPath(v *stagedVolume, p string) bool {
	return filepath.Clean(v.StagingPath) == filepath.Clean(p)
}

// stagedAt finds the staged volume id whose staging or target path is p.
func (d *Driver) stagedAt(id, p string) (*stagedVolume, error) {
	if _, err := d.pool.get(id); err != nil {
		return nil, err
	}
	v := d.lookupStaged(id)
	if v == nil {
		return nil, fmt.Errorf("volume %q is not staged on node %s: %w", id, d.opts.NodeID, ErrNotFound)
	}
	clean := filepath.Clean(p)
	if !sameStagingPath(v, clean) && !d.hasTarget(v, clean) {
		return nil, fmt.Errorf("volume %q is not staged or published at %s: %w", id, p, ErrNotFound)
	}
	if _, err := os.Stat(clean); err != nil {
		return nil, fmt.Errorf("volume %q: %s: %w", id, p, ErrNotFound)
	}
	return v, nil
}

// volumePathProblem says what is wrong with what is mounted at a staged
// volume's staging path or target p, or "" when it is the volume.
func (d *Driver) volumePathProblem(v *stagedVolume, p string) (string, error) {
	if p == filepath.Clean(v.StagingPath) {
		return d.stagingProblem(v)
	}
	c, err := d.checkMount(v, "target path", p, v.Block)
	switch {
	case err != nil:
		return "", err
	case c.none:
		return fmt.Sprintf("nothing is mounted at %s: volume %q's mount there is gone", p, v.ID), nil
	}
	return c.not, nil
}

func (d *Driver) NodeGetVolumeStats(ctx context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	if err := validateNodeGetVolumeStatsRequest(req); err != nil {
		return nil, toStatus(err)
	}
	id := req.GetVolumeId()
	release, err := d.locks.acquire(id, opRead)
	if err != nil {
		return nil, toStatus(err)
	}
	defer release()
	v, err := d.stagedAt(id, req.GetVolumePath())
	if err != nil {
		return nil, toStatus(err)
	}
	// The usage units have no place for the image's own footprint in the
	// pool, so the condition message carries it.
	cond := &csi.VolumeCondition{Message: fmt.Sprintf("attached at %s (%s)", v.DevicePath, v.Backend)}
	alloc, allocErr := allocatedBytes(d.pool.imagePath(id))
	if allocErr == nil {
		cond.Message += fmt.Sprintf("; image allocates %d bytes in the pool", alloc)
	}
	cond.Message += qosCondition(v.throttle)
	imageUsage := v.Block || v.device == nil
	if v.device == nil {
		cond = &csi.VolumeCondition{Abnormal: true, Message: "device lost at plugin restart: " + v.lostReason}
	} else if why, err := d.volumePathProblem(v, filepath.Clean(req.GetVolumePath())); err != nil {
		return nil, toStatus(err)
	} else if why != "" {
		// Whatever is there now is not the volume: its usage would be
		// another filesystem's (the node's root disk, say).
		cond = &csi.VolumeCondition{Abnormal: true, Message: why}
		imageUsage = true
	}
	resp := &csi.NodeGetVolumeStatsResponse{VolumeCondition: d.withSpaceCondition(cond)}
	if imageUsage {
		// A block volume's usage is its image's: virtual size and the bytes
		// the image file occupies in the pool.
		size, err := d.images.Size(ctx, d.pool.imagePath(id))
		if v.image != nil {
			size, err = v.image.Size(), nil
		}
		if err != nil {
			return nil, toStatus(err)
		}
		if allocErr != nil {
			return nil, toStatus(allocErr)
		}
		used := min(alloc, size)
		resp.Usage = []*csi.VolumeUsage{{Unit: csi.VolumeUsage_BYTES, Total: size, Used: used, Available: size - used}}
		return resp, nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(filepath.Clean(req.GetVolumePath()), &st); err != nil {
		return nil, toStatus(fmt.Errorf("volume %q: statfs %s: %w", id, req.GetVolumePath(), err))
	}
	bs := st.Bsize
	resp.Usage = []*csi.VolumeUsage{
		{Unit: csi.VolumeUsage_BYTES, Total: int64(st.Blocks) * bs, Available: int64(st.Bavail) * bs, Used: int64(st.Blocks-st.Bfree) * bs},
		{Unit: csi.VolumeUsage_INODES, Total: int64(st.Files), Available: int64(st.Ffree), Used: int64(st.Files - st.Ffree)},
	}
	return resp, nil
}

func (d *Driver) NodeExpandVolume(ctx context.Context, req *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	if err := validateNodeExpandVolumeRequest(req); err != nil {
		return nil, toStatus(err)
	}
	id := req.GetVolumeId()
	release, err := d.locks.acquire(id, opExpand)
	if err != nil {
		return nil, toStatus(err)
	}
	defer release()
	v, err := d.stagedAt(id, req.GetVolumePath())
	if err != nil {
		return nil, toStatus(err)
	}
	if v.device == nil {
		return nil, toStatus(fmt.Errorf("%w: volume %q lost its device at a plugin restart (%s); unstage and stage it again", ErrPrecondition, id, v.lostReason))
	}
	if v.ReadOnly {
		return nil, toStatus(fmt.Errorf("%w: volume %q is staged read-only and cannot grow", ErrPrecondition, id))
	}
	growFS := !v.Block && !isBlock(req.GetVolumeCapability())
	if growFS {
		// The filesystem tools grow what is mounted at the staging path:
		// check that it is the volume before anything grows.
		if err := d.requireStaged(v); err != nil {
			return nil, toStatus(err)
		}
	}
	m, err := d.pool.get(id)
	if err != nil {
		return nil, toStatus(err)
	}
	size := max(m.Capacity, v.image.Size())
	if cr := req.GetCapacityRange(); cr != nil {
		if size, err = expandedSize(m, cr); err != nil {
			return nil, toStatus(err)
		}
		size = max(size, v.image.Size())
	}
	releaseSpace, err := d.claimGrowth(m, size)
	if err != nil {
		return nil, toStatus(err)
	}
	defer releaseSpace()
	if _, err := d.growStaged(ctx, id, size); err != nil {
		return nil, toStatus(err)
	}
	if m.Capacity != size {
		m.Capacity = size
		if err := d.pool.put(m); err != nil {
			return nil, toStatus(err)
		}
	}
	if growFS {
		if err := d.mounter.ResizeFS(v.device.Path(), v.StagingPath); err != nil {
			return nil, toStatus(fmt.Errorf("volume %q: %w", id, err))
		}
	}
	klog.FromContext(ctx).Info("Volume expanded on the node", "volumeID", id, "capacity", size)
	return &csi.NodeExpandVolumeResponse{CapacityBytes: size}, nil
}

// growStaged grows a volume staged here through its open image, then tells
// the kernel the device's new size. It reports false when the volume is not
// staged here (the caller then grows the closed image). The caller holds the
// volume's expand lock.
func (d *Driver) growStaged(ctx context.Context, id string, size int64) (bool, error) {
	v := d.lookupStaged(id)
	if v == nil {
		return false, nil
	}
	if v.image == nil || v.device == nil {
		return false, fmt.Errorf("%w: volume %q lost its device at a plugin restart (%s); unstage it first", ErrPrecondition, id, v.lostReason)
	}
	if v.image.Size() < size {
		if v.ReadOnly {
			return false, fmt.Errorf("%w: volume %q is staged read-only and cannot grow online", ErrPrecondition, id)
		}
		if err := v.image.Resize(ctx, size); err != nil {
			return false, fmt.Errorf("volume %q: resize open image: %w", id, err)
		}
	}
	// Always tell the device: a previous attempt may have grown the image
	// and failed before the device learnt of it.
	if err := v.device.Resize(ctx, v.image.Size()); err != nil {
		return false, fmt.Errorf("volume %q: resize device %s: %w", id, v.device.Path(), err)
	}
	return true, nil
}
