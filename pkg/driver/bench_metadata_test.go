package driver_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"github.com/qcow2-csi/qcow2-csi/pkg/snapshotter"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// BenchmarkSnapshotMetadata: the SnapshotMetadata service on volumes of
// 10 GiB, 100 GiB and 1 TiB, each with 1 GiB of data written between two
// snapshots in 16384 scattered 64 KiB runs (the same run count at every
// size, so the rows show what the volume size alone costs). Per size:
//
//   - grpc-delta, grpc-allocated: GetMetadataDelta(s1, s2) and
//     GetMetadataAllocated(s2) through the driver's gRPC socket, every
//     message of the stream received (the driver opens the closed image per
//     call, as for an unstaged volume);
//   - snapshotter-delta, snapshotter-allocated: snapshotter.Delta and
//     Allocated over the whole disk on the image opened once;
//   - qemu-delta, qemu-allocated: the same questions asked of qemu on the
//     same image, one whole process pair per op: `nbdinfo
//     --map=qemu:dirty-bitmap:B -- [ qemu-nbd -r -B B ]` (B is the
//     checkpoint bitmap that recorded s1..s2) and `nbdinfo --map -- [
//     qemu-nbd -r -l s2 ]`. Skipped when qemu-nbd or nbdinfo is missing.
//
// Every op checks it found the 16384 written runs. tests/bench/cbt.sh runs
// this and prints the table.
func BenchmarkSnapshotMetadata(b *testing.B) {
	for _, size := range []int64{10 << 30, 100 << 30, 1 << 40} {
		b.Run(fmt.Sprintf("%dGiB", size>>30), func(b *testing.B) { benchMetadata(b, size) })
	}
}

const (
	metaRuns   = 16384
	metaRunLen = 64 << 10
)

func benchMetadata(b *testing.B, size int64) {
	pool := b.TempDir()
	srv := drivertest.Start(b, driver.Options{Pool: pool}, driver.Seams{Images: driver.Qcow2Images{}})
	c := dial(b, srv)
	conn, err := grpc.NewClient("unix://"+srv.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	md := csi.NewSnapshotMetadataClient(conn)
	ctx := context.Background()
	v, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "meta", VolumeCapabilities: []*csi.VolumeCapability{capBlock(rw)},
		CapacityRange: &csi.CapacityRange{RequiredBytes: size, LimitBytes: size}})
	if err != nil {
		b.Fatal(err)
	}
	vol := v.Volume.VolumeId
	path := imageFile(pool, vol)
	s1, err := c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s1", SourceVolumeId: vol})
	if err != nil {
		b.Fatal(err)
	}
	img, err := qcow2.Open(path, qcow2.OpenOptions{})
	if err != nil {
		b.Fatal(err)
	}
	p := bytes.Repeat([]byte{0xa5}, metaRunLen)
	for i := int64(0); i < metaRuns; i++ {
		if _, err := img.WriteAt(p, i*(size/metaRuns)); err != nil {
			b.Fatal(err)
		}
	}
	if err := img.Close(); err != nil {
		b.Fatal(err)
	}
	s2, err := c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s2", SourceVolumeId: vol})
	if err != nil {
		b.Fatal(err)
	}
	base, target := s1.Snapshot.SnapshotId, s2.Snapshot.SnapshotId

	// The checkpoint bitmaps, oldest first: the first recorded s1..s2.
	img, err = qcow2.Open(path, qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		b.Fatal(err)
	}
	var seqs []uint64
	for _, bm := range img.Bitmaps() {
		var seq uint64
		if _, err := fmt.Sscanf(bm.Name, snapshotter.BitmapPrefix+"%d", &seq); err == nil {
			seqs = append(seqs, seq)
		}
	}
	if len(seqs) != 2 || seqs[0] > seqs[1] {
		b.Fatalf("checkpoint bitmaps %v, want two in order", seqs)
	}
	bitmap := snapshotter.BitmapName(seqs[0])
	if err := img.Close(); err != nil { // the driver opens it per call
		b.Fatal(err)
	}

	want := func(b *testing.B, what string, n int) {
		if n != metaRuns {
			b.Fatalf("%s: %d ranges, want %d", what, n, metaRuns)
		}
	}
	b.Run("grpc-delta", func(b *testing.B) {
		for range b.N {
			s, err := md.GetMetadataDelta(ctx, &csi.GetMetadataDeltaRequest{BaseSnapshotId: base, TargetSnapshotId: target})
			if err != nil {
				b.Fatal(err)
			}
			want(b, "GetMetadataDelta", drain(b, s.Recv))
		}
	})
	b.Run("grpc-allocated", func(b *testing.B) {
		for range b.N {
			s, err := md.GetMetadataAllocated(ctx, &csi.GetMetadataAllocatedRequest{SnapshotId: target})
			if err != nil {
				b.Fatal(err)
			}
			want(b, "GetMetadataAllocated", drain(b, s.Recv))
		}
	})
	img, err = qcow2.Open(path, qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		b.Fatal(err)
	}
	b.Run("snapshotter-delta", func(b *testing.B) {
		for range b.N {
			rs, err := snapshotter.Delta(img, seqs[0], seqs[1], 0, size)
			if err != nil {
				b.Fatal(err)
			}
			want(b, "Delta", len(rs))
		}
	})
	b.Run("snapshotter-allocated", func(b *testing.B) {
		for range b.N {
			rs, err := snapshotter.Allocated(img, target, 0, size)
			if err != nil {
				b.Fatal(err)
			}
			want(b, "Allocated", len(rs))
		}
	})
	if err := img.Close(); err != nil {
		b.Fatal(err)
	}
	b.Run("qemu-delta", func(b *testing.B) {
		nbdinfo, qemuNBD := peer.Require(b, "nbdinfo"), peer.Require(b, "qemu-nbd")
		for range b.N {
			want(b, "qemu-nbd -B", nbdMap(b, nbdinfo, "qemu:dirty-bitmap:"+bitmap, "dirty",
				qemuNBD, "-r", "-f", "qcow2", "-B", bitmap, path))
		}
	})
	b.Run("qemu-allocated", func(b *testing.B) {
		nbdinfo, qemuNBD := peer.Require(b, "nbdinfo"), peer.Require(b, "qemu-nbd")
		for range b.N {
			want(b, "qemu-nbd -l", nbdMap(b, nbdinfo, "base:allocation", "data",
				qemuNBD, "-r", "-f", "qcow2", "-l", target, path))
		}
	})
}

// drain receives a metadata stream to its end and counts its tuples.
func drain[T interface{ GetBlockMetadata() []*csi.BlockMetadata }](b *testing.B, recv func() (T, error)) int {
	n := 0
	for {
		r, err := recv()
		if errors.Is(err, io.EOF) {
			return n
		}
		if err != nil {
			b.Fatal(err)
		}
		n += len(r.GetBlockMetadata())
	}
}

// nbdMap runs `nbdinfo --map=ctx -- [ server... ]` and counts the extents
// whose description is exactly kind ("data", "dirty").
func nbdMap(b *testing.B, nbdinfo, ctx, kind string, server ...string) int {
	args := append([]string{"--map=" + ctx, "--", "["}, server...)
	out, err := exec.Command(nbdinfo, append(args, "]")...).Output()
	if err != nil {
		b.Fatalf("nbdinfo %s: %v", strings.Join(args, " "), err)
	}
	n := 0
	for _, l := range strings.Split(string(out), "\n") {
		f := strings.Fields(l)
		if len(f) == 4 && f[3] == kind {
			n++
		}
	}
	return n
}
