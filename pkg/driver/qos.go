package driver

import (
	"context"
	"fmt"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/klog/v2"

	"github.com/qcow2-csi/qcow2-csi/pkg/nbdattach/throttle"
)

// Mutable parameters: a volume's I/O limits, from a VolumeAttributesClass
// (CreateVolumeRequest.mutable_parameters, ControllerModifyVolumeRequest),
// and flatten (flatten.go, taken out first by takeFlatten). The limits'
// keys and syntax are package throttle's (throttle.ParseParams). A
// ControllerModifyVolume changes the keys it names only (the CSI spec:
// nothing is changed for a key's absence), so a class that lifts limits
// names them with 0; but a rate and its burst are one setting, and naming a
// rate without its burst sets the default burst.

// parseQoSParams parses the limits' keys of mutable parameters (flatten
// taken out); an unknown key's error lists flatten too.
func parseQoSParams(p map[string]string) (throttle.Params, error) {
	return throttle.ParseParams(p, paramFlatten)
}

// parseLimits reads a new volume's I/O limits from mutable parameters
// (flatten taken out), as CreateVolume does.
func parseLimits(p map[string]string) (throttle.Limits, error) {
	c, err := parseQoSParams(p)
	if err != nil {
		return throttle.Limits{}, err
	}
	return c.Apply(throttle.Limits{})
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
	limits, err := change.Apply(old)
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
	if v.noThrottle != "" {
		why = v.noThrottle
	}
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
			out = append(out, fmt.Sprintf("%s%s=%d", r.Name, throttle.BurstSuffix, r.Rate.Burst))
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
