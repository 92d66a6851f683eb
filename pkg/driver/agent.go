package driver

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
)

// The node agent is how the controller (router.go) reaches a node's pool:
// a second gRPC listener of the node plugin serving Identity, Controller
// and SnapshotMetadata of the node's own Driver, so that controller calls
// take the same locks and go through the same open images as the node's
// Node service (a snapshot of a staged volume is taken through its open
// image). Only over mutual TLS (tls.go).

// agentKeepalive lets the controller's keepalive pings through (grpc's
// default policy closes a connection pinging more often than every 5 min).
var agentKeepalive = keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}

// AgentServer returns the agent's gRPC server, TLS with cfg (AgentServerTLS).
func (d *Driver) AgentServer(cfg *tls.Config) (*grpc.Server, error) {
	if cfg == nil || cfg.ClientAuth != tls.RequireAndVerifyClientCert {
		return nil, errors.New("the node agent serves only mutual TLS (AgentServerTLS)")
	}
	s := grpc.NewServer(append(d.serverOptions(), grpc.Creds(credentials.NewTLS(cfg)),
		grpc.KeepaliveEnforcementPolicy(agentKeepalive))...)
	csi.RegisterIdentityServer(s, d)
	csi.RegisterControllerServer(s, d)
	if d.snapshotMetadata() {
		csi.RegisterSnapshotMetadataServer(s, d.SnapshotMetadataServer())
		// The controller's side of group snapshots (group_agent.go).
		s.RegisterService(&groupAgentDesc, d)
	}
	return s, nil
}

// ServeAgent serves the node agent on lis until ctx ends.
func (d *Driver) ServeAgent(ctx context.Context, lis net.Listener, cfg *tls.Config) error {
	s, err := d.AgentServer(cfg)
	if err != nil {
		return err
	}
	return serveGRPC(ctx, s, lis)
}
