package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"
)

// The I/O limits scenarios (issue 16, docs/qos.md): one fio pod writing to
// one PVC the whole time, whose VolumeAttributesClass changes under it.
// 20 starts it at 200 write IOPS, 21 raises that to 1000 while fio runs,
// 22 lifts the limit (the chart's qcow2-unlimited class) and removes pod
// and claim. The rates come from fio's own once-a-second reports in the
// pod's log.

const (
	qosPVC = "qos"
	qosPod = "fio"
)

func qosClassManifest(name string, writeIOPS int) string {
	return fmt.Sprintf(`apiVersion: storage.k8s.io/v1
kind: VolumeAttributesClass
metadata: {name: %s}
driverName: %s
parameters: {writeIOPS: "%d"}
`, name, driverName, writeIOPS)
}

// qosFio writes 4 KiB blocks at random with O_DIRECT, 4 in flight, for
// as long as the pod lives, and reports its totals every second as JSON.
const qosFio = "exec fio --name=w --filename=/data/f --size=64M --rw=randwrite --bs=4k --direct=1 --ioengine=libaio --iodepth=4 " +
	"--time_based --runtime=1800 --status-interval=1 --output-format=json"

func testQoSLimited(t *testing.T, c *cluster) {
	c.mustApply(t, qosClassManifest("qos-e2e-200", 200)+"---\n"+qosClassManifest("qos-e2e-1000", 1000))
	c.mustApply(t, strings.Replace(pvcManifest(qosPVC, "1Gi", "Filesystem"), "spec:\n", "spec:\n  volumeAttributesClassName: qos-e2e-200\n", 1))
	c.mustApply(t, podImageManifest(qosPod, qosPVC, fioRef, false, qosFio, ""))
	c.podReady(t, testNS, qosPod, 3*time.Minute)
	// Give fio a second to lay out its file, then measure five seconds.
	start := time.Now().Add(2 * time.Second)
	time.Sleep(7 * time.Second)
	iops, per := c.fioWriteRate(t, start, time.Now())
	t.Logf("writeIOPS=200: fio measured %.0f write IOPS over %v (per second: %v)", iops, time.Since(start).Round(time.Second), per)
	if iops > 220 || iops < 100 {
		t.Errorf("fio measured %.0f write IOPS under writeIOPS=200, want at most 220 (and the volume in use: at least 100)", iops)
	}
	c.waitClassApplied(t, "qos-e2e-200")
}

func testQoSRaisedLive(t *testing.T, c *cluster) {
	if iops := c.reclass(t, "qos-e2e-1000"); iops > 1100 || iops < 800 {
		t.Errorf("fio measured %.0f write IOPS from 1 s after the class change to writeIOPS=1000 was applied, want 800 to 1100", iops)
	}
}

func testQoSLifted(t *testing.T, c *cluster) {
	// The chart's example class that lifts every limit.
	if iops := c.reclass(t, "qcow2-unlimited"); iops < 1500 {
		t.Errorf("fio measured %.0f write IOPS once the limit was lifted, want well above the last limit of 1000 (at least 1500)", iops)
	}
	_, handle := c.pvcVolume(t, testNS, qosPVC)
	c.deletePod(t, testNS, qosPod)
	c.mustKubectl(t, "delete", "pvc", "-n", testNS, qosPVC, "--wait=true", "--timeout=120s")
	c.mustKubectl(t, "delete", "volumeattributesclass", "qos-e2e-200", "qos-e2e-1000")
	c.waitPVGone(t, handle)
}

// reclass moves the claim to class while fio runs, waits for the claim's
// status to show the class (csi-resizer's ModifyVolume returned: how soon
// depends on the sidecar's pace, logged), and returns the write IOPS fio
// measured from 1 s after that on, for 5 s: once the driver answered, the
// new rate holds. The pod must be the same, never restarted.
func (c *cluster) reclass(t *testing.T, class string) float64 {
	t.Helper()
	uid := c.jsonpath(t, "pod", testNS, qosPod, "{.metadata.uid}")
	c.mustKubectl(t, "patch", "pvc", "-n", testNS, qosPVC, "--type=merge", "-p", fmt.Sprintf(`{"spec":{"volumeAttributesClassName":%q}}`, class))
	patched := time.Now()
	c.waitClassApplied(t, class)
	applied := time.Now()
	time.Sleep(6 * time.Second)
	iops, per := c.fioWriteRate(t, applied.Add(time.Second), time.Now())
	t.Logf("class %s patched at %s, applied %v later: fio measured %.0f write IOPS from 1 s after that (per second: %v)",
		class, patched.Format("15:04:05.000"), applied.Sub(patched).Round(time.Millisecond), iops, per)
	if got := c.jsonpath(t, "pod", testNS, qosPod, "{.metadata.uid} {.status.containerStatuses[0].restartCount}"); got != uid+" 0" {
		t.Errorf("fio pod uid and restarts %q, want %q: the pod must live through the class change", got, uid+" 0")
	}
	return iops
}

// waitClassApplied waits for the claim's status to say its volume has
// class: csi-resizer's ControllerModifyVolume succeeded.
func (c *cluster) waitClassApplied(t *testing.T, class string) {
	t.Helper()
	if err := c.waitFor("pvc "+qosPVC+" modified to "+class, time.Minute, nil, func() error {
		out, err := c.kubectl("get", "pvc", "-n", testNS, qosPVC, "-o", "jsonpath={.status.currentVolumeAttributesClassName} {.status.modifyVolumeStatus}")
		if err != nil {
			return err
		}
		if strings.TrimSpace(out) != class {
			return fmt.Errorf("status: %q", out)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// fioWriteRate is the write IOPS fio reported over [from, to] (between the
// first report at or after from and the last at or before to), and the
// rate of each second in between.
func (c *cluster) fioWriteRate(t *testing.T, from, to time.Time) (float64, []int) {
	t.Helper()
	out := c.mustKubectl(t, "logs", "-n", testNS, qosPod)
	type report struct {
		at  int64 // ms since the epoch
		ios int64
	}
	var rs []report
	dec := json.NewDecoder(strings.NewReader(out))
	for {
		var r struct {
			TimestampMS int64 `json:"timestamp_ms"`
			Jobs        []struct {
				Write struct {
					TotalIOs int64 `json:"total_ios"`
				} `json:"write"`
			} `json:"jobs"`
		}
		if err := dec.Decode(&r); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("fio's reports: %v\n%s", err, tailString(out, 20))
		}
		if len(r.Jobs) == 1 && r.TimestampMS >= from.UnixMilli() && r.TimestampMS <= to.UnixMilli() {
			rs = append(rs, report{r.TimestampMS, r.Jobs[0].Write.TotalIOs})
		}
	}
	if len(rs) < 3 {
		t.Fatalf("%d fio reports between %s and %s, want a few (one a second)\n%s", len(rs), from.Format("15:04:05.000"), to.Format("15:04:05.000"), tailString(out, 20))
	}
	var per []int
	for i := 1; i < len(rs); i++ {
		per = append(per, int(float64(rs[i].ios-rs[i-1].ios)*1000/float64(rs[i].at-rs[i-1].at)))
	}
	first, last := rs[0], rs[len(rs)-1]
	return float64(last.ios-first.ios) * 1000 / float64(last.at-first.at), per
}
