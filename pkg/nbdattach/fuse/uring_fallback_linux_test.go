package fuse

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

// needUringHere is needUring of the package's external tests
// (uring_cases_linux_test.go, which says why the parameter is left on).
func needUringHere(t *testing.T) {
	t.Helper()
	peer.Root(t)
	if b, err := os.ReadFile(uringEnabledParam); err != nil {
		peer.Missing(t, "FUSE over io_uring (Linux 6.14+, CONFIG_FUSE_IO_URING)", err.Error())
	} else if strings.TrimSpace(string(b)) != "Y" {
		if err := os.WriteFile(uringEnabledParam, []byte("Y"), 0); err != nil {
			t.Fatal(err)
		}
	}
}

// When the kernel agreed to io_uring at INIT but the ring never becomes
// ready (an entry refused before the kernel looked at it, or a queue left
// without one), the kernel holds every request of the connection. The
// attach must not hang with it: the connection is aborted, nothing stays
// mounted, and the device is served over /dev/fuse instead.
func TestUringFallback(t *testing.T) {
	needUringHere(t)
	for _, c := range []struct {
		name  string
		setup func()
	}{
		// The refusal must end the wait at once: with a timeout this
		// long, a refusal that went unnoticed fails the test by its own
		// deadline.
		{"register-refused", func() { uringRegisterCmd = 99; uringReadyTimeout = time.Hour }},
		{"queue-without-entry", func() { uringSkipQueue = 0; uringReadyTimeout = 2 * time.Second }},
	} {
		t.Run(c.name, func(t *testing.T) {
			c.setup()
			t.Cleanup(func() {
				uringRegisterCmd, uringSkipQueue, uringReadyTimeout = uringCmdRegister, -1, 10*time.Second
			})
			dir := filepath.Join(t.TempDir(), "fuse")
			a := NewAttacher(Options{Dir: dir, Uring: true})
			b := sparseBackend(t, 4<<20)
			ctx := context.Background()
			d, err := a.Attach(ctx, "fallback", b, nbdattach.AttachOptions{})
			if err != nil {
				t.Fatalf("attach: %v", err)
			}
			a.srvMu.Lock()
			uring := a.srv.uring != nil
			a.srvMu.Unlock()
			if uring {
				t.Fatal("served over io_uring with the ring never ready")
			}
			f, err := os.OpenFile(d.Path(), os.O_RDWR|unix.O_DIRECT, 0)
			if err != nil {
				t.Fatal(err)
			}
			want := bytes.Repeat([]byte{0xa5}, 4096)
			block, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Munmap(block)
			copy(block, want)
			if _, err := f.WriteAt(block, 8192); err != nil {
				t.Fatal(err)
			}
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
			f.Close()
			if err := d.Detach(ctx); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 4096)
			if err := b.ReadAt(ctx, got, 8192); err != nil || !bytes.Equal(got, want) {
				t.Fatalf("the image does not hold the write made over /dev/fuse (%v)", err)
			}
			ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
			if err != nil {
				t.Fatal(err)
			}
			if len(ms) != 0 {
				t.Fatalf("mounts left under %s: %d (the aborted one, or the fallback's)", dir, len(ms))
			}
		})
	}
}

// An entry whose command fails while the connection serves (here a commit
// on a queue that does not exist) aborts the connection: I/O to the
// device fails instead of hanging, the next attach gets a new server, and
// the dead device still detaches.
func TestUringEntryFailureAborts(t *testing.T) {
	needUringHere(t)
	dir := filepath.Join(t.TempDir(), "fuse")
	a := NewAttacher(Options{Dir: dir, Uring: true})
	ctx := context.Background()
	attach := func(id string) (nbdattach.Device, *nbdattach.FileBackend) {
		t.Helper()
		b := sparseBackend(t, 4<<20)
		d, err := a.Attach(ctx, id, b, nbdattach.AttachOptions{})
		if err != nil {
			t.Fatalf("attach %s: %v", id, err)
		}
		return d, b
	}
	dead, _ := attach("dead")
	a.srvMu.Lock()
	first := a.srv
	a.srvMu.Unlock()
	if first.uring == nil {
		t.Fatal("not served over io_uring")
	}
	uringCommitQID.Store(1 << 15)
	t.Cleanup(func() { uringCommitQID.Store(-1) })
	block, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(block)
	f, err := os.OpenFile(dead.Path(), os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	// A hang here fails the test at its deadline.
	if _, err := f.WriteAt(block, 0); err == nil {
		if err := f.Sync(); err == nil {
			t.Fatal("I/O to a device whose io_uring entry failed succeeded")
		}
	}
	f.Close()
	if !first.uring.failed.Load() {
		t.Fatal("the server is not marked failed")
	}
	uringCommitQID.Store(-1)

	live, b := attach("live")
	a.srvMu.Lock()
	second := a.srv
	a.srvMu.Unlock()
	if second == first || second.uring == nil {
		t.Fatalf("the attach after the failure did not get a new io_uring server (same: %v)", second == first)
	}
	want := bytes.Repeat([]byte{0x5c}, 4096)
	copy(block, want)
	g, err := os.OpenFile(live.Path(), os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.WriteAt(block, 4096); err != nil {
		t.Fatal(err)
	}
	if err := g.Sync(); err != nil {
		t.Fatal(err)
	}
	g.Close()
	got := make([]byte, 4096)
	if err := b.ReadAt(ctx, got, 4096); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("the new server's write is not in the image (%v)", err)
	}
	// Its detach says the last flush failed (EIO: what was not flushed
	// is not in the image), and detaches it all the same.
	if err := dead.Detach(ctx); err != nil && !errors.Is(err, unix.EIO) {
		t.Errorf("detach of the device of the aborted connection: %v", err)
	}
	if err := dead.Detach(ctx); err != nil {
		t.Errorf("second detach of the device of the aborted connection: %v", err)
	}
	if err := live.Detach(ctx); err != nil {
		t.Fatal(err)
	}
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 0 {
		t.Fatalf("mounts left under %s: %d", dir, len(ms))
	}
}
