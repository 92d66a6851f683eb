package driver_test

import (
	"context"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
)

// TestMkfsOptionsAllowlist: mkfsOptions pass only options on the allowlist
// of the filesystem the volume gets; the others are refused by name, at
// CreateVolume and again at NodeStageVolume (a volume context is not
// trusted: anyone on the CSI socket can write one).
func TestMkfsOptionsAllowlist(t *testing.T) {
	_, c := startRaw(t, driver.Options{})
	ctx := context.Background()
	create := func(opts string, cp *csi.VolumeCapability) error {
		_, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "mkfs-" + cp.GetMount().GetFsType(),
			Parameters: map[string]string{"mkfsOptions": opts}, VolumeCapabilities: []*csi.VolumeCapability{cp}})
		return err
	}
	stage := func(opts string, cp *csi.VolumeCapability) error {
		_, err := c.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: "vol-none", StagingTargetPath: t.TempDir(),
			VolumeCapability: cp, VolumeContext: map[string]string{"mkfsOptions": opts}})
		return err
	}
	ext4, xfs := capMount(rw, ""), capMount(rw, "xfs")
	for _, tc := range []struct {
		opts string
		cap  *csi.VolumeCapability
		msg  string
	}{
		{"-L data -d /etc", ext4, "mkfs.ext4 option -d is refused: it copies a host directory or tarball into the volume"},
		{"-l /etc/badblocks", ext4, "mkfs.ext4 option -l is refused"},
		{"-z /var/lib/undo", ext4, "mkfs.ext4 option -z is refused"},
		{"-J device=/dev/sda", ext4, "mkfs.ext4 -J sub-option device is refused"},
		{"-E offset=4096", ext4, "mkfs.ext4 -E sub-option offset is refused"},
		{"-E nosuch=1", ext4, "mkfs.ext4 -E sub-option nosuch is not allowed (allowed: "},
		{"-n", ext4, "mkfs.ext4 option -n is refused"},
		// errors=panic in the superblock: a full pool would panic the node.
		{"-e panic", ext4, "mkfs.ext4 option -e panic is refused: an error on the volume would panic the node's kernel (allowed: continue, remount-ro)"},
		{"-e Panic", ext4, "mkfs.ext4 option -e Panic is refused"},
		{"-Y", ext4, "mkfs.ext4 option -Y is not allowed (allowed: -b"},
		{"-qd /etc", ext4, `mkfs argument "-qd": write each option as its own argument`},
		{"-b4096", ext4, `mkfs argument "-b4096": write each option as its own argument`},
		{"-L", ext4, "mkfs.ext4 option -L needs a value"},
		{"-L x extra", ext4, `mkfs argument "extra" is not an option`},
		{"-p /etc/proto", xfs, "mkfs.xfs option -p is refused"},
		{"-l logdev=/dev/sda", xfs, "mkfs.xfs -l sub-option logdev is refused"},
		{"-d name=/dev/sdb", xfs, "mkfs.xfs -d sub-option name is refused"},
		{"-r rtdev=/dev/sdc", xfs, "mkfs.xfs option -r is refused"},
		{"-c options=/etc/x", xfs, "mkfs.xfs option -c is refused"},
		// -d means another thing to each tool: the allowlist is per filesystem.
		{"-d agcount=4", ext4, "mkfs.ext4 option -d is refused"},
		{"-d /etc", xfs, "mkfs.xfs -d sub-option /etc is not allowed"},
	} {
		t.Run(tc.opts+"/"+tc.cap.GetMount().GetFsType(), func(t *testing.T) {
			wantCode(t, create(tc.opts, tc.cap), codes.InvalidArgument, "parameter mkfsOptions: "+tc.msg)
			wantCode(t, stage(tc.opts, tc.cap), codes.InvalidArgument, "volume context mkfsOptions: "+tc.msg)
		})
	}
	// Allowed: the volume is made, and staging gets past validation (to the
	// volume lookup).
	for _, tc := range []struct {
		opts string
		cap  *csi.VolumeCapability
	}{
		{"-L data -b 4096 -e remount-ro -E root_owner=1000:1000,lazy_itable_init=1 -O ^metadata_csum -I 256", ext4},
		{"-L data -d agcount=4,su=64k,sw=2 -m reflink=1 -n ftype=1", xfs},
	} {
		if err := create(tc.opts, tc.cap); err != nil {
			t.Errorf("CreateVolume with mkfsOptions %q: %v", tc.opts, err)
		}
		wantCode(t, stage(tc.opts, tc.cap), codes.NotFound, `volume "vol-none": not found`)
	}
}
