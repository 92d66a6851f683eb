package e2e

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"net"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// inNetns runs f on a thread that has joined the network namespace at
// path; the thread is never handed back to the runtime (it exits with the
// goroutine), so no other goroutine runs in that namespace.
func inNetns(path string, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		ns, err := os.Open(path)
		if err != nil {
			errc <- err
			return
		}
		defer ns.Close()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", path, err)
			return
		}
		errc <- f()
	}()
	return <-errc
}

// http2Preface is what a gRPC client sends first: the connection preface
// and an empty SETTINGS frame. A gRPC server that accepted the TLS client
// answers with its own SETTINGS frame.
const http2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + "\x00\x00\x00\x04\x00\x00\x00\x00\x00"

// agentAnswers dials the agent at addr with cfg from the control plane's
// network namespace (where nothing of the cluster runs: what any pod could
// do), speaks the start of gRPC, and reports whether the agent answered.
// With TLS 1.3 a refused client certificate shows on the first read.
func (c *cluster) agentAnswers(addr string, cfg *tls.Config) error {
	return inNetns("/run/netns/"+c.netns, func() error {
		d := &net.Dialer{Timeout: 10 * time.Second}
		conn, err := tls.DialWithDialer(d, "tcp", addr, cfg)
		if err != nil {
			return err
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := conn.Write([]byte(http2Preface)); err != nil {
			return err
		}
		buf := make([]byte, 9)
		if _, err := conn.Read(buf); err != nil {
			return err
		}
		if buf[3] != 0x4 {
			return fmt.Errorf("first frame from the agent has type %d, want SETTINGS", buf[3])
		}
		return nil
	})
}

func (c *cluster) secretData(t *testing.T, name, key string) []byte {
	t.Helper()
	v := c.jsonpath(t, "secret", releaseNS, name, "{.data."+strings.ReplaceAll(key, ".", `\.`)+"}")
	b, err := base64.StdEncoding.DecodeString(v)
	if err != nil || len(b) == 0 {
		t.Fatalf("secret %s key %s: %v (%d bytes)", name, key, err, len(b))
	}
	return b
}

// Scenario 14: the agent endpoint is mutual TLS only. From the network a
// pod sees, a client with the controller's certificate is answered; a
// client without a certificate, one whose certificate carries the right
// name but another CA, and one speaking plaintext are refused. The agent's
// own certificate verifies against the CA for the name the controller
// checks.
func testAgentMutualTLS(t *testing.T, c *cluster) {
	pod := c.nodePluginPod(t, c.nodes[0].name)
	ip := c.jsonpath(t, "pod", releaseNS, pod, "{.status.podIP}")
	addr := net.JoinHostPort(ip, "9821")
	ca := x509.NewCertPool()
	if !ca.AppendCertsFromPEM(c.secretData(t, "qcow2-csi-agent-tls", "ca.crt")) {
		t.Fatal("ca.crt of the agent Secret holds no certificate")
	}
	ctl, err := tls.X509KeyPair(c.secretData(t, "qcow2-csi-controller-tls", "tls.crt"), c.secretData(t, "qcow2-csi-controller-tls", "tls.key"))
	if err != nil {
		t.Fatal(err)
	}
	// A look-alike: the controller's name, signed by the harness's own CA.
	if err := c.pki.issue("rogue-controller", "qcow2-csi-controller", nil, nil, []string{"qcow2-csi-controller"}); err != nil {
		t.Fatal(err)
	}
	rogue, err := tls.LoadX509KeyPair(c.pki.path("rogue-controller.crt"), c.pki.path("rogue-controller.key"))
	if err != nil {
		t.Fatal(err)
	}
	base := func(certs ...tls.Certificate) *tls.Config {
		return &tls.Config{RootCAs: ca, ServerName: "qcow2-csi-agent", Certificates: certs, NextProtos: []string{"h2"}}
	}
	if err := c.agentAnswers(addr, base(ctl)); err != nil {
		t.Fatalf("agent %s refuses the controller's certificate: %v", addr, err)
	}
	// Go's client sends no certificate whose issuer the server did not
	// name as acceptable: force the look-alike onto the wire.
	forced := base()
	forced.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &rogue, nil }
	for _, tc := range []struct {
		name string
		cfg  *tls.Config
	}{
		{"no client certificate", base()},
		{"client certificate of another CA", forced},
	} {
		err := c.agentAnswers(addr, tc.cfg)
		if err == nil {
			t.Errorf("%s: the agent answered", tc.name)
			continue
		}
		t.Logf("%s: refused: %v", tc.name, err)
	}
	plain := inNetns("/run/netns/"+c.netns, func() error {
		conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err != nil {
			return err
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		conn.Write([]byte(http2Preface))
		buf := make([]byte, 9)
		if _, err := conn.Read(buf); err != nil {
			return err
		}
		if buf[3] == 0x4 {
			return nil
		}
		return fmt.Errorf("not a SETTINGS frame: %q", buf)
	})
	if plain == nil {
		t.Errorf("the agent answered plaintext gRPC on %s", addr)
	}
	// A wrong server name fails on the client side: what the controller
	// checks is in the certificate.
	wrong := base(ctl)
	wrong.ServerName = "qcow2-csi-controller"
	if err := c.agentAnswers(addr, wrong); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("the agent's certificate is valid for qcow2-csi-controller too (or another error): %v", err)
	}
}
