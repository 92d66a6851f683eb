//go:build linux

package fuse_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/fuse"
	"github.com/qcow2-csi/qcow2-csi/tests/attachcases"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// The shared table with the kernel caching the FUSE file, both ways: data
// written, discarded, zeroed, grown and read back through the device must
// be what the image holds after the detach (no stale page survives a
// punch-hole or zero-range, the grown size reaches the loop device).
func TestFuseAttachCasesCached(t *testing.T) {
	for _, m := range []fuse.CacheMode{fuse.CacheWritethrough, fuse.CacheWriteback} {
		t.Run(string(m), func(t *testing.T) {
			a := fuse.NewAttacher(fuse.Options{Dir: filepath.Join(t.TempDir(), "fuse"), Cache: m})
			attachcases.Run(t, attachcases.Target{Attacher: a, Formats: []attachcases.Format{attachcases.Raw, attachcases.Qcow2}})
		})
	}
}

// The loop device is buffered exactly when the FUSE file is cached, and a
// mode nobody knows is refused at the attach.
func TestFuseCacheModes(t *testing.T) {
	needFuse(t)
	for _, c := range []struct {
		mode     fuse.CacheMode
		directIO bool
	}{{"", true}, {fuse.CacheNone, true}, {fuse.CacheWritethrough, false}, {fuse.CacheWriteback, false}} {
		t.Run(string(c.mode), func(t *testing.T) {
			a := fuse.NewAttacher(fuse.Options{Dir: filepath.Join(t.TempDir(), "fuse"), Cache: c.mode})
			d, err := a.Attach(context.Background(), "modes", newFileBackend(t, 1<<20), nbdattach.AttachOptions{})
			if err != nil {
				t.Fatal(err)
			}
			detachOnCleanup(t, d)
			if got := d.(interface{ DirectIO() bool }).DirectIO(); got != c.directIO {
				t.Fatalf("cache %q: loop direct I/O %v, want %v", c.mode, got, c.directIO)
			}
		})
	}
	a := fuse.NewAttacher(fuse.Options{Dir: filepath.Join(t.TempDir(), "fuse"), Cache: "always"})
	if _, err := a.Attach(context.Background(), "modes", newFileBackend(t, 1<<20), nbdattach.AttachOptions{}); err == nil || !strings.Contains(err.Error(), `cache mode "always"`) {
		t.Fatalf("Attach with cache mode always: %v, want a refusal naming it", err)
	}
}

// What crashHelperWrites writes: flushed at 1 MiB, not flushed at 8 MiB.
const (
	flushedOff, flushedLen = 1 << 20, 1 << 20
	dirtyOff, dirtyLen     = 8 << 20, 4 << 20
)

func crashPattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i%251) ^ seed | 1
	}
	return b
}

// crashHelperWrites runs in the helper process before it says READY. On a
// bare device: a flushed write (fsync of the device) and one not flushed.
// Under a mounted ext4: a file written back to the device (sync_file_range
// waits for its bios to complete) but never flushed, so that with a
// writeback cache the FUSE file holds dirty pages when the process dies.
func crashHelperWrites(t *testing.T, dev, mnt string) {
	if mnt != "" {
		f, err := os.Create(filepath.Join(mnt, "dirty"))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.Write(crashPattern(dirtyLen, 0x33)); err != nil {
			t.Fatal(err)
		}
		if err := unix.SyncFileRange(int(f.Fd()), 0, 0, unix.SYNC_FILE_RANGE_WAIT_BEFORE|unix.SYNC_FILE_RANGE_WRITE|unix.SYNC_FILE_RANGE_WAIT_AFTER); err != nil {
			t.Fatal(err)
		}
		return // the file stays open: the process dies holding it
	}
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := alignedBlock(t, dirtyLen)
	copy(buf, crashPattern(flushedLen, 0x11))
	if _, err := f.WriteAt(buf[:flushedLen], flushedOff); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	copy(buf, crashPattern(dirtyLen, 0x22))
	if _, err := f.WriteAt(buf, dirtyOff); err != nil {
		t.Fatal(err)
	}
}

// startCrashHelper starts the helper plugin on img and returns it and its
// device once it has attached and written.
func startCrashHelper(t *testing.T, dir, img, id, mnt string, cache fuse.CacheMode, uring bool) (*exec.Cmd, string) {
	t.Helper()
	transport := "dev"
	if uring {
		transport = "uring"
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestFuseCrashHelper$", "-test.v")
	cmd.Env = append(os.Environ(), helperEnv+"="+strings.Join([]string{dir, img, id, mnt, string(cache), transport}, "|"))
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if p, ok := strings.CutPrefix(sc.Text(), "READY "); ok {
			return cmd, p
		}
	}
	cmd.Process.Kill()
	cmd.Wait()
	t.Fatal("helper did not attach")
	return nil, ""
}

func imageHolds(t *testing.T, img string, off int64, want []byte) bool {
	t.Helper()
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, len(want))
	if _, err := f.ReadAt(got, off); err != nil {
		t.Fatal(err)
	}
	return bytes.Equal(got, want)
}

// withTimeout runs do aside and fails the test if it has not returned
// within d: what must not hang on a dead FUSE connection.
func withTimeout(t *testing.T, what string, d time.Duration, do func() error) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- do() }()
	select {
	case err := <-done:
		return err
	case <-time.After(d):
		t.Fatalf("%s still blocked after %v", what, d)
		return nil
	}
}

// A plugin killed with -9 while the kernel caches its FUSE files: what was
// flushed through the device is in the image file (the loop driver's flush
// is an fsync of the FUSE file, which writes back and then sends FSYNC,
// answered only after the image is flushed); with a writeback cache what
// was not flushed may be lost, as on a disk with a volatile cache, but the
// dirty pages of the dead connection hang nothing: the loop device goes,
// CleanStale detaches the mount, a filesystem on it unmounts, and the
// volume attaches again with the flushed data.
func TestFuseCacheKill(t *testing.T) {
	peer.Require(t, "mkfs.ext4")
	type kcase struct {
		mode    fuse.CacheMode
		mounted bool
		uring   bool
	}
	var cases []kcase
	for _, m := range []fuse.CacheMode{fuse.CacheWritethrough, fuse.CacheWriteback} {
		for _, mounted := range []bool{false, true} {
			cases = append(cases, kcase{m, mounted, false})
		}
	}
	// The same over io_uring, where a killed server leaves ring entries
	// behind as well as requests.
	cases = append(cases, kcase{fuse.CacheWriteback, false, true}, kcase{fuse.CacheWriteback, true, true})
	for _, c := range cases {
		m, mounted := c.mode, c.mounted
		t.Run(fmt.Sprintf("%s/mounted=%v/uring=%v", m, mounted, c.uring), func(t *testing.T) {
			needFuse(t)
			if c.uring {
				needUring(t)
			}
			dir := filepath.Join(t.TempDir(), "fuse")
			img := sparseRaw(t, 64<<20)
			mnt := mountPoint(t, mounted)
			t.Cleanup(func() {
				if mnt != "" {
					unix.Unmount(mnt, unix.MNT_DETACH)
				}
				for _, mp := range fuseMountsUnder(t, dir) {
					unix.Unmount(mp, unix.MNT_DETACH)
				}
			})
			cmd, devPath := startCrashHelper(t, dir, img, "killvol", mnt, m, c.uring)
			if !mounted {
				if !imageHolds(t, img, flushedOff, crashPattern(flushedLen, 0x11)) {
					t.Fatal("a write flushed through the device is not in the image file")
				}
				// Writethrough: every completed write is in the image.
				// Writeback: the unflushed one waits in the page cache
				// (far below the FUSE device's dirty limits), which is
				// what this test kills the process over.
				if got := imageHolds(t, img, dirtyOff, crashPattern(dirtyLen, 0x22)); got != (m == fuse.CacheWritethrough) {
					t.Fatalf("cache %s: an unflushed write is in the image file: %v, want %v", m, got, m == fuse.CacheWritethrough)
				}
			}
			cmd.Process.Kill()
			cmd.Wait()
			if !mounted && !imageHolds(t, img, flushedOff, crashPattern(flushedLen, 0x11)) {
				t.Fatal("a write flushed through the device is not in the image file after the kill")
			}
			a := fuse.NewAttacher(fuse.Options{Dir: dir, Cache: m, Uring: c.uring})
			ctx := context.Background()
			if mounted {
				// The filesystem fails (EIO) instead of hanging, and
				// unmounts with its dirty data.
				if err := withTimeout(t, "unmount over a dead cached device", 30*time.Second, func() error { return unix.Unmount(mnt, 0) }); err != nil {
					t.Fatalf("unmount: %v", err)
				}
				mnt = ""
			}
			waitUnbound(t, devPath)
			if err := withTimeout(t, "CleanStale", 30*time.Second, func() error { _, err := a.CleanStale(ctx); return err }); err != nil {
				t.Fatal(err)
			}
			if ms := fuseMountsUnder(t, dir); len(ms) != 0 {
				t.Fatalf("FUSE mounts left under %s: %q", dir, ms)
			}
			b, err := nbdattach.OpenFile(img, false)
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			d, err := a.Attach(ctx, "killvol", b, nbdattach.AttachOptions{})
			if err != nil {
				t.Fatalf("attach again: %v", err)
			}
			defer func() {
				if err := d.Detach(ctx); err != nil {
					t.Error(err)
				}
			}()
			if mounted {
				return // the filesystem's state is ext4's business
			}
			f, err := os.OpenFile(d.Path(), os.O_RDONLY|unix.O_DIRECT, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			got := alignedBlock(t, flushedLen)
			if _, err := f.ReadAt(got, flushedOff); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, crashPattern(flushedLen, 0x11)) {
				t.Fatal("the flushed write does not read back after attaching again")
			}
		})
	}
}
