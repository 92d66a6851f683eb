//go:build linux

package kernel

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/mdlayher/genetlink"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// TestBindContextInterruptsNetlink blocks a real generic netlink socket in
// a receive that nothing will answer and checks that ending the context,
// or reaching its deadline, wakes it.
func TestBindContextInterruptsNetlink(t *testing.T) {
	for _, tc := range []struct {
		name string
		ctx  func() (context.Context, context.CancelFunc)
		// cancelAfter > 0 cancels the context then; 0 waits for its deadline.
		cancelAfter time.Duration
		want        error
	}{
		{"cancel", func() (context.Context, context.CancelFunc) { return context.WithCancel(context.Background()) }, 200 * time.Millisecond, os.ErrDeadlineExceeded},
		{"deadline", func() (context.Context, context.CancelFunc) {
			return context.WithTimeout(context.Background(), 200*time.Millisecond)
		}, 0, os.ErrDeadlineExceeded},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := genetlink.Dial(nil)
			if err != nil {
				t.Fatalf("generic netlink: %v", err)
			}
			defer c.Close()
			ctx, cancel := tc.ctx()
			defer cancel()
			release, err := bindContext(ctx, c)
			if err != nil {
				t.Fatal(err)
			}
			defer release()

			done := make(chan error, 1)
			go func() {
				_, _, err := c.Receive()
				done <- err
			}()
			select {
			case err := <-done:
				t.Fatalf("Receive returned before the context ended: %v", err)
			case <-time.After(100 * time.Millisecond):
			}
			if tc.cancelAfter > 0 {
				time.Sleep(tc.cancelAfter - 100*time.Millisecond)
				cancel()
			}
			select {
			case err := <-done:
				if !errors.Is(err, tc.want) {
					t.Fatalf("Receive = %v, want an error wrapping %v", err, tc.want)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("Receive still blocked 10s after the context ended")
			}
		})
	}
}

// TestAttachHonoursContext checks that an ended context stops Attach and
// List before they configure anything, with the context's error rather than
// a netlink one (this host has no nbd module: without the check Attach
// would fail with ErrUnavailable instead).
func TestAttachHonoursContext(t *testing.T) {
	root := writeTree(t, map[string]string{"block/loop0/size": "0\n"})
	path := filepath.Join(t.TempDir(), "disk")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	b, err := nbdattach.OpenFile(path, false)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	a := NewAttacher(Options{SysfsRoot: root})

	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	expired, cancel2 := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel2()
	for _, tc := range []struct {
		name string
		ctx  context.Context
		want error
	}{
		{"canceled", canceled, context.Canceled},
		{"expired", expired, context.DeadlineExceeded},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, err := a.Attach(tc.ctx, "pvc-ctx", b, nbdattach.AttachOptions{Connections: 2})
			if !errors.Is(err, tc.want) || errors.Is(err, nbdattach.ErrUnavailable) {
				t.Fatalf("Attach = %v, %v; want an error wrapping %v", d, err, tc.want)
			}
			if n := len(a.served); n != 0 {
				t.Errorf("%d devices registered after a failed Attach", n)
			}
			if _, err := a.List(tc.ctx); !errors.Is(err, tc.want) {
				t.Errorf("List = %v, want an error wrapping %v", err, tc.want)
			}
		})
	}
}
