package fuse_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/fuse"
	"github.com/qcow2-csi/qcow2-csi/tests/attachcases"
	"github.com/qcow2-csi/qcow2-csi/tests/peer"
)

const uringParam = "/sys/module/fuse/parameters/enable_uring"

// needUring turns FUSE over io_uring on, where the kernel has it (Linux
// 6.14+ built with CONFIG_FUSE_IO_URING). It is left on: the parameter only
// lets a FUSE connection ask for io_uring, so the connections that do not
// ask are not affected, and turning it off again would race with the e2e
// suite, whose node plugins ask (tests/e2e, run beside this package).
func needUring(t *testing.T) {
	t.Helper()
	peer.Root(t)
	b, err := os.ReadFile(uringParam)
	if err != nil {
		peer.Missing(t, "FUSE over io_uring (Linux 6.14+, CONFIG_FUSE_IO_URING)", err.Error())
	}
	if strings.TrimSpace(string(b)) == "Y" {
		return
	}
	if err := os.WriteFile(uringParam, []byte("Y"), 0); err != nil {
		t.Fatalf("turning FUSE over io_uring on: %v", err)
	}
}

// The shared table over io_uring, without a cache and with the writeback
// cache. A first device holds the shared server for the whole run, so that
// the test can tell the table ran over the ring and not over /dev/fuse.
func TestFuseAttachCasesUring(t *testing.T) {
	for _, m := range []fuse.CacheMode{fuse.CacheNone, fuse.CacheWriteback} {
		t.Run(string(m), func(t *testing.T) {
			needFuse(t)
			needUring(t)
			a := fuse.NewAttacher(fuse.Options{Dir: filepath.Join(t.TempDir(), "fuse"), Cache: m, Uring: true})
			ctx := context.Background()
			b := newFileBackend(t, 1<<20)
			d, err := a.Attach(ctx, "holder", b, nbdattach.AttachOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer func() {
				if err := d.Detach(ctx); err != nil {
					t.Error(err)
				}
			}()
			if !fuse.ServesOverUring(a) {
				t.Fatal("the server is not over io_uring")
			}
			before := fuse.UringServed(a)
			attachcases.Run(t, attachcases.Target{Attacher: a, Formats: []attachcases.Format{attachcases.Raw, attachcases.Qcow2}})
			if !fuse.ServesOverUring(a) {
				t.Fatal("the server is no longer over io_uring")
			}
			// The table's I/O went through the ring (thousands of
			// requests), not only the holder's attach.
			if after := fuse.UringServed(a); after-before < 1000 {
				t.Fatalf("%d requests served over io_uring during the table", after-before)
			}
		})
	}
}
