package drivertest

import (
	"context"
	"net"
	"net/http/httptest"
	"path/filepath"
	"testing"

	"k8s.io/klog/v2/ktesting"

	"github.com/qcow2-csi/qcow2-csi/pkg/driver"
)

// Agent is a node driver's agent listener on 127.0.0.1 (mutual TLS).
type Agent struct {
	Addr string
	stop context.CancelFunc
	done chan error
}

// StartAgent serves srv's driver as a node agent with the agent
// certificate of certs on a free port of 127.0.0.1, until the test ends or
// Stop is called.
func StartAgent(t testing.TB, srv *Server, certs Certs) *Agent {
	t.Helper()
	return StartAgentAt(t, srv, certs, "127.0.0.1:0")
}

// StartAgentAt is StartAgent on addr (a restarted agent's old address).
func StartAgentAt(t testing.TB, srv *Server, certs Certs, addr string) *Agent {
	t.Helper()
	cfg, err := driver.AgentServerTLS(certs.Agent, driver.DefaultAgentClientName)
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithCancel(ctx)
	a := &Agent{Addr: lis.Addr().String(), stop: cancel, done: make(chan error, 1)}
	go func() { a.done <- srv.Driver.ServeAgent(ctx, lis, cfg) }()
	t.Cleanup(func() { a.Stop(t) })
	return a
}

// Stop stops the agent listener (the node's driver keeps running). It is
// idempotent.
func (a *Agent) Stop(t testing.TB) {
	t.Helper()
	if a.stop == nil {
		return
	}
	a.stop()
	a.stop = nil
	if err := <-a.done; err != nil {
		t.Errorf("agent: %v", err)
	}
}

// Controller is a Router serving on a unix socket.
type Controller struct {
	Router   *driver.Router
	Endpoint string
	done     chan error
}

// Metrics is the Router's Prometheus text, as a scrape would read it.
func (c *Controller) Metrics() string {
	rec := httptest.NewRecorder()
	c.Router.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	return rec.Body.String()
}

// StartController serves a Router over agents with the controller
// certificate of certs (opts.Agents and opts.TLS are filled in when nil).
func StartController(t testing.TB, agents driver.StaticAgents, certs Certs, opts driver.RouterOptions) *Controller {
	t.Helper()
	if opts.Agents == nil {
		opts.Agents = agents
	}
	if opts.TLS == nil {
		cfg, err := driver.AgentClientTLS(certs.Controller, driver.DefaultAgentServerName)
		if err != nil {
			t.Fatal(err)
		}
		opts.TLS = cfg
	}
	r, err := driver.NewRouter(opts)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "controller.sock")
	lis, err := driver.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithCancel(ctx)
	c := &Controller{Router: r, Endpoint: "unix://" + sock, done: make(chan error, 1)}
	go func() { c.done <- r.Serve(ctx, lis) }()
	t.Cleanup(func() {
		cancel()
		if err := <-c.done; err != nil {
			t.Errorf("controller: %v", err)
		}
		_ = r.Close()
	})
	return c
}
