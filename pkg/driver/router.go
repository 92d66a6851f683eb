package driver

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"
	"k8s.io/klog/v2"
)

// Router is the cluster's one controller (`serve --mode=controller`): it
// serves Identity, Controller and SnapshotMetadata to the central sidecars
// and passes each volume-scoped call to the agent of the node that owns the
// volume (agent.go). It owns no pool and keeps no state that a restart
// would lose: the owning node is read from the IDs (ids.go); only legacy
// IDs, which name no node, are looked up by asking the agents, and the
// answer cached.
type Router struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedControllerServer

	opts    RouterOptions
	metrics *routerMetrics

	mu    sync.Mutex
	conns map[string]*agentConn // by node
	// failed: the connection of each node whose last call could not reach
	// its agent; the next call asks the resolver afresh and dials anew.
	failed map[string]*agentConn
	// missing: when each node was first seen without an agent (goneAfter).
	missing map[string]time.Time
	// legacy: legacy volume and snapshot IDs -> owning node.
	legacy map[string]string
}

// RouterOptions configure a Router.
type RouterOptions struct {
	DriverName, Version string
	// Agents finds the agents (StaticAgents, KubeAgents). Required.
	Agents AgentResolver
	// TLS is the client side of the mutual TLS (AgentClientTLS). Required.
	TLS *tls.Config
	// EnableGetSnapshot advertises GET_SNAPSHOT (see Options).
	EnableGetSnapshot bool
	// NodeGoneAfter is how long a node (or the hash of one) must be seen
	// without an agent before DeleteVolume and DeleteSnapshot of its IDs
	// succeed without it (its pool went with it); a resolver that is a
	// NodeChecker must also say its Node is gone. Until then they answer
	// Unavailable, so that a plugin Pod being replaced (briefly no Pod on
	// its node) does not leak the images of volumes deleted meanwhile.
	// 0: at once (a static table is taken at its word).
	NodeGoneAfter time.Duration
	// GroupHoldTimeout is the longest a group snapshot holds its members'
	// I/O (Options.GroupHoldTimeout; default DefaultGroupHoldTimeout): the
	// nodes must all be prepared within it.
	GroupHoldTimeout time.Duration
}

// agentBackoff paces reconnects to an agent that went away.
var agentBackoff = backoff.Config{BaseDelay: time.Second, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 10 * time.Second}

type agentConn struct {
	addr string
	cc   *grpc.ClientConn
}

// maxLegacyCache bounds the legacy ID cache; past it, the cache starts
// over (a lookup costs one call per node).
const maxLegacyCache = 100000

// NewRouter checks opts and builds a router.
func NewRouter(opts RouterOptions) (*Router, error) {
	if opts.DriverName == "" {
		opts.DriverName = DefaultDriverName
	}
	if opts.Version == "" {
		opts.Version = "dev"
	}
	if err := validateDriverName(opts.DriverName); err != nil {
		return nil, err
	}
	if opts.GroupHoldTimeout == 0 {
		opts.GroupHoldTimeout = DefaultGroupHoldTimeout
	}
	if err := checkGroupHold(opts.GroupHoldTimeout); err != nil {
		return nil, err
	}
	if opts.Agents == nil {
		return nil, errors.New("router: no agent resolver (--agent or --agent-selector)")
	}
	if opts.TLS == nil {
		return nil, errors.New("router: the agent connection is mutual TLS only (--tls-ca, --tls-cert, --tls-key)")
	}
	return &Router{
		opts:    opts,
		metrics: newRouterMetrics(),
		conns:   map[string]*agentConn{},
		failed:  map[string]*agentConn{},
		missing: map[string]time.Time{},
		legacy:  map[string]string{},
	}, nil
}

// TopologyKey is the topology segment key naming a volume's node.
func (r *Router) TopologyKey() string { return r.opts.DriverName + "/node" }

// GRPCServer returns the controller's gRPC server.
func (r *Router) GRPCServer() *grpc.Server {
	// The driver's interceptors: logging and metrics, and a handler panic
	// failing its own call only.
	_ = r.metrics.reg.Register(handlerPanics)
	s := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		return logCall(ctx, req, info, h, r.metrics.observe)
	}), grpc.StreamInterceptor(interceptStream))
	csi.RegisterIdentityServer(s, r)
	csi.RegisterControllerServer(s, r)
	csi.RegisterSnapshotMetadataServer(s, routerMetadata{r: r})
	csi.RegisterGroupControllerServer(s, routerGroups{r: r})
	return s
}

// Serve serves the controller on lis until ctx ends.
func (r *Router) Serve(ctx context.Context, lis net.Listener) error {
	return serveGRPC(ctx, r.GRPCServer(), lis)
}

// MetricsHandler serves the controller's metrics.
func (r *Router) MetricsHandler() http.Handler { return r.metrics.handler() }

// Close closes the connections to the agents.
func (r *Router) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var errs []error
	for n, c := range r.conns {
		errs = append(errs, c.cc.Close())
		delete(r.conns, n)
	}
	return errors.Join(errs...)
}

// errNodeGone: the cluster has no agent for the node (for NodeGoneAfter).
var errNodeGone = errors.New("no agent in the cluster")

// agents asks the resolver, afresh when refresh.
func (r *Router) agents(ctx context.Context, refresh bool) (map[string]string, error) {
	m, err := r.opts.Agents.Agents(ctx, refresh)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return m, nil
}

// absent is the answer for an owner (a node, or the hash of one) that no
// listed agent serves. It is errNodeGone (wrapped in ErrNotFound) only
// once the owner has been missing for NodeGoneAfter and, where the
// resolver can tell (NodeChecker), its Node object is gone too: a plugin
// Pod being replaced, or a DaemonSet recreated by an upgrade, leaves a
// node briefly without an agent, and a delete must not claim success then.
// Until both hold it is ErrUnavailable.
func (r *Router) absent(ctx context.Context, o owner) error {
	key := o.Name
	if key == "" {
		key = ownerHashSep + o.Hash
	}
	r.mu.Lock()
	first, seen := r.missing[key]
	if !seen {
		first = time.Now()
		r.missing[key] = first
	}
	r.mu.Unlock()
	desc := o.String()
	if o.Name != "" {
		desc = "node " + o.Name
	}
	since := first.UTC().Format(time.RFC3339)
	unavailable := func(format string, args ...any) error {
		r.metrics.connErrors.WithLabelValues(key).Inc()
		return fmt.Errorf("%w: %s has no agent (no plugin Pod on it) since %s"+format, append([]any{ErrUnavailable, desc, since}, args...)...)
	}
	if time.Since(first) < r.opts.NodeGoneAfter {
		return unavailable("")
	}
	if nc, ok := r.opts.Agents.(NodeChecker); ok {
		exists, err := nc.NodeExists(ctx, o.Name, o.Hash)
		switch {
		case err != nil:
			return unavailable(", and whether its Node still exists is unknown: %w", err)
		case exists:
			return unavailable(", but its Node object still exists")
		}
	}
	return fmt.Errorf("%w: %s: %w", ErrNotFound, desc, errNodeGone)
}

// present notes that the owner key (a node name, or '#' and a hash) has an
// agent again.
func (r *Router) present(key string) {
	r.mu.Lock()
	delete(r.missing, key)
	r.mu.Unlock()
}

// conn returns the connection to node's agent, dialling it if needed. A
// node without an agent is answered by absent.
func (r *Router) conn(ctx context.Context, node string) (*agentConn, error) {
	r.mu.Lock()
	c := r.conns[node]
	stale := c != nil && r.failed[node] == c
	r.mu.Unlock()
	if c != nil && !stale {
		return c, nil
	}
	m, err := r.agents(ctx, stale)
	if err != nil {
		return nil, err
	}
	addr, known := m[node]
	if !known && !stale {
		// Not in the cache: maybe a node that joined since.
		if m, err = r.agents(ctx, true); err != nil {
			return nil, err
		}
		addr, known = m[node]
	}
	if !known {
		return nil, nodeErr(node, r.absent(ctx, owner{Name: node}))
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.missing, node)
	if addr == "" {
		r.metrics.connErrors.WithLabelValues(node).Inc()
		return nil, nodeErr(node, fmt.Errorf("%w: node %s: its plugin Pod is not running", ErrUnavailable, node))
	}
	if c := r.conns[node]; c != nil {
		if c.addr == addr && r.failed[node] != c {
			return c, nil // another call dialled it meanwhile
		}
		// Moved, or failed: a new connection, whose first call waits for
		// its first connection attempt. The failed one would fail calls
		// at once until its reconnect backoff ends, even after a plugin
		// came back at the same address (hostNetwork).
		_ = c.cc.Close()
		delete(r.conns, node)
	}
	cc, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(credentials.NewTLS(r.opts.TLS)),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 30 * time.Second, Timeout: 10 * time.Second, PermitWithoutStream: true}),
		// A node that went away must fail calls soon, not after the
		// 20 s default connect timeout; one that comes back must be
		// reached soon, not after up to 2 min of default backoff.
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: agentBackoff, MinConnectTimeout: 5 * time.Second}),
	)
	if err != nil {
		return nil, nodeErr(node, fmt.Errorf("node %s (agent %s): %w", node, addr, err))
	}
	c = &agentConn{addr: addr, cc: cc}
	r.conns[node] = c
	delete(r.failed, node)
	return c, nil
}

// call runs fn against node's agent and records it. The agent's status
// passes through as it is; a failure to reach the agent becomes
// Unavailable naming the node (DeadlineExceeded stays so, naming it too), and the agent's address is asked afresh
// (its Pod may have moved). When it did move, a unary call (once) is
// tried at the new address at once: CSI calls are idempotent. A stream
// is not, as messages may have reached the client already.
func (r *Router) call(ctx context.Context, node, method string, fn func(ctx context.Context, cc *grpc.ClientConn) error) error {
	return r.callRetry(ctx, node, method, true, fn)
}

func (r *Router) callRetry(ctx context.Context, node, method string, retry bool, fn func(ctx context.Context, cc *grpc.ClientConn) error) error {
	began := time.Now()
	c, err := r.conn(ctx, node)
	if err != nil {
		return err
	}
	start := time.Now()
	err = fn(ctx, c.cc)
	code := status.Code(err)
	r.metrics.observeRouted(node, method, code, time.Since(start))
	if code != codes.Unavailable && code != codes.DeadlineExceeded {
		return err
	}
	r.mu.Lock()
	r.failed[node] = c
	r.mu.Unlock()
	r.metrics.connErrors.WithLabelValues(node).Inc()
	if code == codes.DeadlineExceeded {
		// A hung agent (or connection) looks like this too: dial anew
		// next time, and say which node. No retry: the time is spent.
		return nodeErr(node, agentDeadline(ctx, node, c.addr, time.Since(began), err))
	}
	if retry {
		// Asking the lookup only: conn must still see the failed
		// connection, to dial anew.
		if m, aerr := r.agents(ctx, true); aerr == nil && m[node] != "" && m[node] != c.addr {
			klog.FromContext(ctx).V(2).Info("Agent moved; calling it at its new address", "node", node, "from", c.addr, "to", m[node])
			return r.callRetry(ctx, node, method, false, fn)
		}
	}
	return nodeErr(node, fmt.Errorf("node %s (agent %s): %w: %s", node, c.addr, ErrUnavailable, status.Convert(err).Message()))
}

// nodeError is a failure to reach node's agent, whose text names the node
// (and the agent) already: a caller that names the node of each of its
// errors (a group snapshot's, group_coord.go) leaves it as it is.
type nodeError struct {
	node, text string
	cause      error
}

func (e nodeError) Error() string { return e.text }
func (e nodeError) Unwrap() error { return e.cause }

func nodeErr(node string, err error) error { return nodeError{node, err.Error(), err} }

// namesNode reports whether err's text names node already.
func namesNode(err error, node string) bool {
	var ne nodeError
	return errors.As(err, &ne) && ne.node == node
}

// agentDeadline is the DeadlineExceeded of a call to node's agent at addr
// after waited: the caller's deadline passed (the agent did not answer),
// or the agent answered so itself. It says each thing once: the status
// message of a deadline the client side hit is only the sentinel's text.
func agentDeadline(ctx context.Context, node, addr string, waited time.Duration, err error) error {
	who := fmt.Sprintf("node %s (agent %s)", node, addr)
	if ctx.Err() != nil {
		who += fmt.Sprintf(" did not answer within %s", waited.Round(100*time.Millisecond))
	}
	msg := status.Convert(err).Message()
	if strings.Contains(msg, context.DeadlineExceeded.Error()) {
		// gRPC's own text ("context deadline exceeded while waiting
		// for connections to become ready") says it already.
		return nodeError{node, who + ": " + msg, context.DeadlineExceeded}
	}
	return nodeErr(node, fmt.Errorf("%s: %s: %w", who, msg, context.DeadlineExceeded))
}

// nodeOfVolume is the node that owns volume id.
func (r *Router) nodeOfVolume(ctx context.Context, id string) (string, error) {
	ref, err := parseVolumeID(id)
	if err != nil {
		return "", err
	}
	return r.owner(ctx, ref.Owner, "volume", id, func(ctx context.Context, cc *grpc.ClientConn) (bool, error) {
		_, err := csi.NewControllerClient(cc).ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: id})
		return err == nil, err
	})
}

// nodeOfSnapshot is the node that owns snapshot id; ErrNotFound for an ID
// this driver did not issue.
func (r *Router) nodeOfSnapshot(ctx context.Context, id string) (string, error) {
	ref, ok := parseSnapshotRef(id)
	if !ok {
		return "", fmt.Errorf("snapshot %q: %w (not an ID of this driver)", id, ErrNotFound)
	}
	return r.owner(ctx, ref.Owner, "snapshot", id, func(ctx context.Context, cc *grpc.ClientConn) (bool, error) {
		l, err := csi.NewControllerClient(cc).ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: id})
		return err == nil && len(l.GetEntries()) > 0, err
	})
}

// owner resolves an ID's owner to a node name: a name as it is, a hash
// against the names of the nodes with agents, a legacy ID by asking every
// agent whether it has it (has), once.
func (r *Router) owner(ctx context.Context, o owner, kind, id string, has func(context.Context, *grpc.ClientConn) (bool, error)) (string, error) {
	if o.Name != "" {
		return o.Name, nil
	}
	if o.Hash != "" {
		for _, refresh := range []bool{false, true} {
			m, err := r.agents(ctx, refresh)
			if err != nil {
				return "", err
			}
			for n := range m {
				if o.is(n) {
					r.present(ownerHashSep + o.Hash)
					return n, nil
				}
			}
		}
		return "", fmt.Errorf("%s %q: no node with an agent hashes to %s: %w", kind, id, o.Hash, r.absent(ctx, o))
	}
	r.mu.Lock()
	n, ok := r.legacy[id]
	r.mu.Unlock()
	if ok {
		return n, nil
	}
	m, err := r.agents(ctx, false)
	if err != nil {
		return "", err
	}
	if len(m) == 0 {
		// No agent listed at all (the DaemonSet recreated in an
		// upgrade): not "on no node", which would let a delete succeed
		// and leak the image.
		if m, err = r.agents(ctx, true); err != nil {
			return "", err
		}
	}
	// The nodes to ask: those listed, and those the router had a
	// connection to or saw missing, which may be between plugin Pods
	// (conn answers for them as for any node without an agent).
	r.mu.Lock()
	for n := range r.conns {
		if _, ok := m[n]; !ok {
			m[n] = ""
		}
	}
	for n := range r.missing {
		if _, ok := m[n]; !ok && !strings.HasPrefix(n, ownerHashSep) {
			m[n] = ""
		}
	}
	r.mu.Unlock()
	if len(m) == 0 {
		return "", fmt.Errorf("%w: %s %q names no node (legacy ID) and no node agent is known to ask (no plugin Pod in the cluster)", ErrUnavailable, kind, id)
	}
	nodes := make([]string, 0, len(m))
	for n := range m {
		nodes = append(nodes, n)
	}
	sort.Strings(nodes)
	var errs []error
	for _, n := range nodes {
		found := false
		err := r.call(ctx, n, "lookup", func(ctx context.Context, cc *grpc.ClientConn) error {
			var err error
			found, err = has(ctx, cc)
			if status.Code(err) == codes.NotFound {
				return nil
			}
			return err
		})
		if gone(err) {
			continue // answered: its pool went with it
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if found {
			r.mu.Lock()
			if len(r.legacy) >= maxLegacyCache {
				r.legacy = map[string]string{}
			}
			r.legacy[id] = n
			r.mu.Unlock()
			klog.FromContext(ctx).V(2).Info("Legacy ID found on a node", "id", id, "node", n)
			return n, nil
		}
	}
	if len(errs) > 0 {
		// Not found on the nodes that answered: it may be on one that
		// did not.
		return "", fmt.Errorf("%s %q names no node (legacy ID) and not every node answered: %w", kind, id, errors.Join(errs...))
	}
	return "", fmt.Errorf("%w: %s %q (legacy ID) is on no node", ErrNotFound, kind, id)
}

// forget drops a legacy ID from the cache once it is deleted.
func (r *Router) forget(id string) {
	r.mu.Lock()
	delete(r.legacy, id)
	r.mu.Unlock()
}

func (r *Router) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: r.opts.DriverName, VendorVersion: r.opts.Version}, nil
}

func (r *Router) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	svc := func(t csi.PluginCapability_Service_Type) *csi.PluginCapability {
		return &csi.PluginCapability{Type: &csi.PluginCapability_Service_{Service: &csi.PluginCapability_Service{Type: t}}}
	}
	return &csi.GetPluginCapabilitiesResponse{Capabilities: []*csi.PluginCapability{
		svc(csi.PluginCapability_Service_CONTROLLER_SERVICE),
		svc(csi.PluginCapability_Service_VOLUME_ACCESSIBILITY_CONSTRAINTS),
		svc(csi.PluginCapability_Service_SNAPSHOT_METADATA_SERVICE),
		svc(csi.PluginCapability_Service_GROUP_CONTROLLER_SERVICE),
		{Type: &csi.PluginCapability_VolumeExpansion_{VolumeExpansion: &csi.PluginCapability_VolumeExpansion{
			Type: csi.PluginCapability_VolumeExpansion_ONLINE}}},
	}}, nil
}

// Probe answers ready once the agents can be found (the static table, or
// the Kubernetes API answered). One node's agent being down is not the
// controller's unreadiness: calls for other nodes still work.
func (r *Router) Probe(ctx context.Context, _ *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	_, err := r.opts.Agents.Agents(ctx, false)
	if err != nil {
		klog.FromContext(ctx).V(2).Info("Not ready", "reason", err.Error())
	}
	return &csi.ProbeResponse{Ready: wrapperspb.Bool(err == nil)}, nil
}

func (r *Router) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	// The agents' list with qcow2 images. Expansion always: the image
	// grows on its node (through the open image when staged), and
	// NodeExpandVolume then grows the device and filesystem.
	return controllerCapabilities(true, true, r.opts.EnableGetSnapshot), nil
}

// HealthHandler serves /healthz (the process answers) and /readyz (as
// Probe) for the controller.
func (r *Router) HealthHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, req *http.Request) {
		if _, err := r.opts.Agents.Agents(req.Context(), false); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	return mux
}
