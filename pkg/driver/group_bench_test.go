package driver_test

import (
	"context"
	"fmt"
	"math/rand"
	"slices"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// BenchmarkGroupSnapshotHold measures how long a group snapshot holds the
// I/O of 4 staged volumes under random 4 KiB writes (2 writers each): on
// one node (the driver's own GroupController), and across two nodes (2
// volumes each, through the controller and the agents). The hold is the
// node's own figure (qcow2_csi_group_snapshot_hold_seconds: from the
// prepare, drain included, to the release); across nodes, the longer of
// the two. p50 and p99 in ms; the target is p50 < 50 ms for 4
// volumes on one node. Run:
//
//	flock /work/logs/bench.lock go test -run '^$' -bench GroupSnapshotHold -benchtime 100x ./pkg/driver/
func BenchmarkGroupSnapshotHold(b *testing.B) {
	b.Run("1node-4vols", func(b *testing.B) {
		n := startGroupNode(b, "node-a", 0)
		var vols []string
		var bes []nbdattach.Backend
		for i := range 4 {
			v, be := n.volume(b, fmt.Sprintf("v%d", i), true)
			vols, bes = append(vols, v), append(bes, be)
		}
		benchHold(b, n.groups(), vols, bes, n)
	})
	b.Run("2nodes-4vols", func(b *testing.B) {
		na, nb := startGroupNode(b, "node-a", 0), startGroupNode(b, "node-b", 0)
		var vols []string
		var bes []nbdattach.Backend
		for i := range 4 {
			n := []*groupNode{na, nb}[i%2]
			v, be := n.volume(b, fmt.Sprintf("v%d", i), true)
			vols, bes = append(vols, v), append(bes, be)
		}
		gc, _ := routedGroups(b, 0, nil, na, nb)
		benchHold(b, gc, vols, bes, na, nb)
	})
}

func benchHold(b *testing.B, gc csi.GroupControllerClient, vols []string, bes []nbdattach.Backend, nodes ...*groupNode) {
	stop := randomWriters(bes, 2)
	defer stop()
	ctx := context.Background()
	holds := make([]float64, 0, b.N)
	b.ResetTimer()
	for i := range b.N {
		before := make([]float64, len(nodes))
		for j, n := range nodes {
			_, before[j] = n.srv.Driver.GroupHoldForTest()
		}
		r, err := gc.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: fmt.Sprintf("bench-%d", i), SourceVolumeIds: vols})
		if err != nil {
			b.Fatal(err)
		}
		hold := 0.0
		for j, n := range nodes {
			_, after := n.srv.Driver.GroupHoldForTest()
			hold = max(hold, after-before[j])
		}
		holds = append(holds, hold*1000)
		b.StopTimer()
		// Snapshots do not pile up in the images across iterations.
		if _, err := gc.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: r.GroupSnapshot.GroupSnapshotId}); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.StopTimer()
	slices.Sort(holds)
	b.ReportMetric(percentile(holds, 50), "hold-p50-ms")
	b.ReportMetric(percentile(holds, 99), "hold-p99-ms")
}

func percentile(sorted []float64, p int) float64 {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, len(sorted)*p/100)]
}

// randomWriters writes random 4 KiB blocks to each backend, per
// goroutines each, until stopped.
func randomWriters(bes []nbdattach.Backend, per int) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for i, be := range bes {
		for j := range per {
			wg.Go(func() {
				rng := rand.New(rand.NewSource(int64(i*per + j)))
				buf := make([]byte, 4096)
				blocks := be.Size() / 4096
				for ctx.Err() == nil {
					rng.Read(buf)
					if err := be.WriteAt(ctx, buf, rng.Int63n(blocks)*4096, false); err != nil && ctx.Err() == nil {
						panic(err)
					}
				}
			})
		}
	}
	return func() {
		cancel()
		wg.Wait()
	}
}
