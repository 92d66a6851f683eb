//go:build linux

package vm

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/qcow2-csi/qcow2-csi/pkg/imagebackend"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/qcow2"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
	"github.com/qcow2-csi/qcow2-csi/tests/vm/vmharness"
)

// The kernel NBD benchmark (tests/bench/vmnbd.sh): fio on block devices of
// one guest kernel, in one run, each device alternating with the others
// row by row:
//
//   - loop:   a buffered loop device on a raw file (the floor);
//   - qemu:   /dev/nbd15 attached by `qemu-nbd -c` serving a qcow2 image;
//   - oursN:  a device attached by the node plugin's in-process server
//     (the kernel attacher over imagebackend.New) with N
//     connections, serving the same kind of qcow2 image.
//
// Every file lives on the guest's tmpfs and is fully allocated (64k
// clusters, written once with qemu-io), so that all devices read and write
// through the same page cache and no row measures allocation. TCG makes
// every absolute figure slow and the relative cost of CPU work higher than
// on hardware: read the ratios only.

// Environment of the guest run (set by TestVMBenchNBD from the script's).
const (
	benchEnvSize    = "QCOW2_CSI_BENCH_SIZE"    // image size, e.g. 256M
	benchEnvRuntime = "QCOW2_CSI_BENCH_RUNTIME" // seconds per fio run
	benchEnvRepeat  = "QCOW2_CSI_BENCH_REPEAT"  // runs per device and row (best kept)
	benchEnvConns   = "QCOW2_CSI_BENCH_CONNS"   // connection counts, e.g. 1,2,4
	benchRowPrefix  = "vmnbd| "                 // marks the table lines in the output
)

// TestVMBenchNBD is the host side of tests/bench/vmnbd.sh. It is a
// benchmark, not a test: it runs only when the script asks for it and
// prints the guest's table; it asserts nothing about speed.
func TestVMBenchNBD(t *testing.T) {
	if vmharness.InVM() {
		t.Skip("this is the host-side entry of the benchmark")
	}
	if os.Getenv("QCOW2_CSI_VM_BENCH") != "1" {
		t.Skip("a benchmark: tests/bench/vmnbd.sh runs it (QCOW2_CSI_VM_BENCH=1)")
	}
	for _, p := range []string{"fio", "qemu-nbd", "qemu-img", "qemu-io"} {
		peer.Require(t, p)
	}
	var env []string
	for _, k := range []string{benchEnvSize, benchEnvRuntime, benchEnvRepeat, benchEnvConns} {
		if v, ok := os.LookupEnv(k); ok {
			env = append(env, k+"="+v)
		}
	}
	res := vmharness.RunGoTest(t, ".", "^TestBenchGuestNBD$", vmharness.Options{
		Tools: []string{"fio", "qemu-nbd", "qemu-img", "qemu-io"},
		Env:   env,
		// Five fully allocated images on the guest's tmpfs (half the RAM).
		MemoryMB: 4096,
		Timeout:  40 * time.Minute,
	})
	var table strings.Builder
	for _, l := range strings.Split(res.Output, "\n") {
		if _, row, ok := strings.Cut(l, benchRowPrefix); ok {
			table.WriteString(row + "\n")
		}
	}
	t.Logf("table:\n%s", table.String())
	if p := os.Getenv("QCOW2_CSI_VM_BENCH_OUT"); p != "" {
		if err := os.WriteFile(p, []byte(table.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// benchTarget is one device under test.
type benchTarget struct {
	name string
	dev  string
}

func TestBenchGuestNBD(t *testing.T) {
	vmharness.Guest(t)
	ctx := context.Background()
	size := benchEnv(benchEnvSize, "256M")
	sizeBytes, err := parseSize(size)
	if err != nil {
		t.Fatalf("%s=%s: %v", benchEnvSize, size, err)
	}
	runtime := benchEnv(benchEnvRuntime, "3")
	repeat, err := strconv.Atoi(benchEnv(benchEnvRepeat, "2"))
	if err != nil || repeat < 1 {
		t.Fatalf("%s: want a positive count", benchEnvRepeat)
	}
	var conns []int
	for _, s := range strings.Split(benchEnv(benchEnvConns, "1,2,4"), ",") {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("%s: %q is not a connection count", benchEnvConns, s)
		}
		conns = append(conns, n)
	}
	dir := t.TempDir()

	// The qcow2 images: one written by qemu-io, copied for every server.
	master := filepath.Join(dir, "master.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", master, size)
	run(t, "qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -P 0x5a 0 %d", sizeBytes), master)
	raw := filepath.Join(dir, "floor.raw")
	run(t, "qemu-img", "create", "-q", "-f", "raw", raw, size)
	run(t, "qemu-io", "-f", "raw", "-c", fmt.Sprintf("write -P 0x5a 0 %d", sizeBytes), raw)

	var targets []benchTarget
	loop := strings.TrimSpace(run(t, "losetup", "--direct-io=off", "--show", "-f", raw))
	t.Cleanup(func() { _ = exec.Command("losetup", "-d", loop).Run() })
	targets = append(targets, benchTarget{"loop", loop})

	qimg := filepath.Join(dir, "qemu.qcow2")
	run(t, "cp", master, qimg)
	const qdev = "/dev/nbd15"
	// qemu-nbd's defaults: cache=writeback (the page cache, as ours),
	// aio=threads. -c binds a helper socket in /var/lock.
	if err := os.MkdirAll("/var/lock", 0o755); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-nbd", "--fork", "-f", "qcow2", "-c", qdev, qimg)
	t.Cleanup(func() { _ = exec.Command("qemu-nbd", "-d", qdev).Run() })
	targets = append(targets, benchTarget{"qemu", qdev})

	a := kernelAttacher()
	for i, n := range conns {
		p := filepath.Join(dir, fmt.Sprintf("ours%d.qcow2", n))
		if i == len(conns)-1 {
			run(t, "mv", master, p) // the last copy: tmpfs is RAM
		} else {
			run(t, "cp", master, p)
		}
		img, err := qcow2.Open(p, qcow2.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		b, err := imagebackend.New(img, imagebackend.Options{})
		if err != nil {
			t.Fatal(err)
		}
		id := fmt.Sprintf("bench-%d", n)
		dev, err := a.Attach(ctx, id, b, nbdattach.AttachOptions{Connections: n})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := dev.Detach(ctx); err != nil {
				t.Error(err)
			}
			if err := img.Close(); err != nil {
				t.Error(err)
			}
		})
		targets = append(targets, benchTarget{fmt.Sprintf("ours%d", n), dev.Path()})
	}

	out := func(format string, args ...any) { fmt.Printf(benchRowPrefix+format+"\n", args...) }
	out("guest kernel NBD, size=%s, best of %d runs of %ss per device and row, fio O_DIRECT on the device (TCG: ratios only)", size, repeat, runtime)
	for _, tg := range targets {
		out("  %-6s %s", tg.name, tg.dev)
	}
	hdr := fmt.Sprintf("%-7s %-10s %-3s %-3s", "engine", "rw", "bs", "qd")
	for _, tg := range targets {
		hdr += fmt.Sprintf(" | %11s", tg.name+" IOPS")
	}
	for _, tg := range targets[2:] {
		hdr += fmt.Sprintf(" | %11s %11s", tg.name+"/qemu", tg.name+"/loop")
	}
	out("%s", hdr)
	rows := []struct {
		engine, rw, bs string
		qd             int
	}{
		{"psync", "randread", "4k", 1}, {"psync", "randwrite", "4k", 1},
		{"libaio", "randread", "4k", 32}, {"libaio", "randwrite", "4k", 32},
		{"psync", "read", "1M", 1}, {"psync", "write", "1M", 1},
		{"libaio", "read", "1M", 32}, {"libaio", "write", "1M", 32},
	}
	for _, r := range rows {
		best := make([]int, len(targets))
		for range repeat {
			for i, tg := range targets {
				best[i] = max(best[i], fioIOPS(t, tg.dev, r.engine, r.rw, r.bs, r.qd, size, runtime))
			}
		}
		line := fmt.Sprintf("%-7s %-10s %-3s %-3d", r.engine, r.rw, r.bs, r.qd)
		for i := range targets {
			line += fmt.Sprintf(" | %11d", best[i])
		}
		for i := range targets[2:] {
			line += fmt.Sprintf(" | %11s %11s", ratio(best[i+2], best[1]), ratio(best[i+2], best[0]))
		}
		out("%s", line)
	}
}

func benchEnv(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// parseSize reads fio/qemu-img style sizes: a number with an optional
// K, M or G suffix (binary units).
func parseSize(s string) (int64, error) {
	mult := int64(1)
	switch {
	case strings.HasSuffix(s, "K"):
		mult = 1 << 10
	case strings.HasSuffix(s, "M"):
		mult = 1 << 20
	case strings.HasSuffix(s, "G"):
		mult = 1 << 30
	}
	n, err := strconv.ParseInt(strings.TrimRight(s, "KMG"), 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("not a size")
	}
	return n * mult, nil
}

func ratio(a, b int) string {
	if b == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", float64(a)/float64(b))
}

// fioIOPS runs one fio job on dev and returns its IOPS (read or write,
// whichever the job did).
func fioIOPS(t *testing.T, dev, engine, rw, bs string, qd int, size, runtime string) int {
	t.Helper()
	out := run(t, "fio", "--name=b", "--filename="+dev, "--direct=1", "--ioengine="+engine,
		"--rw="+rw, "--bs="+bs, "--iodepth="+strconv.Itoa(qd), "--size="+size,
		"--runtime="+runtime, "--time_based", "--norandommap", "--randrepeat=0",
		"--output-format=terse", "--terse-version=3")
	for _, l := range strings.Split(out, "\n") {
		f := strings.Split(l, ";")
		if len(f) < 100 {
			continue
		}
		// terse v3: field 8 is read IOPS, field 49 write IOPS (1-based).
		r, _ := strconv.Atoi(f[7])
		w, _ := strconv.Atoi(f[48])
		return max(r, w)
	}
	t.Fatalf("fio %s %s %s on %s: no terse line in\n%s", engine, rw, bs, dev, out)
	return 0
}
