//go:build !linux

package nbdattach

import (
	"context"
	"fmt"
)

// FuseAttacher is the "fuse" attach backend; it exists only on Linux.
type FuseAttacher struct{}

// NewFuseAttacher returns a backend that reports itself unavailable.
func NewFuseAttacher(opts FuseOptions) *FuseAttacher { return &FuseAttacher{} }

var errFuseOS = fmt.Errorf("%w: the fuse backend needs Linux (FUSE and loop devices)", ErrUnavailable)

func (a *FuseAttacher) Name() string     { return "fuse" }
func (a *FuseAttacher) Available() error { return errFuseOS }
func (a *FuseAttacher) IOFlusher() error { return errFuseOS }
func (a *FuseAttacher) Attach(ctx context.Context, id string, b Backend, opts AttachOptions) (Device, error) {
	return nil, errFuseOS
}
func (a *FuseAttacher) Reattach(ctx context.Context, id string, b Backend, opts AttachOptions) (Device, error) {
	return nil, errFuseOS
}
func (a *FuseAttacher) List(ctx context.Context) ([]DeviceInfo, error)       { return nil, errFuseOS }
func (a *FuseAttacher) CleanStale(ctx context.Context) ([]DeviceInfo, error) { return nil, errFuseOS }
