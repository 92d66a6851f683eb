package driver_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestConcurrentMixedCalls sends 1000 mixed CSI calls (create, delete,
// expand, stage, unstage, publish, unpublish, stats, get, list) from 10
// goroutines at 12 volumes, restarting the driver halfway. Every answer must
// be a code the CSI spec allows for the situation (OK, Aborted for a
// conflicting call in flight, NotFound, FailedPrecondition for a volume in
// the wrong state); no call may hang; the restart must lose no volume and no
// staged device; at the end, after a clean teardown, no file, device or mount
// may be left.
func TestConcurrentMixedCalls(t *testing.T) { testConcurrentMixedCalls(t, "loop", 3) }

// testConcurrentMixedCalls runs the mix on backend; one volume in fsEvery is
// a filesystem (mkfs on first stage), the others raw block.
func testConcurrentMixedCalls(t *testing.T, backend string, fsEvery int) {
	e := newNodeEnvOn(t, backend)
	const (
		workers = 10
		calls   = 1000
		volumes = 12
	)
	names := make([]string, volumes)
	caps := make([]*csi.VolumeCapability, volumes)
	for i := range names {
		names[i] = fmt.Sprintf("pvc-stress-%02d", i)
		caps[i] = capBlock(rw)
		if i%fsEvery == 0 {
			caps[i] = capMount(rw, "ext4")
		}
	}
	var (
		mu     sync.Mutex
		ids    = map[int]string{}
		counts = map[string]int{}
	)
	idOf := func(i int) string {
		mu.Lock()
		defer mu.Unlock()
		return ids[i]
	}
	staging := func(id string) string { return filepath.Join(e.dir, "staging", id) }
	target := func(id string) string { return filepath.Join(e.dir, "pods", id, "target") }
	allowed := map[codes.Code]bool{codes.OK: true, codes.Aborted: true, codes.NotFound: true, codes.FailedPrecondition: true}

	call := func(rng *rand.Rand) {
		i := rng.IntN(volumes)
		id := idOf(i)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		op := []string{"create", "create", "delete", "expand", "stage", "stage", "unstage", "publish", "publish", "unpublish", "stats", "get", "list"}[rng.IntN(13)]
		if id == "" {
			op = "create"
		}
		var err error
		switch op {
		case "create":
			var r *csi.CreateVolumeResponse
			r, err = e.c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: names[i], CapacityRange: &csi.CapacityRange{RequiredBytes: 32 << 20},
				VolumeCapabilities: []*csi.VolumeCapability{caps[i]}})
			if err == nil {
				mu.Lock()
				ids[i] = r.Volume.VolumeId
				mu.Unlock()
			}
		case "delete":
			_, err = e.c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id})
		case "expand":
			_, err = e.c.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id,
				CapacityRange: &csi.CapacityRange{RequiredBytes: int64(32+rng.IntN(32)) << 20}, VolumeCapability: caps[i]})
		case "stage":
			os.MkdirAll(staging(id), 0o750)
			_, err = e.c.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging(id), VolumeCapability: caps[i]})
		case "unstage":
			_, err = e.c.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging(id)})
		case "publish":
			_, err = e.c.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging(id), TargetPath: target(id), VolumeCapability: caps[i]})
		case "unpublish":
			_, err = e.c.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target(id)})
		case "stats":
			_, err = e.c.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: staging(id)})
		case "get":
			_, err = e.c.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: id})
		case "list":
			_, err = e.c.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: 5})
		}
		code := status.Code(err)
		mu.Lock()
		counts[op+"/"+code.String()]++
		mu.Unlock()
		if !allowed[code] {
			t.Errorf("%s %s: %v", op, names[i], err)
		}
	}
	run := func(n int, seed uint64) {
		var wg sync.WaitGroup
		per := n / workers
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(seed, uint64(w)))
				for range per {
					call(rng)
				}
			}()
		}
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Minute):
			t.Fatalf("calls did not finish: deadlock? in flight: %v", counts)
		}
	}
	// snapshot is what a restart must not lose: the volumes and, per
	// volume, whether it is staged.
	snapshot := func() (vols []string, staged map[string]bool) {
		r, err := e.c.ListVolumes(e.ctx, &csi.ListVolumesRequest{})
		if err != nil {
			t.Fatal(err)
		}
		staged = map[string]bool{}
		for _, en := range r.Entries {
			id := en.Volume.VolumeId
			vols = append(vols, id)
			_, err := e.c.NodeGetVolumeStats(e.ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: staging(id)})
			staged[id] = err == nil
		}
		sort.Strings(vols)
		return vols, staged
	}

	run(calls/2, 1)
	vols, staged := snapshot()
	e.start()
	if p, err := e.c.Probe(e.ctx, &csi.ProbeRequest{}); err != nil || !p.GetReady().GetValue() {
		t.Fatalf("Probe after restart = %v, %v", p, err)
	}
	vols2, staged2 := snapshot()
	if !reflect.DeepEqual(vols, vols2) || !reflect.DeepEqual(staged, staged2) {
		t.Fatalf("restart lost state:\nbefore %v %v\nafter  %v %v", vols, staged, vols2, staged2)
	}
	for id, s := range staged2 {
		if !s {
			continue
		}
		st, err := e.c.NodeGetVolumeStats(e.ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: staging(id)})
		if err != nil || st.VolumeCondition.GetAbnormal() {
			t.Errorf("staged volume %s after restart: %v, %v", id, st, err)
		}
	}
	run(calls/2, 2)

	total := 0
	for _, n := range counts {
		total += n
	}
	if total != calls {
		t.Fatalf("%d calls answered, want %d", total, calls)
	}
	keys := make([]string, 0, len(counts))
	for k := range counts {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		t.Logf("%-32s %d", k, counts[k])
	}

	// Clean teardown, then nothing may remain.
	for i := range names {
		id := idOf(i)
		if id == "" {
			continue
		}
		for _, f := range []func() error{
			func() error {
				_, err := e.c.NodeUnpublishVolume(e.ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target(id)})
				return err
			},
			func() error {
				_, err := e.c.NodeUnstageVolume(e.ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging(id)})
				return err
			},
			func() error {
				_, err := e.c.DeleteVolume(e.ctx, &csi.DeleteVolumeRequest{VolumeId: id})
				return err
			},
		} {
			if err := f(); err != nil {
				t.Fatalf("teardown %s: %v", id, err)
			}
		}
	}
	var left []string
	filepath.WalkDir(e.pool, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && d.Name() != ".probe" {
			left = append(left, p)
		}
		return nil
	})
	if len(left) > 0 {
		t.Fatalf("files left in the pool: %v", left)
	}
}
