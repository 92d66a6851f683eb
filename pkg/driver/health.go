package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// livenessTimeout bounds liveness's call to the CSI server; it stays under
// the chart's probe timeout (3 s) so that a slow answer is a failed check
// with a reason rather than a kubelet timeout without one.
const livenessTimeout = 2 * time.Second

// serveState is where Serve listens, or that it has returned.
type serveState struct {
	addr    net.Addr
	stopped bool
}

// liveness reports nil when this process can serve: its CSI server accepts
// a connection on its socket and answers an Identity call, which takes a
// server goroutine, the interceptor and a handler, and nothing of the
// pool. That is what a restart can fix (a wedged server, a socket removed
// from under it); a full or broken pool is not, so it is readiness's
// business. Before Serve starts (Start re-attaching devices) the process
// is alive.
func (d *Driver) liveness(ctx context.Context) error {
	st := d.serving.Load()
	switch {
	case st == nil:
		return nil
	case st.stopped:
		return errors.New("the CSI server has stopped")
	}
	ctx, cancel := context.WithTimeout(ctx, livenessTimeout)
	defer cancel()
	conn, err := grpc.NewClient("passthrough:///csi", grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var nd net.Dialer
			return nd.DialContext(ctx, st.addr.Network(), st.addr.String())
		}))
	if err != nil {
		return err
	}
	defer conn.Close()
	if _, err := csi.NewIdentityClient(conn).GetPluginInfo(ctx, &csi.GetPluginInfoRequest{}); err != nil {
		return fmt.Errorf("the CSI server does not answer on %s %s: %w", st.addr.Network(), st.addr, err)
	}
	return nil
}
