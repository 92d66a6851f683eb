package driver_test

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
)

// TestAgentTLS: the agent answers only the controller's certificate.
// Without a client certificate, with one from another CA, and with one the
// CA issued to another name, the call is refused; the controller's works.
func TestAgentTLS(t *testing.T) {
	certs := drivertest.MakeCerts(t, t.TempDir())
	node := drivertest.Start(t, driver.Options{NodeID: "node-a"}, driver.Seams{Images: driver.Qcow2Images{}})
	agent := drivertest.StartAgent(t, node, certs)
	ca, err := os.ReadFile(certs.Agent.CA)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(ca)
	call := func(pair *driver.TLSFiles) error {
		cfg := &tls.Config{RootCAs: roots, ServerName: driver.DefaultAgentServerName, MinVersion: tls.VersionTLS13}
		if pair != nil {
			kp, err := tls.LoadX509KeyPair(pair.Cert, pair.Key)
			if err != nil {
				t.Fatal(err)
			}
			cfg.Certificates = []tls.Certificate{kp}
		}
		conn, err := grpc.NewClient(agent.Addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err = csi.NewControllerClient(conn).ControllerGetCapabilities(ctx, &csi.ControllerGetCapabilitiesRequest{})
		return err
	}
	for _, tc := range []struct {
		name string
		pair *driver.TLSFiles
	}{{"no certificate", nil}, {"another CA", &certs.OtherCA}, {"another name", &certs.WrongName}} {
		if err := call(tc.pair); status.Code(err) != codes.Unavailable {
			t.Errorf("%s: got %v, want the connection refused (Unavailable)", tc.name, err)
		}
	}
	if err := call(&certs.Controller); err != nil {
		t.Errorf("controller certificate: %v", err)
	}
	// Plaintext: refused too.
	conn, err := grpc.NewClient(agent.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := csi.NewIdentityClient(conn).GetPluginInfo(ctx, &csi.GetPluginInfoRequest{}); status.Code(err) != codes.Unavailable {
		t.Errorf("plaintext: got %v, want Unavailable", err)
	}
	// No agent without TLS files, or with a configuration that does not
	// verify clients.
	if _, err := driver.AgentServerTLS(driver.TLSFiles{CA: certs.Agent.CA, Cert: certs.Agent.Cert}, driver.DefaultAgentClientName); err == nil || !strings.Contains(err.Error(), "--tls-key") {
		t.Errorf("AgentServerTLS without a key: %v", err)
	}
	if _, err := node.Driver.AgentServer(&tls.Config{}); err == nil {
		t.Error("AgentServer accepted a TLS configuration without client verification")
	}
}

// routed is a controller in front of node drivers on qcow2 images.
type routed struct {
	nodes  map[string]*drivertest.Server
	agents map[string]*drivertest.Agent
	ctl    *drivertest.Controller
	certs  drivertest.Certs
	c      csi.ControllerClient
	md     csi.SnapshotMetadataClient
}

func startRouted(t *testing.T, extra driver.StaticAgents, nodes ...string) *routed {
	t.Helper()
	certs := drivertest.MakeCerts(t, t.TempDir())
	r := &routed{nodes: map[string]*drivertest.Server{}, agents: map[string]*drivertest.Agent{}, certs: certs}
	static := driver.StaticAgents{}
	for n, a := range extra {
		static[n] = a
	}
	for _, n := range nodes {
		r.nodes[n] = drivertest.Start(t, driver.Options{NodeID: n, ControllerExpand: true}, driver.Seams{Images: driver.Qcow2Images{}})
		r.agents[n] = drivertest.StartAgent(t, r.nodes[n], certs)
		static[n] = r.agents[n].Addr
	}
	r.ctl = drivertest.StartController(t, static, certs, driver.RouterOptions{})
	conn, err := grpc.NewClient(r.ctl.Endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	r.c, r.md = csi.NewControllerClient(conn), csi.NewSnapshotMetadataClient(conn)
	return r
}

func onNode(node string) *csi.TopologyRequirement {
	t := &csi.Topology{Segments: map[string]string{driver.DefaultDriverName + "/node": node}}
	return &csi.TopologyRequirement{Requisite: []*csi.Topology{t}, Preferred: []*csi.Topology{t}}
}

func (r *routed) create(t *testing.T, name, node string, src *csi.VolumeContentSource) (*csi.CreateVolumeResponse, error) {
	t.Helper()
	return r.c.CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csi.VolumeCapability{capBlock(rw)},
		CapacityRange: &csi.CapacityRange{RequiredBytes: 4 << 20}, AccessibilityRequirements: onNode(node), VolumeContentSource: src})
}

// TestRouterTwoNodes: volumes land in the selected node's pool and nowhere
// else; every call about them reaches that node; restore across nodes is
// refused naming both; lists cover both nodes once, page by page.
func TestRouterTwoNodes(t *testing.T) {
	r := startRouted(t, nil, "node-a", "node-b")
	ctx := context.Background()
	vols := map[string]string{}
	var routedMsgs []*csi.GetMetadataAllocatedResponse
	for _, n := range []string{"node-a", "node-b", "node-b"} {
		v, err := r.create(t, "pvc-"+n+"-"+string(rune('0'+len(vols))), n, nil)
		if err != nil {
			t.Fatal(err)
		}
		id := v.Volume.VolumeId
		vols[id] = n
		if !strings.HasSuffix(id, "@"+n) || v.Volume.AccessibleTopology[0].Segments[driver.DefaultDriverName+"/node"] != n {
			t.Fatalf("volume on %s: %v", n, v.Volume)
		}
		for other, srv := range r.nodes {
			_, err := os.Stat(imageFile(srv.Driver.Options().Pool, id))
			if (other == n) != (err == nil) {
				t.Errorf("volume %s of %s: image in %s's pool: %v", id, n, other, err)
			}
		}
	}
	var onB string
	for id, n := range vols {
		if n == "node-b" {
			onB = id
		}
	}
	// Volume calls reach the owner.
	if g, err := r.c.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: onB}); err != nil || g.Volume.VolumeId != onB {
		t.Fatalf("ControllerGetVolume: %v %v", g, err)
	}
	writeImage(t, imageFile(r.nodes["node-b"].Driver.Options().Pool, onB), rand.New(rand.NewSource(1)), make([]byte, snapDisk))
	s, err := r.c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-b", SourceVolumeId: onB})
	if err != nil || !strings.HasSuffix(s.Snapshot.SnapshotId, "@node-b") || s.Snapshot.SourceVolumeId != onB {
		t.Fatalf("CreateSnapshot: %v %v", s, err)
	}
	snapSrc := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: s.Snapshot.SnapshotId}}}
	_, err = r.create(t, "restore-a", "node-a", snapSrc)
	wantCode(t, err, codes.FailedPrecondition, "is on node node-b, the volume was requested on node node-a")
	volSrc := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: onB}}}
	_, err = r.create(t, "clone-a", "node-a", volSrc)
	wantCode(t, err, codes.FailedPrecondition, "is on node node-b")
	rb, err := r.create(t, "restore-b", "node-b", snapSrc)
	if err != nil || !strings.HasSuffix(rb.Volume.VolumeId, "@node-b") {
		t.Fatalf("restore on the snapshot's node: %v %v", rb, err)
	}
	vols[rb.Volume.VolumeId] = "node-b"
	if e, err := r.c.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: onB, CapacityRange: &csi.CapacityRange{RequiredBytes: 8 << 20}}); err != nil || e.CapacityBytes != 8<<20 {
		t.Fatalf("ControllerExpandVolume: %v %v", e, err)
	}
	// Streams pass through, message for message.
	direct := csi.NewSnapshotMetadataClient(dialConn(t, r.nodes["node-b"].Endpoint))
	for _, c := range []csi.SnapshotMetadataClient{r.md, direct} {
		st, err := c.GetMetadataAllocated(ctx, &csi.GetMetadataAllocatedRequest{SnapshotId: s.Snapshot.SnapshotId, MaxResults: 2})
		if err != nil {
			t.Fatal(err)
		}
		msgs := recvAll(t, st.Recv)
		if c == r.md {
			routedMsgs = msgs
		} else if len(msgs) < 2 || len(msgs) != len(routedMsgs) {
			t.Fatalf("GetMetadataAllocated: %d messages routed, %d direct", len(routedMsgs), len(msgs))
		} else {
			for i := range msgs {
				if !proto.Equal(msgs[i], routedMsgs[i]) {
					t.Fatalf("message %d: routed %v, direct %v", i, routedMsgs[i], msgs[i])
				}
			}
		}
	}
	// Unfiltered lists: every volume once, pages of one across nodes.
	seen := map[string]int{}
	for tok, pages := "", 0; ; pages++ {
		l, err := r.c.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: 1, StartingToken: tok})
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range l.Entries {
			seen[e.Volume.VolumeId]++
		}
		if tok = l.NextToken; tok == "" || pages > 10 {
			break
		}
	}
	if len(seen) != len(vols) {
		t.Errorf("listed %v, want %v", seen, vols)
	}
	for id, n := range seen {
		if n != 1 || vols[id] == "" {
			t.Errorf("volume %s listed %d times (known: %v)", id, n, vols[id] != "")
		}
	}
	_, err = r.c.ListVolumes(ctx, &csi.ListVolumesRequest{StartingToken: "next:vol-x"})
	wantCode(t, err, codes.Aborted, "was not issued by this driver")
	if l, err := r.c.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SourceVolumeId: onB}); err != nil || len(l.Entries) != 1 {
		t.Errorf("ListSnapshots of %s: %v %v", onB, l, err)
	}
	if l, err := r.c.ListSnapshots(ctx, &csi.ListSnapshotsRequest{}); err != nil || len(l.Entries) != 1 {
		t.Errorf("ListSnapshots: %v %v", l, err)
	}
	// Capacity: one node by topology, the sum without.
	ca, err := r.c.GetCapacity(ctx, &csi.GetCapacityRequest{AccessibleTopology: onNode("node-a").Requisite[0]})
	if err != nil || ca.AvailableCapacity <= 0 {
		t.Fatalf("GetCapacity node-a: %v %v", ca, err)
	}
	sum, err := r.c.GetCapacity(ctx, &csi.GetCapacityRequest{})
	if err != nil || sum.AvailableCapacity < ca.AvailableCapacity {
		t.Fatalf("GetCapacity: %v %v", sum, err)
	}
	// Without a node in the request and two nodes: refused, naming the key.
	_, err = r.c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "nowhere", VolumeCapabilities: []*csi.VolumeCapability{capBlock(rw)}})
	wantCode(t, err, codes.InvalidArgument, driver.DefaultDriverName+"/node")
	// The delta stream too: a second snapshot after new writes, compared
	// with the one from the node's own socket.
	writeImage(t, imageFile(r.nodes["node-b"].Driver.Options().Pool, onB), rand.New(rand.NewSource(2)), make([]byte, snapDisk))
	s2, err := r.c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-b2", SourceVolumeId: onB})
	if err != nil {
		t.Fatal(err)
	}
	delta := func(c csi.SnapshotMetadataClient) []*csi.GetMetadataDeltaResponse {
		st, err := c.GetMetadataDelta(ctx, &csi.GetMetadataDeltaRequest{BaseSnapshotId: s.Snapshot.SnapshotId, TargetSnapshotId: s2.Snapshot.SnapshotId, MaxResults: 2})
		if err != nil {
			t.Fatal(err)
		}
		return recvAll(t, st.Recv)
	}
	if routed, direct := delta(r.md), delta(direct); len(direct) < 2 || len(routed) != len(direct) {
		t.Fatalf("GetMetadataDelta: %d messages routed, %d direct", len(routed), len(direct))
	} else {
		for i := range direct {
			if !proto.Equal(routed[i], direct[i]) {
				t.Fatalf("delta message %d: routed %v, direct %v", i, routed[i], direct[i])
			}
		}
	}
	// Deletes reach the owner.
	for _, id := range []string{s2.Snapshot.SnapshotId, s.Snapshot.SnapshotId} {
		if _, err := r.c.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id}); err != nil {
			t.Fatal(err)
		}
	}
	for id, n := range vols {
		if _, err := r.c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatalf("DeleteVolume %s: %v", id, err)
		}
		if _, err := os.Stat(imageFile(r.nodes[n].Driver.Options().Pool, id)); !os.IsNotExist(err) {
			t.Errorf("image of %s still there: %v", id, err)
		}
	}
}

// recvAll reads a stream to its end.
func recvAll[M any](t *testing.T, recv func() (M, error)) []M {
	t.Helper()
	var msgs []M
	for {
		m, err := recv()
		if err == io.EOF {
			return msgs
		}
		if err != nil {
			t.Fatal(err)
		}
		msgs = append(msgs, m)
	}
}

// TestRouterListSnapshotsPaging: unfiltered ListSnapshots in pages of one
// lists the snapshots of every node once; when a node drops out of the
// agent table between pages (its token's node left), the listing goes on
// with the next node, repeating nothing.
func TestRouterListSnapshotsPaging(t *testing.T) {
	r := startRouted(t, nil, "node-a", "node-b", "node-c")
	ctx := context.Background()
	owner := map[string]string{} // snapshot ID -> node
	for i, n := range []string{"node-a", "node-a", "node-b", "node-b", "node-c"} {
		v, err := r.create(t, fmt.Sprintf("pvc-%d", i), n, nil)
		if err != nil {
			t.Fatal(err)
		}
		sn, err := r.c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: fmt.Sprintf("snap-%d", i), SourceVolumeId: v.Volume.VolumeId})
		if err != nil {
			t.Fatal(err)
		}
		owner[sn.Snapshot.SnapshotId] = n
	}
	table := &agentTable{m: map[string]string{}}
	for n, a := range r.agents {
		table.m[n] = a.Addr
	}
	ctl := drivertest.StartController(t, nil, r.certs, driver.RouterOptions{Agents: table})
	c := csi.NewControllerClient(dialConn(t, ctl.Endpoint))
	// list pages through, calling between(page) after each page; it
	// returns how often each snapshot was listed.
	list := func(between func(page int)) map[string]int {
		seen := map[string]int{}
		tok := ""
		for page := 0; ; page++ {
			if page > 20 {
				t.Fatal("the listing does not end")
			}
			l, err := c.ListSnapshots(ctx, &csi.ListSnapshotsRequest{MaxEntries: 1, StartingToken: tok})
			if err != nil {
				t.Fatalf("page %d: %v", page, err)
			}
			if len(l.Entries) > 1 {
				t.Fatalf("page %d: %d entries, max_entries 1", page, len(l.Entries))
			}
			for _, e := range l.Entries {
				seen[e.Snapshot.SnapshotId]++
			}
			if tok = l.NextToken; tok == "" {
				return seen
			}
			between(page)
		}
	}
	seen := list(func(int) {})
	if len(seen) != len(owner) {
		t.Errorf("listed %v, want %v", seen, owner)
	}
	for id, k := range seen {
		if k != 1 || owner[id] == "" {
			t.Errorf("snapshot %s listed %d times (known: %v)", id, k, owner[id] != "")
		}
	}
	// Drop node-b after the third page: node-a's two and node-b's first
	// were listed; the token names node-b inside its own listing.
	seen = list(func(page int) {
		if page == 2 {
			table.mu.Lock()
			delete(table.m, "node-b")
			table.mu.Unlock()
		}
	})
	byNode := map[string]int{}
	for id, k := range seen {
		if k != 1 {
			t.Errorf("snapshot %s listed %d times", id, k)
		}
		byNode[owner[id]] += k
	}
	if byNode["node-a"] != 2 || byNode["node-b"] != 1 || byNode["node-c"] != 1 || len(byNode) != 3 {
		t.Errorf("listed per node %v, want node-a 2, node-b 1 (before it left), node-c 1", byNode)
	}
}

// TestRouterAgentMoved: when a node's plugin Pod comes back at another
// address, the call that finds the old one dead is made again at the new
// one: the caller sees no error.
func TestRouterAgentMoved(t *testing.T) {
	r := startRouted(t, nil, "node-a")
	v, err := r.create(t, "pvc", "node-a", nil)
	if err != nil {
		t.Fatal(err)
	}
	table := &agentTable{m: map[string]string{"node-a": r.agents["node-a"].Addr}}
	ctl := drivertest.StartController(t, nil, r.certs, driver.RouterOptions{Agents: table})
	c := csi.NewControllerClient(dialConn(t, ctl.Endpoint))
	get := &csi.ControllerGetVolumeRequest{VolumeId: v.Volume.VolumeId}
	if _, err := c.ControllerGetVolume(context.Background(), get); err != nil {
		t.Fatal(err)
	}
	moved := drivertest.StartAgent(t, r.nodes["node-a"], r.certs)
	r.agents["node-a"].Stop(t)
	table.mu.Lock()
	table.m["node-a"] = moved.Addr
	table.mu.Unlock()
	if _, err := c.ControllerGetVolume(context.Background(), get); err != nil {
		t.Fatalf("after the agent moved: %v", err)
	}
	if want := `qcow2_csi_agent_connection_errors_total{node="node-a"} 1`; !strings.Contains(ctl.Metrics(), want) {
		t.Errorf("metrics lack %s", want)
	}
}

// TestRouterAgentRestarted: a plugin that comes back at the same address
// (hostNetwork) is reached by the next call, not after the connection's
// reconnect backoff.
func TestRouterAgentRestarted(t *testing.T) {
	r := startRouted(t, nil, "node-a")
	v, err := r.create(t, "pvc", "node-a", nil)
	if err != nil {
		t.Fatal(err)
	}
	get := &csi.ControllerGetVolumeRequest{VolumeId: v.Volume.VolumeId}
	addr := r.agents["node-a"].Addr
	r.agents["node-a"].Stop(t)
	for range 3 { // a few failures: the backoff grows
		_, err := r.c.ControllerGetVolume(context.Background(), get)
		wantCode(t, err, codes.Unavailable, "node node-a")
	}
	drivertest.StartAgentAt(t, r.nodes["node-a"], r.certs, addr)
	if _, err := r.c.ControllerGetVolume(context.Background(), get); err != nil {
		t.Fatalf("first call after the agent came back: %v", err)
	}
}

// TestRouterLegacyAndHashedIDs: a legacy ID (no node in it) is found on
// the node that has it; a node whose name is too long for the snapshot ID
// budget issues hashed IDs, which the controller resolves by hashing the
// names it knows.
func TestRouterLegacyAndHashedIDs(t *testing.T) {
	long := strings.Repeat("n", 80)
	r := startRouted(t, nil, "node-a", long)
	ctx := context.Background()
	// Make a legacy volume in node-a's pool: a volume whose record has the
	// unqualified ID, as drivers before this format wrote it.
	v, err := r.create(t, "legacy", "node-a", nil)
	if err != nil {
		t.Fatal(err)
	}
	pool := r.nodes["node-a"].Driver.Options().Pool
	legacy := makeLegacy(t, pool, v.Volume.VolumeId)
	g, err := r.c.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: legacy})
	if err != nil || g.Volume.VolumeId != legacy {
		t.Fatalf("legacy ControllerGetVolume: %v %v", g, err)
	}
	s, err := r.c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "legacy-snap", SourceVolumeId: legacy})
	if err != nil || strings.Count(s.Snapshot.SnapshotId, "@") != 1 {
		t.Fatalf("snapshot of a legacy volume: %v %v", s, err)
	}
	if _, err := r.c.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: s.Snapshot.SnapshotId}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: legacy}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(pool, legacy+".qcow2")); !os.IsNotExist(err) {
		t.Errorf("legacy image still there: %v", err)
	}
	_, err = r.c.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: "vol-nowhere"})
	wantCode(t, err, codes.NotFound, "legacy")
	// Hashed.
	h, err := r.create(t, "hashed", long, nil)
	if err != nil || !strings.Contains(h.Volume.VolumeId, "#") || len(h.Volume.VolumeId) > 128 {
		t.Fatalf("volume on a long-named node: %v %v", h, err)
	}
	hs, err := r.c.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "hashed-snap", SourceVolumeId: h.Volume.VolumeId})
	if err != nil || !strings.HasSuffix(hs.Snapshot.SnapshotId, h.Volume.VolumeId[strings.Index(h.Volume.VolumeId, "#"):]) {
		t.Fatalf("snapshot on a long-named node: %v %v", hs, err)
	}
	if _, err := r.c.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: hs.Snapshot.SnapshotId}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: h.Volume.VolumeId}); err != nil {
		t.Fatal(err)
	}
	// A node refuses another node's ID, naming both.
	c := dial(t, r.nodes["node-a"])
	_, err = c.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: h.Volume.VolumeId})
	wantCode(t, err, codes.NotFound, "this is node node-a")
}

// TestKubeAgents: the Kubernetes lookup lists the plugin Pods with the
// service account token and maps running Pods' nodes to their IPs; a Pod
// not running marks its node as present but unreachable.
func TestKubeAgents(t *testing.T) {
	pods := `{"items":[
	 {"metadata":{"name":"p1"},"spec":{"nodeName":"node-a"},"status":{"phase":"Running","podIP":"192.0.2.1"}},
	 {"metadata":{"name":"p2"},"spec":{"nodeName":"node-b"},"status":{"phase":"Pending"}},
	 {"metadata":{"name":"p3","deletionTimestamp":"2026-12-02T00:00:00Z"},"spec":{"nodeName":"node-c"},"status":{"phase":"Running","podIP":"192.0.2.3"}},
	 {"metadata":{"name":"p4"},"spec":{"nodeName":"node-c"},"status":{"phase":"Running","podIP":"192.0.2.4"}},
	 {"metadata":{"name":"p5"},"spec":{},"status":{"phase":"Pending"}}]}`
	var got *http.Request
	calls := 0
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got, calls = r, calls+1
		if r.Header.Get("Authorization") != "Bearer tok" {
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		io.WriteString(w, pods)
	}))
	defer srv.Close()
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.crt")
	if err := os.WriteFile(ca, pemCert(srv.Certificate().Raw), 0o600); err != nil {
		t.Fatal(err)
	}
	token := filepath.Join(dir, "token")
	os.WriteFile(token, []byte("tok\n"), 0o600)
	k := &driver.KubeAgents{Namespace: "kube-system", Selector: "app=qcow2-csi-node", Port: 9821, APIServer: srv.URL, TokenFile: token, CAFile: ca, TTL: time.Hour}
	m, err := k.Agents(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"node-a": "192.0.2.1:9821", "node-b": "", "node-c": "192.0.2.4:9821"}
	if len(m) != len(want) || m["node-a"] != want["node-a"] || m["node-b"] != "" || m["node-c"] != want["node-c"] {
		t.Errorf("agents %v, want %v", m, want)
	}
	if got.URL.Path != "/api/v1/namespaces/kube-system/pods" || got.URL.Query().Get("labelSelector") != "app=qcow2-csi-node" {
		t.Errorf("asked %s", got.URL)
	}
	k.Agents(context.Background(), false) // cached
	if calls != 1 {
		t.Errorf("%d lookups, want 1 (cached)", calls)
	}
	os.WriteFile(token, []byte("wrong"), 0o600)
	k2 := &driver.KubeAgents{Namespace: "ns", Selector: "x", Port: 1, APIServer: srv.URL, TokenFile: token, CAFile: ca}
	if _, err := k2.Agents(context.Background(), false); err == nil || !strings.Contains(err.Error(), "401") {
		t.Errorf("unauthorized lookup: %v", err)
	}
}

// TestKubeAgentsNodeExists: a node is gone only when the API server says
// its Node object is (404); any other answer is "cannot tell". A hashed
// owner is matched against the names in the node list.
func TestKubeAgentsNodeExists(t *testing.T) {
	long := strings.Repeat("n", 80)
	var paths []string
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		paths = append(paths, r.URL.Path)
		switch r.URL.Path {
		case "/api/v1/nodes/node-a":
			io.WriteString(w, `{"metadata":{"name":"node-a"}}`)
		case "/api/v1/nodes/node-forbidden":
			http.Error(w, "forbidden", http.StatusForbidden)
		case "/api/v1/nodes":
			io.WriteString(w, `{"items":[{"metadata":{"name":"node-a"}},{"metadata":{"name":"`+long+`"}}]}`)
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.crt")
	token := filepath.Join(dir, "token")
	if err := os.WriteFile(ca, pemCert(srv.Certificate().Raw), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(token, []byte("tok"), 0o600); err != nil {
		t.Fatal(err)
	}
	k := &driver.KubeAgents{Namespace: "ns", Selector: "x", Port: 1, APIServer: srv.URL, TokenFile: token, CAFile: ca}
	var _ driver.NodeChecker = k
	ctx := context.Background()
	if ok, err := k.NodeExists(ctx, "node-a", ""); !ok || err != nil {
		t.Errorf("node-a: %v %v, want it there", ok, err)
	}
	if ok, err := k.NodeExists(ctx, "node-gone", ""); ok || err != nil {
		t.Errorf("node-gone: %v %v, want it gone", ok, err)
	}
	if _, err := k.NodeExists(ctx, "node-forbidden", ""); err == nil || !strings.Contains(err.Error(), "403") {
		t.Errorf("node-forbidden: %v, want the 403 as an error", err)
	}
	// The owner hash of a long name: the start of its SHA-256 (ids.go).
	sum := sha256.Sum256([]byte(long))
	if ok, err := k.NodeExists(ctx, "", hex.EncodeToString(sum[:8])); !ok || err != nil {
		t.Errorf("hash of a listed node: %v %v, want it there", ok, err)
	}
	if ok, err := k.NodeExists(ctx, "", "0123456789abcdef"); ok || err != nil {
		t.Errorf("hash of no node: %v %v, want it gone", ok, err)
	}
	if want := "/api/v1/nodes/node-a"; len(paths) == 0 || paths[0] != want {
		t.Errorf("asked %v, want %s first", paths, want)
	}
}

func dialConn(t testing.TB, endpoint string) *grpc.ClientConn {
	conn, err := grpc.NewClient(endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func pemCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// slowAgent answers ControllerGetVolume with DeadlineExceeded, as an agent
// that hangs past its caller's deadline does.
type slowAgent struct {
	csi.UnimplementedControllerServer
}

func (slowAgent) ControllerGetVolume(context.Context, *csi.ControllerGetVolumeRequest) (*csi.ControllerGetVolumeResponse, error) {
	return nil, status.Error(codes.DeadlineExceeded, "too slow")
}

// TestRouterAgentDeadline: a DeadlineExceeded from an agent names its node
// and counts as a connection error, like Unavailable.
func TestRouterAgentDeadline(t *testing.T) {
	certs := drivertest.MakeCerts(t, t.TempDir())
	cfg, err := driver.AgentServerTLS(certs.Agent, driver.DefaultAgentClientName)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(cfg)))
	csi.RegisterControllerServer(srv, slowAgent{})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	defer srv.Stop()
	ctl := drivertest.StartController(t, driver.StaticAgents{"node-a": lis.Addr().String()}, certs, driver.RouterOptions{})
	c := csi.NewControllerClient(dialConn(t, ctl.Endpoint))
	_, err = c.ControllerGetVolume(context.Background(), &csi.ControllerGetVolumeRequest{VolumeId: "vol-0123456789abcdef0123456789abcdef@node-a"})
	wantCode(t, err, codes.DeadlineExceeded, "node node-a (agent "+lis.Addr().String()+"): too slow: context deadline exceeded")
	if want := `qcow2_csi_agent_connection_errors_total{node="node-a"} 1`; !strings.Contains(ctl.Metrics(), want) {
		t.Errorf("metrics lack %s", want)
	}
}
