package driver_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// TestBadInput sends hostile and malformed requests through the gRPC socket
// and checks the exact code and that the message names the problem. None may
// create a file outside the pool.
func TestBadInput(t *testing.T) {
	srv, c := startRaw(t, driver.Options{})
	ctx := context.Background()
	pool := srv.Driver.Options().Pool
	long := strings.Repeat("a", 129)
	caps := []*csi.VolumeCapability{capMount(rw, "")}
	create := func(name string, cr *csi.CapacityRange, params map[string]string, caps ...*csi.VolumeCapability) func() error {
		return func() error {
			_, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: cr, Parameters: params, VolumeCapabilities: caps})
			return err
		}
	}
	del := func(id string) func() error {
		return func() error { _, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); return err }
	}
	stage := func(id, path string, cp *csi.VolumeCapability) func() error {
		return func() error {
			_, err := c.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: path, VolumeCapability: cp})
			return err
		}
	}
	tmp := t.TempDir()
	tests := []struct {
		name string
		call func() error
		code codes.Code
		msg  string
	}{
		{"delete path traversal", del("../../etc/passwd"), codes.InvalidArgument, `volume ID "../../etc/passwd"`},
		{"delete slash", del("a/b"), codes.InvalidArgument, `volume ID "a/b"`},
		{"delete dotdot", del(".."), codes.InvalidArgument, `volume ID ".."`},
		{"delete dotdot inside", del("a..b"), codes.InvalidArgument, `volume ID "a..b"`},
		{"delete hidden", del(".tmp-x"), codes.InvalidArgument, `volume ID ".tmp-x"`},
		{"delete too long", del(long), codes.InvalidArgument, "volume ID of 129 bytes exceeds 128"},
		{"delete empty", del(""), codes.InvalidArgument, "volume ID missing"},
		{"delete NUL", del("a\x00b"), codes.InvalidArgument, "only letters, digits"},
		{"get traversal", func() error {
			_, err := c.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: "../x"})
			return err
		}, codes.InvalidArgument, `volume ID "../x"`},
		{"get unknown", func() error {
			_, err := c.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: "vol-unknown"})
			return err
		}, codes.NotFound, `volume "vol-unknown": not found`},
		{"create empty name", create("", nil, nil, caps...), codes.InvalidArgument, "volume name missing"},
		{"create long name", create(strings.Repeat("n", 257), nil, nil, caps...), codes.InvalidArgument, "volume name of 257 bytes exceeds 256"},
		{"create no caps", create("v", nil, nil), codes.InvalidArgument, "volume capabilities missing"},
		{"create negative", create("v", &csi.CapacityRange{RequiredBytes: -1}, nil, caps...), codes.InvalidArgument, "required_bytes -1 / limit_bytes 0: negative"},
		{"create required above limit", create("v", &csi.CapacityRange{RequiredBytes: 2 << 20, LimitBytes: 1 << 20}, nil, caps...), codes.InvalidArgument, "required_bytes 2097152 exceeds limit_bytes 1048576"},
		{"create too large", create("v", &csi.CapacityRange{RequiredBytes: 1 << 62}, nil, caps...), codes.OutOfRange, "at most 2251799813685248 with cluster size 65536"},
		{"create too large small clusters", create("v", &csi.CapacityRange{RequiredBytes: 1 << 40}, map[string]string{"clusterSize": "512"}, caps...), codes.OutOfRange, "at most 137438953472 with cluster size 512"},
		{"create limit below cluster", create("v", &csi.CapacityRange{RequiredBytes: 1, LimitBytes: 4096}, nil, caps...), codes.OutOfRange, "no multiple of the cluster size 65536 lies in [1, 4096]"},
		{"create multi-node", create("v", nil, nil, capMount(csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER, "")), codes.InvalidArgument, "access mode MULTI_NODE_MULTI_WRITER not supported"},
		{"create unknown mode", create("v", nil, nil, capMount(csi.VolumeCapability_AccessMode_UNKNOWN, "")), codes.InvalidArgument, "access mode UNKNOWN not supported"},
		{"create btrfs", create("v", nil, nil, capMount(rw, "btrfs")), codes.InvalidArgument, `fs_type "btrfs" not supported`},
		{"create no access type", create("v", nil, nil, &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: rw}}), codes.InvalidArgument, "neither block nor mount"},
		{"create unknown parameter", create("v", nil, map[string]string{"clustersize": "64k"}, caps...), codes.InvalidArgument, `unknown parameter "clustersize"`},
		{"create bad cluster size", create("v", nil, map[string]string{"clusterSize": "3000"}, caps...), codes.InvalidArgument, `clusterSize="3000": want a power of two`},
		{"create bad prealloc", create("v", nil, map[string]string{"preallocation": "sparse"}, caps...), codes.InvalidArgument, `preallocation="sparse"`},
		{"create extendedL2 plain", create("v", nil, map[string]string{"extendedL2": "true"}, caps...), codes.InvalidArgument, "extendedL2=true is for encrypted volumes (encrypted=true) only"},
		{"create extendedL2 small clusters", create("v", nil, map[string]string{"extendedL2": "true", "encrypted": "true", "clusterSize": "4k"}, caps...), codes.InvalidArgument, "extendedL2=true needs clusterSize of at least 16K (have 4096)"},
		{"create bad extendedL2", create("v", nil, map[string]string{"extendedL2": "yes"}, caps...), codes.InvalidArgument, `extendedL2="yes"`},
		{"create bad lazy", create("v", nil, map[string]string{"lazyRefcounts": "maybe"}, caps...), codes.InvalidArgument, `lazyRefcounts="maybe"`},
		{"create bad mkfs", create("v", nil, map[string]string{"mkfsOptions": "-L $(reboot)"}, caps...), codes.InvalidArgument, `mkfs argument "$(reboot)"`},
		{"create errors=panic", create("v", nil, nil, capMountFlags("errors=panic")), codes.InvalidArgument, "mount flag errors=panic is refused"},
		{"create errors=panic in a list", create("v", nil, nil, capMountFlags("noatime,errors=panic")), codes.InvalidArgument, "mount flag errors=panic is refused"},
		{"stage errors=panic", stage("v", tmp, capMountFlags("errors=panic")), codes.InvalidArgument, "mount flag errors=panic is refused"},
		{"publish errors=panic", func() error {
			_, err := c.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: "v", StagingTargetPath: tmp, TargetPath: tmp + "/t", VolumeCapability: capMountFlags("ro", "errors=panic")})
			return err
		}, codes.InvalidArgument, "mount flag errors=panic is refused"},
		{"create fs conflict", create("v", nil, map[string]string{"fsType": "xfs"}, capMount(rw, "ext4")), codes.InvalidArgument, "fsType=xfs contradicts the capability's fs_type ext4"},
		{"create content source", func() error {
			_, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: caps,
				VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{}}}})
			return err
		}, codes.InvalidArgument, "volume_content_source names neither a snapshot nor a volume"},
		{"create other node", func() error {
			_, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: caps,
				AccessibilityRequirements: &csi.TopologyRequirement{Requisite: []*csi.Topology{{Segments: map[string]string{driver.DefaultDriverName + "/node": "elsewhere"}}}}})
			return err
		}, codes.ResourceExhausted, "node test-node is not in the requisite topology"},
		{"list bad token", func() error {
			_, err := c.ListVolumes(ctx, &csi.ListVolumesRequest{StartingToken: "next:../x"})
			return err
		}, codes.Aborted, `starting_token "next:../x" was not issued by this driver`},
		{"list negative", func() error {
			_, err := c.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: -1})
			return err
		}, codes.InvalidArgument, "max_entries -1 is negative"},
		{"expand traversal", func() error {
			_, err := c.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: "../v", CapacityRange: &csi.CapacityRange{RequiredBytes: 1}})
			return err
		}, codes.InvalidArgument, `volume ID "../v"`},
		{"expand no range", func() error {
			_, err := c.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: "v"})
			return err
		}, codes.InvalidArgument, "capacity range missing"},
		{"stage traversal", stage("../v", tmp, capMount(rw, "")), codes.InvalidArgument, `volume ID "../v"`},
		{"stage relative path", stage("v", "rel/path", capMount(rw, "")), codes.InvalidArgument, `staging target path "rel/path" is not absolute`},
		{"stage unclean path", stage("v", "/a/../etc", capMount(rw, "")), codes.InvalidArgument, `staging target path "/a/../etc" is not clean`},
		{"stage multi-node", stage("v", tmp, capBlock(csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY)), codes.InvalidArgument, "access mode MULTI_NODE_READER_ONLY not supported"},
		{"stage unknown", stage("vol-unknown", tmp, capMount(rw, "")), codes.NotFound, `volume "vol-unknown": not found`},
		{"stage bad context", func() error {
			_, err := c.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: "v", StagingTargetPath: tmp, VolumeCapability: capMount(rw, ""),
				VolumeContext: map[string]string{"fsType": "vfat"}})
			return err
		}, codes.InvalidArgument, `volume context fsType="vfat"`},
		{"publish no staging", func() error {
			_, err := c.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: "v", TargetPath: tmp, VolumeCapability: capMount(rw, "")})
			return err
		}, codes.InvalidArgument, "staging target path missing"},
		{"unpublish traversal", func() error {
			_, err := c.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "v", TargetPath: "/x/../../etc"})
			return err
		}, codes.InvalidArgument, `target path "/x/../../etc" is not clean`},
		{"stats unknown", func() error {
			_, err := c.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: "vol-x", VolumePath: "/tmp"})
			return err
		}, codes.NotFound, `volume "vol-x": not found`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			wantCode(t, tc.call(), tc.code, tc.msg)
		})
	}
	// Nothing may have been created: the pool holds only the probe file.
	ents, err := os.ReadDir(pool)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if e.Name() != ".probe" {
			t.Errorf("pool holds %s after bad requests only", filepath.Join(pool, e.Name()))
		}
	}
}

// TestNodeWithoutAttachBackend: a node with no usable backend reports not
// ready and answers NodeStage with FailedPrecondition saying what to do.
func TestNodeWithoutAttachBackend(t *testing.T) {
	_, c := startRaw(t, driver.Options{})
	ctx := context.Background()
	v, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-1", VolumeCapabilities: []*csi.VolumeCapability{capMount(rw, "")}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.Volume.VolumeId, StagingTargetPath: t.TempDir(), VolumeCapability: capMount(rw, "")})
	wantCode(t, err, codes.FailedPrecondition, "node test-node: no attach backend is built into this plugin")
	p, err := c.Probe(ctx, &csi.ProbeRequest{})
	if err != nil || p.GetReady().GetValue() {
		t.Fatalf("Probe = %v, %v; want not ready", p, err)
	}
}

// unavailable is an attach backend this node lacks.
type unavailable struct{ name, why string }

func (u unavailable) Name() string { return u.name }
func (u unavailable) Available() error {
	return fmt.Errorf("%w: %s", nbdattach.ErrUnavailable, u.why)
}
func (u unavailable) Attach(context.Context, string, nbdattach.Backend, nbdattach.AttachOptions) (nbdattach.Device, error) {
	return nil, u.Available()
}
func (u unavailable) Reattach(context.Context, string, nbdattach.Backend, nbdattach.AttachOptions) (nbdattach.Device, error) {
	return nil, u.Available()
}
func (u unavailable) List(context.Context) ([]nbdattach.DeviceInfo, error) { return nil, nil }

func TestNodeWithoutNBDNorFUSE(t *testing.T) {
	_, c := startRaw(t, driver.Options{},
		unavailable{"nbd", "no /sys/module/nbd"}, unavailable{"fuse", "no /dev/fuse"})
	ctx := context.Background()
	v, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-1", VolumeCapabilities: []*csi.VolumeCapability{capMount(rw, "")}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.Volume.VolumeId, StagingTargetPath: t.TempDir(), VolumeCapability: capMount(rw, "")})
	wantCode(t, err, codes.FailedPrecondition,
		"node test-node cannot attach volumes (--attach-backend=auto): nbd: attach backend unavailable: no /sys/module/nbd; fuse: attach backend unavailable: no /dev/fuse. Load the nbd kernel module (modprobe nbd)")
}

// capMountFlags is a single-node ext4 mount capability with mount flags.
func capMountFlags(flags ...string) *csi.VolumeCapability {
	c := capMount(rw, "ext4")
	c.GetMount().MountFlags = flags
	return c
}
