package driver_test

import (
	"flag"
	"io"
	"os"
	"testing"

	"k8s.io/klog/v2"

	"github.com/qcow2-csi/qcow2-csi/tests/mntns"
)

// TestMain silences the driver's klog output (every RPC logs) unless
// QCOW2_CSI_TEST_LOG is set; failures carry their own messages. The tests
// run in a mount namespace of their own (tests/mntns): a namespace another
// process clones meanwhile would keep a staged filesystem, and its device,
// busy after NodeUnstage unmounts it.
func TestMain(m *testing.M) {
	if pool := os.Getenv(envServe); pool != "" {
		os.Exit(serveChild(pool, os.Getenv(envBackend)))
	}
	mntns.Isolate()
	quietKlog()
	os.Exit(m.Run())
}

// quietKlog discards klog's output unless QCOW2_CSI_TEST_LOG is set.
func quietKlog() {
	if os.Getenv("QCOW2_CSI_TEST_LOG") == "" {
		fs := flag.NewFlagSet("klog", flag.ContinueOnError)
		klog.InitFlags(fs)
		_ = fs.Set("logtostderr", "false")
		_ = fs.Set("stderrthreshold", "FATAL")
		klog.SetOutput(io.Discard)
	}
}
