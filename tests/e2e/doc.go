// Package e2e proves qcow2-csi on a real Kubernetes control plane built and
// started on this machine: etcd, kube-apiserver, kube-controller-manager,
// kube-scheduler, kubelet with Debian's containerd and runc, the CSI
// sidecars and snapshot-controller, all compiled from the Go module proxy by
// hack/e2e/build-tools.sh (cached under .cache/e2e, keyed by versions).
//
// The whole cluster runs inside a network namespace the suite creates, with
// a veth pair whose two ends both live in it and addresses from the
// documentation ranges (node 198.51.100.10/24, pods 203.0.113.0/24,
// services 192.0.2.0/24): nothing listens on the machine's own interfaces.
// The `kubernetes` Service address 192.0.2.1 is a local address of that
// namespace on which the apiserver listens directly, so pods reach the API
// without kube-proxy.
//
// Images are docker-archive tarballs made without a container engine
// (hack/image/imagetar) and imported into containerd; the chart is installed
// with the built helm. Every process is stopped by PID, and mounts, loop
// devices and namespaces are removed, also when a test fails.
//
// When a scenario fails the suite dumps, at once (later scenarios restart
// and uninstall the plugin): objects and events, and every container's log
// (driver, sidecars, test pods; each restart's file) read from the
// kubelet's podLogsDir inside the cluster root, plus each cluster
// process's log. Tails go to the test log, whole logs to a directory it
// names ($E2E_DUMP_DIR/<scenario> when set, else a new
// $TMPDIR/qcow2-csi-e2e-dump-*); E2E_DUMP_ALWAYS=1 dumps after every
// scenario.
//
// The suite needs root, containerd, runc, containernetworking-plugins and
// busybox-static (hack/deps.d/packages). Under CI=true a missing prerequisite
// fails the suite; otherwise it skips loudly.
package e2e
