package driver_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/fuse"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// BenchmarkSnapshotUnderLoad: the I/O latency a snapshot adds under load.
// fio runs 4k random writes and then 4k random reads at queue depth 32 on a
// fully written volume, once undisturbed ("idle") and once with a snapshot
// taken every INTERVAL ("snapshots"); each sub-benchmark reports fio's
// completion latency percentiles and, for "snapshots", how long the
// snapshots took. The snapshots of a run are deleted after it.
//
//   - driver: a block volume of this driver, staged with the fuse attach
//     backend (loop device over FUSE, in process) and published; fio
//     (libaio, direct) on the published device; CreateSnapshot through the
//     gRPC socket. Crash-consistent bitmaps on, as `qcow2-csi serve` runs
//     by default.
//   - driver-nocc: the same with them off (serve --crash-consistent-cbt=false).
//   - qemu: the anchor. qemu-storage-daemon serves a qcow2 image of the same
//     size over NBD (a unix socket), fio's nbd engine drives it, and QMP
//     blockdev-snapshot-internal-sync takes the snapshots. The data paths
//     differ (kernel loop + FUSE against a userspace NBD client), so compare
//     each side's idle and snapshots rows, not the sides' absolute figures.
//
// Long (a fio run of RUNTIME per row): it runs only when
// QCOW2_CSI_BENCH_LOAD is set, as tests/bench/cbt.sh does, with -benchtime
// 1x. Knobs: QCOW2_CSI_BENCH_LOAD_SIZE (bytes, default 1 GiB),
// QCOW2_CSI_BENCH_LOAD_RUNTIME and QCOW2_CSI_BENCH_LOAD_INTERVAL (seconds,
// default 20 and 2).
func BenchmarkSnapshotUnderLoad(b *testing.B) {
	if os.Getenv("QCOW2_CSI_BENCH_LOAD") == "" {
		b.Skip("a long benchmark: set QCOW2_CSI_BENCH_LOAD=1 (tests/bench/cbt.sh does)")
	}
	peer.Root(b)
	cfg := loadConfig{size: 1 << 30, runtime: 20, interval: 2 * time.Second, fio: peer.Require(b, "fio")}
	envInt := func(name string, v *int64) {
		if s := os.Getenv(name); s != "" {
			n, err := strconv.ParseInt(s, 10, 64)
			if err != nil || n <= 0 {
				b.Fatalf("%s=%q: want a positive integer", name, s)
			}
			*v = n
		}
	}
	envInt("QCOW2_CSI_BENCH_LOAD_SIZE", &cfg.size)
	envInt("QCOW2_CSI_BENCH_LOAD_RUNTIME", &cfg.runtime)
	iv := int64(2)
	envInt("QCOW2_CSI_BENCH_LOAD_INTERVAL", &iv)
	cfg.interval = time.Duration(iv) * time.Second
	b.Run("driver", func(b *testing.B) { benchLoad(b, cfg, driverLoadTarget(b, cfg, true)) })
	b.Run("driver-nocc", func(b *testing.B) { benchLoad(b, cfg, driverLoadTarget(b, cfg, false)) })
	b.Run("qemu", func(b *testing.B) { benchLoad(b, cfg, qemuLoadTarget(b, cfg)) })
}

type loadConfig struct {
	size, runtime int64
	interval      time.Duration
	fio           string
}

// loadTarget is a disk fio can drive and snapshot.
type loadTarget struct {
	fioArgs  []string                   // where fio's I/O goes
	snapshot func(name string) error    // takes one snapshot
	cleanup  func(names []string) error // deletes the snapshots taken
}

func benchLoad(b *testing.B, cfg loadConfig, t loadTarget) {
	// Every cluster written first: reads hit data, and a write after a
	// snapshot has to copy its cluster, which is the cost measured.
	if _, err := runFio(b, cfg, t, "write", "1m", 8, 0); err != nil {
		b.Fatal(err)
	}
	for _, rw := range []string{"randwrite", "randread"} {
		for _, mode := range []string{"idle", "snapshots"} {
			b.Run(rw+"/"+mode, func(b *testing.B) {
				for range b.N {
					var snaps []time.Duration
					var names []string
					var serr error
					stop, done := make(chan struct{}), make(chan struct{})
					go func() {
						defer close(done)
						if mode != "snapshots" {
							return
						}
						tick := time.NewTicker(cfg.interval)
						defer tick.Stop()
						for {
							select {
							case <-stop:
								return
							case <-tick.C:
							}
							name := fmt.Sprintf("load-%s-%d", rw, len(names))
							t0 := time.Now()
							if err := t.snapshot(name); err != nil {
								serr = err
								return
							}
							snaps = append(snaps, time.Since(t0))
							names = append(names, name)
						}
					}()
					res, err := runFio(b, cfg, t, rw, "4k", 32, cfg.runtime)
					close(stop)
					<-done
					if err != nil {
						b.Fatal(err)
					}
					if serr != nil {
						b.Fatalf("snapshot under load: %v", serr)
					}
					if mode == "snapshots" && len(snaps) == 0 {
						b.Fatal("no snapshot was taken during the run")
					}
					b.StopTimer()
					if err := t.cleanup(names); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
					res.report(b)
					if len(snaps) > 0 {
						slices.Sort(snaps)
						ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
						b.ReportMetric(float64(len(snaps)), "snaps")
						b.ReportMetric(ms(snaps[len(snaps)/2]), "snap-p50-ms")
						b.ReportMetric(ms(snaps[len(snaps)-1]), "snap-max-ms")
					}
				}
			})
		}
	}
}

// fioResult is the completion latency of one fio job, in microseconds.
type fioResult struct {
	iops, p50, p99, p999, max float64
}

func (r fioResult) report(b *testing.B) {
	b.ReportMetric(r.iops, "iops")
	b.ReportMetric(r.p50, "p50-us")
	b.ReportMetric(r.p99, "p99-us")
	b.ReportMetric(r.p999, "p99.9-us")
	b.ReportMetric(r.max, "max-us")
}

// runFio runs one fio job (runtime 0: one pass over the disk) and returns
// the latency of its reads or writes.
func runFio(b *testing.B, cfg loadConfig, t loadTarget, rw, bs string, qd int, runtime int64) (fioResult, error) {
	out := filepath.Join(b.TempDir(), "fio.json")
	args := append([]string{"--name=load", "--rw=" + rw, "--bs=" + bs, "--iodepth=" + strconv.Itoa(qd),
		"--size=" + strconv.FormatInt(cfg.size, 10), "--randrepeat=0", "--norandommap",
		"--lat_percentiles=1", "--percentile_list=50:99:99.9", "--output-format=json", "--output=" + out}, t.fioArgs...)
	if runtime > 0 {
		args = append(args, "--time_based", "--runtime="+strconv.FormatInt(runtime, 10))
	}
	if o, err := exec.Command(cfg.fio, args...).CombinedOutput(); err != nil {
		return fioResult{}, fmt.Errorf("fio %v: %v: %s", args, err, o)
	}
	raw, err := os.ReadFile(out)
	if err != nil {
		return fioResult{}, err
	}
	type side struct {
		IOPS  float64 `json:"iops"`
		LatNs struct {
			Max        float64            `json:"max"`
			Percentile map[string]float64 `json:"percentile"`
		} `json:"lat_ns"`
	}
	var rep struct {
		Jobs []struct {
			Error int  `json:"error"`
			Read  side `json:"read"`
			Write side `json:"write"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal(raw, &rep); err != nil || len(rep.Jobs) != 1 {
		return fioResult{}, fmt.Errorf("fio output %s: %v (%d jobs)", out, err, len(rep.Jobs))
	}
	j := rep.Jobs[0]
	s := j.Write
	if rw == "randread" || rw == "read" {
		s = j.Read
	}
	if j.Error != 0 || s.IOPS == 0 {
		return fioResult{}, fmt.Errorf("fio %s: error %d, %v IOPS", rw, j.Error, s.IOPS)
	}
	pc := func(k string) float64 { return s.LatNs.Percentile[k] / 1000 }
	return fioResult{iops: s.IOPS, p50: pc("50.000000"), p99: pc("99.000000"), p999: pc("99.900000"), max: s.LatNs.Max / 1000}, nil
}

// driverLoadTarget: a block volume of an in-process driver, staged with the
// fuse backend and published.
func driverLoadTarget(b *testing.B, cfg loadConfig, crashConsistent bool) loadTarget {
	fa := fuse.NewAttacher(fuse.Options{Dir: filepath.Join(b.TempDir(), "fuse")})
	if err := fa.Available(); err != nil {
		peer.Missing(b, "the fuse attach backend", err.Error())
	}
	dir := b.TempDir()
	srv := drivertest.Start(b, driver.Options{Pool: filepath.Join(dir, "pool")}, driver.Seams{Images: driver.Qcow2Images{CrashConsistentBitmaps: crashConsistent}, Attachers: []nbdattach.Attacher{fa}})
	c := dial(b, srv)
	ctx := context.Background()
	capab := capBlock(rw)
	v, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "load", VolumeCapabilities: []*csi.VolumeCapability{capab},
		CapacityRange: &csi.CapacityRange{RequiredBytes: cfg.size, LimitBytes: cfg.size}})
	if err != nil {
		b.Fatal(err)
	}
	vol := v.Volume.VolumeId
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "pods", "dev")
	os.MkdirAll(staging, 0o750)
	if _, err := c.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: staging, VolumeCapability: capab, VolumeContext: v.Volume.VolumeContext}); err != nil {
		b.Fatal(err)
	}
	if _, err := c.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: vol, StagingTargetPath: staging, TargetPath: target, VolumeCapability: capab}); err != nil {
		b.Fatal(err)
	}
	// Registered after the server's own cleanup, so it runs before it.
	b.Cleanup(func() {
		c.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: vol, TargetPath: target})
		c.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: staging})
	})
	ids := map[string]string{}
	var mu sync.Mutex
	return loadTarget{
		fioArgs: []string{"--filename=" + target, "--ioengine=libaio", "--direct=1"},
		snapshot: func(name string) error {
			r, err := c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: vol})
			if err != nil {
				return err
			}
			mu.Lock()
			ids[name] = r.Snapshot.SnapshotId
			mu.Unlock()
			return nil
		},
		cleanup: func(names []string) error {
			for _, n := range names {
				mu.Lock()
				id := ids[n]
				mu.Unlock()
				if _, err := c.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id}); err != nil {
					return err
				}
			}
			return nil
		},
	}
}

// qemuLoadTarget: qemu-storage-daemon exporting a qcow2 image over NBD,
// snapshots through QMP.
func qemuLoadTarget(b *testing.B, cfg loadConfig) loadTarget {
	qsd, qemuImg := peer.Require(b, "qemu-storage-daemon"), peer.Require(b, "qemu-img")
	dir := b.TempDir()
	img, sock, qmpSock := filepath.Join(dir, "q.qcow2"), filepath.Join(dir, "nbd.sock"), filepath.Join(dir, "qmp.sock")
	if out, err := exec.Command(qemuImg, "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", img, strconv.FormatInt(cfg.size, 10)).CombinedOutput(); err != nil {
		b.Fatalf("qemu-img create: %v: %s", err, out)
	}
	cmd := exec.Command(qsd,
		"--blockdev", "driver=file,filename="+img+",node-name=file0",
		"--blockdev", "driver=qcow2,file=file0,node-name=disk0",
		"--nbd-server", "addr.type=unix,addr.path="+sock,
		"--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on",
		"--chardev", "socket,id=qmp0,path="+qmpSock+",server=on,wait=off",
		"--monitor", "chardev=qmp0")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	var conn net.Conn
	for i := 0; ; i++ {
		var err error
		if conn, err = net.Dial("unix", qmpSock); err == nil {
			if _, err = os.Stat(sock); err == nil {
				break
			}
			conn.Close()
		}
		if i == 100 {
			b.Fatalf("qemu-storage-daemon: no QMP or NBD socket after 10 s: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	b.Cleanup(func() { conn.Close() })
	q := &qmp{enc: json.NewEncoder(conn), dec: json.NewDecoder(bufio.NewReader(conn))}
	var greeting map[string]any
	if err := q.dec.Decode(&greeting); err != nil {
		b.Fatalf("QMP greeting: %v", err)
	}
	if err := q.do("qmp_capabilities", nil); err != nil {
		b.Fatal(err)
	}
	return loadTarget{
		fioArgs: []string{"--ioengine=nbd", "--uri=nbd+unix:///disk0?socket=" + sock},
		snapshot: func(name string) error {
			return q.do("blockdev-snapshot-internal-sync", map[string]any{"device": "disk0", "name": name})
		},
		cleanup: func(names []string) error {
			for _, n := range names {
				if err := q.do("blockdev-snapshot-delete-internal-sync", map[string]any{"device": "disk0", "name": n}); err != nil {
					return err
				}
			}
			return nil
		},
	}
}

// qmp is a minimal QMP client: one command at a time, events skipped.
type qmp struct {
	mu  sync.Mutex
	enc *json.Encoder
	dec *json.Decoder
}

func (q *qmp) do(cmd string, args map[string]any) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	if err := q.enc.Encode(req); err != nil {
		return fmt.Errorf("QMP %s: %w", cmd, err)
	}
	for {
		var r struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := q.dec.Decode(&r); err != nil {
			return fmt.Errorf("QMP %s: %w", cmd, err)
		}
		switch {
		case r.Error != nil:
			return fmt.Errorf("QMP %s: %s: %s", cmd, r.Error.Class, r.Error.Desc)
		case r.Return != nil:
			return nil
		}
	}
}
