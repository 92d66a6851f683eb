package main

import (
	"bufio"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
	"github.com/qcow2-csi/qcow2-csi/pkg/driver/drivertest"
)

func TestParseReserve(t *testing.T) {
	tests := []struct {
		in      string
		bytes   int64
		percent float64
		err     bool
	}{
		{"0", 0, 0, false},
		{"10Gi", 10 << 30, 0, false},
		{"1073741824", 1 << 30, 0, false},
		{"5%", 0, 5, false},
		{"100%", 0, 100, false},
		{"101%", 0, 0, true},
		{"-1", 0, 0, true},
		{"10GB", 0, 0, true},
		{"", 0, 0, true},
	}
	for _, tc := range tests {
		b, p, err := parseReserve(tc.in)
		if b != tc.bytes || p != tc.percent || (err != nil) != tc.err {
			t.Errorf("parseReserve(%q) = %d, %g, %v", tc.in, b, p, err)
		}
	}
}

// TestServeNoFlags: the README's run command. With no flags serve prints
// where it serves; the socket answers CSI, here the whole controller path of
// a qcow2 volume; health and metrics answer when asked for.
func TestServeNoFlags(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	r, w := io.Pipe()
	done := make(chan error, 1)
	f := serveFlags{mode: "all", driverName: "qcow2.csi.qcow2-csi.io", attachBackend: "auto", capacityReserve: "0",
		defaultSz: "1Gi", controllerExpand: true}
	go func() { done <- serve(ctx, f, w); w.Close() }()
	line, err := bufio.NewReader(r).ReadString('\n')
	if err != nil {
		cancel()
		t.Fatalf("serve printed %q: %v (exit %v)", line, err, <-done)
	}
	go io.Copy(io.Discard, r)
	m := regexp.MustCompile(`serving mode all on (unix://(/\S+)/csi\.sock) \(node \S+, pool (\S+)\)`).FindStringSubmatch(line)
	if m == nil {
		cancel()
		t.Fatalf("serve printed %q", line)
	}
	tmp := m[2]
	defer os.RemoveAll(tmp)
	if m[3] != filepath.Join(tmp, "pool") {
		t.Errorf("pool %s is not in the temporary directory %s", m[3], tmp)
	}
	conn, err := grpc.NewClient(m[1], grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	cctx, ccancel := context.WithTimeout(ctx, 30*time.Second)
	defer ccancel()
	info, err := csi.NewIdentityClient(conn).GetPluginInfo(cctx, &csi.GetPluginInfoRequest{})
	if err != nil || info.Name != "qcow2.csi.qcow2-csi.io" || info.VendorVersion != version {
		t.Fatalf("GetPluginInfo = %v, %v", info, err)
	}
	cc := csi.NewControllerClient(conn)
	v, err := cc.CreateVolume(cctx, &csi.CreateVolumeRequest{Name: "pvc-1", CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 40},
		VolumeCapabilities: []*csi.VolumeCapability{{AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}}}}})
	if err != nil || v.Volume.CapacityBytes != 1<<40 {
		t.Fatalf("CreateVolume = %v, %v", v, err)
	}
	hdr := make([]byte, 4)
	// The pool names the image by the ID's local part, before @node/#hash.
	local, _, _ := strings.Cut(strings.Replace(v.Volume.VolumeId, "#", "@", 1), "@")
	fh, err := os.Open(filepath.Join(m[3], local+".qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	fh.Read(hdr)
	fh.Close()
	if string(hdr) != "QFI\xfb" {
		t.Fatalf("image starts %q, not the qcow2 magic", hdr)
	}
	// The ad hoc run confines node paths to the temporary directory.
	_, err = csi.NewNodeClient(conn).NodeStageVolume(cctx, &csi.NodeStageVolumeRequest{VolumeId: v.Volume.VolumeId, StagingTargetPath: "/etc/qcow2-csi-staging",
		VolumeCapability: &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}}}})
	if want := "is not below the kubelet directory " + os.TempDir(); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), want) {
		t.Errorf("NodeStageVolume at /etc: %v, want InvalidArgument saying %q", err, want)
	}
	if _, err := cc.DeleteVolume(cctx, &csi.DeleteVolumeRequest{VolumeId: v.Volume.VolumeId}); err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not stop")
	}
}

// TestServeTopologyFlags: node and controller modes refuse to start
// without what the agent connection needs (no plaintext TCP anywhere), and
// the controller owns no pool.
// A cache mode the fuse backend does not know stops the plugin before it
// serves anything, naming the flag.
func TestServeFuseCacheFlag(t *testing.T) {
	err := serve(context.Background(), serveFlags{fuseCache: "always"}, io.Discard)
	if err == nil || !strings.Contains(err.Error(), `--fuse-cache: nbdattach: fuse: cache mode "always"`) {
		t.Fatalf("serve --fuse-cache=always: %v, want a refusal naming the flag", err)
	}
}

func TestServeTopologyFlags(t *testing.T) {
	certs := drivertest.MakeCerts(t, t.TempDir())
	base := serveFlags{driverName: driver.DefaultDriverName, attachBackend: "auto", capacityReserve: "0", defaultSz: "1Gi",
		agentClientName: driver.DefaultAgentClientName, agentServerName: driver.DefaultAgentServerName, agentPort: 9821}
	tlsOf := func(f serveFlags, files driver.TLSFiles) serveFlags {
		f.tlsCA, f.tlsCert, f.tlsKey = files.CA, files.Cert, files.Key
		return f
	}
	for _, tc := range []struct {
		name string
		f    func(serveFlags) serveFlags
		want string
	}{
		{"node without agent", func(f serveFlags) serveFlags { f.mode = "node"; return f }, "--mode=node needs --agent-address"},
		{"node without TLS", func(f serveFlags) serveFlags { f.mode, f.agentAddress = "node", "127.0.0.1:0"; return f }, "--tls-ca --tls-cert --tls-key"},
		{"node with agents", func(f serveFlags) serveFlags { f.mode, f.agents = "all", agentList{"n=h:1"}; return f }, "are for --mode=controller"},
		{"controller without TLS", func(f serveFlags) serveFlags { f.mode, f.agents = "controller", agentList{"n=h:1"}; return f }, "mutual TLS only"},
		{"controller without agents", func(f serveFlags) serveFlags { f.mode = "controller"; return tlsOf(f, certs.Controller) }, "needs --agent-selector"},
		{"controller with a pool", func(f serveFlags) serveFlags {
			f.mode, f.pool, f.agents = "controller", "/tmp/x", agentList{"n=h:1"}
			return tlsOf(f, certs.Controller)
		}, "owns no pool"},
		{"controller with a bad agent", func(f serveFlags) serveFlags {
			f.mode, f.agents = "controller", agentList{"n=nowhere"}
			return tlsOf(f, certs.Controller)
		}, "want HOST:PORT"},
		// No plaintext TCP listener for the unauthenticated CSI services.
		{"controller on tcp", func(f serveFlags) serveFlags {
			f.mode, f.agents, f.endpoint = "controller", agentList{"n=h:1"}, "tcp://127.0.0.1:0"
			return tlsOf(f, certs.Controller)
		}, "plaintext TCP is not served"},
		{"all on tcp", func(f serveFlags) serveFlags {
			f.mode, f.pool, f.endpoint = "all", filepath.Join(t.TempDir(), "pool"), "tcp://127.0.0.1:0"
			return f
		}, "plaintext TCP is not served"},
	} {
		err := serve(context.Background(), tc.f(base), io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
}

// TestServeControllerAndNode: `serve --mode=node --agent-address` and
// `serve --mode=controller --agent NODE=ADDR` in one process: a volume
// created through the controller lands in the node's pool with the node's
// name in its ID.
func TestServeControllerAndNode(t *testing.T) {
	certs := drivertest.MakeCerts(t, t.TempDir())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	base := serveFlags{driverName: driver.DefaultDriverName, attachBackend: "auto", capacityReserve: "0", defaultSz: "1Gi",
		agentClientName: driver.DefaultAgentClientName, agentServerName: driver.DefaultAgentServerName, agentPort: 9821}
	start := func(f serveFlags) (lines <-chan string, done <-chan error) {
		r, w := io.Pipe()
		d, l := make(chan error, 1), make(chan string, 4)
		go func() { d <- serve(ctx, f, w); w.Close() }()
		go func() {
			s := bufio.NewScanner(r)
			for s.Scan() {
				l <- s.Text()
			}
			close(l)
		}()
		return l, d
	}
	node := base
	node.mode, node.nodeID, node.agentAddress = "node", "node-x", "127.0.0.1:0"
	node.tlsCA, node.tlsCert, node.tlsKey = certs.Agent.CA, certs.Agent.Cert, certs.Agent.Key
	nl, nd := start(node)
	agent := regexp.MustCompile(`node agent on (\S+) \(mutual TLS`).FindStringSubmatch(<-nl)
	pool := regexp.MustCompile(`serving mode node on \S+ \(node node-x, pool (\S+)\)`).FindStringSubmatch(<-nl)
	if agent == nil || pool == nil {
		t.Fatalf("node serve printed %v %v", agent, pool)
	}
	defer os.RemoveAll(filepath.Dir(pool[1]))
	ctl := base
	ctl.mode, ctl.agents = "controller", agentList{"node-x=" + agent[1]}
	ctl.tlsCA, ctl.tlsCert, ctl.tlsKey = certs.Controller.CA, certs.Controller.Cert, certs.Controller.Key
	cl, cd := start(ctl)
	ep := regexp.MustCompile(`serving mode controller on (unix://(\S+)/csi\.sock)`).FindStringSubmatch(<-cl)
	if ep == nil {
		t.Fatal("controller serve printed no endpoint")
	}
	defer os.RemoveAll(ep[2])
	conn, err := grpc.NewClient(ep[1], grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	cctx, ccancel := context.WithTimeout(ctx, 30*time.Second)
	defer ccancel()
	v, err := csi.NewControllerClient(conn).CreateVolume(cctx, &csi.CreateVolumeRequest{Name: "pvc-1",
		VolumeCapabilities: []*csi.VolumeCapability{{AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}}}}})
	if err != nil || !strings.HasSuffix(v.Volume.VolumeId, "@node-x") {
		t.Fatalf("CreateVolume through the controller: %v, %v", v, err)
	}
	local, _, _ := strings.Cut(v.Volume.VolumeId, "@")
	if _, err := os.Stat(filepath.Join(pool[1], local+".qcow2")); err != nil {
		t.Errorf("image not in the node's pool: %v", err)
	}
	cancel()
	for _, d := range []<-chan error{cd, nd} {
		if err := <-d; err != nil {
			t.Errorf("serve: %v", err)
		}
	}
}

// TestAwaitServers: serve's deferred cleanup (closing the images) must not
// run while any gRPC server may still run an RPC, so whatever ends the run,
// awaitServers cancels and then waits for every server to have stopped.
func TestAwaitServers(t *testing.T) {
	boom := errors.New("boom")
	for _, tc := range []struct {
		name string
		// end ends the run; first is the first server's done channel.
		end          func(cancel context.CancelFunc, errc, first chan<- error)
		firstStopped bool // end stopped the first server
		want         error
	}{
		{"context ends", func(cancel context.CancelFunc, _, _ chan<- error) { cancel() }, false, nil},
		{"a failure on errc", func(_ context.CancelFunc, errc, _ chan<- error) { errc <- boom }, false, boom},
		{"a server fails", func(_ context.CancelFunc, _, first chan<- error) { first <- boom }, true, boom},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			stopped := make(chan struct{})
			errc, first, second := make(chan error, 1), make(chan error, 1), make(chan error, 1)
			ret := make(chan error, 1)
			go func() { ret <- awaitServers(ctx, func() { close(stopped) }, errc, first, second) }()
			tc.end(cancel, errc, first)
			<-stopped
			if !tc.firstStopped {
				first <- nil
			}
			select {
			case err := <-ret:
				t.Fatalf("returned %v while the second server still runs", err)
			case <-time.After(50 * time.Millisecond):
			}
			second <- nil
			if err := <-ret; err != tc.want {
				t.Fatalf("awaitServers = %v, want %v", err, tc.want)
			}
		})
	}
}
