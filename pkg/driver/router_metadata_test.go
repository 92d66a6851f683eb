package driver_test

import (
	"context"
	"errors"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/proto"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
)

// routeToAgent serves agent as node-a's agent (mutual TLS) and returns a
// SnapshotMetadata client of a controller that routes to it.
func routeToAgent(t *testing.T, agent csi.SnapshotMetadataServer) csi.SnapshotMetadataClient {
	t.Helper()
	certs := drivertest.MakeCerts(t, t.TempDir())
	cfg, err := driver.AgentServerTLS(certs.Agent, driver.DefaultAgentClientName)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(cfg)))
	csi.RegisterSnapshotMetadataServer(srv, agent)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	ctl := drivertest.StartController(t, driver.StaticAgents{"node-a": lis.Addr().String()}, certs, driver.RouterOptions{})
	return csi.NewSnapshotMetadataClient(dialConn(t, ctl.Endpoint))
}

const nodeASnapshot = "vol-0123456789abcdef0123456789abcdef@1@node-a"

// blockingAgent sends one message of a stream, then waits for its call's
// context to end and reports that it did.
type blockingAgent struct {
	csi.UnimplementedSnapshotMetadataServer
	ended chan error
}

func (a *blockingAgent) GetMetadataAllocated(_ *csi.GetMetadataAllocatedRequest, out csi.SnapshotMetadata_GetMetadataAllocatedServer) error {
	if err := out.Send(&csi.GetMetadataAllocatedResponse{VolumeCapacityBytes: 1}); err != nil {
		return err
	}
	<-out.Context().Done()
	a.ended <- out.Context().Err()
	return out.Context().Err()
}

// TestRouterStreamCancel: a SnapshotMetadata client that goes away
// mid-stream cancels the agent's call: the controller relays on the
// client's context. (An agent that never ends its stream would otherwise
// hold the relay forever.)
func TestRouterStreamCancel(t *testing.T) {
	agent := &blockingAgent{ended: make(chan error, 1)}
	md := routeToAgent(t, agent)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	st, err := md.GetMetadataAllocated(ctx, &csi.GetMetadataAllocatedRequest{SnapshotId: nodeASnapshot})
	if err != nil {
		t.Fatal(err)
	}
	if m, err := st.Recv(); err != nil || m.VolumeCapacityBytes != 1 {
		t.Fatalf("first message: %v %v", m, err)
	}
	cancel()
	select {
	case err := <-agent.ended:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("agent's call ended with %v, want canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the agent's call was not cancelled when the client went away")
	}
}

// floodAgent streams messages of 4096 tuples without end, counting those
// its Send accepted.
type floodAgent struct {
	csi.UnimplementedSnapshotMetadataServer
	sent atomic.Int64
}

func floodMessage(i int64) *csi.GetMetadataAllocatedResponse {
	m := &csi.GetMetadataAllocatedResponse{BlockMetadataType: csi.BlockMetadataType_FIXED_LENGTH, VolumeCapacityBytes: 1 << 50}
	for j := range int64(4096) {
		m.BlockMetadata = append(m.BlockMetadata, &csi.BlockMetadata{ByteOffset: (i*4096 + j) << 16, SizeBytes: 1 << 16})
	}
	return m
}

func (a *floodAgent) GetMetadataAllocated(_ *csi.GetMetadataAllocatedRequest, out csi.SnapshotMetadata_GetMetadataAllocatedServer) error {
	for i := int64(0); ; i++ {
		if err := out.Send(floodMessage(i)); err != nil {
			return err
		}
		a.sent.Add(1)
	}
}

// TestRouterStreamBackpressure: a client that stops reading stops the
// agent. The controller relays one message at a time, so what the agent
// gets ahead is bounded by the two connections' gRPC flow-control windows
// (at most 16 MiB each, grown by BDP estimation), not by the listing's
// size; when the client reads again, the agent goes on, in order.
func TestRouterStreamBackpressure(t *testing.T) {
	agent := &floodAgent{}
	md := routeToAgent(t, agent)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	st, err := md.GetMetadataAllocated(ctx, &csi.GetMetadataAllocatedRequest{SnapshotId: nodeASnapshot})
	if err != nil {
		t.Fatal(err)
	}
	recv := func(i int64) {
		t.Helper()
		m, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if got := m.BlockMetadata[0].ByteOffset; got != i*4096<<16 {
			t.Fatalf("message %d starts at %d, want %d", i, got, i*4096<<16)
		}
	}
	recv(0)
	// The client reads nothing more: the agent must come to a stop.
	var stalled int64
	for deadline := time.Now().Add(30 * time.Second); ; {
		before := agent.sent.Load()
		time.Sleep(time.Second)
		if stalled = agent.sent.Load(); stalled == before {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent is still sending (%d messages) 30 s after the client stopped reading", stalled)
		}
	}
	msg := int64(proto.Size(floodMessage(0)))
	t.Logf("agent stopped %d messages (%.1f MiB) ahead of a client that stopped reading", stalled, float64(stalled*msg)/(1<<20))
	if ahead := stalled * msg; ahead > 48<<20 {
		t.Errorf("agent got %d MiB ahead of the client, want it bounded by the flow-control windows (under 48 MiB)", ahead>>20)
	}
	for i := int64(1); i <= stalled+64; i++ {
		recv(i)
	}
	if now := agent.sent.Load(); now <= stalled {
		t.Errorf("the agent did not go on when the client read again (%d messages sent, %d before)", now, stalled)
	}
}
