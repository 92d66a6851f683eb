//go:build linux

package vm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/kernel"
	"github.com/qcow2-csi/qcow2-csi/tests/vm/vmharness"
)

// Guest tests run as root inside the VM (see TestVM). Images live on the
// guest's tmpfs (9p under TCG is slow); what the host checks afterwards is
// copied to the share, sparsely.

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func newRaw(t *testing.T, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
}

func kernelAttacher() *kernel.Attacher {
	// A short I/O timeout: requests in flight on a socket that died are
	// resent only when it expires (see DefaultIOTimeout). Not too short:
	// TCG on a loaded machine is slow, and a request that times out makes
	// the kernel drop a healthy socket.
	return kernel.NewAttacher(kernel.Options{IOTimeout: 10 * time.Second, DeadConnTimeout: 60 * time.Second})
}

// fileSet writes n files of pseudo-random sizes and contents under dir and
// returns their digests, so that they can be verified after a remount.
func writeFileSet(t *testing.T, dir string, seed uint64, n int) map[string][32]byte {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	sums := map[string][32]byte{}
	for i := 0; i < n; i++ {
		data := make([]byte, 1+r.IntN(1<<20))
		for j := range data {
			data[j] = byte(r.Uint32())
		}
		name := filepath.Join(dir, fmt.Sprintf("d%d", i%4), fmt.Sprintf("f%03d", i))
		if err := os.MkdirAll(filepath.Dir(name), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(name, data, 0o644); err != nil {
			t.Fatal(err)
		}
		sums[name] = sha256.Sum256(data)
	}
	return sums
}

func verifyFileSet(t *testing.T, sums map[string][32]byte) {
	t.Helper()
	for name, want := range sums {
		data, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		if sha256.Sum256(data) != want {
			t.Errorf("%s: content differs after remount", name)
		}
	}
}

// dropCaches makes the next reads come from the device, not the page cache.
func dropCaches(t *testing.T) {
	t.Helper()
	unix.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0); err != nil {
		t.Fatal(err)
	}
}

func sysfsSize(t *testing.T, dev string) int64 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "size"))
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n * 512
}

func statfsSize(t *testing.T, dir string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks) * st.Bsize
}

// TestGuestFilesystems: attach an image, make a filesystem, mount, write,
// remount and verify, grow the image and the device and the filesystem
// while mounted, unmount, copy the device out through the kernel and
// detach. TestVM then checks the image and the copy on the host.
func TestGuestFilesystems(t *testing.T) {
	vmharness.Guest(t)
	tests := []struct {
		fs          string
		size, grown int64
		conns       int
		mkfs        []string
		grow        func(t *testing.T, dev, mnt string)
	}{
		{
			fs: "ext4", size: 128 << 20, grown: 192 << 20, conns: 1,
			mkfs: []string{"mkfs.ext4", "-q", "-F"},
			grow: func(t *testing.T, dev, _ string) { run(t, "resize2fs", dev) },
		},
		{
			fs: "xfs", size: 320 << 20, grown: 400 << 20, conns: 2,
			mkfs: []string{"mkfs.xfs", "-q", "-f"},
			grow: func(t *testing.T, _, mnt string) { run(t, "xfs_growfs", mnt) },
		},
	}
	a := kernelAttacher()
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%s-%dconn", tt.fs, tt.conns), func(t *testing.T) {
			ctx := context.Background()
			img := filepath.Join(t.TempDir(), tt.fs+".raw")
			newRaw(t, img, tt.size)
			b, err := nbdattach.OpenFile(img, false)
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			id := "vol-" + tt.fs
			dev, err := a.Attach(ctx, id, b, nbdattach.AttachOptions{Connections: tt.conns})
			if err != nil {
				t.Fatal(err)
			}
			if got := sysfsSize(t, dev.Path()); got != tt.size {
				t.Fatalf("%s: kernel size %d, want %d", dev.Path(), got, tt.size)
			}
			if got, _ := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev.Path()), "backend")); string(got) != id+"\n" {
				t.Errorf("sysfs backend = %q, want %q", got, id+"\n")
			}
			infos, err := a.List(ctx)
			if err != nil {
				t.Fatal(err)
			}
			found := false
			for _, in := range infos {
				if in.ID == id {
					found = true
					want := nbdattach.DeviceInfo{Path: dev.Path(), ID: id, Size: tt.size, Connected: true}
					if in != want {
						t.Errorf("List: %+v, want %+v", in, want)
					}
				}
			}
			if !found {
				t.Errorf("List has no %s: %+v", id, infos)
			}
			if _, err := a.Attach(ctx, id, b, nbdattach.AttachOptions{}); !errors.Is(err, nbdattach.ErrAlreadyAttached) {
				t.Errorf("second Attach of %s: %v, want ErrAlreadyAttached", id, err)
			}

			run(t, tt.mkfs[0], append(tt.mkfs[1:], dev.Path())...)
			mnt := filepath.Join("/mnt", tt.fs)
			if err := os.MkdirAll(mnt, 0o755); err != nil {
				t.Fatal(err)
			}
			run(t, "mount", "-t", tt.fs, dev.Path(), mnt)
			sums := writeFileSet(t, mnt, uint64(len(tt.fs)), 16)
			if err := dev.Detach(ctx); !errors.Is(err, nbdattach.ErrDeviceBusy) {
				t.Errorf("Detach while mounted: %v, want ErrDeviceBusy", err)
			}
			run(t, "umount", mnt)
			dropCaches(t)
			run(t, "mount", "-t", tt.fs, dev.Path(), mnt)
			verifyFileSet(t, sums)

			// Online growth: image first, then the device, then the
			// filesystem, all while mounted.
			before := statfsSize(t, mnt)
			if err := b.Resize(tt.grown); err != nil {
				t.Fatal(err)
			}
			if err := dev.Resize(ctx, tt.grown); err != nil {
				t.Fatal(err)
			}
			if got := sysfsSize(t, dev.Path()); got != tt.grown {
				t.Fatalf("after Resize: kernel size %d, want %d", got, tt.grown)
			}
			if got := strings.TrimSpace(run(t, "blockdev", "--getsize64", dev.Path())); got != strconv.FormatInt(tt.grown, 10) {
				t.Errorf("blockdev --getsize64 = %s, want %d", got, tt.grown)
			}
			tt.grow(t, dev.Path(), mnt)
			if after := statfsSize(t, mnt); after <= before {
				t.Errorf("filesystem did not grow: %d -> %d bytes", before, after)
			}
			more := writeFileSet(t, filepath.Join(mnt, "after-grow"), 99, 4)
			run(t, "umount", mnt)
			dropCaches(t)
			run(t, "mount", "-t", tt.fs, dev.Path(), mnt)
			verifyFileSet(t, sums)
			verifyFileSet(t, more)
			run(t, "umount", mnt)

			// What the kernel reads back must be the backend's bytes.
			compareThroughKernel(t, dev.Path(), img)
			if err := dev.Detach(ctx); err != nil {
				t.Fatal(err)
			}
			if err := dev.Detach(ctx); err != nil {
				t.Errorf("second Detach: %v", err)
			}
			if _, err := os.Stat(filepath.Join("/sys/block", filepath.Base(dev.Path()), "backend")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("after Detach the backend file is still there (%v)", err)
			}
			if _, err := a.Reattach(ctx, id, b, nbdattach.AttachOptions{}); !errors.Is(err, nbdattach.ErrNotAttached) {
				t.Errorf("Reattach after Detach: %v, want ErrNotAttached", err)
			}
			// TestVM checks the filesystem on the host.
			copySparse(t, img, filepath.Join(vmharness.SharePath, tt.fs+".raw"))
		})
	}
}

// TestGuestRawData writes a known pattern through two connections with
// O_DIRECT and checks the backend file byte for byte.
func TestGuestRawData(t *testing.T) {
	vmharness.Guest(t)
	ctx := context.Background()
	img := filepath.Join(t.TempDir(), "raw-data.raw")
	const size = 32 << 20
	newRaw(t, img, size)
	b, err := nbdattach.OpenFile(img, false)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	a := kernelAttacher()
	dev, err := a.Attach(ctx, "vol-raw", b, nbdattach.AttachOptions{Connections: 2, BlockSize: 512})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Detach(ctx)
	if got, _ := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev.Path()), "queue", "logical_block_size")); string(got) != "512\n" {
		t.Errorf("logical_block_size = %q, want 512", got)
	}
	pattern := filepath.Join(t.TempDir(), "pattern")
	writePattern(t, pattern, 7, size)
	run(t, "dd", "if="+pattern, "of="+dev.Path(), "bs=256k", "oflag=direct", "conv=fsync")
	want, _ := os.ReadFile(pattern)
	got := make([]byte, size)
	if err := b.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("backend differs from what was written through %s", dev.Path())
	}
	// Discard reaches the backend as TRIM: the range reads back as zeroes.
	run(t, "blkdiscard", "-o", "1048576", "-l", "1048576", dev.Path())
	if err := b.ReadAt(ctx, got[:1<<20], 1<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:1<<20], make([]byte, 1<<20)) {
		t.Errorf("discarded range does not read as zeroes")
	}
}

func writePattern(t *testing.T, path string, seed uint64, size int) {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, ^seed))
	data := make([]byte, size)
	for i := 0; i+8 <= len(data); i += 8 {
		v := r.Uint64()
		for j := 0; j < 8; j++ {
			data[i+j] = byte(v >> (8 * j))
		}
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// dataExtents lists the allocated ranges of a sparse file.
func dataExtents(t *testing.T, f *os.File) [][2]int64 {
	t.Helper()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	var out [][2]int64
	for off := int64(0); off < st.Size(); {
		data, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
		if err != nil {
			break // ENXIO: no data past off
		}
		hole, err := unix.Seek(int(f.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, [2]int64{data, hole})
		off = hole
	}
	return out
}

// compareThroughKernel reads every allocated range of the backend file, and
// its first and last MiB, through the device with O_DIRECT and compares.
func compareThroughKernel(t *testing.T, dev, img string) {
	t.Helper()
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	size := st.Size()
	ranges := append(dataExtents(t, f), [2]int64{0, min(size, 1<<20)}, [2]int64{max(0, size-1<<20), size})
	d, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	const chunk = 1 << 20
	buf := alignedBuf(chunk)
	want := make([]byte, chunk)
	total := int64(0)
	for _, r := range ranges {
		start := r[0] &^ 4095
		for off := start; off < r[1]; off += chunk {
			n := min(int64(chunk), size-off)
			if _, err := d.ReadAt(buf[:n], off); err != nil {
				t.Fatalf("read %s at %d: %v", dev, off, err)
			}
			if _, err := f.ReadAt(want[:n], off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf[:n], want[:n]) {
				t.Fatalf("%s at %d: the kernel reads other bytes than the backend holds", dev, off)
			}
			total += n
		}
	}
	t.Logf("compared %d bytes of %s through %s", total, filepath.Base(img), dev)
}

// alignedBuf returns n bytes aligned for O_DIRECT.
func alignedBuf(n int) []byte {
	b := make([]byte, n+4096)
	off := int(4096 - uintptr(unsafe.Pointer(&b[0]))%4096)
	return b[off%4096 : off%4096+n]
}

// copySparse copies src's allocated ranges to dst, keeping its size.
func copySparse(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	st, _ := in.Stat()
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	if err := out.Truncate(st.Size()); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for _, r := range dataExtents(t, in) {
		for off := r[0]; off < r[1]; {
			n := min(int64(len(buf)), r[1]-off)
			if _, err := in.ReadAt(buf[:n], off); err != nil {
				t.Fatal(err)
			}
			if _, err := out.WriteAt(buf[:n], off); err != nil {
				t.Fatal(err)
			}
			off += n
		}
	}
	if err := out.Sync(); err != nil {
		t.Fatal(err)
	}
}

// TestGuestReadOnly: a read-only attach is read-only in the kernel too, and
// reads serve the backend's bytes.
func TestGuestReadOnly(t *testing.T) {
	vmharness.Guest(t)
	ctx := context.Background()
	img := filepath.Join(t.TempDir(), "ro.raw")
	writePattern(t, img, 3, 8<<20)
	b, err := nbdattach.OpenFile(img, true)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	dev, err := kernelAttacher().Attach(ctx, "vol-ro", b, nbdattach.AttachOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(run(t, "blockdev", "--getro", dev.Path())); got != "1" {
		t.Errorf("blockdev --getro = %s, want 1", got)
	}
	if out, err := exec.Command("dd", "if=/dev/zero", "of="+dev.Path(), "bs=4k", "count=1", "oflag=direct").CombinedOutput(); err == nil {
		t.Errorf("dd wrote to a read-only device:\n%s", out)
	}
	compareThroughKernel(t, dev.Path(), img)
	if err := dev.Detach(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestGuestIOFlusher: once a device is attached, every thread of the
// serving process carries PR_SET_IO_FLUSHER (PF_MEMALLOC_NOIO and
// PF_LOCAL_THROTTLE in /proc/PID/task/TID/stat's flags field).
func TestGuestIOFlusher(t *testing.T) {
	vmharness.Guest(t)
	ctx := context.Background()
	img := filepath.Join(t.TempDir(), "flusher.raw")
	newRaw(t, img, 4<<20)
	b, err := nbdattach.OpenFile(img, false)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	dev, err := kernelAttacher().Attach(ctx, "vol-flusher", b, nbdattach.AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Detach(ctx)
	const pfMemallocNoIO, pfLocalThrottle = 0x00080000, 0x00100000
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	for _, task := range tasks {
		stat, err := os.ReadFile(filepath.Join("/proc/self/task", task.Name(), "stat"))
		if err != nil {
			t.Fatal(err)
		}
		// Fields after "(comm)": state ppid pgrp session tty_nr tpgid flags.
		rest := string(stat[bytes.LastIndexByte(stat, ')')+2:])
		flags, err := strconv.ParseUint(strings.Fields(rest)[6], 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		if flags&(pfMemallocNoIO|pfLocalThrottle) != pfMemallocNoIO|pfLocalThrottle {
			t.Errorf("thread %s: flags %#x lack PR_SET_IO_FLUSHER's bits", task.Name(), flags)
		}
	}
}

// stallingBackend holds one write past the kernel's I/O timeout.
type stallingBackend struct {
	*nbdattach.FileBackend
	stall chan struct{} // closed by the first write at stallOff
	once  sync.Once
	delay time.Duration
}

const stallOff = 1 << 20

func (b *stallingBackend) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if off == stallOff {
		first := false
		b.once.Do(func() { first = true; close(b.stall) })
		if first {
			time.Sleep(b.delay)
		}
	}
	return b.FileBackend.WriteAt(ctx, p, off, fua)
}

// TestGuestStalledRequest: a request that outlives the I/O timeout makes
// the kernel give up on the socket and shut it; the attacher hands it a
// fresh one while the process keeps running, the request is resent, and
// the write completes without an error.
func TestGuestStalledRequest(t *testing.T) {
	vmharness.Guest(t)
	ctx := context.Background()
	img := filepath.Join(t.TempDir(), "stall.raw")
	newRaw(t, img, 4<<20)
	fb, err := nbdattach.OpenFile(img, false)
	if err != nil {
		t.Fatal(err)
	}
	defer fb.Close()
	const timeout = 2 * time.Second
	b := &stallingBackend{FileBackend: fb, stall: make(chan struct{}), delay: 3 * timeout}
	var logs lockedBuffer
	a := kernel.NewAttacher(kernel.Options{IOTimeout: timeout, DeadConnTimeout: 60 * time.Second,
		Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	dev, err := a.Attach(ctx, "vol-stall", b, nbdattach.AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Detach(ctx)
	pattern := filepath.Join(t.TempDir(), "pattern")
	writePattern(t, pattern, 11, 64<<10)
	out, err := exec.Command("dd", "if="+pattern, "of="+dev.Path(), "bs=64k", "seek=16", "oflag=direct", "conv=fsync").CombinedOutput()
	if err != nil {
		t.Fatalf("dd through a stalled request: %v\n%s", err, out)
	}
	select {
	case <-b.stall:
	default:
		t.Fatal("the write never reached the stalling offset; the test proved nothing")
	}
	want, _ := os.ReadFile(pattern)
	got := make([]byte, len(want))
	if err := fb.ReadAt(ctx, got, stallOff); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Error("the resent write did not land")
	}
	// The path under test: the kernel dropped the socket and got a new one.
	if l := logs.String(); !strings.Contains(l, "handing the kernel a fresh one") {
		t.Errorf("no socket was replaced; attacher log:\n%s", l)
	}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
