//go:build !linux

package kernel

import (
	"context"
	"fmt"
	"runtime"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// The kernel NBD driver and its netlink interface are Linux only.
func (a *Attacher) unavailable() error {
	return fmt.Errorf("%w: nbd: kernel NBD attach needs Linux (this is %s); use the fuse attach backend", nbdattach.ErrUnavailable, runtime.GOOS)
}

// Available implements Attacher.
func (a *Attacher) Available() error { return a.unavailable() }

// Attach implements Attacher.
func (a *Attacher) Attach(ctx context.Context, id string, b nbdattach.Backend, opts nbdattach.AttachOptions) (nbdattach.Device, error) {
	return nil, a.unavailable()
}

// Reattach implements Attacher.
func (a *Attacher) Reattach(ctx context.Context, id string, b nbdattach.Backend, opts nbdattach.AttachOptions) (nbdattach.Device, error) {
	return nil, a.unavailable()
}

// List implements Attacher.
func (a *Attacher) List(ctx context.Context) ([]nbdattach.DeviceInfo, error) {
	return nil, a.unavailable()
}

// Disconnect implements nbdattach.Disconnecter.
func (a *Attacher) Disconnect(ctx context.Context, id string) error {
	return a.unavailable()
}

// prepareProcess has nothing to prepare off Linux.
func prepareProcess() {}

// kernelDevice has no instances off Linux.
type kernelDevice struct{}
