// Package e2e proves qcow2-csi on a real Kubernetes control plane built and
// started on this machine: etcd, kube-apiserver, kube-controller-manager,
// kube-scheduler, kubelet with Debian's containerd and runc, the CSI
// sidecars and snapshot-controller, all compiled from the Go module proxy by
// hack/e2e/build-tools.sh (cached under .cache/e2e, keyed by versions).
//
// Two nodes on this one machine join one control plane. The control plane
// (etcd, apiserver, controller-manager, scheduler, snapshot-controller)
// runs in a network namespace the suite creates; each node in its own
// network namespace, linked to the control plane's by a veth pair with
// documentation-range addresses (control plane 198.51.100.1, nodes
// 198.51.100.11 and .12, their pods 203.0.113.0/25 and .128/25, services
// 192.0.2.0/24), routed through the control plane's namespace: nothing
// listens on the machine's own interfaces. The `kubernetes` Service address
// 192.0.2.1 is a local address of the control plane's namespace on which
// the apiserver listens directly, so pods reach the API without kube-proxy.
// Each node also has its own mount namespace, held by one process, in which
// its directories under the cluster root are bind-mounted over
// /var/lib/kubelet, /var/lib/containerd, /run/containerd and the pool and
// fuse paths of the chart values: the same paths on both nodes, as a
// DaemonSet needs, with different contents. Each node has its own
// containerd, and its kubelet its own --cgroup-root; teardown finds a
// node's processes by its network namespace and cgroup root.
//
// The cluster starts with the previous chart and driver (previous_test.go:
// a pinned commit, built once into .cache/e2e) so that the first scenario
// is the upgrade to this checkout's chart; a -run filter must keep it
// (-run 'TestE2E/^(0|9)-'). QCOW2_CSI_E2E_PREV_REF=none starts with this
// chart instead and skips scenario 0 (a shallow checkout lacks the commit).
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
