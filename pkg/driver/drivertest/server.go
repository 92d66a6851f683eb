package drivertest

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"k8s.io/klog/v2/ktesting"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
)

// Server is a driver serving on a unix socket in a test's temporary
// directory.
type Server struct {
	Driver   *driver.Driver
	Endpoint string // unix:///...
	Socket   string
	stop     context.CancelFunc
	done     chan error
}

// Start builds a driver from opts and seams (Pool defaults to a temporary
// directory, NodeID to "test-node", KubeletDir to the system's temporary
// directory), starts it and serves it until the test
// ends or Stop is called.
func Start(t testing.TB, opts driver.Options, seams driver.Seams) *Server {
	t.Helper()
	if opts.Pool == "" {
		opts.Pool = filepath.Join(t.TempDir(), "pool")
	}
	if opts.NodeID == "" {
		opts.NodeID = "test-node"
	}
	if opts.KubeletDir == "" {
		// Tests stage and publish in their temporary directories.
		opts.KubeletDir = os.TempDir()
	}
	d, err := driver.New(opts, seams)
	if err != nil {
		t.Fatalf("driver.New: %v", err)
	}
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithCancel(ctx)
	if err := d.Start(ctx); err != nil {
		cancel()
		t.Fatalf("driver.Start: %v", err)
	}
	sock := filepath.Join(t.TempDir(), "csi.sock")
	lis, err := driver.Listen(sock)
	if err != nil {
		cancel()
		t.Fatalf("listen: %v", err)
	}
	s := &Server{Driver: d, Endpoint: "unix://" + sock, Socket: sock, stop: cancel, done: make(chan error, 1)}
	go func() { s.done <- d.Serve(ctx, lis) }()
	t.Cleanup(func() { s.Stop(t) })
	return s
}

// Stop stops serving and closes the driver's open images, leaving devices
// attached as a restarting plugin would. It is idempotent.
func (s *Server) Stop(t testing.TB) {
	t.Helper()
	if s.stop == nil {
		return
	}
	s.stop()
	s.stop = nil
	if err := <-s.done; err != nil {
		t.Errorf("serve: %v", err)
	}
	if err := s.Driver.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
}
