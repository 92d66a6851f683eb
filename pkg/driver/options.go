package driver

import (
	"fmt"
	"log/slog"
	"math"
	"path/filepath"
	"time"
)

// Mode selects which CSI services a process serves. In a cluster the node
// plugins run Mode "node" (the Node service, plus the node agent that the
// controller's Router reaches over mutual TLS, agent.go) and one Deployment
// runs `serve --mode=controller`, which is a Router (router.go), not a
// Driver: it owns no pool. A Driver of Mode "controller" serves the
// controller services over its own pool (tests). "all" is the single-process
// embedded driver.
type Mode string

const (
	// ModeController serves Identity and Controller.
	ModeController Mode = "controller"
	// ModeNode serves Identity and Node.
	ModeNode Mode = "node"
	// ModeAll serves Identity, Controller and Node.
	ModeAll Mode = "all"
)

// ParseMode checks a --mode value.
func ParseMode(s string) (Mode, error) {
	switch m := Mode(s); m {
	case ModeController, ModeNode, ModeAll:
		return m, nil
	}
	return "", fmt.Errorf("mode %q: want controller, node or all", s)
}

func (m Mode) controller() bool { return m == ModeController || m == ModeAll }
func (m Mode) node() bool       { return m == ModeNode || m == ModeAll }

// Defaults for Options fields left zero.
const (
	DefaultDriverName  = "qcow2.csi.qcow2-csi.io"
	DefaultVolumeSize  = 1 << 30 // CreateVolume without a capacity range
	DefaultClusterSize = 64 << 10
	DefaultFSType      = "ext4"
	// DefaultOvercommitRatio is serve's --overcommit-ratio (docs/operations.md
	// says why 10).
	DefaultOvercommitRatio = 10
	// DefaultPoolWarningPercent is when the pool counts as nearly full.
	DefaultPoolWarningPercent = 85
	// DefaultKubeletDir is serve's --kubelet-dir.
	DefaultKubeletDir = "/var/lib/kubelet"
)

// Options configure a Driver. The zero value of every field except Pool and
// NodeID means the documented default.
type Options struct {
	// Mode decides which services register (default all).
	Mode Mode
	// DriverName is the CSI plugin name (GetPluginInfo); it also prefixes the
	// topology key "<DriverName>/node".
	DriverName string
	// Version is reported as the vendor version.
	Version string
	// NodeID is this node's ID (NodeGetInfo) and the value of the topology key
	// of the volumes this node's pool holds. Required.
	NodeID string
	// Pool is the directory holding the node's images and their metadata.
	// Required; created if missing.
	Pool string
	// MaxVolumes is NodeGetInfo's max_volumes_per_node (0: no limit).
	MaxVolumes int64
	// CapacityReserve is kept free in the pool: GetCapacity reports the free
	// space minus this, and CreateVolume refuses preallocated volumes that would
	// eat into it. Bytes.
	CapacityReserve int64
	// CapacityReservePercent is a reserve as a share of the pool filesystem's
	// size; the larger of the two reserves applies.
	CapacityReservePercent float64
	// OvercommitRatio bounds thin provisioning: the virtual sizes of the
	// pool's volumes (preallocated ones included) may add up to at most
	// this many times the pool filesystem's size minus the reserve.
	// CreateVolume and ControllerExpandVolume refuse more with
	// ResourceExhausted. 0 means no limit (serve's --overcommit-ratio
	// defaults to DefaultOvercommitRatio).
	OvercommitRatio float64
	// PoolWarningPercent is how full (percent of the pool filesystem) the
	// pool may get before every volume's condition turns abnormal and the
	// pool_nearly_full metric is 1, so that someone acts before thin
	// volumes meet ENOSPC (default DefaultPoolWarningPercent).
	PoolWarningPercent float64
	// DefaultVolumeSize is the size of a volume created without a capacity
	// range (default 1 GiB).
	DefaultVolumeSize int64
	// ControllerExpand advertises the controller EXPAND_VOLUME capability. When
	// false, expansion is entirely node-side (NodeExpandVolume), which is the
	// flow that works with a central csi-resizer in a node-local deployment:
	// the resizer then only records the new size (docs/driver.md).
	ControllerExpand bool
	// AttachBackend is "auto", "nbd" or "fuse": which Attacher the node uses.
	// "auto" takes the first available of nbd, fuse.
	AttachBackend string
	// BlockMetadataType is how the SnapshotMetadata service reports the
	// ranges of a snapshot created without the VolumeSnapshotClass
	// parameter blockMetadataType: "VARIABLE_LENGTH" (default) or
	// "FIXED_LENGTH". CSI requests carry no type; the choice is recorded with
	// each snapshot when it is created.
	BlockMetadataType string
	// KubeletDir confines the node's staging and target paths: they must
	// lie below it, with no symbolic link below it (the kubelet makes
	// none there). Default DefaultKubeletDir; "/" confines nothing but the
	// symbolic links.
	KubeletDir string
	// EnableGetSnapshot advertises the GET_SNAPSHOT controller capability
	// (CSI 1.12, alpha). Off by default: csi-test v5.4.0, the released
	// sanity suite, fails a driver that lists it. GetSnapshot answers
	// either way.
	EnableGetSnapshot bool
	// ReattachTimeout bounds the re-attach of devices on start.
	ReattachTimeout time.Duration
	// GroupHoldTimeout is the longest a group snapshot holds its members'
	// I/O (docs/group-snapshots.md): where the protocol runs, the time the
	// nodes have to prepare; on a node, the deadline at which it releases
	// on its own. Default DefaultGroupHoldTimeout, at most
	// MaxGroupHoldTimeout (below the kernel's nbd request timeout).
	GroupHoldTimeout time.Duration
	// Logger receives the domain packages' logs (the driver itself logs with
	// klog). Optional.
	Logger *slog.Logger
}

func (o *Options) setDefaults() {
	if o.Mode == "" {
		o.Mode = ModeAll
	}
	if o.DriverName == "" {
		o.DriverName = DefaultDriverName
	}
	if o.Version == "" {
		o.Version = "dev"
	}
	if o.DefaultVolumeSize == 0 {
		o.DefaultVolumeSize = DefaultVolumeSize
	}
	if o.AttachBackend == "" {
		o.AttachBackend = "auto"
	}
	if o.PoolWarningPercent == 0 {
		o.PoolWarningPercent = DefaultPoolWarningPercent
	}
	if o.BlockMetadataType == "" {
		o.BlockMetadataType = blockMetadataVariable
	}
	if o.KubeletDir == "" {
		o.KubeletDir = DefaultKubeletDir
	}
	if o.ReattachTimeout == 0 {
		o.ReattachTimeout = 2 * time.Minute
	}
	if o.GroupHoldTimeout == 0 {
		o.GroupHoldTimeout = DefaultGroupHoldTimeout
	}
}

func (o *Options) validate() error {
	if _, err := ParseMode(string(o.Mode)); err != nil {
		return err
	}
	if o.Pool == "" {
		return fmt.Errorf("pool directory is required")
	}
	if o.NodeID == "" {
		return fmt.Errorf("node ID is required")
	}
	// The node's name goes into the IDs it issues (ids.go).
	if err := checkNodeName(o.NodeID); err != nil {
		return err
	}
	if err := validateDriverName(o.DriverName); err != nil {
		return err
	}
	if o.MaxVolumes < 0 {
		return fmt.Errorf("max volumes %d is negative", o.MaxVolumes)
	}
	if err := checkGroupHold(o.GroupHoldTimeout); err != nil {
		return err
	}
	if o.CapacityReserve < 0 || o.CapacityReservePercent < 0 || o.CapacityReservePercent > 100 {
		return fmt.Errorf("capacity reserve %d bytes / %g%% out of range", o.CapacityReserve, o.CapacityReservePercent)
	}
	if o.OvercommitRatio < 0 || math.IsNaN(o.OvercommitRatio) || math.IsInf(o.OvercommitRatio, 0) {
		return fmt.Errorf("overcommit ratio %g: want 0 (no limit) or a positive number", o.OvercommitRatio)
	}
	if !(o.PoolWarningPercent > 0 && o.PoolWarningPercent <= 100) {
		return fmt.Errorf("pool warning threshold %g%%: want more than 0 and at most 100", o.PoolWarningPercent)
	}
	if o.DefaultVolumeSize < 0 {
		return fmt.Errorf("default volume size %d is negative", o.DefaultVolumeSize)
	}
	switch o.AttachBackend {
	case "auto", "nbd", "fuse":
	default:
		return fmt.Errorf("attach backend %q: want auto, nbd or fuse", o.AttachBackend)
	}
	if !filepath.IsAbs(o.KubeletDir) {
		return fmt.Errorf("kubelet directory %q is not absolute", o.KubeletDir)
	}
	if _, ok := blockMetadataTypes[o.BlockMetadataType]; !ok {
		return fmt.Errorf("block metadata type %q: want %s or %s", o.BlockMetadataType, blockMetadataFixed, blockMetadataVariable)
	}
	return nil
}

// TopologyKey is the topology segment key that pins a volume to the node
// holding its pool.
func (o *Options) TopologyKey() string { return o.DriverName + "/node" }
