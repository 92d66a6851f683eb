package fuse

import (
	"bytes"
	"context"
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

// When the kernel agreed to io_uring at INIT but the ring never becomes
// ready (an entry refused before the kernel looked at it, or a queue left
// without one), the kernel holds every request of the connection. The
// attach must not hang with it: the connection is aborted, nothing stays
// mounted, and the device is served over /dev/fuse instead.
func TestUringFallback(t *testing.T) {
	peer.Root(t)
	if b, err := os.ReadFile(uringEnabledParam); err != nil {
		peer.Missing(t, "FUSE over io_uring (Linux 6.14+, CONFIG_FUSE_IO_URING)", err.Error())
	} else if strings.TrimSpace(string(b)) != "Y" {
		// Left on, as the other tests of this package leave it
		// (uring_cases_linux_test.go says why).
		if err := os.WriteFile(uringEnabledParam, []byte("Y"), 0); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		name  string
		setup func()
	}{
		{"register-refused", func() { uringRegisterCmd = 99 }},
		{"queue-without-entry", func() { uringSkipQueue = 0; uringReadyTimeout = 2 * time.Second }},
	} {
		t.Run(c.name, func(t *testing.T) {
			c.setup()
			t.Cleanup(func() {
				uringRegisterCmd, uringSkipQueue, uringReadyTimeout = uringCmdRegister, -1, 10*time.Second
			})
			dir := filepath.Join(t.TempDir(), "fuse")
			a := NewAttacher(Options{Dir: dir, Uring: true})
			img := filepath.Join(t.TempDir(), "disk.raw")
			if err := os.WriteFile(img, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(img, 4<<20); err != nil {
				t.Fatal(err)
			}
			b, err := nbdattach.OpenFile(img, false)
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
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
