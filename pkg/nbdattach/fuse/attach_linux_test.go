//go:build linux

package fuse_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/fuse"
	"github.com/qcow2-csi/qcow2-csi/tests/attachcases"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// The shared table, run for the fuse backend on this host's kernel.
func TestFuseAttachCases(t *testing.T) {
	a := fuse.NewAttacher(fuse.Options{Dir: filepath.Join(t.TempDir(), "fuse")})
	attachcases.Run(t, attachcases.Target{Attacher: a, Formats: []attachcases.Format{attachcases.Raw, attachcases.Qcow2}})
}

// The same table for raw images with FUSE passthrough asked for: where the
// kernel takes it, the kernel reads and writes the file itself, and every
// case must still hold (flush, discard and write-zeroes still reach the
// backend).
func TestFuseAttachCasesPassthrough(t *testing.T) {
	a := fuse.NewAttacher(fuse.Options{Dir: filepath.Join(t.TempDir(), "fuse"), Passthrough: true})
	attachcases.Run(t, attachcases.Target{Attacher: a, Formats: []attachcases.Format{attachcases.Raw}, Filesystems: []string{"ext4"}})
}

// TestFusePassthrough: on a kernel with FUSE passthrough (6.9 and later) a
// raw file's device is served by the kernel, and the loop device is then
// buffered (direct I/O would pass through to the file and skip its page
// cache); data written through the device is in the file. Without the
// option nothing changes.
func TestFusePassthrough(t *testing.T) {
	needFuse(t)
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		t.Fatal(err)
	}
	var major, minor int
	fmt.Sscanf(unix.ByteSliceToString(uts.Release[:]), "%d.%d", &major, &minor)
	kernelHas := major > 6 || major == 6 && minor >= 9
	for _, on := range []bool{false, true} {
		t.Run(fmt.Sprintf("passthrough=%v", on), func(t *testing.T) {
			a := fuse.NewAttacher(fuse.Options{Dir: filepath.Join(t.TempDir(), "fuse"), Passthrough: on})
			b := newFileBackend(t, 4<<20)
			d, err := a.Attach(context.Background(), "pt", b, nbdattach.AttachOptions{})
			if err != nil {
				t.Fatal(err)
			}
			detachOnCleanup(t, d)
			dev := d.(interface {
				Passthrough() bool
				DirectIO() bool
			})
			want := on && kernelHas
			if dev.Passthrough() != want || dev.DirectIO() == want {
				t.Fatalf("kernel %s, option %v: Passthrough() %v DirectIO() %v, want passthrough %v and direct I/O %v",
					unix.ByteSliceToString(uts.Release[:]), on, dev.Passthrough(), dev.DirectIO(), want, !want)
			}
			f, err := os.OpenFile(d.Path(), os.O_RDWR|unix.O_DIRECT, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			buf := alignedBlock(t, 4096)
			for i := range buf {
				buf[i] = byte(i%251) + 1
			}
			if _, err := f.WriteAt(buf, 1<<20); err != nil {
				t.Fatal(err)
			}
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(buf))
			if err := b.ReadAt(context.Background(), got, 1<<20); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, buf) {
				t.Fatal("the file does not hold what was written through the device")
			}
			back := alignedBlock(t, 4096)
			if _, err := f.ReadAt(back, 1<<20); err != nil || !bytes.Equal(back, buf) {
				t.Fatalf("read back through the device: %v, equal %v", err, bytes.Equal(back, buf))
			}
		})
	}
}

// alignedBlock returns n bytes aligned for O_DIRECT.
func alignedBlock(t *testing.T, n int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Munmap(b) })
	return b
}

func needFuse(t *testing.T) *fuse.Attacher {
	t.Helper()
	peer.Root(t)
	a := fuse.NewAttacher(fuse.Options{Dir: filepath.Join(t.TempDir(), "fuse")})
	if err := a.Available(); err != nil {
		peer.Missing(t, "FUSE and loop devices", err.Error())
	}
	return a
}

// recBackend records the calls the kernel's requests turn into and can be
// told to fail.
type recBackend struct {
	*nbdattach.FileBackend
	mu      sync.Mutex
	calls   []string
	failErr error // returned by ReadAt/WriteAt when set
}

func (b *recBackend) rec(s string) {
	b.mu.Lock()
	b.calls = append(b.calls, s)
	b.mu.Unlock()
}

func (b *recBackend) take() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	c := b.calls
	b.calls = nil
	return c
}

func (b *recBackend) fail(err error) {
	b.mu.Lock()
	b.failErr = err
	b.mu.Unlock()
}

func (b *recBackend) failing() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.failErr
}

func (b *recBackend) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := b.failing(); err != nil {
		return err
	}
	return b.FileBackend.ReadAt(ctx, p, off)
}

func (b *recBackend) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := b.failing(); err != nil {
		return err
	}
	b.rec(fmt.Sprintf("write %d+%d", off, len(p)))
	return b.FileBackend.WriteAt(ctx, p, off, fua)
}

func (b *recBackend) Flush(ctx context.Context) error {
	b.rec("flush")
	return b.FileBackend.Flush(ctx)
}

func (b *recBackend) Trim(ctx context.Context, off, length int64) error {
	b.rec(fmt.Sprintf("trim %d+%d", off, length))
	return b.FileBackend.Trim(ctx, off, length)
}

func (b *recBackend) WriteZeroes(ctx context.Context, off, length int64, f nbdattach.ZeroFlags) error {
	b.rec(fmt.Sprintf("zeroes %d+%d nohole=%v", off, length, f.NoHole))
	return b.FileBackend.WriteZeroes(ctx, off, length, f)
}

// sparseRaw makes an empty raw image of size bytes in a test directory.
func sparseRaw(t *testing.T, size int64) string {
	t.Helper()
	return fuse.SparseRaw(t, size)
}

// mountPoint is a new directory to mount on when mounted, else "".
func mountPoint(t *testing.T, mounted bool) string {
	t.Helper()
	if !mounted {
		return ""
	}
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	return mnt
}

func newFileBackend(t *testing.T, size int64) *nbdattach.FileBackend {
	t.Helper()
	return fuse.SparseBackend(t, size)
}

func detachOnCleanup(t *testing.T, d nbdattach.Device) {
	t.Cleanup(func() {
		if err := d.Detach(context.Background()); err != nil {
			t.Errorf("cleanup detach: %v", err)
		}
	})
}

func ioctlRange(t *testing.T, f *os.File, req uintptr, off, length uint64) error {
	t.Helper()
	r := [2]uint64{off, length}
	_, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), req, uintptr(unsafe.Pointer(&r)))
	if e != 0 {
		return e
	}
	return nil
}

// Each kind of block request reaches the Backend as the call it means.
func TestFuseRequestMapping(t *testing.T) {
	a := needFuse(t)
	b := &recBackend{FileBackend: newFileBackend(t, 16<<20)}
	d, err := a.Attach(context.Background(), "map", b, nbdattach.AttachOptions{}) // 4096 by default
	if err != nil {
		t.Fatal(err)
	}
	detachOnCleanup(t, d)
	// PR_SET_IO_FLUSHER is tried at the first attach; when it cannot be
	// set, the reason is one of the two known ones.
	if err := a.IOFlusher(); err != nil && !strings.Contains(err.Error(), "cgo") && !strings.Contains(err.Error(), "CAP_SYS_RESOURCE") {
		t.Errorf("IOFlusher: %v", err)
	} else {
		t.Logf("IOFlusher: %v", err)
	}
	if dio := d.(interface{ DirectIO() bool }).DirectIO(); !dio {
		t.Errorf("loop device %s does not do direct I/O to the FUSE file", d.Path())
	}
	for attr, want := range map[string]string{
		"queue/logical_block_size":  "4096",
		"queue/discard_granularity": "4096",
		"size":                      fmt.Sprint(16 << 20 / 512),
		"loop/autoclear":            "1",
	} {
		got, err := os.ReadFile(filepath.Join("/sys/class/block", filepath.Base(d.Path()), attr))
		if err != nil || strings.TrimSpace(string(got)) != want {
			t.Errorf("%s %s = %q (%v), want %q", d.Path(), attr, got, err, want)
		}
	}
	f, err := os.OpenFile(d.Path(), os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 8192+4096)
	al := buf[4096-int(uintptr(unsafe.Pointer(&buf[0]))&4095):][:8192]
	b.take()
	cases := []struct {
		name string
		do   func() error
		want []string
	}{
		{"write", func() error { _, err := f.WriteAt(al, 1<<20); return err }, []string{"write 1048576+8192"}},
		{"fsync", f.Sync, []string{"flush"}},
		{"BLKZEROOUT", func() error { return ioctlRange(t, f, unix.BLKZEROOUT, 2<<20, 1<<20) }, []string{"zeroes 2097152+1048576 nohole=true"}},
		{"BLKDISCARD", func() error { return ioctlRange(t, f, unix.BLKDISCARD, 4<<20, 1<<20) }, []string{"zeroes 4194304+1048576 nohole=false"}},
		{"punch-hole", func() error {
			return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 6<<20, 64<<10)
		}, []string{"zeroes 6291456+65536 nohole=false"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if err := c.do(); err != nil {
				t.Fatal(err)
			}
			if got := b.take(); strings.Join(got, ";") != strings.Join(c.want, ";") {
				t.Fatalf("backend calls %q, want %q", got, c.want)
			}
		})
	}
	// A failing backend fails the block request, with its errno.
	b.fail(syscall.EIO)
	if _, err := f.ReadAt(al, 0); !errors.Is(err, syscall.EIO) {
		t.Errorf("read with a failing backend: %v, want EIO", err)
	}
	b.fail(fmt.Errorf("image full: %w", nbdattach.ErrNoSpace))
	if _, err := f.WriteAt(al, 0); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("write with a full backend: %v, want ENOSPC", err)
	}
	b.fail(nil)
}

// The FUSE file behaves as the fixed-size device it is.
func TestFuseFileIsFixedSize(t *testing.T) {
	a := needFuse(t)
	dir := filepath.Join(t.TempDir(), "fuse")
	a = fuse.NewAttacher(fuse.Options{Dir: dir})
	d, err := a.Attach(context.Background(), "fixed", newFileBackend(t, 1<<20), nbdattach.AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	detachOnCleanup(t, d)
	file := backingFile(t, d.Path())
	if filepath.Base(file) != "fixed" || !strings.HasPrefix(file, dir+"/") {
		t.Fatalf("FUSE file %s: want Dir/<server>/fixed under %s", file, dir)
	}
	st, err := os.Stat(file)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != 1<<20 || st.Mode().Perm() != 0o600 || !st.Mode().IsRegular() {
		t.Fatalf("FUSE file: size %d mode %v, want 1 MiB regular 0600", st.Size(), st.Mode())
	}
	for _, c := range []struct {
		name string
		do   func() error
		want error
	}{
		{"truncate", func() error { return os.Truncate(file, 4096) }, syscall.EPERM},
		{"open O_TRUNC", func() error {
			f, err := os.OpenFile(file, os.O_RDWR|os.O_TRUNC, 0)
			if err == nil {
				f.Close()
			}
			return err
		}, syscall.EPERM},
		{"write past the end", func() error {
			f, err := os.OpenFile(file, os.O_RDWR, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = f.WriteAt([]byte("x"), 1<<20)
			return err
		}, syscall.ENOSPC},
		{"chmod", func() error { return os.Chmod(file, 0o666) }, syscall.EPERM},
		{"create", func() error { return os.WriteFile(filepath.Join(filepath.Dir(file), "other"), nil, 0o600) }, syscall.EROFS},
	} {
		t.Run(c.name, func(t *testing.T) {
			if err := c.do(); !errors.Is(err, c.want) {
				t.Fatalf("got %v, want %v", err, c.want)
			}
		})
	}
}

func TestFuseAttachRefuses(t *testing.T) {
	a := fuse.NewAttacher(fuse.Options{Dir: filepath.Join(t.TempDir(), "fuse")})
	ctx := context.Background()
	for _, c := range []struct {
		name, id string
		size     int64
		bs       uint32
		want     string
	}{
		{"empty id", "", 1 << 20, 0, "invalid device id"},
		{"slash", "a/b", 1 << 20, 0, "byte 1 is not one of"},
		{"dotdot", "..", 1 << 20, 0, "invalid device id"},
		{"long id", strings.Repeat("x", 201), 1 << 20, 0, "1-200 bytes"},
		{"block size", "ok", 1 << 20, 3000, "block size 3000"},
		{"unaligned size", "ok", 1<<20 + 512, 4096, "not a positive multiple of the block size 4096"},
		{"unaligned to 512", "ok", 1<<20 + 100, 0, "not a positive multiple of the block size 512"},
		{"empty backend", "ok", 0, 0, "not a positive multiple"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := a.Attach(ctx, c.id, newFileBackend(t, c.size), nbdattach.AttachOptions{BlockSize: c.bs})
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Attach: %v, want an error containing %q", err, c.want)
			}
		})
	}
}

func TestFuseDetachBusyAndTwice(t *testing.T) {
	a := needFuse(t)
	ctx := context.Background()
	d, err := a.Attach(ctx, "busy", newFileBackend(t, 1<<20), nbdattach.AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Attach(ctx, "busy", newFileBackend(t, 1<<20), nbdattach.AttachOptions{}); !errors.Is(err, nbdattach.ErrAlreadyAttached) {
		t.Fatalf("second Attach of the same id: %v, want ErrAlreadyAttached", err)
	}
	// An exclusive opener stands for a mounted filesystem.
	holder, err := os.OpenFile(d.Path(), os.O_RDONLY|unix.O_EXCL, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Detach(ctx); !errors.Is(err, nbdattach.ErrDeviceBusy) {
		t.Fatalf("Detach while held: %v, want ErrDeviceBusy", err)
	}
	if err := d.Resize(ctx, 512<<10); err == nil || !strings.Contains(err.Error(), "shrinking") {
		t.Fatalf("Resize smaller: %v, want a refusal", err)
	}
	holder.Close()
	if err := d.Detach(ctx); err != nil {
		t.Fatal(err)
	}
	if err := d.Detach(ctx); err != nil {
		t.Fatalf("second Detach: %v", err)
	}
	if err := d.Resize(ctx, 2<<20); !errors.Is(err, nbdattach.ErrNotAttached) {
		t.Fatalf("Resize after Detach: %v, want ErrNotAttached", err)
	}
	if l, err := listID(ctx, a, "busy"); err != nil || len(l) != 0 {
		t.Fatalf("List after Detach: %v %v, want nothing", l, err)
	}
	if _, err := a.Reattach(ctx, "busy", newFileBackend(t, 1<<20), nbdattach.AttachOptions{}); !errors.Is(err, nbdattach.ErrNotAttached) {
		t.Fatalf("Reattach of a detached id: %v, want ErrNotAttached", err)
	}
}

// helperEnv makes the test binary a crashing plugin: it attaches, optionally
// makes and mounts ext4, says so on stdout and waits to be killed.
const helperEnv = "QCOW2_CSI_FUSE_CRASH_HELPER"

func TestFuseCrashHelper(t *testing.T) {
	spec := os.Getenv(helperEnv)
	if spec == "" {
		return // only a helper process for TestFuseCrashCleanup
	}
	// spec: dir|image|id|mountpoint-or-empty[|cache mode[|uring]]
	parts := strings.Split(spec, "|")
	b, err := nbdattach.OpenFile(parts[1], false)
	if err != nil {
		t.Fatal(err)
	}
	var cache fuse.CacheMode
	if len(parts) > 4 {
		cache = fuse.CacheMode(parts[4])
	}
	uring := len(parts) > 5 && parts[5] == "uring"
	a := fuse.NewAttacher(fuse.Options{Dir: parts[0], Cache: cache, Uring: uring})
	d, err := a.Attach(context.Background(), parts[2], b, nbdattach.AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if uring && !fuse.ServesOverUring(a) {
		t.Fatal("the helper's device is not served over io_uring")
	}
	if mnt := parts[3]; mnt != "" {
		if out, err := exec.Command("mkfs.ext4", "-q", "-F", d.Path()).CombinedOutput(); err != nil {
			t.Fatalf("mkfs: %v %s", err, out)
		}
		if err := unix.Mount(d.Path(), mnt, "ext4", 0, ""); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(mnt, "f"), []byte("hello"), 0o644); err != nil {
			t.Fatal(err)
		}
		unix.Sync()
	}
	if cache != "" {
		crashHelperWrites(t, d.Path(), parts[3])
	}
	fmt.Printf("READY %s\n", d.Path())
	time.Sleep(time.Hour)
}

// A plugin killed with its devices attached leaves them dead; the next one
// finds them, says Reattach cannot work, and releases what it can.
func TestFuseCrashCleanup(t *testing.T) {
	peer.Require(t, "mkfs.ext4")
	for _, c := range []struct{ mounted, attachFirst, symlink bool }{
		{false, false, false}, {true, false, false}, {false, true, false},
		{true, false, true}, // Dir reached through a symlink: mountinfo and sysfs show the real path
	} {
		mounted := c.mounted
		t.Run(fmt.Sprintf("mounted=%v/attach-first=%v/symlink=%v", c.mounted, c.attachFirst, c.symlink), func(t *testing.T) {
			needFuse(t)
			dir := filepath.Join(t.TempDir(), "fuse")
			if c.symlink {
				link := filepath.Join(t.TempDir(), "link")
				if err := os.Symlink(t.TempDir(), link); err != nil {
					t.Fatal(err)
				}
				dir = filepath.Join(link, "fuse")
			}
			img := sparseRaw(t, 64<<20)
			mnt := mountPoint(t, mounted)
			// A failing run must not leave the dead mount behind.
			t.Cleanup(func() {
				for _, m := range fuseMountsUnder(t, dir) {
					unix.Unmount(m, unix.MNT_DETACH)
				}
			})
			cmd := exec.Command(os.Args[0], "-test.run=^TestFuseCrashHelper$", "-test.v")
			cmd.Env = append(os.Environ(), helperEnv+"="+strings.Join([]string{dir, img, "crashvol", mnt}, "|"))
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			cmd.Stderr = os.Stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			var devPath string
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				if p, ok := strings.CutPrefix(sc.Text(), "READY "); ok {
					devPath = p
					break
				}
			}
			if devPath == "" {
				cmd.Process.Kill()
				cmd.Wait()
				t.Fatal("helper did not attach")
			}
			cmd.Process.Kill()
			cmd.Wait()
			if mounted {
				t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
			}

			a := fuse.NewAttacher(fuse.Options{Dir: dir})
			ctx := context.Background()
			if c.attachFirst {
				// Attach finds the dead mount and cleans it.
				waitUnbound(t, devPath)
				d, err := a.Attach(ctx, "crashvol", newFileBackend(t, 64<<20), nbdattach.AttachOptions{})
				if err != nil {
					t.Fatalf("Attach over a dead mount: %v", err)
				}
				if err := d.Detach(ctx); err != nil {
					t.Fatal(err)
				}
				if ms := fuseMountsUnder(t, dir); len(ms) != 0 {
					t.Fatalf("FUSE mounts left under %s: %q", dir, ms)
				}
				return
			}
			// Unused, the device went with its process (autoclear), and
			// the dead shared mount cannot say it held crashvol; under a
			// mounted filesystem the device stays, dead.
			var wantList []nbdattach.DeviceInfo
			if mounted {
				wantList = []nbdattach.DeviceInfo{{Path: devPath, ID: "crashvol", Size: 64 << 20, Connected: false}}
			} else {
				waitUnbound(t, devPath)
			}
			l, err := listID(ctx, a, "crashvol")
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(l) != fmt.Sprint(wantList) {
				t.Fatalf("List after the crash: %+v, want %+v", l, wantList)
			}
			wantReattach := nbdattach.ErrNotAttached
			if mounted {
				wantReattach = nbdattach.ErrUnavailable
			}
			if _, err := a.Reattach(ctx, "crashvol", newFileBackend(t, 64<<20), nbdattach.AttachOptions{}); !errors.Is(err, wantReattach) {
				t.Fatalf("Reattach: %v, want %v", err, wantReattach)
			}
			if mounted {
				// The filesystem on the dead device fails instead of hanging.
				if _, err := os.ReadFile(filepath.Join(mnt, "f")); err == nil {
					// the page cache may still hold it; a direct read cannot
					f, err := os.OpenFile(devPath, os.O_RDONLY|unix.O_DIRECT, 0)
					if err != nil {
						t.Fatal(err)
					}
					buf := make([]byte, 8192)
					al := buf[4096-int(uintptr(unsafe.Pointer(&buf[0]))&4095):][:4096]
					_, err = f.ReadAt(al, 0)
					f.Close()
					if err == nil {
						t.Fatalf("direct read of the dead device %s succeeded", devPath)
					}
				}
			}
			all, err := a.CleanStale(ctx)
			if err != nil {
				t.Fatal(err)
			}
			var found []nbdattach.DeviceInfo
			for _, f := range all {
				if f.ID == "crashvol" {
					found = append(found, f)
				}
			}
			if fmt.Sprint(found) != fmt.Sprint(wantList) {
				t.Fatalf("CleanStale found %+v, want %+v", found, wantList)
			}
			if mounted {
				// Still mounted: the device stays bound until the unmount,
				// then goes by itself; meanwhile it is still recognised.
				if !loopBound(devPath) {
					t.Fatalf("%s unbound under a mounted filesystem", devPath)
				}
				if l, err := listID(ctx, a, "crashvol"); err != nil || fmt.Sprint(l) != fmt.Sprint(wantList) {
					t.Fatalf("List after CleanStale: %+v (%v), want %+v", l, err, wantList)
				}
				if _, err := a.Reattach(ctx, "crashvol", newFileBackend(t, 64<<20), nbdattach.AttachOptions{}); !errors.Is(err, nbdattach.ErrUnavailable) {
					t.Fatalf("Reattach after CleanStale: %v, want ErrUnavailable", err)
				}
				if err := unix.Unmount(mnt, 0); err != nil {
					t.Fatal(err)
				}
			}
			waitUnbound(t, devPath)
			if ms := fuseMountsUnder(t, dir); len(ms) != 0 {
				t.Fatalf("FUSE mounts left under %s: %q", dir, ms)
			}
			if ents, err := os.ReadDir(dir); err != nil || len(ents) != 0 {
				t.Fatalf("mount directories left in %s: %v %v", dir, ents, err)
			}
			// And the id can be attached again.
			d, err := a.Attach(ctx, "crashvol", newFileBackend(t, 64<<20), nbdattach.AttachOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if err := d.Detach(ctx); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// backingFile is the file a loop device is bound to, as sysfs shows it.
func backingFile(t *testing.T, dev string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/class/block", filepath.Base(dev), "loop", "backing_file"))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// listID is List restricted to one id: other processes (other tests running
// at the same time) may have devices of their own.
func listID(ctx context.Context, a *fuse.Attacher, id string) ([]nbdattach.DeviceInfo, error) {
	l, err := a.List(ctx)
	var out []nbdattach.DeviceInfo
	for _, d := range l {
		if d.ID == id {
			out = append(out, d)
		}
	}
	return out, err
}

func loopBound(dev string) bool {
	_, err := os.Stat(filepath.Join("/sys/class/block", filepath.Base(dev), "loop", "backing_file"))
	return err == nil
}

func waitUnbound(t *testing.T, dev string) {
	t.Helper()
	for i := 0; loopBound(dev); i++ {
		if i == 500 {
			t.Fatalf("%s still bound after 10 s", dev)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func fuseMountsUnder(t *testing.T, dir string) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			out = append(out, f[4])
		}
	}
	return out
}

// Attaches, Lists and Detaches from several goroutines at once (run under
// -race): each device ends up with its own loop device and all go away.
func TestFuseConcurrentAttach(t *testing.T) {
	a := needFuse(t)
	ctx := context.Background()
	const n = 4
	devs := make([]nbdattach.Device, n)
	var wg sync.WaitGroup
	errs := make(chan error, 2*n)
	for i := range n {
		b := newFileBackend(t, 1<<20)
		wg.Add(2)
		go func() {
			defer wg.Done()
			d, err := a.Attach(ctx, fmt.Sprintf("conc%d", i), b, nbdattach.AttachOptions{})
			devs[i] = d
			errs <- err
		}()
		go func() {
			defer wg.Done()
			_, err := a.List(ctx)
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	paths := map[string]bool{}
	for i, d := range devs {
		if d == nil || paths[d.Path()] {
			t.Fatalf("device %d: %v (paths so far %v)", i, d, paths)
		}
		paths[d.Path()] = true
		if l, err := listID(ctx, a, d.ID()); err != nil || len(l) != 1 || l[0].Path != d.Path() || !l[0].Connected {
			t.Fatalf("List for %s: %+v %v", d.ID(), l, err)
		}
	}
	for _, d := range devs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := d.Detach(ctx); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	for _, d := range devs {
		if l, _ := listID(ctx, a, d.ID()); len(l) != 0 {
			t.Errorf("%s still listed after Detach: %+v", d.ID(), l)
		}
	}
}

// All devices are files of one FUSE mount (one server: its readers, threads
// and buffers do not grow with the devices), which goes with the last
// device. A device detached and attached again under the same id while the
// others stay is a new file: it reads the new backend, not the old one.
func TestFuseOneServer(t *testing.T) {
	a := needFuse(t)
	ctx := context.Background()
	const n = 5
	devs := map[string]nbdattach.Device{}
	attach := func(id string, fill byte) {
		t.Helper()
		b := newFileBackend(t, 1<<20)
		if err := b.WriteAt(ctx, bytes.Repeat([]byte{fill}, 4096), 0, false); err != nil {
			t.Fatal(err)
		}
		d, err := a.Attach(ctx, id, b, nbdattach.AttachOptions{})
		if err != nil {
			t.Fatal(err)
		}
		devs[id] = d
	}
	firstByte := func(dev string) byte {
		t.Helper()
		f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		buf := make([]byte, 8192)
		al := buf[4096-int(uintptr(unsafe.Pointer(&buf[0]))&4095):][:4096]
		if _, err := f.ReadAt(al, 0); err != nil {
			t.Fatal(err)
		}
		return al[0]
	}
	for i := range n {
		attach(fmt.Sprintf("one%d", i), byte('a'+i))
	}
	dir := filepath.Dir(filepath.Dir(backingFile(t, devs["one0"].Path())))
	if ms := fuseMountsUnder(t, dir); len(ms) != 1 {
		t.Fatalf("%d devices on FUSE mounts %q, want one mount", n, ms)
	}
	mnt := filepath.Dir(backingFile(t, devs["one0"].Path()))
	for id, d := range devs {
		if got := backingFile(t, d.Path()); got != filepath.Join(mnt, id) {
			t.Errorf("%s: backing file %s, want %s", id, got, filepath.Join(mnt, id))
		}
	}

	// This process's live server is not stale. Devices of other processes
	// (another test package's cluster, in a mount namespace this one cannot
	// see) may be reported: only this test's own must not be.
	found, err := a.CleanStale(ctx)
	if err != nil {
		t.Fatalf("CleanStale with devices attached: %v", err)
	}
	for _, in := range found {
		if _, ours := devs[in.ID]; ours {
			t.Fatalf("CleanStale with devices attached reported this process's live %+v", in)
		}
	}
	if err := devs["one2"].Detach(ctx); err != nil {
		t.Fatal(err)
	}
	attach("one2", 'z')
	for id, want := range map[string]byte{"one1": 'b', "one2": 'z', "one3": 'd'} {
		if got := firstByte(devs[id].Path()); got != want {
			t.Errorf("%s reads %q, want %q", id, got, want)
		}
	}

	for _, d := range devs {
		if err := d.Detach(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if ms := fuseMountsUnder(t, dir); len(ms) != 0 {
		t.Fatalf("FUSE mounts left after the last detach: %q", ms)
	}
	if ents, err := os.ReadDir(dir); err != nil || len(ents) != 0 {
		t.Fatalf("left in %s: %v %v", dir, ents, err)
	}
}
