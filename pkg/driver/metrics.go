package driver

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc/codes"
)

const metricsNamespace = "qcow2_csi"

// metrics are the driver's Prometheus metrics, in a registry of its own so
// that several drivers (tests) never collide.
type metrics struct {
	reg     *prometheus.Registry
	ops     *prometheus.CounterVec
	latency *prometheus.HistogramVec
	// groupHold: how long a node held its members' I/O for one group
	// snapshot; groupAborts: group snapshots given up, by reason
	// (group.go on a node, group_coord.go where the protocol is run).
	groupHold   prometheus.Histogram
	groupAborts *prometheus.CounterVec
}

func newMetrics(d *Driver) *metrics {
	m := newRPCMetrics()
	// Only a node holds I/O; the router's registry has no hold figure.
	m.reg.MustRegister(&poolCollector{d: d}, &qosCollector{d: d}, m.groupHold)
	return m
}

// newRPCMetrics are the metrics of any served process: RPCs by method and
// code, latency, and the Go runtime's.
func newRPCMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "operations_total",
			Help: "CSI RPCs handled, by method and gRPC status code.",
		}, []string{"method", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metricsNamespace, Name: "operation_duration_seconds",
			Help:    "CSI RPC latency, by method.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10), // 0.5 ms .. ~131 s
		}, []string{"method"}),
	}
	m.groupHold = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: metricsNamespace, Name: "group_snapshot_hold_seconds",
		Help:    "How long this node held the I/O of its staged members for one group snapshot (from the prepare to the release).",
		Buckets: prometheus.ExponentialBuckets(0.001, 2, 15), // 1 ms .. ~16 s
	})
	m.groupAborts = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: metricsNamespace, Name: "group_snapshot_aborts_total",
		Help: "Group snapshots aborted, by reason: prepare_failed, prepare_timeout, commit_refused, commit_failed (where the protocol runs), node_deadline (a node released its hold on its own).",
	}, []string{"reason"})
	m.reg.MustRegister(m.ops, m.latency, m.groupAborts,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

func (m *metrics) observe(method string, code codes.Code, took time.Duration) {
	m.ops.WithLabelValues(method, code.String()).Inc()
	m.latency.WithLabelValues(method).Observe(took.Seconds())
}

// MetricsHandler serves the driver's metrics in the Prometheus format.
func (d *Driver) MetricsHandler() http.Handler {
	return d.metrics.handler()
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// poolCollector reads the pool at scrape time, so the figures are never
// stale and cost nothing between scrapes.
type poolCollector struct{ d *Driver }

var (
	descPoolSize = prometheus.NewDesc(metricsNamespace+"_pool_size_bytes",
		"Size of the filesystem holding the pool.", nil, nil)
	descPoolAvail = prometheus.NewDesc(metricsNamespace+"_pool_available_bytes",
		"Bytes CreateVolume may still use: free space minus the reserve (GetCapacity).", nil, nil)
	descPoolAlloc = prometheus.NewDesc(metricsNamespace+"_pool_allocated_bytes",
		"Bytes the pool's images occupy on disk.", nil, nil)
	descPoolProv = prometheus.NewDesc(metricsNamespace+"_pool_provisioned_bytes",
		"Sum of the virtual sizes of the pool's volumes.", nil, nil)
	descVolumes = prometheus.NewDesc(metricsNamespace+"_pool_volumes",
		"Volumes in the pool.", nil, nil)
	descAttached = prometheus.NewDesc(metricsNamespace+"_attached_volumes",
		"Volumes staged on this node with a live device.", nil, nil)
)

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descPoolSize, descPoolAvail, descPoolAlloc, descPoolProv, descVolumes, descAttached,
		descPoolFree, descPoolUsed, descPoolReserve, descPoolReserved, descPoolLimit, descPoolNearlyFull, descPoolFull} {
		ch <- d
	}
}

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	d := c.d
	if total, _, err := d.pool.space(); err == nil {
		ch <- prometheus.MustNewConstMetric(descPoolSize, prometheus.GaugeValue, float64(total))
	}
	if s, err := d.poolSpace(); err == nil {
		ch <- prometheus.MustNewConstMetric(descPoolAvail, prometheus.GaugeValue, float64(max(s.free-s.reserve, 0)))
		c.collectSpace(ch, s)
	}
	if ids, err := d.pool.list(); err == nil {
		var alloc, prov int64
		n := 0
		for _, id := range ids {
			m, err := d.pool.getFile(id)
			if err != nil {
				continue
			}
			n++
			prov += m.Capacity
			if a, err := allocatedBytes(d.pool.imagePath(id)); err == nil {
				alloc += a
			}
		}
		ch <- prometheus.MustNewConstMetric(descPoolAlloc, prometheus.GaugeValue, float64(alloc))
		ch <- prometheus.MustNewConstMetric(descPoolProv, prometheus.GaugeValue, float64(prov))
		ch <- prometheus.MustNewConstMetric(descVolumes, prometheus.GaugeValue, float64(n))
	}
	ch <- prometheus.MustNewConstMetric(descAttached, prometheus.GaugeValue, float64(d.attachedCount()))
}

// Space gauges (space.go): enough to alert before the pool fills, on the
// pool's own figures or on the driver's judgement (nearly_full, full).
var (
	descPoolFree = prometheus.NewDesc(metricsNamespace+"_pool_free_bytes",
		"Free bytes of the filesystem holding the pool (statfs f_bavail).", nil, nil)
	descPoolUsed = prometheus.NewDesc(metricsNamespace+"_pool_used_bytes",
		"Used bytes of the filesystem holding the pool: size minus free.", nil, nil)
	descPoolReserve = prometheus.NewDesc(metricsNamespace+"_pool_reserve_bytes",
		"Bytes CreateVolume leaves free for thin volumes to grow into (--capacity-reserve).", nil, nil)
	descPoolReserved = prometheus.NewDesc(metricsNamespace+"_pool_reserved_bytes",
		"Bytes claimed by creates in flight and not yet allocated.", nil, nil)
	descPoolLimit = prometheus.NewDesc(metricsNamespace+"_pool_provisioned_limit_bytes",
		"Most the volumes' virtual sizes may add up to (--overcommit-ratio times the pool after the reserve); absent without a limit.", nil, nil)
	descPoolNearlyFull = prometheus.NewDesc(metricsNamespace+"_pool_nearly_full",
		"1 when the pool is above --pool-warning-percent or full: volume conditions are abnormal.", nil, nil)
	descPoolFull = prometheus.NewDesc(metricsNamespace+"_pool_full",
		"1 when the pool cannot hold one more image's metadata: thin volumes' writes fail, /readyz answers 503.", nil, nil)
)

func (c *poolCollector) collectSpace(ch chan<- prometheus.Metric, s *poolSpace) {
	gauge := func(d *prometheus.Desc, v int64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, float64(v))
	}
	gauge(descPoolFree, s.free)
	gauge(descPoolUsed, s.size-s.free)
	gauge(descPoolReserve, s.reserve)
	gauge(descPoolReserved, s.heldDisk)
	if s.limit > 0 {
		gauge(descPoolLimit, s.limit)
	}
	lvl, _ := c.d.spaceState()
	flag := func(d *prometheus.Desc, on bool) {
		if on {
			gauge(d, 1)
		} else {
			gauge(d, 0)
		}
	}
	flag(descPoolNearlyFull, lvl >= spaceLow)
	flag(descPoolFull, lvl == spaceFull)
}

// routerMetrics are the controller's (router.go): each call it passes to an
// agent, by node, and the failures to reach one.
type routerMetrics struct {
	*metrics
	routed     *prometheus.CounterVec
	routedTime *prometheus.HistogramVec
	connErrors *prometheus.CounterVec
}

func newRouterMetrics() *routerMetrics {
	m := &routerMetrics{
		metrics: newRPCMetrics(),
		routed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "routed_calls_total",
			Help: "Calls the controller passed to a node agent, by node, method and gRPC status code.",
		}, []string{"node", "method", "code"}),
		routedTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metricsNamespace, Name: "routed_call_seconds",
			Help:    "Latency of the calls the controller passed to a node agent, by node and method (streams: until the last message).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10),
		}, []string{"node", "method"}),
		connErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "agent_connection_errors_total",
			Help: "Calls that could not reach a node's agent (no address, connection refused or lost, TLS refused), by node.",
		}, []string{"node"}),
	}
	m.reg.MustRegister(m.routed, m.routedTime, m.connErrors)
	return m
}

func (m *routerMetrics) observeRouted(node, method string, code codes.Code, took time.Duration) {
	m.routed.WithLabelValues(node, method, code.String()).Inc()
	m.routedTime.WithLabelValues(node, method).Observe(took.Seconds())
}
