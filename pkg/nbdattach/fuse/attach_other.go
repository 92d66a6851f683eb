//go:build !linux

package fuse

import (
	"context"
	"fmt"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach"
)

// Attacher is the "fuse" attach backend; it exists only on Linux.
type Attacher struct{}

// NewAttacher returns a backend that reports itself unavailable.
func NewAttacher(opts Options) *Attacher { return &Attacher{} }

var errFuseOS = fmt.Errorf("%w: the fuse backend needs Linux (FUSE and loop devices)", nbdattach.ErrUnavailable)

func (a *Attacher) Name() string     { return "fuse" }
func (a *Attacher) CachesIO() string { return "" }
func (a *Attacher) Available() error { return errFuseOS }
func (a *Attacher) IOFlusher() error { return errFuseOS }
func (a *Attacher) Attach(ctx context.Context, id string, b nbdattach.Backend, opts nbdattach.AttachOptions) (nbdattach.Device, error) {
	return nil, errFuseOS
}
func (a *Attacher) Reattach(ctx context.Context, id string, b nbdattach.Backend, opts nbdattach.AttachOptions) (nbdattach.Device, error) {
	return nil, errFuseOS
}
func (a *Attacher) List(ctx context.Context) ([]nbdattach.DeviceInfo, error) {
	return nil, errFuseOS
}
func (a *Attacher) CleanStale(ctx context.Context) ([]nbdattach.DeviceInfo, error) {
	return nil, errFuseOS
}
