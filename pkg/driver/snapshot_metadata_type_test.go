package driver_test

import (
	"bytes"
	"context"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
)

const snapBlock = 64 << 10 // the default cluster size and bitmap granularity

// blocksOf widens ranges to the snapBlock-aligned blocks they touch: what a
// FIXED_LENGTH stream must list for the same coverage.
func blocksOf(rs []*csi.BlockMetadata) []int64 {
	var out []int64
	for _, r := range rs {
		for b := r.ByteOffset / snapBlock * snapBlock; b < r.ByteOffset+r.SizeBytes; b += snapBlock {
			if len(out) == 0 || out[len(out)-1] < b {
				out = append(out, b)
			}
		}
	}
	return out
}

// fixedBlocks checks a FIXED_LENGTH list (every tuple one aligned block) and
// returns the blocks' offsets.
func fixedBlocks(t *testing.T, rs []*csi.BlockMetadata) []int64 {
	t.Helper()
	var out []int64
	for _, r := range rs {
		if r.SizeBytes != snapBlock || r.ByteOffset%snapBlock != 0 {
			t.Fatalf("FIXED_LENGTH tuple %v: want %d-byte aligned blocks", r, snapBlock)
		}
		out = append(out, r.ByteOffset)
	}
	return out
}

// The block metadata type comes from the VolumeSnapshotClass parameter
// blockMetadataType, recorded with the snapshot: FIXED_LENGTH lists
// aligned cluster-size blocks covering exactly what VARIABLE_LENGTH lists,
// in pages of max_results from any starting_offset, and a full plus
// incremental backup made from FIXED_LENGTH tuples equals the disk.
func TestSnapshotBlockMetadataType(t *testing.T) {
	pool, c, md := startQcow2(t)
	ctx := context.Background()
	v, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "src", VolumeCapabilities: []*csi.VolumeCapability{capBlock(rw)},
		CapacityRange: &csi.CapacityRange{RequiredBytes: snapDisk, LimitBytes: snapDisk}})
	if err != nil {
		t.Fatal(err)
	}
	vol := v.Volume.VolumeId
	path := imageFile(pool, vol)
	rng := rand.New(rand.NewSource(11))
	model := make([]byte, snapDisk)
	snap := func(name, typ string) string {
		t.Helper()
		req := &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: vol, Parameters: map[string]string{
			"csi.storage.k8s.io/volumesnapshot/name": name, // added by the external-snapshotter: ignored
		}}
		if typ != "" {
			req.Parameters["blockMetadataType"] = typ
		}
		s, err := c.CreateSnapshot(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		return s.Snapshot.SnapshotId
	}
	alloc := func(id string, start int64, max int, typ csi.BlockMetadataType) []*csi.BlockMetadata {
		t.Helper()
		st, err := md.GetMetadataAllocated(ctx, &csi.GetMetadataAllocatedRequest{SnapshotId: id, StartingOffset: start, MaxResults: int32(max)})
		if err != nil {
			t.Fatal(err)
		}
		rs, err := collectAs(t, st.Recv, max, typ)
		if err != nil {
			t.Fatal(err)
		}
		return rs
	}
	delta := func(base, target string, start int64, max int, typ csi.BlockMetadataType) []*csi.BlockMetadata {
		t.Helper()
		st, err := md.GetMetadataDelta(ctx, &csi.GetMetadataDeltaRequest{BaseSnapshotId: base, TargetSnapshotId: target, StartingOffset: start, MaxResults: int32(max)})
		if err != nil {
			t.Fatal(err)
		}
		rs, err := collectAs(t, st.Recv, max, typ)
		if err != nil {
			t.Fatal(err)
		}
		return rs
	}
	const fixed, variable = csi.BlockMetadataType_FIXED_LENGTH, csi.BlockMetadataType_VARIABLE_LENGTH

	writeImage(t, path, rng, model)
	aVar, aFix := snap("a-var", ""), snap("a-fix", "FIXED_LENGTH")
	backup := make([]byte, snapDisk)
	full := alloc(aFix, 0, 0, fixed)
	if got, want := fixedBlocks(t, full), blocksOf(alloc(aVar, 0, 0, variable)); !slices.Equal(got, want) || len(got) == 0 {
		t.Fatalf("allocated blocks FIXED_LENGTH %v, VARIABLE_LENGTH widened %v", got, want)
	}
	for _, b := range full {
		copy(backup[b.ByteOffset:], model[b.ByteOffset:b.ByteOffset+b.SizeBytes])
	}
	if !bytes.Equal(backup, model) {
		t.Fatal("full backup from FIXED_LENGTH blocks differs from the disk")
	}

	writeImage(t, path, rng, model)
	bVar, bFix := snap("b-var", "VARIABLE_LENGTH"), snap("b-fix", "FIXED_LENGTH")
	incr := delta(aFix, bFix, 0, 0, fixed)
	if got, want := fixedBlocks(t, incr), blocksOf(delta(aFix, bVar, 0, 0, variable)); !slices.Equal(got, want) || len(got) == 0 {
		t.Fatalf("delta blocks FIXED_LENGTH %v, VARIABLE_LENGTH widened %v", got, want)
	}
	for _, b := range incr {
		copy(backup[b.ByteOffset:], model[b.ByteOffset:b.ByteOffset+b.SizeBytes])
	}
	if !bytes.Equal(backup, model) {
		t.Fatal("incremental backup from FIXED_LENGTH blocks differs from the disk")
	}
	// The target decides: a FIXED_LENGTH base does not change a
	// VARIABLE_LENGTH target's stream.
	delta(aFix, bVar, 0, 0, variable)

	// Pages and resumption: from the middle of a listed block, that block
	// comes first; every page size lists the same blocks.
	for _, max := range []int{1, 3, 0} {
		for _, start := range []int64{0, full[1].ByteOffset + 100, full[len(full)-1].ByteOffset + snapBlock - 1} {
			var want []int64
			for _, b := range fixedBlocks(t, full) {
				if b+snapBlock > start {
					want = append(want, b)
				}
			}
			if got := fixedBlocks(t, alloc(aFix, start, max, fixed)); !slices.Equal(got, want) {
				t.Errorf("allocated from %d, max_results %d: %v, want %v", start, max, got, want)
			}
			want = nil
			for _, b := range fixedBlocks(t, incr) {
				if b+snapBlock > start {
					want = append(want, b)
				}
			}
			if got := fixedBlocks(t, delta(aVar, bFix, start, max, fixed)); !slices.Equal(got, want) {
				t.Errorf("delta from %d, max_results %d: %v, want %v", start, max, got, want)
			}
		}
	}

	// The choice is in the snapshot's record.
	rec, err := os.ReadFile(filepath.Join(pool, ".snapshots", bFix+".json"))
	if err != nil || !strings.Contains(string(rec), `"blockMetadataType": "FIXED_LENGTH"`) {
		t.Fatalf("record of %s: %s %v", bFix, rec, err)
	}

	// Bad parameters, and one name asked with another type.
	for _, tc := range []struct {
		name   string
		params map[string]string
		code   codes.Code
		msg    string
	}{
		{"bad type", map[string]string{"blockMetadataType": "fixed"}, codes.InvalidArgument, `parameter blockMetadataType="fixed": want FIXED_LENGTH or VARIABLE_LENGTH`},
		{"unknown parameter", map[string]string{"blockSize": "4096"}, codes.InvalidArgument, `unknown snapshot parameter "blockSize"`},
		{"same name other type", map[string]string{"blockMetadataType": "VARIABLE_LENGTH"}, codes.AlreadyExists, "blockMetadataType FIXED_LENGTH, not VARIABLE_LENGTH"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "b-fix", SourceVolumeId: vol, Parameters: tc.params})
			wantCode(t, err, tc.code, tc.msg)
		})
	}
	if s, err := c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "b-fix", SourceVolumeId: vol,
		Parameters: map[string]string{"blockMetadataType": "FIXED_LENGTH"}}); err != nil || s.Snapshot.SnapshotId != bFix {
		t.Fatalf("repeated create: %v %v", s, err)
	}
}

// Options.BlockMetadataType (serve --block-metadata-type) is the type of
// snapshots whose class does not say; New refuses a bad one.
func TestSnapshotBlockMetadataTypeDefault(t *testing.T) {
	pool, c, md := startQcow2With(t, driver.Options{BlockMetadataType: "FIXED_LENGTH"})
	ctx := context.Background()
	v, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: []*csi.VolumeCapability{capBlock(rw)},
		CapacityRange: &csi.CapacityRange{RequiredBytes: snapDisk, LimitBytes: snapDisk}})
	if err != nil {
		t.Fatal(err)
	}
	writeImage(t, imageFile(pool, v.Volume.VolumeId), rand.New(rand.NewSource(5)), make([]byte, snapDisk))
	for _, tc := range []struct {
		name, param string
		want        csi.BlockMetadataType
	}{
		{"default", "", csi.BlockMetadataType_FIXED_LENGTH},
		{"class says", "VARIABLE_LENGTH", csi.BlockMetadataType_VARIABLE_LENGTH},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := &csi.CreateSnapshotRequest{Name: tc.name, SourceVolumeId: v.Volume.VolumeId}
			if tc.param != "" {
				req.Parameters = map[string]string{"blockMetadataType": tc.param}
			}
			s, err := c.CreateSnapshot(ctx, req)
			if err != nil {
				t.Fatal(err)
			}
			st, err := md.GetMetadataAllocated(ctx, &csi.GetMetadataAllocatedRequest{SnapshotId: s.Snapshot.SnapshotId})
			if err != nil {
				t.Fatal(err)
			}
			if rs, err := collectAs(t, st.Recv, 0, tc.want); err != nil || len(rs) == 0 {
				t.Fatalf("%v %v", rs, err)
			}
		})
	}
	_, err = driver.New(driver.Options{Pool: t.TempDir(), NodeID: "n", BlockMetadataType: "BLOCKS"}, driver.Seams{Images: driver.Qcow2Images{}})
	if err == nil || !strings.Contains(err.Error(), `block metadata type "BLOCKS"`) {
		t.Fatalf("New with a bad block metadata type: %v", err)
	}
}
