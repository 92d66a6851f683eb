package driver

import (
	"context"
	"errors"
	"fmt"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"k8s.io/klog/v2"
)

// The Router's volume- and snapshot-scoped RPCs: each finds the owning
// node and passes the request on unchanged, so that the agent validates it
// as a single-process driver would and every answer (codes included) is the
// node driver's own. The router only validates what it needs to route.

// forward passes req to node's agent with the controller RPC rpc. Its
// error is not yet a status (errNodeGone must stay visible): callers end
// with toStatus.
func forward[Q, A any](ctx context.Context, r *Router, node, method string, req Q,
	rpc func(csi.ControllerClient, context.Context, Q, ...grpc.CallOption) (A, error)) (A, error) {
	var resp A
	err := r.call(ctx, node, method, func(ctx context.Context, cc *grpc.ClientConn) error {
		var err error
		resp, err = rpc(csi.NewControllerClient(cc), ctx, req)
		return err
	})
	return resp, err
}

// selectNode is the node a new volume goes to: the first preferred
// topology naming a node under the topology key, then the first requisite
// one (csi-provisioner puts the scheduler's selected node first). A request
// without any is refused unless the cluster has exactly one node (a
// single-node install, csi-sanity), which is then the only choice.
func (r *Router) selectNode(ctx context.Context, req *csi.TopologyRequirement) (string, error) {
	key := r.TopologyKey()
	for _, ts := range [][]*csi.Topology{req.GetPreferred(), req.GetRequisite()} {
		for _, t := range ts {
			if n := t.GetSegments()[key]; n != "" {
				return n, nil
			}
		}
	}
	m, err := r.agents(ctx, false)
	if err != nil {
		return "", err
	}
	if len(m) == 1 {
		for n := range m {
			return n, nil
		}
	}
	return "", fmt.Errorf("%w: accessibility_requirements name no node under the topology key %s, and the cluster has %d nodes: volumes live on one node (StorageClass volumeBindingMode WaitForFirstConsumer)", ErrInvalid, key, len(m))
}

func (r *Router) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	if err := validateCreateVolumeRequest(req); err != nil {
		return nil, toStatus(err)
	}
	node, err := r.selectNode(ctx, req.GetAccessibilityRequirements())
	if err != nil {
		return nil, toStatus(err)
	}
	if src := req.GetVolumeContentSource(); src != nil {
		kind, id := "snapshot", src.GetSnapshot().GetSnapshotId()
		var from string
		if id != "" {
			from, err = r.nodeOfSnapshot(ctx, id)
		} else {
			kind, id = "volume", src.GetVolume().GetVolumeId()
			from, err = r.nodeOfVolume(ctx, id)
		}
		if err != nil {
			return nil, toStatus(fmt.Errorf("volume content source: %w", err))
		}
		if from != node {
			// FailedPrecondition, not ResourceExhausted: the latter makes
			// csi-provisioner ask the scheduler for another node, which
			// knows nothing of the source's node and may pick the same
			// one again and again. This is a final error: the PVC gets an
			// event naming both nodes and the provisioner retries with
			// backoff (a pod moved to the source's node then succeeds).
			return nil, toStatus(fmt.Errorf("%w: the source %s %q is on node %s, the volume was requested on node %s: restore and clone work only on the source's node",
				ErrPrecondition, kind, id, from, node))
		}
	}
	resp, err := forward(ctx, r, node, "CreateVolume", req, csi.ControllerClient.CreateVolume)
	if gone(err) {
		// The scheduler picked a node with no plugin Pod (yet): retry,
		// do not answer NotFound for a volume that was never made.
		err = fmt.Errorf("%w: volume %q: node %s has no agent in the cluster", ErrUnavailable, req.GetName(), node)
	}
	return resp, toStatus(err)
}

// gone reports whether err says the owner has no agent in the cluster any
// more (RouterOptions.NodeGoneAfter).
func gone(err error) bool { return errors.Is(err, errNodeGone) }

func (r *Router) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	if err := validateDeleteVolumeRequest(req); err != nil {
		return nil, toStatus(err)
	}
	id := req.GetVolumeId()
	node, err := r.nodeOfVolume(ctx, id)
	if err == nil {
		var resp *csi.DeleteVolumeResponse
		resp, err = forward(ctx, r, node, "DeleteVolume", req, csi.ControllerClient.DeleteVolume)
		if err == nil {
			r.forget(id)
			return resp, nil
		}
	}
	switch {
	case gone(err):
		// The pool went with its node: nothing is left to delete, and a
		// PV that cannot be deleted would stay forever.
		klog.FromContext(ctx).Info("Volume's node has no agent in the cluster any more; deleting the volume as gone", "volumeID", id, "err", err)
		return &csi.DeleteVolumeResponse{}, nil
	case errors.Is(err, ErrNotFound) && node == "":
		// A legacy ID no node has: deleted already.
		return &csi.DeleteVolumeResponse{}, nil
	}
	return nil, toStatus(err)
}

func (r *Router) ControllerGetVolume(ctx context.Context, req *csi.ControllerGetVolumeRequest) (*csi.ControllerGetVolumeResponse, error) {
	if err := validateControllerGetVolumeRequest(req); err != nil {
		return nil, toStatus(err)
	}
	node, err := r.nodeOfVolume(ctx, req.GetVolumeId())
	if err != nil {
		return nil, toStatus(err)
	}
	resp, err := forward(ctx, r, node, "ControllerGetVolume", req, csi.ControllerClient.ControllerGetVolume)
	return resp, toStatus(err)
}

func (r *Router) ValidateVolumeCapabilities(ctx context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	if err := validateValidateVolumeCapabilitiesRequest(req); err != nil {
		return nil, toStatus(err)
	}
	node, err := r.nodeOfVolume(ctx, req.GetVolumeId())
	if err != nil {
		return nil, toStatus(err)
	}
	resp, err := forward(ctx, r, node, "ValidateVolumeCapabilities", req, csi.ControllerClient.ValidateVolumeCapabilities)
	return resp, toStatus(err)
}

func (r *Router) ControllerExpandVolume(ctx context.Context, req *csi.ControllerExpandVolumeRequest) (*csi.ControllerExpandVolumeResponse, error) {
	if err := validateControllerExpandVolumeRequest(req); err != nil {
		return nil, toStatus(err)
	}
	node, err := r.nodeOfVolume(ctx, req.GetVolumeId())
	if err != nil {
		return nil, toStatus(err)
	}
	resp, err := forward(ctx, r, node, "ControllerExpandVolume", req, csi.ControllerClient.ControllerExpandVolume)
	return resp, toStatus(err)
}

func (r *Router) ControllerModifyVolume(ctx context.Context, req *csi.ControllerModifyVolumeRequest) (*csi.ControllerModifyVolumeResponse, error) {
	if err := validateControllerModifyVolumeRequest(req); err != nil {
		return nil, toStatus(err)
	}
	node, err := r.nodeOfVolume(ctx, req.GetVolumeId())
	if err != nil {
		return nil, toStatus(err)
	}
	resp, err := forward(ctx, r, node, "ControllerModifyVolume", req, csi.ControllerClient.ControllerModifyVolume)
	return resp, toStatus(err)
}

func (r *Router) CreateSnapshot(ctx context.Context, req *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	if err := validateCreateSnapshotRequest(req); err != nil {
		return nil, toStatus(err)
	}
	node, err := r.nodeOfVolume(ctx, req.GetSourceVolumeId())
	if err != nil {
		return nil, toStatus(err)
	}
	resp, err := forward(ctx, r, node, "CreateSnapshot", req, csi.ControllerClient.CreateSnapshot)
	return resp, toStatus(err)
}

func (r *Router) DeleteSnapshot(ctx context.Context, req *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	id := req.GetSnapshotId()
	if id == "" {
		return nil, toStatus(fmt.Errorf("%w: snapshot_id is required", ErrInvalid))
	}
	if _, ok := parseSnapshotRef(id); !ok {
		// Not an ID this driver issued: nothing to delete.
		return &csi.DeleteSnapshotResponse{}, nil
	}
	node, err := r.nodeOfSnapshot(ctx, id)
	if err == nil {
		var resp *csi.DeleteSnapshotResponse
		resp, err = forward(ctx, r, node, "DeleteSnapshot", req, csi.ControllerClient.DeleteSnapshot)
		if err == nil {
			r.forget(id)
			return resp, nil
		}
	}
	switch {
	case gone(err):
		klog.FromContext(ctx).Info("Snapshot's node has no agent in the cluster any more; deleting the snapshot as gone", "snapshotID", id, "err", err)
		return &csi.DeleteSnapshotResponse{}, nil
	case errors.Is(err, ErrNotFound) && node == "":
		return &csi.DeleteSnapshotResponse{}, nil
	}
	return nil, toStatus(err)
}

func (r *Router) GetSnapshot(ctx context.Context, req *csi.GetSnapshotRequest) (*csi.GetSnapshotResponse, error) {
	if req.GetSnapshotId() == "" {
		return nil, toStatus(fmt.Errorf("%w: snapshot_id is required", ErrInvalid))
	}
	node, err := r.nodeOfSnapshot(ctx, req.GetSnapshotId())
	if err != nil {
		return nil, toStatus(err)
	}
	resp, err := forward(ctx, r, node, "GetSnapshot", req, csi.ControllerClient.GetSnapshot)
	return resp, toStatus(err)
}
