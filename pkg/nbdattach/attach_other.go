//go:build !linux

package nbdattach

import (
	"context"
	"fmt"
	"runtime"
)

// The kernel NBD driver and its netlink interface are Linux only.
func (a *KernelAttacher) unavailable() error {
	return fmt.Errorf("%w: nbd: kernel NBD attach needs Linux (this is %s); use the fuse attach backend", ErrUnavailable, runtime.GOOS)
}

// Available implements Attacher.
func (a *KernelAttacher) Available() error { return a.unavailable() }

// Attach implements Attacher.
func (a *KernelAttacher) Attach(ctx context.Context, id string, b Backend, opts AttachOptions) (Device, error) {
	return nil, a.unavailable()
}

// Reattach implements Attacher.
func (a *KernelAttacher) Reattach(ctx context.Context, id string, b Backend, opts AttachOptions) (Device, error) {
	return nil, a.unavailable()
}

// List implements Attacher.
func (a *KernelAttacher) List(ctx context.Context) ([]DeviceInfo, error) {
	return nil, a.unavailable()
}

// kernelDevice has no instances off Linux.
type kernelDevice struct{}
