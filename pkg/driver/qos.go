package driver

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/klog/v2"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/throttle"
)

// Mutable parameters: a volume's I/O limits, from a VolumeAttributesClass
// (CreateVolumeRequest.mutable_parameters, ControllerModifyVolumeRequest),
// and flatten (flatten.go, taken out first by takeFlatten).
// Each rate key (readIOPS, writeIOPS, readBytesPerSecond,
// writeBytesPerSecond) has a burst key, the rate key + "Burst". Values are
// whole numbers; bytes take a k, K, M or G (binary) suffix; 0 lifts the
// limit. A ControllerModifyVolume changes the keys it names only (the CSI
// spec: nothing is changed for a key's absence), so a class that lifts
// limits names them with 0; but a rate and its burst are one setting, and
// naming a rate without its burst sets the default burst.
const qosBurstSuffix = "Burst"

// qosChange is what one request's mutable parameters set: rate or burst
// key to value. Keys it does not hold are left as they are.
type qosChange map[string]int64

// qosKeys are the keys of the mutable parameters, for error messages.
func qosKeys() string {
	var ks []string
	for _, r := range (&throttle.Limits{}).Rates() {
		ks = append(ks, r.Name, r.Name+qosBurstSuffix)
	}
	return strings.Join(ks, ", ")
}

// parseQoSParams checks the keys and the syntax of the values of mutable
// parameters; whether the limits they make make sense together is
// apply's.
func parseQoSParams(p map[string]string) (qosChange, error) {
	keys := make([]string, 0, len(p))
	for k := range p {
		keys = append(keys, k)
	}
	sort.Strings(keys) // report the first bad key deterministically
	c := qosChange{}
	for _, k := range keys {
		val := p[k]
		name := strings.TrimSuffix(k, qosBurstSuffix)
		bytes := name == throttle.NameReadBytes || name == throttle.NameWriteBytes
		if !bytes && name != throttle.NameReadIOPS && name != throttle.NameWriteIOPS {
			return nil, fmt.Errorf("%w: unknown mutable parameter %q (known: %s, %s)", ErrInvalid, k, qosKeys(), paramFlatten)
		}
		var n int64
		var err error
		switch {
		case val == "" || val[0] < '0' || val[0] > '9':
			// ParseInt takes a sign: "+5" and "-0" are not whole numbers
			// as a class's author writes them.
			err = strconv.ErrSyntax
		case bytes:
			n, err = parseSize(val)
		default:
			n, err = strconv.ParseInt(val, 10, 64)
		}
		if err != nil || n < 0 || n > throttle.MaxValue {
			unit := "operations per second"
			if bytes {
				unit = "bytes per second, with an optional k, K, M or G suffix"
			}
			if strings.HasSuffix(k, qosBurstSuffix) {
				unit = "the most " + unit + " after a quiet spell"
			}
			return nil, fmt.Errorf("%w: mutable parameter %s=%q: want a whole number of %s, at most %d (0: no limit)",
				ErrInvalid, k, val, unit, int64(throttle.MaxValue))
		}
		c[k] = n
	}
	return c, nil
}

// apply is l with c's values set, checked as a whole (a burst needs its
// rate): the error names the keys. A rate and its burst are one setting: a
// rate named without its burst gets the default burst, not the one sized
// for the old rate (from writeIOPS=1000 writeIOPSBurst=2000, writeIOPS=200
// must not keep a 10 s burst).
func (c qosChange) apply(l throttle.Limits) (throttle.Limits, error) {
	for _, r := range l.Rates() {
		if n, ok := c[r.Name]; ok {
			*r.Rate = throttle.Rate{Avg: n}
		}
		if n, ok := c[r.Name+qosBurstSuffix]; ok {
			r.Rate.Burst = n
		}
	}
	return l, l.Check()
}

// ParseLimits reads a new volume's I/O limits from mutable parameters (a
// VolumeAttributesClass's), as CreateVolume does: `qcow2-csi attach
// --limits` takes the same keys.
func ParseLimits(p map[string]string) (throttle.Limits, error) {
	c, err := parseQoSParams(p)
	if err != nil {
		return throttle.Limits{}, err
	}
	return c.apply(throttle.Limits{})
}

// limits are the volume's I/O limits (none when it has none recorded).
func (m *volumeMeta) limits() throttle.Limits {
	if m.QoS == nil {
		return throttle.Limits{}
	}
	return *m.QoS
}

func (m *volumeMeta) setLimits(l throttle.Limits) {
	m.QoS = nil
	if !l.Unlimited() {
		m.QoS = &l
	}
}

func (d *Driver) ControllerModifyVolume(ctx context.Context, req *csi.ControllerModifyVolumeRequest) (*csi.ControllerModifyVolumeResponse, error) {
	if err := validateControllerModifyVolumeRequest(req); err != nil {
		return nil, toStatus(err)
	}
	rest, flatten, _ := takeFlatten(req.GetMutableParameters()) // validated above
	change, _ := parseQoSParams(rest)
	id := req.GetVolumeId()
	if err := d.ownVolume(id); err != nil {
		return nil, toStatus(err)
	}
	release, err := d.locks.acquire(id, opModify)
	if err != nil {
		return nil, toStatus(err)
	}
	defer release()
	m, err := d.pool.get(id)
	if err != nil {
		return nil, toStatus(err)
	}
	old := m.limits()
	limits, err := change.apply(old)
	if err != nil {
		return nil, toStatus(fmt.Errorf("volume %q: %w", id, err))
	}
	v := d.lookupStaged(id)
	if v != nil && v.device != nil {
		if err := throttleable(v, limits); err != nil {
			return nil, toStatus(err)
		}
	}
	// On disk first: a node plugin restarted from here on serves the new
	// limits, and a failed write changes nothing.
	if limits != old {
		m.setLimits(limits)
		if err := d.pool.put(m); err != nil {
			return nil, toStatus(fmt.Errorf("volume %q: write metadata: %w", id, err))
		}
	}
	live := v != nil && v.device != nil
	if live {
		if err := v.throttle.Set(limits); err != nil { // cannot fail: checked above
			return nil, toStatus(fmt.Errorf("volume %q: %w", id, err))
		}
	}
	klog.FromContext(ctx).Info("Volume I/O limits set", "volumeID", id, "limits", formatLimits(limits), "live", live)
	if flatten {
		started, err := d.requestFlatten(id)
		if err != nil {
			return nil, toStatus(err)
		}
		klog.FromContext(ctx).Info("Flatten requested", "volumeID", id, "started", started)
	}
	return &csi.ControllerModifyVolumeResponse{}, nil
}

// throttleable refuses limits for a staged volume whose device no throttle
// serves: enforcing nothing while saying yes would be a lie.
func throttleable(v *stagedVolume, l throttle.Limits) error {
	if v.throttle != nil || l.Unlimited() {
		return nil
	}
	why := "its device reads the image file directly (" + v.Backend + ")"
	if !throttle.Enabled {
		why = "this node plugin was built without I/O limits (tag nothrottle)"
	}
	return fmt.Errorf("volume %q: I/O limits %s cannot be enforced: %s: %w", v.ID, formatLimits(l), why, throttle.ErrCompiledOut)
}

// formatLimits is l as its parameters, "writeIOPS=200 writeIOPSBurst=400";
// "none" when unlimited.
func formatLimits(l throttle.Limits) string {
	var out []string
	for _, r := range l.Rates() {
		if r.Rate.Avg > 0 {
			out = append(out, fmt.Sprintf("%s=%d", r.Name, r.Rate.Avg))
		}
		if r.Rate.Burst > 0 {
			out = append(out, fmt.Sprintf("%s%s=%d", r.Name, qosBurstSuffix, r.Rate.Burst))
		}
	}
	if len(out) == 0 {
		return "none"
	}
	return strings.Join(out, " ")
}

// qosCondition is what NodeGetVolumeStats' condition message says of a
// staged volume's limits and what they held back ("" for a volume that
// never had any).
func qosCondition(t *throttle.Throttle) string {
	st := t.Stats()
	if st.Limits.Unlimited() && st.ReadsThrottled == 0 && st.WritesThrottled == 0 {
		return ""
	}
	return fmt.Sprintf("; I/O limits: %s; throttled %d reads (%v waiting), %d writes (%v waiting)",
		formatLimits(st.Limits), st.ReadsThrottled, st.ReadWait.Round(1e6), st.WritesThrottled, st.WriteWait.Round(1e6))
}

// qosCollector reports each staged volume's limits and what they held back,
// at scrape time.
type qosCollector struct{ d *Driver }

var (
	descIOLimit = prometheus.NewDesc(metricsNamespace+"_volume_io_limit_per_second",
		"I/O limit of a staged volume, by direction (read, write) and unit (operations, bytes); absent: no limit.",
		[]string{"volume_id", "direction", "unit"}, nil)
	descIOBurst = prometheus.NewDesc(metricsNamespace+"_volume_io_limit_burst",
		"Burst of a staged volume's I/O limit: what may pass at once after a quiet spell; absent: a tenth of a second's worth.",
		[]string{"volume_id", "direction", "unit"}, nil)
	descIOThrottled = prometheus.NewDesc(metricsNamespace+"_volume_io_throttled_total",
		"Requests of a staged volume that its I/O limits held back, by direction, since it was attached by this process.",
		[]string{"volume_id", "direction"}, nil)
	descIOThrottledWait = prometheus.NewDesc(metricsNamespace+"_volume_io_throttled_seconds_total",
		"Time the held-back requests of a staged volume waited, summed, by direction.",
		[]string{"volume_id", "direction"}, nil)
)

func (c *qosCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descIOLimit, descIOBurst, descIOThrottled, descIOThrottledWait} {
		ch <- d
	}
}

func (c *qosCollector) Collect(ch chan<- prometheus.Metric) {
	for id, t := range c.d.throttles() {
		st := t.Stats()
		for _, r := range []struct {
			dir, unit string
			rate      throttle.Rate
		}{
			{"read", "operations", st.Limits.ReadIOPS}, {"write", "operations", st.Limits.WriteIOPS},
			{"read", "bytes", st.Limits.ReadBytes}, {"write", "bytes", st.Limits.WriteBytes},
		} {
			if r.rate.Avg > 0 {
				ch <- prometheus.MustNewConstMetric(descIOLimit, prometheus.GaugeValue, float64(r.rate.Avg), id, r.dir, r.unit)
			}
			if r.rate.Burst > 0 {
				ch <- prometheus.MustNewConstMetric(descIOBurst, prometheus.GaugeValue, float64(r.rate.Burst), id, r.dir, r.unit)
			}
		}
		ch <- prometheus.MustNewConstMetric(descIOThrottled, prometheus.CounterValue, float64(st.ReadsThrottled), id, "read")
		ch <- prometheus.MustNewConstMetric(descIOThrottled, prometheus.CounterValue, float64(st.WritesThrottled), id, "write")
		ch <- prometheus.MustNewConstMetric(descIOThrottledWait, prometheus.CounterValue, st.ReadWait.Seconds(), id, "read")
		ch <- prometheus.MustNewConstMetric(descIOThrottledWait, prometheus.CounterValue, st.WriteWait.Seconds(), id, "write")
	}
}

// throttles are the throttles of the volumes staged here with a live
// device, by volume ID.
func (d *Driver) throttles() map[string]*throttle.Throttle {
	d.stagedMu.Lock()
	defer d.stagedMu.Unlock()
	out := map[string]*throttle.Throttle{}
	for id, v := range d.staged {
		if v.device != nil && v.throttle != nil {
			out[id] = v.throttle
		}
	}
	return out
}
