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

// NodeChecker is implemented by resolvers that can tell a node that left
// the cluster from one whose plugin is only missing for a while. The
// Router asks it before it takes a node without an agent for gone (and
// lets deletes of its IDs succeed); a resolver without it is taken at its
// word once RouterOptions.NodeGoneAfter has passed.
type NodeChecker interface {
	// NodeExists reports whether the cluster still has the node named
	// name or, when name is empty, a node whose name has the owner hash
	// hash (the IDs of nodes with long names). An error is "cannot tell".
	NodeExists(ctx context.Context, name, hash string) (bool, error)
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

// get GETs an API path with the service account token; any status other
// than 200 and 404 is an error, naming what.
func (k *KubeAgents) get(ctx context.Context, what, path string) (found bool, body []byte, err error) {
	token, err := os.ReadFile(k.TokenFile) // re-read: bound tokens rotate
	if err != nil {
		return false, nil, fmt.Errorf("agent lookup: service account token: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, k.APIServer+path, nil)
	if err != nil {
		return false, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+string(bytes.TrimSpace(token)))
	req.Header.Set("Accept", "application/json")
	resp, err := k.client.Do(req)
	if err != nil {
		return false, nil, fmt.Errorf("agent lookup: %s: %w", what, err)
	}
	defer resp.Body.Close()
	body, err = io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return false, nil, fmt.Errorf("agent lookup: %s: %w", what, err)
	}
	switch resp.StatusCode {
	case http.StatusOK:
		return true, body, nil
	case http.StatusNotFound:
		return false, nil, nil
	}
	return false, nil, fmt.Errorf("agent lookup: %s: %s: %s", what, resp.Status, bytes.TrimSpace(body))
}

// NodeExists asks the API server for the Node object: only a 404 (or, for
// a hash, a node list without a match) says the node is gone. A node
// without a plugin Pod is not gone: the DaemonSet may be being replaced.
func (k *KubeAgents) NodeExists(ctx context.Context, name, hash string) (bool, error) {
	if err := k.init(); err != nil {
		return false, err
	}
	if name != "" {
		found, _, err := k.get(ctx, "get node "+name, "/api/v1/nodes/"+url.PathEscape(name))
		return found, err
	}
	found, body, err := k.get(ctx, "list nodes", "/api/v1/nodes")
	if err == nil && !found {
		err = errors.New("agent lookup: list nodes: 404")
	}
	if err != nil {
		return false, err
	}
	var nl struct {
		Items []struct {
			Metadata struct {
				Name string `json:"name"`
			} `json:"metadata"`
		} `json:"items"`
	}
	if err := json.Unmarshal(body, &nl); err != nil {
		return false, fmt.Errorf("agent lookup: list nodes: %w", err)
	}
	for _, n := range nl.Items {
		if (owner{Hash: hash}).is(n.Metadata.Name) {
			return true, nil
		}
	}
	return false, nil
}

func (k *KubeAgents) list(ctx context.Context) (map[string]string, error) {
	what := fmt.Sprintf("list pods in %s with %q", k.Namespace, k.Selector)
	found, body, err := k.get(ctx, what, "/api/v1/namespaces/"+url.PathEscape(k.Namespace)+"/pods?labelSelector="+url.QueryEscape(k.Selector))
	if err == nil && !found {
		err = fmt.Errorf("agent lookup: %s: 404 (no namespace %s?)", what, k.Namespace)
	}
	if err != nil {
		return nil, err
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
