package driver

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"time"
)

// The controller and the node agents authenticate each other with mutual
// TLS: one CA signs the agents' server certificate (DNS name
// DefaultAgentServerName, shared by every node: the controller dials pod
// IPs, so it checks this fixed name rather than an address) and the
// controller's client certificate (DefaultAgentClientName, as CN or DNS
// SAN). An agent refuses any client whose chain does not lead to the CA or
// whose certificate does not carry the controller's name, so that a
// certificate the same CA issued for something else opens nothing. There
// is no plaintext TCP listener anywhere.
const (
	DefaultAgentServerName = "qcow2-csi-agent"
	DefaultAgentClientName = "qcow2-csi-controller"
	DefaultAgentPort       = 9821
)

// TLSFiles are the PEM files of one end of the agent connection.
type TLSFiles struct {
	CA, Cert, Key string
}

func (f TLSFiles) check() error {
	var missing []string
	for _, x := range []struct{ flag, v string }{{"--tls-ca", f.CA}, {"--tls-cert", f.Cert}, {"--tls-key", f.Key}} {
		if x.v == "" {
			missing = append(missing, x.flag)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("the agent connection is mutual TLS only: %v missing", missing)
	}
	return nil
}

func loadCAPool(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("TLS CA: %w", err)
	}
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("TLS CA %s: no PEM certificate in it", path)
	}
	return p, nil
}

// keyPair serves a certificate and key from files, reloaded when either
// changes (cert-manager and the chart's Secret rotate them in place), so
// that a rotation needs no restart: connections made after it present the
// new pair.
type keyPair struct {
	cert, key string
	mu        sync.Mutex
	mtimes    [2]time.Time
	pair      *tls.Certificate
}

func newKeyPair(cert, key string) (*keyPair, error) {
	k := &keyPair{cert: cert, key: key}
	if _, err := k.get(); err != nil {
		return nil, err
	}
	return k, nil
}

func (k *keyPair) get() (*tls.Certificate, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	var now [2]time.Time
	for i, p := range []string{k.cert, k.key} {
		fi, err := os.Stat(p)
		if err != nil {
			if k.pair != nil {
				return k.pair, nil // mid-rotation: keep the last good pair
			}
			return nil, fmt.Errorf("TLS key pair: %w", err)
		}
		now[i] = fi.ModTime()
	}
	if k.pair != nil && now == k.mtimes {
		return k.pair, nil
	}
	pair, err := tls.LoadX509KeyPair(k.cert, k.key)
	if err != nil {
		if k.pair != nil {
			return k.pair, nil
		}
		return nil, fmt.Errorf("TLS key pair %s, %s: %w", k.cert, k.key, err)
	}
	k.pair, k.mtimes = &pair, now
	return k.pair, nil
}

// certHasName reports whether a certificate names name as its CN or a DNS
// SAN.
func certHasName(c *x509.Certificate, name string) bool {
	return c.Subject.CommonName == name || slices.Contains(c.DNSNames, name)
}

// load reads the CA and this side's key pair for a TLS configuration that
// checks the peer's name (what, for the error when it is empty).
func (f TLSFiles) load(what, peerName string) (*x509.CertPool, *keyPair, error) {
	if err := f.check(); err != nil {
		return nil, nil, err
	}
	if peerName == "" {
		return nil, nil, fmt.Errorf("%s is empty", what)
	}
	cas, err := loadCAPool(f.CA)
	if err != nil {
		return nil, nil, err
	}
	kp, err := newKeyPair(f.Cert, f.Key)
	if err != nil {
		return nil, nil, err
	}
	return cas, kp, nil
}

// errWrongPeer is a peer certificate that chains to the CA but is not
// issued to the expected name.
var errWrongPeer = errors.New("peer certificate is not issued to the expected name")

// AgentServerTLS is the TLS configuration of a node agent's listener:
// TLS 1.3, a client certificate signed by the CA required, and that
// certificate must carry clientName.
func AgentServerTLS(f TLSFiles, clientName string) (*tls.Config, error) {
	cas, kp, err := f.load("agent client name", clientName)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		ClientAuth: tls.RequireAndVerifyClientCert,
		ClientCAs:  cas,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return kp.get()
		},
		// Runs after the chain is verified against ClientCAs.
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 || !certHasName(cs.PeerCertificates[0], clientName) {
				return fmt.Errorf("%w: want %q", errWrongPeer, clientName)
			}
			return nil
		},
	}, nil
}

// AgentClientTLS is the TLS configuration the controller dials agents
// with: TLS 1.3, the agent's certificate verified against the CA for
// serverName, and the controller's own certificate presented.
func AgentClientTLS(f TLSFiles, serverName string) (*tls.Config, error) {
	cas, kp, err := f.load("agent server name", serverName)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		RootCAs:    cas,
		ServerName: serverName,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return kp.get()
		},
	}, nil
}
