package driver_test

import (
	"context"
	"encoding/json"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
)

// The router's answers for nodes without an agent: unreachable, missing
// from the lookup for a while, gone from the cluster; and legacy and
// hashed IDs whose node cannot be asked.

// TestRouterNodeDown: a node whose agent is unreachable answers
// Unavailable naming it; the other node keeps working; the failures are
// counted. A node the cluster no longer has: its deletes succeed.
func TestRouterNodeDown(t *testing.T) {
	r := startRouted(t, driver.StaticAgents{"node-c": "127.0.0.1:1"}, "node-a", "node-b")
	ctx := context.Background()
	va, err := r.create(t, "pvc-a", "node-a", nil)
	if err != nil {
		t.Fatal(err)
	}
	r.agents["node-a"].Stop(t)
	_, err = r.create(t, "pvc-a2", "node-a", nil)
	wantCode(t, err, codes.Unavailable, "node node-a")
	_, err = r.c.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: va.Volume.VolumeId})
	wantCode(t, err, codes.Unavailable, "node node-a")
	_, err = r.c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: va.Volume.VolumeId})
	wantCode(t, err, codes.Unavailable, "node node-a") // it may come back: never "deleted" while it is known
	_, err = r.create(t, "pvc-c", "node-c", nil)
	wantCode(t, err, codes.Unavailable, "node node-c")
	if _, err := r.create(t, "pvc-b", "node-b", nil); err != nil {
		t.Fatalf("node-b while node-a is down: %v", err)
	}
	// Gone from the cluster (not in the table): deletes succeed, the rest
	// is NotFound.
	gone := "vol-0123456789abcdef0123456789abcdef@node-gone"
	if _, err := r.c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: gone}); err != nil {
		t.Errorf("DeleteVolume on a gone node: %v", err)
	}
	if _, err := r.c.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: "vol-0123456789abcdef0123456789abcdef@5@node-gone"}); err != nil {
		t.Errorf("DeleteSnapshot on a gone node: %v", err)
	}
	_, err = r.c.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: gone})
	wantCode(t, err, codes.NotFound, "node-gone")
	_, err = r.create(t, "pvc-gone", "node-gone", nil)
	wantCode(t, err, codes.Unavailable, "node node-gone has no agent")
	body := r.ctl.Metrics()
	for _, want := range []string{
		`qcow2_csi_agent_connection_errors_total{node="node-a"}`,
		`qcow2_csi_routed_calls_total{code="OK",method="CreateVolume",node="node-b"} 1`,
		`qcow2_csi_routed_call_seconds_count{method="CreateVolume",node="node-a"}`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
}

// agentTable is a resolver whose table a test changes.
type agentTable struct {
	mu sync.Mutex
	m  map[string]string
}

func (a *agentTable) Agents(context.Context, bool) (map[string]string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return maps.Clone(a.m), nil
}

// TestRouterNodeGoneAfter: a node that drops out of the agent lookup is
// not taken for gone at once (its plugin Pod may be being replaced):
// deletes answer Unavailable until NodeGoneAfter has passed.
func TestRouterNodeGoneAfter(t *testing.T) {
	r := startRouted(t, nil, "node-a")
	v, err := r.create(t, "pvc", "node-a", nil)
	if err != nil {
		t.Fatal(err)
	}
	table := &agentTable{m: map[string]string{"node-a": r.agents["node-a"].Addr}}
	ctl := drivertest.StartController(t, nil, r.certs, driver.RouterOptions{Agents: table, NodeGoneAfter: time.Hour})
	c := csi.NewControllerClient(dialConn(t, ctl.Endpoint))
	ctx := context.Background()
	if _, err := c.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: v.Volume.VolumeId}); err != nil {
		t.Fatal(err)
	}
	// The plugin Pod goes (agent stopped, out of the lookup): the call on
	// the open connection fails, the next one asks the lookup afresh.
	r.agents["node-a"].Stop(t)
	table.mu.Lock()
	delete(table.m, "node-a")
	table.mu.Unlock()
	_, err = c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.Volume.VolumeId})
	wantCode(t, err, codes.Unavailable, "node node-a")
	_, err = c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.Volume.VolumeId})
	wantCode(t, err, codes.Unavailable, "node node-a has no agent")
	if _, err := os.Stat(imageFile(r.nodes["node-a"].Driver.Options().Pool, v.Volume.VolumeId)); err != nil {
		t.Fatalf("image gone: %v", err)
	}
}

// checkedTable is an agentTable that also knows which Node objects the
// cluster has (driver.NodeChecker), as KubeAgents does.
type checkedTable struct {
	agentTable
	nodes map[string]bool // name -> the Node object exists
}

func (c *checkedTable) NodeExists(_ context.Context, name, hash string) (bool, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if name == "" {
		return false, errors.New("no hash lookup in this test")
	}
	return c.nodes[name], nil
}

// makeLegacy rewrites a volume's record in pool to its unqualified ID, as
// drivers before qualified IDs wrote it, and returns that ID.
func makeLegacy(t *testing.T, pool, id string) string {
	t.Helper()
	legacy := localID(id)
	meta := filepath.Join(pool, legacy+".json")
	b, err := os.ReadFile(meta)
	if err != nil {
		t.Fatal(err)
	}
	var rec map[string]any
	if err := json.Unmarshal(b, &rec); err != nil {
		t.Fatal(err)
	}
	rec["id"] = legacy
	b, _ = json.Marshal(rec)
	if err := os.WriteFile(meta, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return legacy
}

// TestRouterNoAgentsListed: with no agent listed at all (the DaemonSet
// recreated during an upgrade), a legacy ID is not "on no node": its delete
// answers Unavailable and the image stays, even with no grace at all. Once
// the agent is listed again the delete reaches it.
func TestRouterNoAgentsListed(t *testing.T) {
	r := startRouted(t, nil, "node-a")
	v, err := r.create(t, "pvc", "node-a", nil)
	if err != nil {
		t.Fatal(err)
	}
	pool := r.nodes["node-a"].Driver.Options().Pool
	legacy := makeLegacy(t, pool, v.Volume.VolumeId)
	table := &agentTable{m: map[string]string{}}
	ctl := drivertest.StartController(t, nil, r.certs, driver.RouterOptions{Agents: table})
	c := csi.NewControllerClient(dialConn(t, ctl.Endpoint))
	ctx := context.Background()
	_, err = c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: legacy})
	wantCode(t, err, codes.Unavailable, "no node agent is known")
	_, err = c.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: legacy + "@3"})
	wantCode(t, err, codes.Unavailable, "no node agent is known")
	if _, err := os.Stat(filepath.Join(pool, legacy+".qcow2")); err != nil {
		t.Fatalf("image gone while no agent was listed: %v", err)
	}
	table.mu.Lock()
	table.m["node-a"] = r.agents["node-a"].Addr
	table.mu.Unlock()
	if _, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: legacy}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(pool, legacy+".qcow2")); !os.IsNotExist(err) {
		t.Errorf("image still there after the delete: %v", err)
	}
}

// TestRouterLegacyNodeBetweenPods: a legacy ID whose node had an agent
// and drops out of the lookup is not "on no node" while the other nodes
// say they lack it: the node the router knew (connected to, or seen
// missing) is still asked (Unavailable).
func TestRouterLegacyNodeBetweenPods(t *testing.T) {
	r := startRouted(t, nil, "node-a", "node-b")
	v, err := r.create(t, "pvc", "node-a", nil)
	if err != nil {
		t.Fatal(err)
	}
	pool := r.nodes["node-a"].Driver.Options().Pool
	legacy := makeLegacy(t, pool, v.Volume.VolumeId)
	table := &agentTable{m: map[string]string{"node-a": r.agents["node-a"].Addr, "node-b": r.agents["node-b"].Addr}}
	ctl := drivertest.StartController(t, nil, r.certs, driver.RouterOptions{Agents: table, NodeGoneAfter: time.Hour})
	c := csi.NewControllerClient(dialConn(t, ctl.Endpoint))
	ctx := context.Background()
	if _, err := c.ListVolumes(ctx, &csi.ListVolumesRequest{}); err != nil { // connects to both
		t.Fatal(err)
	}
	r.agents["node-a"].Stop(t)
	table.mu.Lock()
	delete(table.m, "node-a")
	table.mu.Unlock()
	for range 2 {
		_, err = c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: legacy})
		wantCode(t, err, codes.Unavailable, "node node-a")
	}
	// A controller that never had a connection to node-a, but saw it
	// missing (a call for one of its qualified IDs), asks it too.
	fresh := drivertest.StartController(t, nil, r.certs, driver.RouterOptions{Agents: table, NodeGoneAfter: time.Hour})
	fc := csi.NewControllerClient(dialConn(t, fresh.Endpoint))
	_, err = fc.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: v.Volume.VolumeId})
	wantCode(t, err, codes.Unavailable, "node node-a has no agent")
	_, err = fc.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: legacy})
	wantCode(t, err, codes.Unavailable, "node node-a")
	if _, err := os.Stat(filepath.Join(pool, legacy+".qcow2")); err != nil {
		t.Fatalf("image gone: %v", err)
	}
}

// TestRouterHashedGoneAfter: a hashed ID (long node name) whose node drops
// out of the lookup gets the same grace as a named one: deletes answer
// Unavailable until NodeGoneAfter has passed, and succeed after it.
func TestRouterHashedGoneAfter(t *testing.T) {
	long := strings.Repeat("n", 80)
	r := startRouted(t, nil, long)
	v, err := r.create(t, "pvc", long, nil)
	if err != nil || !strings.Contains(v.GetVolume().GetVolumeId(), "#") {
		t.Fatalf("volume on a long-named node: %v %v", v, err)
	}
	id := v.Volume.VolumeId
	pool := r.nodes[long].Driver.Options().Pool
	for _, tc := range []struct {
		grace time.Duration
		code  codes.Code
	}{{time.Hour, codes.Unavailable}, {0, codes.OK}} {
		ctl := drivertest.StartController(t, nil, r.certs, driver.RouterOptions{Agents: &agentTable{m: map[string]string{}}, NodeGoneAfter: tc.grace})
		c := csi.NewControllerClient(dialConn(t, ctl.Endpoint))
		_, err := c.DeleteVolume(context.Background(), &csi.DeleteVolumeRequest{VolumeId: id})
		if tc.code == codes.OK {
			if err != nil {
				t.Errorf("grace %v: DeleteVolume: %v", tc.grace, err)
			}
			continue
		}
		wantCode(t, err, tc.code, "the node hashed")
		if _, err := os.Stat(imageFile(pool, id)); err != nil {
			t.Fatalf("grace %v: image gone: %v", tc.grace, err)
		}
	}
}

// TestRouterNodeObjectKept: past NodeGoneAfter, a node without an agent
// whose Node object the cluster still has is not gone (Unavailable); once
// the Node object is deleted, its IDs' deletes succeed.
func TestRouterNodeObjectKept(t *testing.T) {
	id := "vol-0123456789abcdef0123456789abcdef@node-x"
	table := &checkedTable{agentTable: agentTable{m: map[string]string{}}, nodes: map[string]bool{"node-x": true}}
	ctl := drivertest.StartController(t, nil, drivertest.MakeCerts(t, t.TempDir()), driver.RouterOptions{Agents: table})
	c := csi.NewControllerClient(dialConn(t, ctl.Endpoint))
	ctx := context.Background()
	_, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id})
	wantCode(t, err, codes.Unavailable, "its Node object still exists")
	table.mu.Lock()
	delete(table.nodes, "node-x")
	table.mu.Unlock()
	if _, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Errorf("DeleteVolume once the Node is gone: %v", err)
	}
	// A hashed owner the checker cannot tell about: Unavailable, saying so.
	_, err = c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: "vol-0123456789abcdef0123456789abcdef#0123456789abcdef"})
	wantCode(t, err, codes.Unavailable, "whether its Node still exists is unknown")
}
