//go:build linux

package vmharness

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/qcow2-csi/qcow2-csi/internal/hostbin"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// EnvInVM is set to "1" in the environment of every program the VM's /init
// starts.
const EnvInVM = "QCOW2CSI_IN_VM"

// SharePath is where the host directory Options.Share is mounted in the VM.
const SharePath = "/share"

// InVM reports whether this process runs inside a harness VM.
func InVM() bool { return os.Getenv(EnvInVM) == "1" }

// Guest skips the calling test unless it runs inside a harness VM: guest
// tests are run by their package's host-side entry test through RunGoTest,
// never directly on the host. (This is not a missing-peer skip: the entry
// test is what fails when the VM cannot run.)
func Guest(t testing.TB) {
	t.Helper()
	if !InVM() {
		t.Skip("runs inside the test VM only (the package's entry test boots it through vmharness.RunGoTest)")
	}
}

// DefaultModules are loaded in every VM, with their dependencies.
var DefaultModules = []string{
	"crc32c_generic", "nbd", "ext4", "xfs", "loop", "fuse",
	"virtio_pci", "9pnet_virtio", "9p",
}

// DefaultTools are host programs copied into every VM with their libraries.
// Busybox provides the rest of a shell environment (mount, dd, sync, ...).
var DefaultTools = []string{
	"mkfs.ext4", "mke2fs", "e2fsck", "resize2fs", "dumpe2fs",
	"mkfs.xfs", "xfs_growfs", "xfs_repair", "xfs_info", "xfs_db",
	"blkid", "blockdev", "blkdiscard", "fstrim",
	// util-linux's own mount tools rather than busybox's: k8s.io/mount-utils
	// (the driver's mounter) passes options busybox does not know, and runs
	// fsck before mounting ext4.
	"mount", "umount", "findmnt", "losetup", "fsck", "fsck.ext4", "fsck.xfs",
}

// Options tune one VM run. Zero values mean defaults.
type Options struct {
	// Modules are kernel modules loaded in addition to DefaultModules.
	Modules []string
	// ModuleParams are insmod parameters per module name, e.g.
	// {"nbd": "nbds_max=16"}. nbd defaults to nbds_max=16.
	ModuleParams map[string]string
	// Tools are host programs (looked up on PATH and the sbin directories)
	// copied, with the libraries ldd lists, in addition to DefaultTools.
	Tools []string
	// Files maps guest paths to host files copied into the initramfs.
	Files map[string]string
	// Share is a host directory the guest mounts read-write on /share
	// (9p), for images and results both sides read. "" makes a fresh
	// t.TempDir(); Result.Share says which.
	Share string
	// Env is added to the guest test's environment ("KEY=value"). CI is
	// passed through from the host.
	Env []string
	// Args are extra arguments to the test binary (after -test.v and
	// -test.run).
	Args []string
	// BuildTags are passed to `go test -c -tags`.
	BuildTags string
	// Timeout bounds the whole VM run (boot included). Default 10 min.
	Timeout time.Duration
	// MemoryMB is the guest RAM. Default 1024.
	MemoryMB int
	// CPUs is the number of guest CPUs. Default 2.
	CPUs int
}

// Result is what a VM run produced.
type Result struct {
	// ExitCode is the guest test binary's exit status (-1 when it never
	// reported one: the VM crashed or timed out).
	ExitCode int
	// Output is everything the test binary printed.
	Output string
	// Console is the kernel's console (dmesg and /init's own lines).
	Console string
	// Share is the host directory that was mounted on /share.
	Share string
	// Boot is the wall time from starting QEMU to the guest's /init
	// starting the test binary; GuestBoot the guest kernel's uptime then
	// (the difference is QEMU loading the kernel and initramfs); Total the
	// whole run.
	Boot, GuestBoot, Total time.Duration
}

// RunGoTest builds the test binary of the package in pkgDir statically
// (CGO_ENABLED=0), boots a VM with it, runs it as root with
// -test.v -test.run run, streams its output into t's log and returns the
// result. It fails t (Errorf) when the guest tests fail or the VM does not
// finish, and stops t the tests/peer way when qemu-system-x86_64 or the
// Debian tools to fetch the kernel are missing.
func RunGoTest(t testing.TB, pkgDir, run string, opts Options) Result {
	t.Helper()
	qemu := peer.Require(t, "qemu-system-x86_64")
	peer.Require(t, "ldd")
	a := Fetch(t)
	work := t.TempDir()

	bin := filepath.Join(work, "guest.test")
	args := []string{"test", "-c", "-o", bin}
	if opts.BuildTags != "" {
		args = append(args, "-tags", opts.BuildTags)
	}
	args = append(args, ".")
	build := exec.Command("go", args...)
	build.Dir = pkgDir
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("vmharness: go test -c in %s: %v\n%s", pkgDir, err, out)
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("vmharness: %s has no tests to build", pkgDir)
	}
	absPkg, _ := filepath.Abs(pkgDir)

	timeout := opts.Timeout
	if timeout <= 0 {
		timeout = 10 * time.Minute
	}
	// Finish (and report) before `go test -timeout` kills the host test.
	if dt, ok := t.(interface{ Deadline() (time.Time, bool) }); ok {
		if d, ok := dt.Deadline(); ok {
			if left := time.Until(d) - 30*time.Second; left < timeout {
				timeout = left
			}
		}
	}
	if timeout < time.Minute {
		t.Fatalf("vmharness: only %v left before the test deadline; run go test with a longer -timeout", timeout)
	}
	env := []string{EnvInVM + "=1", "HOME=/root", "TMPDIR=/tmp", "GOTRACEBACK=all",
		"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	if v, ok := os.LookupEnv("CI"); ok {
		env = append(env, "CI="+v)
	}
	env = append(env, opts.Env...)
	guestArgs := append([]string{"-test.v", "-test.run", run,
		"-test.timeout", (timeout - 30*time.Second).String()}, opts.Args...)

	initrd := filepath.Join(work, "initrd.cpio")
	if err := a.buildInitramfs(initrd, bin, guestArgs, env, opts); err != nil {
		t.Fatalf("vmharness: initramfs: %v", err)
	}

	share := opts.Share
	if share == "" {
		share = t.TempDir()
	}
	res := boot(t, qemu, a, initrd, share, work, timeout, opts)
	res.Share = share
	t.Logf("vmharness: %s: boot %v (guest kernel uptime %v), total %v, exit %d", absPkg, res.Boot.Round(100*time.Millisecond),
		res.GuestBoot.Round(100*time.Millisecond), res.Total.Round(100*time.Millisecond), res.ExitCode)
	if os.Getenv("VMHARNESS_CONSOLE") == "1" {
		t.Logf("vmharness: kernel console:\n%s", res.Console)
	}
	if res.ExitCode != 0 {
		t.Errorf("vmharness: guest tests of %s failed (exit %d); kernel console tail:\n%s", absPkg, res.ExitCode, tail(res.Console, 60))
	}
	return res
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// shellQuote quotes s for the guest's /bin/sh.
func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

const (
	markerBooted = "VMHARNESS-BOOTED"
	markerExit   = "VMHARNESS-EXIT"
)

func (a *Assets) buildInitramfs(dst, testBin string, args, env []string, opts Options) error {
	mods, err := a.resolve(append(append([]string{}, DefaultModules...), opts.Modules...))
	if err != nil {
		return err
	}
	f, err := os.Create(dst)
	if err != nil {
		return err
	}
	defer f.Close()
	c := newCPIO(f)
	for _, d := range []string{"/proc", "/sys", "/dev", "/tmp", "/run", "/root", "/mnt", SharePath, "/etc", "/usr/bin", "/usr/sbin", "/sbin"} {
		c.mkdirAll(d)
	}
	c.file("/bin/busybox", a.Busybox)
	// Applet links are made by /init (busybox --install), but sh must exist
	// before it runs.
	c.symlink("/bin/sh", "busybox")

	params := map[string]string{"nbd": "nbds_max=16"}
	for k, v := range opts.ModuleParams {
		params[k] = v
	}
	var insmod strings.Builder
	for _, m := range mods {
		gp := "/lib/modules/" + m.path
		c.file(gp, filepath.Join(a.ModulesDir, filepath.FromSlash(m.path)))
		fmt.Fprintf(&insmod, "insmod %s %s || echo 'vmharness: insmod %s failed'\n", gp, params[m.name], m.name)
	}

	tools := append(append([]string{}, DefaultTools...), opts.Tools...)
	addFile := func(dst, src string) error { c.file(dst, src); return nil }
	for _, name := range tools {
		if err := hostbin.CopyProgram(name, addFile, hostbin.Options{}); err != nil {
			return err
		}
	}
	for _, conf := range []string{"/etc/mke2fs.conf"} {
		if _, err := os.Stat(conf); err == nil {
			c.file(conf, conf)
		}
	}
	guestPaths := make([]string, 0, len(opts.Files))
	for g := range opts.Files {
		guestPaths = append(guestPaths, g)
	}
	sort.Strings(guestPaths)
	for _, g := range guestPaths {
		c.file(g, opts.Files[g])
	}
	c.bytes("/etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\n"))
	c.bytes("/etc/group", 0o644, []byte("root:x:0:\n"))
	c.file("/test/guest.test", testBin)

	var cmd strings.Builder
	cmd.WriteString("/test/guest.test")
	for _, a := range args {
		cmd.WriteString(" " + shellQuote(a))
	}
	var exports strings.Builder
	for _, e := range env {
		k, v, _ := strings.Cut(e, "=")
		fmt.Fprintf(&exports, "export %s=%s\n", k, shellQuote(v))
	}
	initScript := fmt.Sprintf(`#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mkdir -p /dev/pts /dev/shm
ln -sf /proc/self/mounts /etc/mtab
%s
ifconfig lo 127.0.0.1 up
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=none share %s || echo 'vmharness: mounting the share failed'
%s
cd /test
echo "%s $(cut -d' ' -f1 /proc/uptime)" > /dev/ttyS1
%s > /dev/ttyS1 2>&1
rc=$?
sync
umount %s 2>/dev/null
echo "%s $rc" > /dev/ttyS1
poweroff -f
`, insmod.String(), SharePath, exports.String(), markerBooted, cmd.String(), SharePath, markerExit)
	c.bytes("/init", 0o755, []byte(initScript))
	return c.close()
}

var exitLine = regexp.MustCompile(`^` + markerExit + ` (-?\d+)\s*$`)

// boot runs QEMU until the guest powers off or the timeout passes,
// streaming the guest test's output into t's log line by line.
func boot(t testing.TB, qemu string, a *Assets, initrd, share, work string, timeout time.Duration, opts Options) Result {
	mem := opts.MemoryMB
	if mem <= 0 {
		mem = 1024
	}
	cpus := opts.CPUs
	if cpus <= 0 {
		cpus = 2
	}
	console := filepath.Join(work, "console.log")
	out := filepath.Join(work, "output.log")
	for _, p := range []string{console, out} {
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	// TCG, never KVM: KVM boots hang on these machines. -nodefaults drops
	// the emulated VGA, NIC and friends the tests do not use.
	cmd := exec.CommandContext(ctx, qemu,
		"-accel", "tcg", "-cpu", "max", "-smp", strconv.Itoa(cpus), "-m", strconv.Itoa(mem),
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-serial", "file:"+console, "-serial", "file:"+out,
		"-kernel", a.Kernel, "-initrd", initrd,
		"-append", "console=ttyS0 panic=-1 loglevel=4 printk.time=1 rdinit=/init",
		"-fsdev", "local,id=share,path="+share+",security_model=none",
		"-device", "virtio-9p-pci,fsdev=share,mount_tag=share",
	)
	// Never leave a VM behind when the test process dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var qout bytes.Buffer
	cmd.Stdout, cmd.Stderr = &qout, &qout
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatalf("vmharness: start qemu: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()

	res := Result{ExitCode: -1}
	var output strings.Builder
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r := bufio.NewReader(f)
	var partial string
	consume := func() {
		for {
			s, err := r.ReadString('\n')
			partial += s
			if err == io.EOF {
				return
			}
			line := strings.TrimRight(partial, "\r\n")
			partial = ""
			switch {
			case strings.HasPrefix(line, markerBooted):
				res.Boot = time.Since(start)
				if f := strings.Fields(line); len(f) == 2 {
					if s, err := strconv.ParseFloat(f[1], 64); err == nil {
						res.GuestBoot = time.Duration(s * float64(time.Second))
					}
				}
			case exitLine.MatchString(line):
				res.ExitCode, _ = strconv.Atoi(exitLine.FindStringSubmatch(line)[1])
			default:
				output.WriteString(line + "\n")
				t.Log("vm: " + line)
			}
		}
	}
	var werr error
loop:
	for {
		select {
		case werr = <-done:
			break loop
		case <-time.After(200 * time.Millisecond):
			consume()
		}
	}
	consume()
	if partial != "" {
		output.WriteString(partial)
		t.Log("vm: " + partial)
	}
	res.Total = time.Since(start)
	res.Output = output.String()
	cb, _ := os.ReadFile(console)
	res.Console = string(cb)
	if ctx.Err() != nil {
		t.Errorf("vmharness: the VM did not finish within %v", timeout)
	} else if werr != nil {
		t.Errorf("vmharness: qemu: %v\n%s", werr, qout.String())
	}
	return res
}
