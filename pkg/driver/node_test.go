package driver_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/fuse"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/kernel"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// needMounts stops a test that needs real loop devices, mkfs and mounts.
func needMounts(t *testing.T, tools ...string) {
	t.Helper()
	peer.Root(t)
	for _, p := range append([]string{"losetup", "mkfs.ext4", "resize2fs"}, tools...) {
		peer.Require(t, p)
	}
}

// loopsOf lists the loop devices backed by files under dir.
func loopsOf(t *testing.T, dir string) []string {
	t.Helper()
	out, err := exec.Command("losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE").Output()
	if err != nil {
		t.Fatal(err)
	}
	var devs []string
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) == 2 && strings.HasPrefix(f[1], dir) {
			devs = append(devs, l)
		}
	}
	return devs
}

// mountsUnder lists the mount points below dir.
func mountsUnder(t *testing.T, dir string) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var ms []string
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 4 && strings.HasPrefix(f[4], dir) {
			ms = append(ms, f[4])
		}
	}
	return ms
}

type nodeEnv struct {
	t       *testing.T
	backend string // "loop" (raw images, in process); "nbd" or "fuse" (qcow2, child process)
	srv     *drivertest.Server
	child   *exec.Cmd
	c       clients
	loop    *drivertest.LoopAttacher
	opts    driver.Options
	dir     string
	ctx     context.Context
	pool    string
	seams   driver.Seams
	vctx    map[string]map[string]string // volume context from CreateVolume
}

func newNodeEnv(t *testing.T) *nodeEnv { return newNodeEnvOn(t, "loop") }

// newNodeEnvOn starts a driver on a backend: "loop" serves raw images as
// loop devices in this process; "nbd" serves qcow2 images through the kernel
// NBD driver from a child process (the test binary in serve mode, see
// TestMain), so that a restart is a real kill -9 of the serving process.
func newNodeEnvOn(t *testing.T, backend string) *nodeEnv {
	needMounts(t)
	dir := t.TempDir()
	e := &nodeEnv{t: t, backend: backend, loop: &drivertest.LoopAttacher{}, dir: dir, ctx: context.Background()}
	e.opts = driver.Options{Pool: filepath.Join(dir, "pool"), NodeID: "test-node", ControllerExpand: true}
	e.pool = e.opts.Pool
	e.seams = driver.Seams{Images: drivertest.RawImages{}, Attachers: []nbdattach.Attacher{e.loop}}
	e.start()
	t.Cleanup(func() {
		if e.child != nil {
			e.child.Process.Kill()
			e.child.Wait()
		}
		if l := loopsOf(t, dir); len(l) > 0 {
			t.Errorf("leaked loop devices: %v", l)
			for _, d := range l {
				exec.Command("losetup", "-d", strings.Fields(d)[0]).Run()
			}
		}
		if m := mountsUnder(t, dir); len(m) > 0 {
			t.Errorf("leaked mounts: %v", m)
			for i := len(m) - 1; i >= 0; i-- {
				unix.Unmount(m[i], unix.MNT_DETACH)
			}
		}
		if backend == "nbd" {
			devs, err := kernel.NewAttacher(kernel.Options{}).List(context.Background())
			if err != nil {
				t.Error(err)
			}
			for _, d := range devs {
				if strings.HasPrefix(d.ID, "vol-") {
					t.Errorf("leaked nbd device: %+v", d)
				}
			}
		}
	})
	return e
}

// start (re)starts the driver on the same pool. For "loop" the old server
// stops and closes its images (devices stay, as after a crash: the loop
// attacher forgets them); for "nbd" the serving child is killed with SIGKILL
// and a new one started.
func (e *nodeEnv) start() {
	if e.backend != "loop" {
		e.startChild()
		return
	}
	if e.srv != nil {
		e.srv.Stop(e.t)
		e.loop.Forget()
	}
	e.srv = drivertest.Start(e.t, e.opts, e.seams)
	e.c = dial(e.t, e.srv)
}

const (
	envServe   = "QCOW2_CSI_TEST_SERVE"   // pool directory; socket next to it
	envBackend = "QCOW2_CSI_TEST_BACKEND" // nbd, fuse, or fuse-writeback (--fuse-cache=writeback)
)

func (e *nodeEnv) startChild() {
	t := e.t
	if e.child != nil {
		e.child.Process.Signal(syscall.SIGKILL)
		e.child.Wait()
	}
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), envServe+"="+e.pool, envBackend+"="+e.backend)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	go io.Copy(io.Discard, out)
	sock, ok := strings.CutPrefix(strings.TrimSpace(line), "READY ")
	if err != nil || !ok {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("serving child: %q, %v", line, err)
	}
	e.child = cmd
	e.c = dial(t, &drivertest.Server{Socket: sock})
}

// serveChild is the test binary in serve mode: a node plugin on qcow2
// images and the backend named (nbd or fuse), as `qcow2-csi serve` wires
// them. It prints "READY <socket>" once Start (re-attach included) is done
// and serves until killed; on SIGTERM it shuts down as `qcow2-csi serve`
// does (Driver.Shutdown) and exits 0 when that succeeded.
func serveChild(pool, backend string) int {
	var a nbdattach.Attacher = kernel.NewAttacher(kernel.Options{})
	switch backend {
	case "fuse":
		a = fuse.NewAttacher(fuse.Options{Dir: filepath.Join(filepath.Dir(pool), "fuse")})
	case "fuse-writeback":
		a = fuse.NewAttacher(fuse.Options{Dir: filepath.Join(filepath.Dir(pool), "fuse"), Cache: fuse.CacheWriteback})
		backend = "fuse"
	}
	d, err := driver.New(driver.Options{Pool: pool, NodeID: "test-node", ControllerExpand: true, AttachBackend: backend, KubeletDir: os.TempDir()},
		driver.Seams{Images: driver.Qcow2Images{EncryptionIterTime: 100 * time.Millisecond}, Attachers: []nbdattach.Attacher{a}})
	if err != nil {
		fmt.Println("ERROR", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	if err := d.Start(ctx); err != nil {
		fmt.Println("ERROR", err)
		return 1
	}
	sock := filepath.Join(filepath.Dir(pool), "csi.sock")
	lis, err := driver.Listen(sock)
	if err != nil {
		fmt.Println("ERROR", err)
		return 1
	}
	fmt.Println("READY", sock)
	if err := d.Serve(ctx, lis); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	sctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := d.Shutdown(sctx); err != nil {
		fmt.Fprintln(os.Stderr, "shutdown:", err)
		return 1
	}
	return 0
}

func (e *nodeEnv) create(name string, size int64, params map[string]string, c *csi.VolumeCapability) string {
	e.t.Helper()
	r, err := e.c.CreateVolume(e.ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{c}})
	if err != nil {
		e.t.Fatalf("CreateVolume: %v", err)
	}
	if e.vctx == nil {
		e.vctx = map[string]map[string]string{}
	}
	e.vctx[r.Volume.VolumeId] = r.Volume.VolumeContext
	return r.Volume.VolumeId
}

func (e *nodeEnv) stage(id string, c *csi.VolumeCapability) string {
	e.t.Helper()
	p := filepath.Join(e.dir, "staging", id)
	os.MkdirAll(p, 0o750)
	if _, err := e.c.NodeStageVolume(e.ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: p, VolumeCapability: c, VolumeContext: e.vctx[id]}); err != nil {
		e.t.Fatalf("NodeStageVolume: %v", err)
	}
	return p
}

func (e *nodeEnv) publish(id, staging string, c *csi.VolumeCapability, ro bool) string {
	e.t.Helper()
	p := filepath.Join(e.dir, "pods", id, "target")
	if _, err := e.c.NodePublishVolume(e.ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: p, VolumeCapability: c, Readonly: ro}); err != nil {
		e.t.Fatalf("NodePublishVolume: %v", err)
	}
	return p
}

func (e *nodeEnv) teardown(id, staging, target string) {
	e.t.Helper()
	if _, err := e.c.NodeUnpublishVolume(e.ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		e.t.Fatalf("NodeUnpublishVolume: %v", err)
	}
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		e.t.Fatalf("target %s still exists after unpublish: %v", target, err)
	}
	if _, err := e.c.NodeUnstageVolume(e.ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		e.t.Fatalf("NodeUnstageVolume: %v", err)
	}
	if _, err := e.c.DeleteVolume(e.ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		e.t.Fatalf("DeleteVolume: %v", err)
	}
}

func statfsSize(t *testing.T, p string) int64 {
	var st unix.Statfs_t
	if err := unix.Statfs(p, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks) * st.Bsize
}

func TestNodeFilesystemLifecycle(t *testing.T) { testNodeFilesystemLifecycle(t, "loop") }

// TestNodeFilesystemLifecycleQcow2 runs the lifecycle on qcow2 images through
// the fuse backend: online expansion grows the open qcow2 image.
func TestNodeFilesystemLifecycleQcow2(t *testing.T) {
	peer.Root(t)
	if err := fuse.NewAttacher(fuse.Options{Dir: t.TempDir()}).Available(); err != nil {
		peer.Missing(t, "the fuse attach backend", err.Error())
	}
	testNodeFilesystemLifecycle(t, "fuse")
}

func testNodeFilesystemLifecycle(t *testing.T, backend string) {
	for _, fs := range []string{"ext4", "xfs"} {
		t.Run(fs, func(t *testing.T) {
			if fs == "xfs" {
				needMounts(t, "mkfs.xfs", "xfs_growfs")
			}
			e := newNodeEnvOn(t, backend)
			c := capMount(rw, fs)
			id := e.create("pvc-"+fs, 320<<20, map[string]string{"mkfsOptions": "-L qcsi"}, c)
			staging := e.stage(id, c)
			e.stage(id, c) // idempotent
			target := e.publish(id, staging, c, false)
			e.publish(id, staging, c, false) // idempotent
			if err := os.WriteFile(filepath.Join(target, "hello"), []byte("world"), 0o644); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command("blkid", "-s", "LABEL", "-o", "value", e.srvDevice(id)).Output(); err != nil || strings.TrimSpace(string(out)) != "qcsi" {
				t.Errorf("mkfsOptions -L not applied: label %q, %v", out, err)
			}

			// Stats: bytes and inodes of the filesystem at the target.
			st, err := e.c.NodeGetVolumeStats(e.ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target})
			if err != nil {
				t.Fatal(err)
			}
			if len(st.Usage) != 2 || st.Usage[0].Unit != csi.VolumeUsage_BYTES || st.Usage[0].Total != statfsSize(t, target) || st.Usage[1].Unit != csi.VolumeUsage_INODES || st.Usage[1].Total == 0 || st.VolumeCondition.Abnormal {
				t.Fatalf("stats %v", st)
			}
			alloc, err := allocatedOf(imageFile(e.pool, id))
			if err != nil {
				t.Fatal(err)
			}
			if want := fmt.Sprintf("attached at %s (%s); image allocates ", e.srvDevice(id), backend); !strings.HasPrefix(st.VolumeCondition.Message, want) || alloc == 0 {
				t.Fatalf("condition %q, want it to start %q (image allocates %d bytes now)", st.VolumeCondition.Message, want, alloc)
			}

			// A staged volume cannot be deleted, and a conflicting stage is refused.
			_, err = e.c.DeleteVolume(e.ctx, &csi.DeleteVolumeRequest{VolumeId: id})
			wantCode(t, err, codes.FailedPrecondition, "is staged on node test-node; unstage it first")
			_, err = e.c.NodeStageVolume(e.ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: e.dir + "/elsewhere", VolumeCapability: c})
			wantCode(t, err, codes.AlreadyExists, "is staged at "+staging)
			_, err = e.c.NodeUnstageVolume(e.ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
			wantCode(t, err, codes.FailedPrecondition, "is still published at ["+target+"]")

			// Online expansion: controller grows image and device, node grows the filesystem.
			before := statfsSize(t, target)
			ex, err := e.c.ControllerExpandVolume(e.ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: &csi.CapacityRange{RequiredBytes: 640 << 20}, VolumeCapability: c})
			if err != nil || ex.CapacityBytes != 640<<20 || !ex.NodeExpansionRequired {
				t.Fatalf("ControllerExpandVolume = %v, %v", ex, err)
			}
			grew := e.nodeExpand(id, target, &csi.CapacityRange{RequiredBytes: 640 << 20}, fs, 640<<20)
			// Node-only expansion (no controller step) grows further.
			e.nodeExpand(id, staging, &csi.CapacityRange{RequiredBytes: 700<<20 + 1}, fs, 700<<20+65536)
			if after := statfsSize(t, target); grew && after < before+350<<20 {
				t.Fatalf("filesystem grew from %d to %d bytes only", before, after)
			}
			if out, err := exec.Command("blockdev", "--getsize64", e.srvDevice(id)).Output(); err != nil || strings.TrimSpace(string(out)) != "734068736" {
				t.Fatalf("device size after expansion: %q, %v", out, err)
			}
			g, err := e.c.ControllerGetVolume(e.ctx, &csi.ControllerGetVolumeRequest{VolumeId: id})
			if err != nil || g.Volume.CapacityBytes != 700<<20+65536 {
				t.Fatalf("ControllerGetVolume after expand = %v, %v", g, err)
			}
			if b, err := os.ReadFile(filepath.Join(target, "hello")); err != nil || string(b) != "world" {
				t.Fatalf("data after expand: %q, %v", b, err)
			}

			// Read-only publish of the same staged volume.
			rot := filepath.Join(e.dir, "ro-target")
			if _, err := e.c.NodePublishVolume(e.ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: rot, VolumeCapability: c, Readonly: true}); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(rot, "x"), nil, 0o644); !errorsIsErrno(err, syscall.EROFS) {
				t.Fatalf("write to read-only publish: %v, want EROFS", err)
			}
			if _, err := e.c.NodeUnpublishVolume(e.ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: rot}); err != nil {
				t.Fatal(err)
			}

			// Unstage, stage again: the data is there (no reformat).
			if _, err := e.c.NodeUnpublishVolume(e.ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
				t.Fatal(err)
			}
			if _, err := e.c.NodeUnstageVolume(e.ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
				t.Fatal(err)
			}
			if _, err := e.c.NodeUnstageVolume(e.ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
				t.Fatalf("second unstage: %v", err)
			}
			staging = e.stage(id, c)
			target = e.publish(id, staging, c, false)
			if b, err := os.ReadFile(filepath.Join(target, "hello")); err != nil || string(b) != "world" {
				t.Fatalf("data after restage: %q, %v", b, err)
			}
			e.teardown(id, staging, target)
		})
	}
}

// canGrowOnline reports whether this host lets a mounted filesystem grow.
// ext4's online resize needs CAP_SYS_RESOURCE, which some container sandboxes
// drop (this project's CI machines do); xfs_growfs needs CAP_SYS_ADMIN only.
// Where it is missing, the tests check that the driver grows image and device
// and reports resize2fs's refusal, exactly.
func canGrowOnline(fs string) bool {
	if fs != "ext4" {
		return true
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false
	}
	return data[0].Effective&(1<<unix.CAP_SYS_RESOURCE) != 0
}

// nodeExpand calls NodeExpandVolume and checks its answer: the new capacity,
// or, for ext4 on a host without CAP_SYS_RESOURCE, resize2fs's refusal. It
// reports whether the filesystem grew.
func (e *nodeEnv) nodeExpand(id, path string, cr *csi.CapacityRange, fs string, want int64) bool {
	e.t.Helper()
	nx, err := e.c.NodeExpandVolume(e.ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: path, CapacityRange: cr})
	if !canGrowOnline(fs) {
		wantCode(e.t, err, codes.Internal, "resize2fs: Permission denied to resize filesystem")
		return false
	}
	if err != nil || nx.CapacityBytes != want {
		e.t.Fatalf("NodeExpandVolume = %v, %v; want %d", nx, err, want)
	}
	return true
}

func errorsIsErrno(err error, want syscall.Errno) bool {
	pe, ok := err.(*os.PathError)
	return ok && pe.Err == want
}

// srvDevice finds the device a volume is staged from: the source of its
// staging mount.
func (e *nodeEnv) srvDevice(id string) string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		e.t.Fatal(err)
	}
	staging := filepath.Join(e.dir, "staging", id)
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 10 || f[4] != staging {
			continue
		}
		for i, x := range f {
			if x == "-" && i+2 < len(f) {
				return f[i+2]
			}
		}
	}
	e.t.Fatalf("no device mounted at %s", staging)
	return ""
}

func TestNodeBlockLifecycle(t *testing.T) {
	e := newNodeEnv(t)
	c := capBlock(rw)
	id := e.create("pvc-block", 64<<20, nil, c)
	staging := e.stage(id, c)
	target := e.publish(id, staging, c, false)
	var st unix.Stat_t
	if err := unix.Stat(target, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK {
		t.Fatalf("target %s is not a block device: mode %o, %v", target, st.Mode, err)
	}
	f, err := os.OpenFile(target, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("block data"), 1<<20); err != nil {
		t.Fatal(err)
	}
	f.Sync()
	f.Close()
	stats, err := e.c.NodeGetVolumeStats(e.ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target})
	if err != nil || len(stats.Usage) != 1 || stats.Usage[0].Total != 64<<20 || stats.Usage[0].Used < 4096 || stats.Usage[0].Used > 1<<20 {
		t.Fatalf("block stats = %v, %v (want total 64 MiB and the image's few allocated bytes used)", stats, err)
	}
	// Block expansion needs no node step.
	ex, err := e.c.ControllerExpandVolume(e.ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: &csi.CapacityRange{RequiredBytes: 96 << 20}, VolumeCapability: c})
	if err != nil || ex.CapacityBytes != 96<<20 || ex.NodeExpansionRequired {
		t.Fatalf("ControllerExpandVolume = %v, %v", ex, err)
	}
	out, err := exec.Command("blockdev", "--getsize64", target).Output()
	if err != nil || strings.TrimSpace(string(out)) != "100663296" {
		t.Fatalf("device size after online expand: %q, %v", out, err)
	}
	// Shrinking is refused.
	_, err = e.c.ControllerExpandVolume(e.ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20, LimitBytes: 32 << 20}})
	wantCode(t, err, codes.OutOfRange, "shrinking is not supported")
	e.teardown(id, staging, target)
}

// TestNodeRestart: a plugin restart with volumes staged and published finds
// their devices again (Reattach) before Probe says ready; the volumes keep
// their data and unstage cleanly afterwards.
func TestNodeRestart(t *testing.T) { testNodeRestart(t, "loop") }

func testNodeRestart(t *testing.T, backend string) {
	e := newNodeEnvOn(t, backend)
	c := capMount(rw, "ext4")
	id := e.create("pvc-restart", 64<<20, nil, c)
	staging := e.stage(id, c)
	target := e.publish(id, staging, c, false)
	if err := os.WriteFile(filepath.Join(target, "f"), []byte("kept"), 0o644); err != nil {
		t.Fatal(err)
	}
	e.start() // the new process knows nothing but what is on disk
	p, err := e.c.Probe(e.ctx, &csi.ProbeRequest{})
	if err != nil || !p.GetReady().GetValue() {
		t.Fatalf("Probe after restart = %v, %v", p, err)
	}
	st, err := e.c.NodeGetVolumeStats(e.ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target})
	if err != nil || st.VolumeCondition.Abnormal {
		t.Fatalf("stats after restart = %v, %v", st, err)
	}
	if b, err := os.ReadFile(filepath.Join(target, "f")); err != nil || string(b) != "kept" {
		t.Fatalf("data after restart: %q, %v", b, err)
	}
	// Online expansion through the re-opened image works too.
	e.nodeExpand(id, target, &csi.CapacityRange{RequiredBytes: 128 << 20}, "ext4", 128<<20)
	if err := os.WriteFile(filepath.Join(target, "g"), []byte("after restart"), 0o644); err != nil {
		t.Fatal(err)
	}
	unix.Sync()
	e.teardown(id, staging, target)
}

// TestNodeOfflineExpand: the controller grows a closed image; the node grows
// the filesystem at the next stage.
func TestNodeOfflineExpand(t *testing.T) {
	for _, fs := range []string{"ext4", "xfs"} {
		t.Run(fs, func(t *testing.T) {
			if fs == "xfs" {
				needMounts(t, "mkfs.xfs", "xfs_growfs")
			}
			e := newNodeEnv(t)
			c := capMount(rw, fs)
			id := e.create("pvc-offline", 320<<20, nil, c)
			staging := e.stage(id, c)
			small := statfsSize(t, staging)
			if _, err := e.c.NodeUnstageVolume(e.ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
				t.Fatal(err)
			}
			ex, err := e.c.ControllerExpandVolume(e.ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: &csi.CapacityRange{RequiredBytes: 640 << 20}, VolumeCapability: c})
			if err != nil || ex.CapacityBytes != 640<<20 || !ex.NodeExpansionRequired {
				t.Fatalf("ControllerExpandVolume = %v, %v", ex, err)
			}
			staging = e.stage(id, c)
			target := e.publish(id, staging, c, false)
			// kubelet calls NodeExpandVolume without a capacity range when
			// only the filesystem is behind.
			if e.nodeExpand(id, target, nil, fs, 640<<20) {
				if big := statfsSize(t, target); big < small+250<<20 {
					t.Fatalf("filesystem %d -> %d bytes after offline expansion", small, big)
				}
			}
			e.teardown(id, staging, target)
		})
	}
}

// TestNodeRestartFuse: fuse devices cannot outlive their serving process
// (docs/driver.md). After a kill -9 the new plugin starts, reports the volume
// abnormal with the backend's reason, refuses to publish it, and unstaging
// cleans everything up; staging it again gives back the data synced before
// the kill.
func TestNodeRestartFuse(t *testing.T) {
	peer.Root(t)
	if err := fuse.NewAttacher(fuse.Options{Dir: t.TempDir()}).Available(); err != nil {
		peer.Missing(t, "the fuse attach backend", err.Error())
	}
	e := newNodeEnvOn(t, "fuse")
	c := capMount(rw, "ext4")
	id := e.create("pvc-fuse", 64<<20, nil, c)
	staging := e.stage(id, c)
	target := e.publish(id, staging, c, false)
	if err := os.WriteFile(filepath.Join(target, "f"), []byte("synced"), 0o644); err != nil {
		t.Fatal(err)
	}
	unix.Sync()
	e.start() // kill -9 and start again
	p, err := e.c.Probe(e.ctx, &csi.ProbeRequest{})
	if err != nil || !p.GetReady().GetValue() {
		t.Fatalf("Probe after restart = %v, %v", p, err)
	}
	st, err := e.c.NodeGetVolumeStats(e.ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target})
	if err != nil || !st.VolumeCondition.GetAbnormal() || !strings.Contains(st.VolumeCondition.GetMessage(), "cannot be taken over") {
		t.Fatalf("stats after restart = %v, %v; want abnormal, naming the fuse backend's reason", st, err)
	}
	_, err = e.c.NodePublishVolume(e.ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: filepath.Join(e.dir, "other"), VolumeCapability: c})
	wantCode(t, err, codes.FailedPrecondition, "lost its device at a plugin restart")
	if _, err := e.c.NodeUnpublishVolume(e.ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.NodeUnstageVolume(e.ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	staging = e.stage(id, c)
	target = e.publish(id, staging, c, false)
	if b, err := os.ReadFile(filepath.Join(target, "f")); err != nil || string(b) != "synced" {
		t.Fatalf("data after restage: %q, %v", b, err)
	}
	e.teardown(id, staging, target)
}

// waitNBDGreeting waits until the NBD server at unix socket sock greets a
// client. qemu-nbd listens before it has opened (and locked) its image, so
// the socket's existence says nothing; its greeting comes from the main
// loop, once the export is up.
func waitNBDGreeting(t *testing.T, sock string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		conn, err := net.DialTimeout("unix", sock, time.Second)
		if err == nil {
			var greet [8]byte
			_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err = io.ReadFull(conn, greet[:])
			conn.Close()
			if err == nil && string(greet[:]) == "NBDMAGIC" {
				return
			}
			if err == nil {
				err = fmt.Errorf("greeting %q, want NBDMAGIC", greet[:])
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu-nbd on %s did not greet: %v", sock, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestImageLocksAgainstQemu: the plugin and qemu's tools exclude each other
// on an image through qemu's OFD locks. An image qemu-nbd serves cannot be
// staged or deleted; an image the plugin has staged cannot be written, nor
// even checked, by qemu-io and qemu-img.
func TestImageLocksAgainstQemu(t *testing.T) {
	peer.Root(t)
	qemuNBD := peer.Require(t, "qemu-nbd")
	qemuIO := peer.Require(t, "qemu-io")
	qemuImg := peer.Require(t, "qemu-img")
	if err := fuse.NewAttacher(fuse.Options{Dir: t.TempDir()}).Available(); err != nil {
		peer.Missing(t, "the fuse attach backend", err.Error())
	}
	e := newNodeEnvOn(t, "fuse")
	c := capMount(rw, "ext4")
	id := e.create("pvc-locks", 64<<20, nil, c)
	img := imageFile(e.pool, id)

	// qemu-nbd holds the image: the driver backs off. -t: the readiness
	// probe's connection must not end the server.
	sock := filepath.Join(e.dir, "nbd.sock")
	nbd := exec.Command(qemuNBD, "-t", "-f", "qcow2", "-k", sock, img)
	if err := nbd.Start(); err != nil {
		t.Fatal(err)
	}
	waitNBDGreeting(t, sock)
	staging := filepath.Join(e.dir, "staging", id)
	os.MkdirAll(staging, 0o750)
	_, err := e.c.NodeStageVolume(e.ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: c})
	wantCode(t, err, codes.FailedPrecondition, "qcow2: image is locked")
	_, err = e.c.DeleteVolume(e.ctx, &csi.DeleteVolumeRequest{VolumeId: id})
	wantCode(t, err, codes.FailedPrecondition, "qcow2: image is locked")
	nbd.Process.Kill()
	nbd.Wait()

	// The driver holds the image: qemu's tools are refused.
	staging = e.stage(id, c)
	for _, cmd := range [][]string{
		{qemuIO, "-f", "qcow2", "-c", "write 0 4k", img},
		{qemuImg, "check", img},
	} {
		out, err := exec.Command(cmd[0], cmd[1:]...).CombinedOutput()
		if err == nil || !strings.Contains(string(out), `Failed to get`) || !strings.Contains(string(out), `lock`) {
			t.Errorf("%v while staged: %v\n%s\nwant a lock failure", cmd, err, out)
		}
	}
	if _, err := e.c.NodeUnstageVolume(e.ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	// Released: qemu-img checks the image clean.
	if out, err := exec.Command(qemuImg, "check", img).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img check after unstage: %v\n%s", err, out)
	}
	if _, err := e.c.DeleteVolume(e.ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
}

func allocatedOf(p string) (int64, error) {
	var st unix.Stat_t
	err := unix.Stat(p, &st)
	return st.Blocks * 512, err
}
