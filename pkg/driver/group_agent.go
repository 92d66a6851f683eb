package driver

import (
	"context"
	"encoding/json"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
)

// The node agent's group snapshot service: the router's side of the
// protocol in group.go reaches each node through it, on the agent's
// mutual TLS listener. CSI has no message for a prepare or a commit, so
// the service is the driver's own; its messages are the small JSON
// structs of group.go (a codec of their own, chosen by the call's content
// subtype), which keeps the project free of generated code.

const (
	groupAgentService = "qcow2csi.agent.v1.GroupSnapshots"
	groupCodecName    = "qcow2-csi-json"
)

// jsonCodec marshals the group service's messages.
type jsonCodec struct{}

func (jsonCodec) Marshal(v any) ([]byte, error)      { return json.Marshal(v) }
func (jsonCodec) Unmarshal(data []byte, v any) error { return json.Unmarshal(data, v) }
func (jsonCodec) Name() string                       { return groupCodecName }

func init() { encoding.RegisterCodec(jsonCodec{}) }

// groupAgent is what the agent registers (HandlerType of the service).
type groupAgent interface {
	groupPrepare(context.Context, *groupPrepare) (*groupMembers, error)
}

var groupAgentDesc = grpc.ServiceDesc{
	ServiceName: groupAgentService,
	HandlerType: (*groupAgent)(nil),
	Methods: []grpc.MethodDesc{
		groupMethod("GroupPrepare", func(d *Driver, ctx context.Context, r *groupPrepare) (*groupMembers, error) {
			return d.groupPrepare(ctx, r)
		}),
		groupMethod("GroupCommit", func(d *Driver, ctx context.Context, r *groupRef) (*groupMembers, error) {
			return d.groupCommit(ctx, *r)
		}),
		groupMethod("GroupRelease", func(d *Driver, ctx context.Context, r *groupRef) (*groupMembers, error) {
			return &groupMembers{}, d.groupRelease(ctx, *r)
		}),
		groupMethod("GroupGet", func(d *Driver, ctx context.Context, r *groupRef) (*groupMembers, error) {
			return d.groupGet(ctx, *r)
		}),
	},
	Metadata: "group_agent.go",
}

// groupMethod adapts fn to a gRPC method of the service, through the
// server's interceptor (logging, metrics, panics) like any CSI call.
func groupMethod[Req any](name string, fn func(*Driver, context.Context, *Req) (*groupMembers, error)) grpc.MethodDesc {
	return grpc.MethodDesc{MethodName: name, Handler: func(srv any, ctx context.Context, dec func(any) error, ic grpc.UnaryServerInterceptor) (any, error) {
		req := new(Req)
		if err := dec(req); err != nil {
			return nil, toStatus(fmt.Errorf("%w: %s: %w", ErrInvalid, name, err))
		}
		h := func(ctx context.Context, r any) (any, error) {
			resp, err := fn(srv.(*Driver), ctx, r.(*Req))
			if err != nil {
				return nil, toStatus(err)
			}
			return resp, nil
		}
		if ic == nil {
			return h(ctx, req)
		}
		return ic(ctx, req, &grpc.UnaryServerInfo{Server: srv, FullMethod: "/" + groupAgentService + "/" + name}, h)
	}}
}

// agentPeer is a node reached through its agent by the router.
type agentPeer struct {
	r    *Router
	node string
}

func (p agentPeer) invoke(ctx context.Context, method string, req any) (*groupMembers, error) {
	out := &groupMembers{}
	err := p.r.call(ctx, p.node, method, func(ctx context.Context, cc *grpc.ClientConn) error {
		return cc.Invoke(ctx, "/"+groupAgentService+"/"+method, req, out, grpc.CallContentSubtype(groupCodecName))
	})
	return out, err
}

func (p agentPeer) prepare(ctx context.Context, req *groupPrepare) (*groupMembers, error) {
	return p.invoke(ctx, "GroupPrepare", req)
}
func (p agentPeer) commit(ctx context.Context, ref groupRef) (*groupMembers, error) {
	return p.invoke(ctx, "GroupCommit", &ref)
}
func (p agentPeer) release(ctx context.Context, ref groupRef) error {
	_, err := p.invoke(ctx, "GroupRelease", &ref)
	return err
}
func (p agentPeer) get(ctx context.Context, ref groupRef) (*groupMembers, error) {
	return p.invoke(ctx, "GroupGet", &ref)
}
