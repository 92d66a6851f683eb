package driver

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Unfiltered lists fan out to every agent, node by node in name order. The
// router's next_token names the node to continue with and that node's own
// token, encoded so that it is opaque: pages stay correct when nodes join
// or leave between calls (a node that left is skipped, the listing goes on
// with the next name).

const routeTokenPrefix = "r1."

func encodeRouteToken(node, inner string) string {
	return routeTokenPrefix + base64.RawURLEncoding.EncodeToString([]byte(node+"\n"+inner))
}

func decodeRouteToken(t string) (node, inner string, err error) {
	b64, ok := strings.CutPrefix(t, routeTokenPrefix)
	if ok {
		if b, derr := base64.RawURLEncoding.DecodeString(b64); derr == nil {
			node, inner, ok = strings.Cut(string(b), "\n")
			if ok && checkNodeName(node) == nil {
				return node, inner, nil
			}
		}
	}
	return "", "", fmt.Errorf("%w: starting_token %q was not issued by this driver", ErrBadToken, t)
}

// fanOut lists page by page over the nodes from the token's position:
// list(node, inner token, max) returns that node's entries and next token.
// max 0 lists everything.
func fanOut[E any](ctx context.Context, r *Router, token string, max int32,
	list func(ctx context.Context, node, inner string, max int32) ([]E, string, error)) ([]E, string, error) {
	from, inner := "", ""
	if token != "" {
		var err error
		if from, inner, err = decodeRouteToken(token); err != nil {
			return nil, "", err
		}
	}
	m, err := r.agents(ctx, false)
	if err != nil {
		return nil, "", err
	}
	nodes := make([]string, 0, len(m))
	for n := range m {
		nodes = append(nodes, n)
	}
	sort.Strings(nodes)
	i := sort.SearchStrings(nodes, from)
	if i < len(nodes) && nodes[i] != from {
		inner = "" // the token's node left: start the next one afresh
	}
	var out []E
	for ; i < len(nodes); i, inner = i+1, "" {
		left := int32(0)
		if max > 0 {
			left = max - int32(len(out))
		}
		es, next, err := list(ctx, nodes[i], inner, left)
		if err != nil {
			return nil, "", err
		}
		out = append(out, es...)
		if next != "" {
			return out, encodeRouteToken(nodes[i], next), nil
		}
		if max > 0 && int32(len(out)) >= max {
			if i+1 < len(nodes) {
				return out, encodeRouteToken(nodes[i+1], ""), nil
			}
			return out, "", nil
		}
	}
	return out, "", nil
}

func (r *Router) ListVolumes(ctx context.Context, req *csi.ListVolumesRequest) (*csi.ListVolumesResponse, error) {
	if err := validateListVolumesRequest(req); err != nil {
		return nil, toStatus(err)
	}
	es, next, err := fanOut(ctx, r, req.GetStartingToken(), req.GetMaxEntries(),
		func(ctx context.Context, node, inner string, max int32) ([]*csi.ListVolumesResponse_Entry, string, error) {
			resp, err := forward(ctx, r, node, "ListVolumes", &csi.ListVolumesRequest{MaxEntries: max, StartingToken: inner}, csi.ControllerClient.ListVolumes)
			return resp.GetEntries(), resp.GetNextToken(), err
		})
	if err != nil {
		return nil, toStatus(err)
	}
	return &csi.ListVolumesResponse{Entries: es, NextToken: next}, nil
}

func (r *Router) ListSnapshots(ctx context.Context, req *csi.ListSnapshotsRequest) (*csi.ListSnapshotsResponse, error) {
	if req.GetMaxEntries() < 0 {
		return nil, toStatus(fmt.Errorf("%w: max_entries %d is negative", ErrInvalid, req.GetMaxEntries()))
	}
	// Filtered: the one node that can hold the answer.
	var node string
	var err error
	switch {
	case req.GetSnapshotId() != "":
		node, err = r.nodeOfSnapshot(ctx, req.GetSnapshotId())
	case req.GetSourceVolumeId() != "":
		node, err = r.nodeOfVolume(ctx, req.GetSourceVolumeId())
	}
	switch {
	case errors.Is(err, ErrNotFound):
		// An unknown ID, or one whose node left: nothing to list.
		return &csi.ListSnapshotsResponse{}, nil
	case err != nil:
		return nil, toStatus(err)
	case node != "":
		resp, err := forward(ctx, r, node, "ListSnapshots", req, csi.ControllerClient.ListSnapshots)
		if gone(err) {
			return &csi.ListSnapshotsResponse{}, nil
		}
		return resp, toStatus(err)
	}
	es, next, err := fanOut(ctx, r, req.GetStartingToken(), req.GetMaxEntries(),
		func(ctx context.Context, node, inner string, max int32) ([]*csi.ListSnapshotsResponse_Entry, string, error) {
			resp, err := forward(ctx, r, node, "ListSnapshots", &csi.ListSnapshotsRequest{MaxEntries: max, StartingToken: inner}, csi.ControllerClient.ListSnapshots)
			return resp.GetEntries(), resp.GetNextToken(), err
		})
	if err != nil {
		return nil, toStatus(err)
	}
	return &csi.ListSnapshotsResponse{Entries: es, NextToken: next}, nil
}

// GetCapacity asks the node the topology names; without one, every node,
// summed (the largest volume is the largest any node can make).
func (r *Router) GetCapacity(ctx context.Context, req *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error) {
	if n := req.GetAccessibleTopology().GetSegments()[r.TopologyKey()]; n != "" {
		resp, err := forward(ctx, r, n, "GetCapacity", req, csi.ControllerClient.GetCapacity)
		if gone(err) {
			return &csi.GetCapacityResponse{}, nil // no pool there
		}
		return resp, toStatus(err)
	}
	m, err := r.agents(ctx, false)
	if err != nil {
		return nil, toStatus(err)
	}
	sum := &csi.GetCapacityResponse{}
	for n := range m {
		resp, err := forward(ctx, r, n, "GetCapacity", req, csi.ControllerClient.GetCapacity)
		if err != nil {
			return nil, toStatus(err)
		}
		sum.AvailableCapacity += resp.GetAvailableCapacity()
		if mv := resp.GetMaximumVolumeSize(); mv != nil && mv.GetValue() > sum.GetMaximumVolumeSize().GetValue() {
			sum.MaximumVolumeSize = wrapperspb.Int64(mv.GetValue())
		}
	}
	return sum, nil
}
