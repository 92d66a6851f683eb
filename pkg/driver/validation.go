package driver

import (
	"fmt"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/throttle"
)

// Limits on request strings. Volume IDs become file names in the pool, so they
// are held to a character set with no path separator and a bounded length
// before any path is built from them.
const (
	maxIDLength   = 128
	maxNameLength = 256
	maxPathLength = 4096
)

// validID is a local ID and an optional owner suffix (ids.go).
var validID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*([@#][A-Za-z0-9_.-]+)?$`)

func checkVolumeID(id string) error {
	switch {
	case id == "":
		return fmt.Errorf("%w: volume ID missing", ErrInvalid)
	case len(id) > maxIDLength:
		return fmt.Errorf("%w: volume ID of %d bytes exceeds %d", ErrInvalid, len(id), maxIDLength)
	case !validID.MatchString(id) || strings.Contains(id, ".."):
		return fmt.Errorf("%w: volume ID %q: only letters, digits, '_', '-' and '.' (not '..'), starting with a letter or digit, then an optional @<node> or #<hash>", ErrInvalid, id)
	}
	return nil
}

func checkName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("%w: volume name missing", ErrInvalid)
	case len(name) > maxNameLength:
		return fmt.Errorf("%w: volume name of %d bytes exceeds %d", ErrInvalid, len(name), maxNameLength)
	}
	return nil
}

// checkPath validates a staging or target path from the CO: absolute, clean,
// bounded. The driver creates and mounts on it, so relative paths and ".."
// components are refused rather than resolved.
func checkPath(field, p string) error {
	switch {
	case p == "":
		return fmt.Errorf("%w: %s missing", ErrInvalid, field)
	case len(p) > maxPathLength:
		return fmt.Errorf("%w: %s of %d bytes exceeds %d", ErrInvalid, field, len(p), maxPathLength)
	case !filepath.IsAbs(p):
		return fmt.Errorf("%w: %s %q is not absolute", ErrInvalid, field, p)
	case strings.ContainsRune(p, 0):
		return fmt.Errorf("%w: %s contains a NUL byte", ErrInvalid, field)
	case filepath.Clean(p) != strings.TrimSuffix(p, "/") && filepath.Clean(p) != p:
		return fmt.Errorf("%w: %s %q is not clean (%q)", ErrInvalid, field, p, filepath.Clean(p))
	}
	return nil
}

var supportedAccessModes = map[csi.VolumeCapability_AccessMode_Mode]bool{
	csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER:        true,
	csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER: true,
	csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER:  true,
	csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY:   true,
}

// checkCapability reports ErrInvalid for a malformed capability and for one
// this driver cannot give (multi-node modes: a volume lives on one node).
func checkCapability(c *csi.VolumeCapability) error {
	if c == nil {
		return fmt.Errorf("%w: volume capability missing", ErrInvalid)
	}
	if c.GetAccessMode() == nil {
		return fmt.Errorf("%w: volume capability has no access mode", ErrInvalid)
	}
	if m := c.GetAccessMode().GetMode(); !supportedAccessModes[m] {
		return fmt.Errorf("%w: access mode %s not supported: volumes are node-local (SINGLE_NODE_* modes only)", ErrInvalid, m)
	}
	switch t := c.GetAccessType().(type) {
	case *csi.VolumeCapability_Block:
	case *csi.VolumeCapability_Mount:
		if fs := t.Mount.GetFsType(); fs != "" && !supportedFSTypes[fs] {
			return fmt.Errorf("%w: fs_type %q not supported (ext4, xfs)", ErrInvalid, fs)
		}
		for _, f := range t.Mount.GetMountFlags() {
			if f == "" || strings.ContainsAny(f, " \t\n\x00") {
				return fmt.Errorf("%w: mount flag %q is malformed", ErrInvalid, f)
			}
			// A flag may be a comma-separated list, as mount(8) takes it.
			for _, o := range strings.Split(f, ",") {
				if o == "errors=panic" {
					return fmt.Errorf("%w: mount flag errors=panic is refused: an error on the volume (a full pool) would panic the node's kernel; use errors=remount-ro or errors=continue", ErrInvalid)
				}
			}
		}
	default:
		return fmt.Errorf("%w: volume capability has neither block nor mount access type", ErrInvalid)
	}
	return nil
}

func checkCapabilities(cs []*csi.VolumeCapability) error {
	if len(cs) == 0 {
		return fmt.Errorf("%w: volume capabilities missing", ErrInvalid)
	}
	for _, c := range cs {
		if err := checkCapability(c); err != nil {
			return err
		}
	}
	return nil
}

func isBlock(c *csi.VolumeCapability) bool { return c.GetBlock() != nil }

func isReadOnlyMode(c *csi.VolumeCapability) bool {
	return c.GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
}

func validateCreateVolumeRequest(r *csi.CreateVolumeRequest) error {
	if err := checkName(r.GetName()); err != nil {
		return err
	}
	if err := checkCapabilities(r.GetVolumeCapabilities()); err != nil {
		return err
	}
	// Each filesystem the volume may be made with checks mkfsOptions
	// against its own mkfs: a capability's fs_type wins over the fsType
	// parameter, as at NodeStageVolume.
	if opts := r.GetParameters()[paramMkfsOptions]; opts != "" {
		for _, c := range r.GetVolumeCapabilities() {
			if fs := fsTypeFor(c, r.GetParameters()); c.GetMount() != nil && supportedFSTypes[fs] {
				if _, err := mkfsOptionsFor(fs, opts); err != nil {
					return fmt.Errorf("%w: parameter %s: %v", ErrInvalid, paramMkfsOptions, err)
				}
			}
		}
	}
	if src := r.GetVolumeContentSource(); src != nil {
		if src.GetSnapshot().GetSnapshotId() == "" && src.GetVolume().GetVolumeId() == "" {
			return fmt.Errorf("%w: volume_content_source names neither a snapshot nor a volume", ErrInvalid)
		}
	}
	// A new volume's limits are all there is: check them whole.
	rest, _, err := takeFlatten(r.GetMutableParameters())
	if err != nil {
		return err
	}
	_, err = parseLimits(rest)
	return err
}

func validateDeleteVolumeRequest(r *csi.DeleteVolumeRequest) error {
	return checkVolumeID(r.GetVolumeId())
}

func validateControllerGetVolumeRequest(r *csi.ControllerGetVolumeRequest) error {
	return checkVolumeID(r.GetVolumeId())
}

func validateValidateVolumeCapabilitiesRequest(r *csi.ValidateVolumeCapabilitiesRequest) error {
	if err := checkVolumeID(r.GetVolumeId()); err != nil {
		return err
	}
	if len(r.GetVolumeCapabilities()) == 0 {
		return fmt.Errorf("%w: volume capabilities missing", ErrInvalid)
	}
	for _, c := range r.GetVolumeCapabilities() {
		if c.GetAccessMode() == nil {
			return fmt.Errorf("%w: volume capability has no access mode", ErrInvalid)
		}
		if c.GetAccessType() == nil {
			return fmt.Errorf("%w: volume capability has neither block nor mount access type", ErrInvalid)
		}
	}
	return nil
}

func validateListVolumesRequest(r *csi.ListVolumesRequest) error {
	if r.GetMaxEntries() < 0 {
		return fmt.Errorf("%w: max_entries %d is negative", ErrInvalid, r.GetMaxEntries())
	}
	return nil
}

func validateControllerExpandVolumeRequest(r *csi.ControllerExpandVolumeRequest) error {
	if err := checkVolumeID(r.GetVolumeId()); err != nil {
		return err
	}
	if r.GetCapacityRange() == nil {
		return fmt.Errorf("%w: capacity range missing", ErrInvalid)
	}
	if c := r.GetVolumeCapability(); c != nil {
		return checkCapability(c)
	}
	return nil
}

// validateControllerModifyVolumeRequest checks the keys and values; how
// they combine with the volume's limits is checked where those are known.
func validateControllerModifyVolumeRequest(r *csi.ControllerModifyVolumeRequest) error {
	if err := checkVolumeID(r.GetVolumeId()); err != nil {
		return err
	}
	if len(r.GetMutableParameters()) == 0 {
		return fmt.Errorf("%w: mutable_parameters missing (known: %s, %s)", ErrInvalid, throttle.Keys(), paramFlatten)
	}
	rest, _, err := takeFlatten(r.GetMutableParameters())
	if err != nil {
		return err
	}
	_, err = parseQoSParams(rest)
	return err
}

func validateNodeStageVolumeRequest(r *csi.NodeStageVolumeRequest) error {
	if err := checkVolumeID(r.GetVolumeId()); err != nil {
		return err
	}
	if err := checkPath("staging target path", r.GetStagingTargetPath()); err != nil {
		return err
	}
	if err := checkCapability(r.GetVolumeCapability()); err != nil {
		return err
	}
	if fs := r.GetVolumeContext()[ctxFSType]; fs != "" && !supportedFSTypes[fs] {
		return fmt.Errorf("%w: volume context %s=%q not supported (ext4, xfs)", ErrInvalid, ctxFSType, fs)
	}
	if _, err := stageMkfsOptions(r); err != nil {
		return fmt.Errorf("%w: volume context %s: %v", ErrInvalid, ctxMkfsOptions, err)
	}
	return nil
}

// stageMkfsOptions are the mkfs options of a NodeStageVolume request,
// checked against the allowlist of the filesystem it makes: the volume
// context comes from whoever calls, not necessarily from CreateVolume.
func stageMkfsOptions(r *csi.NodeStageVolumeRequest) ([]string, error) {
	s := r.GetVolumeContext()[ctxMkfsOptions]
	if isBlock(r.GetVolumeCapability()) {
		return splitMkfsOptions(s) // no filesystem is made
	}
	return mkfsOptionsFor(fsTypeFor(r.GetVolumeCapability(), r.GetVolumeContext()), s)
}

func validateNodeUnstageVolumeRequest(r *csi.NodeUnstageVolumeRequest) error {
	if err := checkVolumeID(r.GetVolumeId()); err != nil {
		return err
	}
	return checkPath("staging target path", r.GetStagingTargetPath())
}

func validateNodePublishVolumeRequest(r *csi.NodePublishVolumeRequest) error {
	if err := checkVolumeID(r.GetVolumeId()); err != nil {
		return err
	}
	if err := checkPath("staging target path", r.GetStagingTargetPath()); err != nil {
		return err
	}
	if err := checkPath("target path", r.GetTargetPath()); err != nil {
		return err
	}
	return checkCapability(r.GetVolumeCapability())
}

func validateNodeUnpublishVolumeRequest(r *csi.NodeUnpublishVolumeRequest) error {
	if err := checkVolumeID(r.GetVolumeId()); err != nil {
		return err
	}
	return checkPath("target path", r.GetTargetPath())
}

func validateNodeGetVolumeStatsRequest(r *csi.NodeGetVolumeStatsRequest) error {
	if err := checkVolumeID(r.GetVolumeId()); err != nil {
		return err
	}
	return checkVolumePath(r.GetVolumePath())
}

// checkVolumePath validates the volume_path of NodeGetVolumeStats and
// NodeExpandVolume. Unlike staging and target paths the driver never creates
// or mounts at it: it is only compared with the paths the volume is staged and
// published at, so a path that is not one of them is NotFound (as the CSI spec
// and csi-sanity want), not InvalidArgument.
func checkVolumePath(p string) error {
	switch {
	case p == "":
		return fmt.Errorf("%w: volume path missing", ErrInvalid)
	case len(p) > maxPathLength:
		return fmt.Errorf("%w: volume path of %d bytes exceeds %d", ErrInvalid, len(p), maxPathLength)
	case strings.ContainsRune(p, 0):
		return fmt.Errorf("%w: volume path contains a NUL byte", ErrInvalid)
	}
	return nil
}

func validateNodeExpandVolumeRequest(r *csi.NodeExpandVolumeRequest) error {
	if err := checkVolumeID(r.GetVolumeId()); err != nil {
		return err
	}
	if err := checkVolumePath(r.GetVolumePath()); err != nil {
		return err
	}
	// capacity_range is optional here: without it the node grows the device
	// and filesystem to the image's current size.
	if c := r.GetVolumeCapability(); c != nil {
		return checkCapability(c)
	}
	return nil
}

var validDriverName = regexp.MustCompile(`^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$`)

// validateDriverName follows the CSI rule: at most 63 characters, a domain
// name style (it also becomes a topology key prefix and a socket file name).
func validateDriverName(n string) error {
	if len(n) == 0 || len(n) > 63 || !validDriverName.MatchString(n) {
		return fmt.Errorf("driver name %q: want at most 63 lower-case letters, digits, '-' and '.', beginning and ending with a letter or digit", n)
	}
	return nil
}
