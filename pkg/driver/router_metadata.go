package driver

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
)

// routerMetadata is the Router's SnapshotMetadata service: each stream goes
// to the agent of the target snapshot's node and its messages come back one
// by one as they arrive (a 1 TiB volume's extents are never held whole).
// The upstream stream runs on the client's context: when the client goes
// away, the agent's call is cancelled with it.
type routerMetadata struct {
	csi.UnimplementedSnapshotMetadataServer
	r *Router
}

// relay copies an agent's stream to the client until the agent ends it.
func relay[M any](recv func() (M, error), send func(M) error) error {
	for {
		m, err := recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := send(m); err != nil {
			return err
		}
	}
}

func (s routerMetadata) GetMetadataAllocated(req *csi.GetMetadataAllocatedRequest, out csi.SnapshotMetadata_GetMetadataAllocatedServer) error {
	if req.GetSnapshotId() == "" {
		return toStatus(fmt.Errorf("%w: snapshot_id is required", ErrInvalid))
	}
	ctx := out.Context()
	node, err := s.r.nodeOfSnapshot(ctx, req.GetSnapshotId())
	if err != nil {
		return toStatus(err)
	}
	return toStatus(s.r.callRetry(ctx, node, "GetMetadataAllocated", false, func(ctx context.Context, cc *grpc.ClientConn) error {
		in, err := csi.NewSnapshotMetadataClient(cc).GetMetadataAllocated(ctx, req)
		if err != nil {
			return err
		}
		return relay(in.Recv, out.Send)
	}))
}

func (s routerMetadata) GetMetadataDelta(req *csi.GetMetadataDeltaRequest, out csi.SnapshotMetadata_GetMetadataDeltaServer) error {
	if req.GetBaseSnapshotId() == "" || req.GetTargetSnapshotId() == "" {
		return toStatus(fmt.Errorf("%w: base_snapshot_id and target_snapshot_id are required", ErrInvalid))
	}
	ctx := out.Context()
	// The target decides: the base may be deleted already (its ID still
	// names its volume, which the agent checks against the target's).
	node, err := s.r.nodeOfSnapshot(ctx, req.GetTargetSnapshotId())
	if err != nil {
		return toStatus(err)
	}
	return toStatus(s.r.callRetry(ctx, node, "GetMetadataDelta", false, func(ctx context.Context, cc *grpc.ClientConn) error {
		in, err := csi.NewSnapshotMetadataClient(cc).GetMetadataDelta(ctx, req)
		if err != nil {
			return err
		}
		return relay(in.Recv, out.Send)
	}))
}
