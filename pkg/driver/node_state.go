package driver

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"

	"k8s.io/klog/v2"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/throttle"
)

// stageRecord is what a node must remember about a staged volume across a
// plugin restart: where it is mounted and which backend serves its device.
// It is written (atomically) before the device is mounted, so a crash at any
// point leaves a record that Start or NodeUnstageVolume can act on.
type stageRecord struct {
	ID          string `json:"id"`
	StagingPath string `json:"stagingPath"`
	Block       bool   `json:"block"`
	FSType      string `json:"fsType,omitempty"`
	ReadOnly    bool   `json:"readOnly"`
	Backend     string `json:"backend"`
	DevicePath  string `json:"devicePath"`
	// Dev is the device's "major:minor": what the volume's mounts show in
	// the mount table, so that the driver unmounts only its own. Records
	// written before it was kept have none.
	Dev     string   `json:"dev,omitempty"`
	Targets []string `json:"targets,omitempty"` // published at
	// Made are the targets the driver created (directory or file), the
	// only ones unpublish removes.
	Made []string `json:"made,omitempty"`
}

// stagedVolume is a volume staged on this node. image and device are nil when
// a restarted plugin could not re-attach it (lostReason says why): the volume
// is then reported abnormal and only unstaging it (or staging it again)
// helps.
type stagedVolume struct {
	stageRecord
	image  Image
	device nbdattach.Device
	gate   *gate // between device and image (Shutdown)
	// throttle is in front of the gate: the volume's I/O limits (qos.go).
	// nil where no request passes the backend, or built with nothrottle,
	// or where the attach backend serves I/O ahead of it (noThrottle says
	// why).
	throttle   *throttle.Throttle
	noThrottle string
	lostReason string
}

// ioCacher is an attach backend that may serve a device's I/O from a
// cache in the kernel, ahead of the backend the plugin throttles: it says
// so (the fuse backend with --fuse-cache), or "" when it does not.
type ioCacher interface {
	CachesIO() string
}

// gated returns img's backend behind a new gate and throttle of v, for
// attaching with a, with limits set. Every attach path (kernel nbd, fuse)
// passes here, so all of them enforce a volume's limits alike; the throttle
// is outermost so that a request held back by it holds no gate. The backend
// comes back even with an error (limits that cannot be enforced here), for
// a re-attach that must serve the device all the same.
func (v *stagedVolume) gated(a nbdattach.Attacher, img Image, limits throttle.Limits) (nbdattach.Backend, error) {
	be := img.Backend()
	if _, direct := be.(interface{ FilePath() string }); direct {
		// The device reads the file itself (a loop device on a raw image,
		// drivertest): no request passes through the backend to gate.
		v.gate, v.throttle = nil, nil
		return be, throttleable(v, limits)
	}
	// Devices of a backend with stale-device cleaning die with the process
	// (fuse); the others (nbd) survive it and their kernel requeues.
	_, dies := a.(staleCleaner)
	be, v.gate = newGate(be, !dies)
	if c, ok := a.(ioCacher); ok && c.CachesIO() != "" {
		// Limits there would hold what reaches the plugin, not what the
		// pod does: refused (throttleable), not pretended.
		v.throttle, v.noThrottle = nil, c.CachesIO()
		return be, throttleable(v, limits)
	}
	be, v.throttle = throttle.Wrap(be)
	if err := throttleable(v, limits); err != nil {
		return be, err
	}
	return be, v.throttle.Set(limits)
}

// Targets change under a volume's publish/unpublish lock while stats and
// expand read them, so they are guarded by stagedMu.

func (d *Driver) hasTarget(v *stagedVolume, p string) bool {
	d.stagedMu.Lock()
	defer d.stagedMu.Unlock()
	return slices.Contains(v.Targets, p)
}

func (d *Driver) madeTarget(v *stagedVolume, p string) bool {
	d.stagedMu.Lock()
	defer d.stagedMu.Unlock()
	return slices.Contains(v.Made, p)
}

func (d *Driver) targets(v *stagedVolume) []string {
	d.stagedMu.Lock()
	defer d.stagedMu.Unlock()
	return append([]string(nil), v.Targets...)
}

// setTarget adds or removes a published target, and whether the driver
// made it, and saves the record.
func (d *Driver) setTarget(v *stagedVolume, p string, on, made bool) error {
	d.stagedMu.Lock()
	v.Targets = withPath(v.Targets, p, on)
	v.Made = withPath(v.Made, p, on && made)
	rec := v.stageRecord
	d.stagedMu.Unlock()
	return d.saveRecord(&rec)
}

// withPath is paths with p in it or not, sorted.
func withPath(paths []string, p string, in bool) []string {
	out := make([]string, 0, len(paths)+1)
	for _, t := range paths {
		if t != p {
			out = append(out, t)
		}
	}
	if in {
		out = append(out, p)
		sort.Strings(out)
	}
	return out
}

func (d *Driver) saveRecord(r *stageRecord) error {
	return d.pool.stagedVolumes().put(r.ID, r)
}

func (d *Driver) removeRecord(id string) error {
	return d.pool.stagedVolumes().remove(id)
}

// loadRecords reads the staged volumes' records, at start: it also removes
// what writes a crash interrupted left.
func (d *Driver) loadRecords() ([]*stageRecord, error) {
	store := d.pool.stagedVolumes()
	if err := store.removeTemps(); err != nil {
		return nil, err
	}
	ids, err := store.names()
	if err != nil {
		return nil, err
	}
	var recs []*stageRecord
	for _, id := range ids {
		if checkVolumeID(id) != nil {
			continue
		}
		var r stageRecord
		if err := store.get(id, &r); err != nil {
			return nil, err
		}
		if r.ID != id {
			return nil, fmt.Errorf("staged volume record %s is corrupt: it names volume %q", store.path(id), r.ID)
		}
		recs = append(recs, &r)
	}
	return recs, nil
}

func (d *Driver) lookupStaged(id string) *stagedVolume {
	d.stagedMu.Lock()
	defer d.stagedMu.Unlock()
	return d.staged[id]
}

func (d *Driver) isStaged(id string) bool { return d.lookupStaged(id) != nil }

func (d *Driver) setStaged(v *stagedVolume) {
	d.stagedMu.Lock()
	defer d.stagedMu.Unlock()
	d.staged[v.ID] = v
}

func (d *Driver) dropStaged(id string) {
	d.stagedMu.Lock()
	defer d.stagedMu.Unlock()
	delete(d.staged, id)
}

// attachedCount is the number of volumes with a live device (metrics).
func (d *Driver) attachedCount() (n int) {
	d.stagedMu.Lock()
	defer d.stagedMu.Unlock()
	for _, v := range d.staged {
		if v.device != nil {
			n++
		}
	}
	return n
}

// reattachAll serves again the devices a previous plugin process attached,
// before the kernel's dead-connection timeout fails their I/O. A volume that
// cannot be re-attached does not stop the node: it is logged, kept as lost
// (abnormal in NodeGetVolumeStats) and repaired by unstaging or staging it.
func (d *Driver) reattachAll(ctx context.Context) error {
	logger := klog.FromContext(ctx)
	// Backends whose devices cannot outlive their process (fuse) release
	// what a dead predecessor left before anything is attached.
	for _, a := range d.attachers {
		if c, ok := a.(staleCleaner); ok && a.Available() == nil {
			found, err := c.CleanStale(ctx)
			if len(found) > 0 || err != nil {
				logger.Info("Released devices a previous process left", "backend", a.Name(), "devices", found, "err", err)
			}
		}
	}
	recs, err := d.loadRecords()
	if err != nil {
		return err
	}
	for _, r := range recs {
		v := &stagedVolume{stageRecord: *r}
		if err := d.reattach(ctx, v); err != nil {
			if errors.Is(err, nbdattach.ErrNotAttached) && !d.mounted(r.StagingPath) {
				// Device and mount are both gone (the node rebooted): the
				// CO stages the volume again; forget it.
				logger.Info("Staged volume has no device any more; forgetting it", "volumeID", r.ID, "err", err)
				_ = d.removeRecord(r.ID)
				continue
			}
			v.lostReason = err.Error()
			logger.Error(err, "Re-attach failed; the volume stays unusable until it is unstaged", "volumeID", r.ID, "backend", r.Backend)
		} else {
			logger.Info("Re-attached staged volume", "volumeID", r.ID, "device", v.device.Path(), "backend", r.Backend)
		}
		d.setStaged(v)
	}
	return nil
}

func (d *Driver) reattach(ctx context.Context, v *stagedVolume) error {
	a, err := d.attacherNamed(v.Backend)
	if err != nil {
		return err
	}
	// The limits the volume was staged with, as changed since: kept
	// across a plugin restart. Without its record the volume is served
	// all the same (unlimited) rather than left failing its I/O.
	var limits throttle.Limits
	var key []byte
	if m, err := d.pool.get(v.ID); err == nil {
		limits = m.limits()
		if m.Params.Encrypted {
			// The key the staging process kept in the kernel keyring
			// (encryption_keys.go). Without it the image is not even
			// opened: the volume stays lost, nothing read or written.
			if key, err = d.keptKey(v.ID); err != nil {
				return err
			}
			defer clear(key)
			klog.FromContext(ctx).Info("Encrypted volume's key found in the kernel keyring", "volumeID", v.ID)
		}
	} else {
		klog.FromContext(ctx).Error(err, "No volume record: re-attaching without I/O limits", "volumeID", v.ID)
	}
	img, err := d.images.Open(ctx, d.pool.imagePath(v.ID), ImageOpenOptions{ReadOnly: v.ReadOnly, MasterKey: key})
	if err != nil {
		return fmt.Errorf("open image: %w", err)
	}
	be, err := v.gated(a, img, limits)
	if err != nil {
		klog.FromContext(ctx).Error(err, "Re-attaching without I/O limits", "volumeID", v.ID)
	}
	var dev nbdattach.Device
	d.withDevMu(func() {
		dev, err = a.Reattach(ctx, v.ID, be, nbdattach.AttachOptions{ReadOnly: v.ReadOnly})
	})
	if err != nil {
		_ = img.Close()
		return fmt.Errorf("%s reattach: %w", a.Name(), err)
	}
	v.image, v.device = img, dev
	num, err := deviceNumber(dev.Path())
	if err != nil {
		num = v.Dev // keep what the record says; checks use it
	}
	if dev.Path() != v.DevicePath || num != v.Dev {
		v.DevicePath, v.Dev = dev.Path(), num
		_ = d.saveRecord(&v.stageRecord)
	}
	return nil
}

// staleCleaner is implemented by attach backends whose devices cannot be
// taken over by a new process (nbdattach's fuse backend).
type staleCleaner interface {
	CleanStale(ctx context.Context) ([]nbdattach.DeviceInfo, error)
}

// mounted reports whether p is a mount point (false when it does not exist).
func (d *Driver) mounted(p string) bool {
	if p == "" {
		return false
	}
	ok, err := d.mounter.IsMountPoint(p)
	return err == nil && ok
}
