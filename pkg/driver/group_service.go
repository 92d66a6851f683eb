package driver

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// The CSI GroupController service (docs/group-snapshots.md): driverGroups
// serves a single-process driver's own node, routerGroups the cluster
// through the node agents. Both run the protocol of group_coord.go.

type driverGroups struct {
	csi.UnimplementedGroupControllerServer
	d *Driver
}

// GroupControllerServer is the GroupController service of d (registered by
// GRPCServer in controller mode with qcow2 images).
func (d *Driver) GroupControllerServer() csi.GroupControllerServer { return driverGroups{d: d} }

func (s driverGroups) GroupControllerGetCapabilities(context.Context, *csi.GroupControllerGetCapabilitiesRequest) (*csi.GroupControllerGetCapabilitiesResponse, error) {
	return groupControllerCapabilities(), nil
}

func (s driverGroups) CreateVolumeGroupSnapshot(ctx context.Context, req *csi.CreateVolumeGroupSnapshotRequest) (*csi.CreateVolumeGroupSnapshotResponse, error) {
	if err := validateCreateVolumeGroupSnapshotRequest(req); err != nil {
		return nil, toStatus(err)
	}
	for _, v := range req.GetSourceVolumeIds() {
		if checkVolumeID(v) != nil {
			return nil, toStatus(fmt.Errorf("source volume %q: %w", v, ErrNotFound))
		}
		if err := s.d.ownVolume(v); err != nil {
			return nil, toStatus(err)
		}
	}
	node := s.d.opts.NodeID
	run := &groupRun{id: groupIDForName(req.GetName()), name: req.GetName(), all: req.GetSourceVolumeIds(), params: req.GetParameters(),
		hold: s.d.opts.GroupHoldTimeout, aborts: s.d.metrics.groupAborts,
		peers: map[string]groupPeer{node: localPeer{s.d}}, members: map[string][]string{node: req.GetSourceVolumeIds()}}
	g, err := run.create(ctx)
	if err != nil {
		return nil, toStatus(err)
	}
	return &csi.CreateVolumeGroupSnapshotResponse{GroupSnapshot: g}, nil
}

func (s driverGroups) GetVolumeGroupSnapshot(ctx context.Context, req *csi.GetVolumeGroupSnapshotRequest) (*csi.GetVolumeGroupSnapshotResponse, error) {
	id := req.GetGroupSnapshotId()
	if err := checkGroupSnapshotID(id); err != nil {
		return nil, toStatus(err)
	}
	m, err := s.d.groupGet(ctx, groupRef{GroupID: id})
	if err != nil {
		return nil, toStatus(err)
	}
	if err := checkGroupSnapshotIDs(id, req.GetSnapshotIds(), m.Snapshots); err != nil {
		return nil, toStatus(err)
	}
	return &csi.GetVolumeGroupSnapshotResponse{GroupSnapshot: groupSnapshot(id, m.Snapshots)}, nil
}

func (s driverGroups) DeleteVolumeGroupSnapshot(ctx context.Context, req *csi.DeleteVolumeGroupSnapshotRequest) (*csi.DeleteVolumeGroupSnapshotResponse, error) {
	id := req.GetGroupSnapshotId()
	if err := checkGroupSnapshotID(id); errors.Is(err, ErrNotFound) {
		return &csi.DeleteVolumeGroupSnapshotResponse{}, nil // not ours: nothing to delete
	} else if err != nil {
		return nil, toStatus(err)
	}
	if m, err := s.d.groupGet(ctx, groupRef{GroupID: id}); err == nil {
		if err := checkDeleteSnapshotIDs(id, req.GetSnapshotIds(), m.Snapshots); err != nil {
			return nil, toStatus(err)
		}
	}
	if err := s.d.groupRelease(ctx, groupRef{GroupID: id}); err != nil {
		return nil, toStatus(err)
	}
	return &csi.DeleteVolumeGroupSnapshotResponse{}, nil
}

// routerGroups is the Router's GroupController service.
type routerGroups struct {
	csi.UnimplementedGroupControllerServer
	r *Router
}

func (s routerGroups) GroupControllerGetCapabilities(context.Context, *csi.GroupControllerGetCapabilitiesRequest) (*csi.GroupControllerGetCapabilitiesResponse, error) {
	return groupControllerCapabilities(), nil
}

func (s routerGroups) CreateVolumeGroupSnapshot(ctx context.Context, req *csi.CreateVolumeGroupSnapshotRequest) (*csi.CreateVolumeGroupSnapshotResponse, error) {
	if err := validateCreateVolumeGroupSnapshotRequest(req); err != nil {
		return nil, toStatus(err)
	}
	run := &groupRun{id: groupIDForName(req.GetName()), name: req.GetName(), all: req.GetSourceVolumeIds(), params: req.GetParameters(),
		hold: s.r.opts.GroupHoldTimeout, aborts: s.r.metrics.groupAborts,
		peers: map[string]groupPeer{}, members: map[string][]string{}}
	for _, v := range req.GetSourceVolumeIds() {
		if checkVolumeID(v) != nil {
			return nil, toStatus(fmt.Errorf("source volume %q: %w", v, ErrNotFound))
		}
		n, err := s.r.nodeOfVolume(ctx, v)
		if err != nil {
			return nil, toStatus(fmt.Errorf("source volume %q: %w", v, err))
		}
		run.peers[n] = agentPeer{r: s.r, node: n}
		run.members[n] = append(run.members[n], v)
	}
	g, err := run.create(ctx)
	if err != nil {
		return nil, toStatus(err)
	}
	return &csi.CreateVolumeGroupSnapshotResponse{GroupSnapshot: g}, nil
}

// groupNodes are the nodes that may hold members of a group: those of the
// snapshot IDs the request names, or else every node with an agent.
func (s routerGroups) groupNodes(ctx context.Context, snapshotIDs []string) ([]string, error) {
	set := map[string]bool{}
	for _, sid := range snapshotIDs {
		n, err := s.r.nodeOfSnapshot(ctx, sid)
		if gone(err) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("snapshot %q: %w", sid, err)
		}
		set[n] = true
	}
	if len(snapshotIDs) == 0 {
		m, err := s.r.agents(ctx, false)
		if err != nil {
			return nil, err
		}
		for n := range m {
			set[n] = true
		}
	}
	return slices.Sorted(maps.Keys(set)), nil
}

// members are the member snapshots group id has on nodes, and on the
// nodes of the group's other source volumes (every member's record names
// them all): a member on a node the request's snapshot IDs do not lead to
// is found too. It returns the nodes asked. A node that is gone or has no
// member adds nothing.
func (s routerGroups) members(ctx context.Context, id string, nodes []string) ([]groupMember, []string, error) {
	asked := map[string]bool{}
	for _, n := range nodes {
		asked[n] = true
	}
	var ms []groupMember
	for todo := slices.Clone(nodes); len(todo) > 0; todo = todo[1:] {
		n := todo[0]
		m, err := agentPeer{r: s.r, node: n}.get(ctx, groupRef{GroupID: id})
		if gone(err) || status.Code(err) == codes.NotFound {
			continue
		}
		if err != nil {
			return nil, nil, fmt.Errorf("group snapshot %q: node %s: %w", id, n, err)
		}
		ms = append(ms, m.Snapshots...)
		for _, v := range m.Sources {
			if vn, err := s.r.nodeOfVolume(ctx, v); err == nil && !asked[vn] {
				asked[vn] = true
				todo = append(todo, vn)
			}
		}
	}
	return ms, slices.Sorted(maps.Keys(asked)), nil
}

func (s routerGroups) GetVolumeGroupSnapshot(ctx context.Context, req *csi.GetVolumeGroupSnapshotRequest) (*csi.GetVolumeGroupSnapshotResponse, error) {
	id := req.GetGroupSnapshotId()
	if err := checkGroupSnapshotID(id); err != nil {
		return nil, toStatus(err)
	}
	nodes, err := s.groupNodes(ctx, req.GetSnapshotIds())
	if err != nil {
		return nil, toStatus(err)
	}
	ms, _, err := s.members(ctx, id, nodes)
	if err != nil {
		return nil, toStatus(err)
	}
	if len(ms) == 0 {
		return nil, toStatus(fmt.Errorf("%w: group snapshot %q has no member on any node", ErrNotFound, id))
	}
	if err := checkGroupSnapshotIDs(id, req.GetSnapshotIds(), ms); err != nil {
		return nil, toStatus(err)
	}
	return &csi.GetVolumeGroupSnapshotResponse{GroupSnapshot: groupSnapshot(id, ms)}, nil
}

func (s routerGroups) DeleteVolumeGroupSnapshot(ctx context.Context, req *csi.DeleteVolumeGroupSnapshotRequest) (*csi.DeleteVolumeGroupSnapshotResponse, error) {
	id := req.GetGroupSnapshotId()
	if err := checkGroupSnapshotID(id); errors.Is(err, ErrNotFound) {
		return &csi.DeleteVolumeGroupSnapshotResponse{}, nil // not ours: nothing to delete
	} else if err != nil {
		return nil, toStatus(err)
	}
	nodes, err := s.groupNodes(ctx, req.GetSnapshotIds())
	if err != nil {
		return nil, toStatus(err)
	}
	ms, nodes, err := s.members(ctx, id, nodes)
	if err != nil {
		return nil, toStatus(err)
	}
	if err := checkDeleteSnapshotIDs(id, req.GetSnapshotIds(), ms); err != nil {
		return nil, toStatus(err)
	}
	var errs []error
	for _, n := range nodes {
		err := agentPeer{r: s.r, node: n}.release(ctx, groupRef{GroupID: id})
		if err != nil && !gone(err) {
			errs = append(errs, fmt.Errorf("node %s: %w", n, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, toStatus(fmt.Errorf("group snapshot %q: %w", id, err))
	}
	return &csi.DeleteVolumeGroupSnapshotResponse{}, nil
}
