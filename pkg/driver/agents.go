package driver

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// AgentResolver tells the controller where each node's agent listens.
type AgentResolver interface {
	// Agents maps node names to agent addresses (host:port). A node whose
	// agent exists but has no address yet (a Pod not yet running) maps to
	// "". refresh asks for a fresh answer instead of a cached one: the
	// Router asks so after a connection to an agent failed.
	Agents(ctx context.Context, refresh bool) (map[string]string, error)
}

// StaticAgents is a fixed node -> host:port table (serve --agent), for
// tests, csi-sanity and benchmarks.
type StaticAgents map[string]string

func (s StaticAgents) Agents(context.Context, bool) (map[string]string, error) {
	return maps.Clone(s), nil
}

// ParseStaticAgent reads one --agent NODE=HOST:PORT value.
func ParseStaticAgent(s string) (node, addr string, err error) {
	node, addr, ok := strings.Cut(s, "=")
	if !ok {
		return "", "", fmt.Errorf("--agent %q: want NODE=HOST:PORT", s)
	}
	if err := checkNodeName(node); err != nil {
		return "", "", fmt.Errorf("--agent %q: %w", s, err)
	}
	if _, port, err := net.SplitHostPort(addr); err != nil || port == "" {
		return "", "", fmt.Errorf("--agent %q: address %q: want HOST:PORT", s, addr)
	}
	return node, addr, nil
}

// KubeAgents finds agents through the Kubernetes API: the node plugin Pods
// matching Selector in Namespace, each on the node of its spec.nodeName at
// its status.podIP (the node's IP with hostNetwork) and Port. It uses the
// Pod's service account (in-cluster), with net/http only, and caches the
// answer for TTL.
type KubeAgents struct {
	Namespace, Selector string
	Port                int
	// TTL bounds the age of a cached answer (default 30 s).
	TTL time.Duration
	// APIServer, TokenFile, CAFile default to the in-cluster values
	// (KUBERNETES_SERVICE_HOST/PORT, the service account's mount).
	APIServer, TokenFile, CAFile string

	once    sync.Once
	initErr error
	client  *http.Client

	mu      sync.Mutex
	cached  map[string]string
	fetched time.Time
}

const serviceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// minRefresh keeps a burst of failed calls from turning into a burst of
// Pod listings.
const minRefresh = time.Second

func (k *KubeAgents) init() error {
	k.once.Do(func() {
		if k.TTL == 0 {
			k.TTL = 30 * time.Second
		}
		if k.TokenFile == "" {
			k.TokenFile = serviceAccountDir + "/token"
		}
		if k.CAFile == "" {
			k.CAFile = serviceAccountDir + "/ca.crt"
		}
		if k.APIServer == "" {
			host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
			if host == "" || port == "" {
				k.initErr = errors.New("agent lookup: not in a cluster (KUBERNETES_SERVICE_HOST/PORT unset); use --agent NODE=HOST:PORT")
				return
			}
			k.APIServer = "https://" + net.JoinHostPort(host, port)
		}
		ca, err := os.ReadFile(k.CAFile)
		if err != nil {
			k.initErr = fmt.Errorf("agent lookup: API server CA: %w", err)
			return
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(ca) {
			k.initErr = fmt.Errorf("agent lookup: API server CA %s: no PEM certificate", k.CAFile)
			return
		}
		k.client = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
		}}
	})
	return k.initErr
}

func (k *KubeAgents) Agents(ctx context.Context, refresh bool) (map[string]string, error) {
	if err := k.init(); err != nil {
		return nil, err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	age := time.Since(k.fetched)
	if k.cached != nil && age < k.TTL && (!refresh || age < minRefresh) {
		return maps.Clone(k.cached), nil
	}
	m, err := k.list(ctx)
	if err != nil {
		if k.cached != nil {
			// The API server is down, not the agents: keep routing with
			// what was known.
			return maps.Clone(k.cached), nil
		}
		return nil, err
	}
	k.cached, k.fetched = m, time.Now()
	return maps.Clone(m), nil
}

// podList is the part of a v1 PodList the lookup reads.
type podList struct {
	Items []struct {
		Metadata struct {
			Name              string  `json:"name"`
			DeletionTimestamp *string `json:"deletionTimestamp"`
		} `json:"metadata"`
		Spec struct {
			NodeName string `json:"nodeName"`
		} `json:"spec"`
		Status struct {
			Phase string `json:"phase"`
			PodIP string `json:"podIP"`
		} `json:"status"`
	} `json:"items"`
}

func (k *KubeAgents) list(ctx context.Context) (map[string]string, error) {
	token, err := os.ReadFile(k.TokenFile) // re-read: bound tokens rotate
	if err != nil {
		return nil, fmt.Errorf("agent lookup: service account token: %w", err)
	}
	u := k.APIServer + "/api/v1/namespaces/" + url.PathEscape(k.Namespace) + "/pods?labelSelector=" + url.QueryEscape(k.Selector)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+string(bytes.TrimSpace(token)))
	req.Header.Set("Accept", "application/json")
	resp, err := k.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("agent lookup: list pods: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("agent lookup: list pods: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("agent lookup: list pods in %s with %q: %s: %s", k.Namespace, k.Selector, resp.Status, bytes.TrimSpace(body))
	}
	var pl podList
	if err := json.Unmarshal(body, &pl); err != nil {
		return nil, fmt.Errorf("agent lookup: list pods: %w", err)
	}
	m := map[string]string{}
	port := strconv.Itoa(k.Port)
	for _, p := range pl.Items {
		n := p.Spec.NodeName
		if n == "" {
			continue // not scheduled yet
		}
		usable := p.Status.Phase == "Running" && p.Status.PodIP != "" && p.Metadata.DeletionTimestamp == nil
		if usable {
			m[n] = net.JoinHostPort(p.Status.PodIP, port)
		} else if _, seen := m[n]; !seen {
			// The node has its plugin Pod, not running yet: the node is
			// there, its agent is not reachable (Unavailable, not gone).
			m[n] = ""
		}
	}
	return m, nil
}
