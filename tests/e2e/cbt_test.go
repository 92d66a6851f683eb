package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

// Changed block tracking through Kubernetes (issue 14): the chart's
// csi-snapshot-metadata sidecar, found through the SnapshotMetadataService
// object, asked by the upstream snapshot-metadata-lister authenticated as a
// ServiceAccount bound to the upstream client ClusterRole.
//
// The cluster has no DNS and no kube-proxy, so the address the
// SnapshotMetadataService gives (the Service's DNS name and port) cannot
// be reached as in a real cluster: the lister runs in the control plane's
// network namespace and in a mount namespace of its own whose /etc/hosts
// maps that name to a controller pod's IP, where the sidecar listens on
// the Service's port (helmValues). Everything else is what a backup tool
// does: the name, the CA and the audience come from the object, and the
// certificate is checked against that name.
//
// Scenarios 15-18 share one block volume written at known places (cbt
// below); 19 is the opt-in measurement.

const (
	mib          = int64(1) << 20
	cluster64k   = int64(64) << 10
	cbtClient    = "cbt-client" // ServiceAccount with the upstream client role
	cbtNoRole    = "cbt-norole" // ServiceAccount without it
	smdHost      = "qcow2-csi-snapshot-metadata.qcow2-csi.svc"
	smdPort      = "6443" // the Service's, and the sidecar's here (helmValues)
	fixedClass   = "qcow2-fixed"
	blockTypeFix = 1 // FIXED_LENGTH in the lister's JSON
	blockTypeVar = 2 // VARIABLE_LENGTH
)

// rng is a byte range [off, off+n).
type rng struct{ off, n int64 }

func (r rng) String() string {
	return fmt.Sprintf("[%d MiB + %d KiB, +%d KiB)", r.off/mib, r.off%mib>>10, r.n>>10)
}

// normalize sorts and merges ranges.
func normalize(rs []rng) []rng {
	rs = append([]rng(nil), rs...)
	sort.Slice(rs, func(i, j int) bool { return rs[i].off < rs[j].off })
	var out []rng
	for _, r := range rs {
		if k := len(out) - 1; k >= 0 && r.off <= out[k].off+out[k].n {
			out[k].n = max(out[k].n, r.off+r.n-out[k].off)
			continue
		}
		out = append(out, r)
	}
	return out
}

// roundOut widens each range to the units of size u it touches.
func roundOut(rs []rng, u int64) []rng {
	var out []rng
	for _, r := range rs {
		s := r.off / u * u
		e := (r.off + r.n + u - 1) / u * u
		out = append(out, rng{s, e - s})
	}
	return normalize(out)
}

func covers(have []rng, r rng) bool {
	for _, h := range normalize(have) {
		if h.off <= r.off && r.off+r.n <= h.off+h.n {
			return true
		}
	}
	return false
}

func total(rs []rng) int64 {
	var n int64
	for _, r := range normalize(rs) {
		n += r.n
	}
	return n
}

// cbt is what scenarios 15-18 share.
var cbt struct {
	node       string // where the volume and its pod are
	kubeconfig string // of cbtClient
	handleA    string // snap-a's CSI handle (scenario 17 deletes snap-a)
	w0, w1     []rng  // written before snap-a, between snap-a and snap-b
}

// listerRecord is one message as the lister's -o json prints it.
type listerRecord struct {
	Type     int   `json:"block_metadata_type"`
	Capacity int64 `json:"volume_capacity_bytes"`
	Blocks   []struct {
		Off int64 `json:"byte_offset"`
		N   int64 `json:"size_bytes"`
	} `json:"block_metadata"`
}

// listing is the lister's answer: the tuples in order and the types seen.
type listing struct {
	tuples []rng
	types  map[int]bool
	took   time.Duration
}

// controllerPodIP is the IP of a Ready controller pod (both replicas run
// the sidecar, so either serves).
func (c *cluster) controllerPodIP(t *testing.T) string {
	t.Helper()
	out := c.mustKubectl(t, "get", "pods", "-n", releaseNS, "-l", "app.kubernetes.io/component=controller", "-o",
		`jsonpath={range .items[*]}{.status.podIP}{" "}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}`)
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if ip, ready, _ := strings.Cut(l, " "); ip != "" && ready == "True" {
			return ip
		}
	}
	t.Fatalf("no Ready controller pod:\n%s", out)
	return ""
}

// lister runs the upstream snapshot-metadata-lister with kubeconfig and
// args (plus -o json) as a backup tool would, and parses what it printed.
func (c *cluster) lister(t *testing.T, kubeconfig string, args ...string) (listing, error) {
	t.Helper()
	hosts := c.path("cbt-hosts")
	etc, _ := os.ReadFile("/etc/hosts")
	if err := os.WriteFile(hosts, fmt.Appendf(etc, "\n%s %s\n", c.controllerPodIP(t), smdHost), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := c.inNS(ctx, "unshare", append([]string{"--mount", "--propagation", "private", "--",
		"sh", "-c", `mount --bind "$0" /etc/hosts && exec "$@"`, hosts,
		filepath.Join(c.bin, "snapshot-metadata-lister"), "-kubeconfig", kubeconfig, "-n", testNS, "-o", "json"}, args...)...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	t0 := time.Now()
	err := cmd.Run()
	l := listing{took: time.Since(t0), types: map[int]bool{}}
	if err != nil {
		return l, fmt.Errorf("snapshot-metadata-lister %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	var recs []listerRecord
	if err := json.Unmarshal([]byte(out.String()), &recs); err != nil {
		return l, fmt.Errorf("lister output: %v: %.300s", err, out.String())
	}
	for _, r := range recs {
		l.types[r.Type] = true
		for _, b := range r.Blocks {
			if k := len(l.tuples) - 1; k >= 0 && b.Off < l.tuples[k].off+l.tuples[k].n {
				return l, fmt.Errorf("tuple [%d, +%d) overlaps or precedes [%d, +%d): not ascending", b.Off, b.N, l.tuples[k].off, l.tuples[k].n)
			}
			l.tuples = append(l.tuples, rng{b.Off, b.N})
		}
	}
	return l, nil
}

func (c *cluster) mustList(t *testing.T, args ...string) listing {
	t.Helper()
	l, err := c.lister(t, cbt.kubeconfig, args...)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// saKubeconfig writes a kubeconfig that authenticates as ServiceAccount sa
// of the test namespace (a token from the TokenRequest API).
func (c *cluster) saKubeconfig(t *testing.T, sa string) string {
	t.Helper()
	token := strings.TrimSpace(c.mustKubectl(t, "create", "token", sa, "-n", testNS, "--duration=2h"))
	server := c.mustKubectl(t, "config", "view", "--raw", "-o", "jsonpath={.clusters[0].cluster.server}")
	ca := c.mustKubectl(t, "config", "view", "--raw", "-o", "jsonpath={.clusters[0].cluster.certificate-authority-data}")
	p := c.path("kubeconfig-" + sa)
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster: {server: %q, certificate-authority-data: %s}
users:
- name: %s
  user: {token: %s}
contexts:
- name: e2e
  context: {cluster: e2e, user: %s}
current-context: e2e
`, server, ca, sa, token, sa)
	if err := os.WriteFile(p, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// upstreamClientRole is the client ClusterRole the external-snapshot-metadata
// module ships (deploy/snapshot-metadata-client-cluster-role.yaml).
func upstreamClientRole(t *testing.T) (path, name string) {
	t.Helper()
	dir, err := toolsModuleDir(repoRoot(t), "github.com/kubernetes-csi/external-snapshot-metadata")
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, "deploy/snapshot-metadata-client-cluster-role.yaml"), "external-snapshot-metadata-client-runner"
}

// backupServiceAccounts makes the backup client's ServiceAccount, bound to
// the upstream client role, and one without the role, and points
// cbt.kubeconfig at the client's.
func (c *cluster) backupServiceAccounts(t *testing.T) {
	t.Helper()
	role, roleName := upstreamClientRole(t)
	if _, err := c.kubectl("apply", "-f", role); err != nil {
		t.Fatal(err)
	}
	c.mustApply(t, fmt.Sprintf(`apiVersion: v1
kind: ServiceAccount
metadata: {name: %[1]s, namespace: %[3]s}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: %[2]s, namespace: %[3]s}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: e2e-cbt-client}
subjects: [{kind: ServiceAccount, name: %[1]s, namespace: %[3]s}]
roleRef: {kind: ClusterRole, name: %[4]s, apiGroup: rbac.authorization.k8s.io}
`, cbtClient, cbtNoRole, testNS, roleName))
	cbt.kubeconfig = c.saKubeconfig(t, cbtClient)
}

// writeAt writes random data at each range of the pod's device and syncs it.
func (c *cluster) writeAt(t *testing.T, pod string, rs []rng) {
	t.Helper()
	var sb strings.Builder
	for _, r := range rs {
		if r.off%4096 != 0 || r.n%4096 != 0 {
			t.Fatalf("range %v is not in 4 KiB blocks", r)
		}
		fmt.Fprintf(&sb, "dd if=/dev/urandom of=/dev/xvda bs=4096 seek=%d count=%d conv=notrunc,fsync 2>/dev/null && ", r.off/4096, r.n/4096)
	}
	sb.WriteString("sync")
	c.exec(t, testNS, pod, sb.String())
}

func snapshotClassManifest(name, pvc, class string) string {
	return strings.Replace(snapshotManifest(name, pvc), "volumeSnapshotClassName: qcow2", "volumeSnapshotClassName: "+class, 1)
}

// snapshotHandle is the CSI snapshot ID of a bound VolumeSnapshot.
func (c *cluster) snapshotHandle(t *testing.T, vs string) string {
	t.Helper()
	vsc := c.jsonpath(t, "volumesnapshot", testNS, vs, "{.status.boundVolumeSnapshotContentName}")
	return c.jsonpath(t, "volumesnapshotcontent", "", vsc, "{.status.snapshotHandle}")
}

func (c *cluster) takeSnapshot(t *testing.T, name, class string) {
	t.Helper()
	c.mustApply(t, snapshotClassManifest(name, "cbt", class))
	c.snapshotReady(t, name)
}

// checkExact: the listing is exactly the written ranges widened to 64 KiB
// (the clusters of an allocation list, the granules of the checkpoint
// bitmaps: docs/backup.md says a delta without a crash reports nothing
// more).
func checkExact(t *testing.T, what string, l listing, written []rng) {
	t.Helper()
	got, want := normalize(l.tuples), roundOut(written, cluster64k)
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("%s: lister reports %v, want %v (the writes %v in 64 KiB units)", what, got, want, normalize(written))
	}
}

// Scenario 15: a block volume written before snap-a and at known offsets
// between snap-a and snap-b. Through the sidecar, as a ServiceAccount bound to
// the upstream client role: `lister -s snap-b -p snap-a` reports exactly the
// 64 KiB granules written, `lister -s snap-a` the allocated clusters.
// A ServiceAccount without the role is refused (PermissionDenied), and so
// is a token of the client for another audience (Unauthenticated), while
// the same client with the object's audience is served.
func testCBTLister(t *testing.T, c *cluster) {
	c.backupServiceAccounts(t)
	cbt.kubeconfig = c.saKubeconfig(t, cbtClient)

	sms := c.mustKubectl(t, "get", "snapshotmetadataservice", driverName, "-o", "jsonpath={.spec.address} {.spec.audience}")
	if want := smdHost + ":" + smdPort + " " + driverName; strings.TrimSpace(sms) != want {
		t.Fatalf("SnapshotMetadataService %s: address and audience %q, want %q", driverName, sms, want)
	}

	c.mustApply(t, pvcManifest("cbt", "1Gi", "Block"))
	c.mustApply(t, podManifest("cbt-w", "cbt", true, "sleep 3600"))
	c.podReady(t, testNS, "cbt-w", 3*time.Minute)
	cbt.node = c.podNode(t, testNS, "cbt-w")
	cbt.w0 = []rng{{0, 4 * mib}, {100 * mib, mib}}
	// Partial granules, one write across a granule boundary, the last
	// block of the disk.
	cbt.w1 = []rng{{10*mib + 4096, cluster64k}, {500 * mib, mib}, {gib - 4096, 4096}}
	c.writeAt(t, "cbt-w", cbt.w0)
	c.takeSnapshot(t, "snap-a", "qcow2")
	c.writeAt(t, "cbt-w", cbt.w1)
	c.takeSnapshot(t, "snap-b", "qcow2")
	cbt.handleA = c.snapshotHandle(t, "snap-a")

	delta := c.mustList(t, "-s", "snap-b", "-p", "snap-a")
	checkExact(t, "delta snap-a..snap-b", delta, cbt.w1)
	alloc := c.mustList(t, "-s", "snap-a")
	checkExact(t, "allocated snap-a", alloc, cbt.w0)
	for _, l := range []listing{delta, alloc} {
		if len(l.types) != 1 || !l.types[blockTypeVar] {
			t.Errorf("block metadata types %v, want VARIABLE_LENGTH (%d) only", l.types, blockTypeVar)
		}
	}
	t.Logf("lister: delta %v in %v, allocated %v in %v", normalize(delta.tuples), delta.took.Round(time.Millisecond), normalize(alloc.tuples), alloc.took.Round(time.Millisecond))

	// Refusals. The admin kubeconfig reads the snapshots; the token is the
	// role-less ServiceAccount's: the sidecar's SubjectAccessReview says no.
	_, err := c.lister(t, c.admin, "-s", "snap-b", "-service-account", cbtNoRole, "-service-account-namespace", testNS)
	if err == nil || !strings.Contains(err.Error(), "PermissionDenied") {
		t.Errorf("lister as %s (no client role): %v, want PermissionDenied", cbtNoRole, err)
	}
	for _, tc := range []struct {
		audience string
		want     codes.Code
	}{
		{driverName, codes.OK},
		{"not-" + driverName, codes.Unauthenticated},
	} {
		token := strings.TrimSpace(c.mustKubectl(t, "create", "token", cbtClient, "-n", testNS, "--audience="+tc.audience))
		if got := status.Code(c.rawAllocated(t, token, "snap-b")); got != tc.want {
			t.Errorf("GetMetadataAllocated with a %s token for audience %q: %v, want %v", cbtClient, tc.audience, got, tc.want)
		}
	}
}

// rawAllocated calls the sidecar's GetMetadataAllocated with token, as a
// client that builds its own request (the lister always asks for the
// object's audience), and returns the stream's first error (nil when it
// ends well). The request is encoded by hand: this module does not depend
// on the sidecar's API package, whose three fields are all it needs.
func (c *cluster) rawAllocated(t *testing.T, token, snapshot string) error {
	t.Helper()
	caB64 := c.mustKubectl(t, "get", "snapshotmetadataservice", driverName, "-o", "jsonpath={.spec.caCert}")
	ca, err := base64.StdEncoding.DecodeString(strings.TrimSpace(caB64))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		t.Fatalf("the SnapshotMetadataService's caCert is no PEM certificate")
	}
	addr := net.JoinHostPort(c.controllerPodIP(t), smdPort)
	conn, err := grpc.NewClient("passthrough:///"+smdHost,
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: smdHost})),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var conn net.Conn
			err := inNetns("/run/netns/"+c.netns, func() error {
				var err error
				conn, err = (&net.Dialer{}).DialContext(ctx, "tcp", addr)
				return err
			})
			return conn, err
		}))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var req []byte
	req = protowire.AppendTag(req, 1, protowire.BytesType) // security_token
	req = protowire.AppendString(req, token)
	req = protowire.AppendTag(req, 2, protowire.BytesType) // namespace
	req = protowire.AppendString(req, testNS)
	req = protowire.AppendTag(req, 3, protowire.BytesType) // snapshot_name
	req = protowire.AppendString(req, snapshot)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	st, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, "/snapshotmetadata.SnapshotMetadata/GetMetadataAllocated", grpc.ForceCodec(rawCodec{}))
	if err != nil {
		return err
	}
	if err := st.SendMsg(req); err != nil {
		return err
	}
	if err := st.CloseSend(); err != nil {
		return err
	}
	for {
		var m []byte
		if err := st.RecvMsg(&m); errors.Is(err, io.EOF) {
			return nil
		} else if err != nil {
			return err
		}
	}
}

// Scenario 16: an incremental backup restores byte for byte, as
// docs/backup.md tells users to take one. Full backup: the ranges `lister -s
// snap-a` lists, read from a PVC restored from snap-a. Incremental: the ranges
// of `lister -s snap-b -p snap-a`, read from a PVC restored from snap-b. Both
// applied in order to an empty block PVC, which then has the sha256 of
// snap-b's restored PVC.
func testCBTIncrementalBackup(t *testing.T, c *cluster) {
	full := c.mustList(t, "-s", "snap-a")
	incr := c.mustList(t, "-s", "snap-b", "-p", "snap-a")
	for _, p := range []struct{ name, snap string }{{"cbt-ra", "snap-a"}, {"cbt-rb", "snap-b"}} {
		c.mustApply(t, strings.Replace(pvcFromManifest(p.name, "VolumeSnapshot", "snapshot.storage.k8s.io", p.snap),
			"accessModes:", "volumeMode: Block\n  accessModes:", 1))
	}
	c.mustApply(t, pvcManifest("cbt-t", "1Gi", "Block"))
	// The backup tool's pod: the two restored snapshots and the target.
	c.mustApply(t, fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: cbt-backup, namespace: %s}
spec:
  nodeSelector: {kubernetes.io/hostname: %s}
  terminationGracePeriodSeconds: 2
  containers:
  - name: c
    image: %s
    imagePullPolicy: Never
    command: [sh, -c, "sleep 3600"]
    volumeDevices: [{name: a, devicePath: /dev/snapa}, {name: b, devicePath: /dev/snapb}, {name: t, devicePath: /dev/target}]
    volumeMounts: [{name: backup, mountPath: /backup}]
  volumes:
  - {name: a, persistentVolumeClaim: {claimName: cbt-ra}}
  - {name: b, persistentVolumeClaim: {claimName: cbt-rb}}
  - {name: t, persistentVolumeClaim: {claimName: cbt-t}}
  - {name: backup, emptyDir: {}}
`, testNS, cbt.node, busyboxRef))
	c.podReady(t, testNS, "cbt-backup", 3*time.Minute)
	// A backup is the data of the listed ranges, in order, in one file
	// (the listing is its index); a restore writes each range back at its
	// offset. The tuples are whole 64 KiB clusters or granules.
	backup := func(file, dev string, l listing) string {
		var sb strings.Builder
		for _, r := range l.tuples {
			if r.off%cluster64k != 0 || r.n%cluster64k != 0 {
				t.Fatalf("tuple %v is not in 64 KiB units", r)
			}
			fmt.Fprintf(&sb, "dd if=%s bs=65536 skip=%d count=%d >> %s 2>/dev/null && ", dev, r.off/cluster64k, r.n/cluster64k, file)
		}
		return sb.String() + "true"
	}
	restore := func(file string, l listing) string {
		var sb strings.Builder
		at := int64(0)
		for _, r := range l.tuples {
			fmt.Fprintf(&sb, "dd if=%s of=/dev/target bs=65536 skip=%d seek=%d count=%d conv=notrunc 2>/dev/null && ", file, at, r.off/cluster64k, r.n/cluster64k)
			at += r.n / cluster64k
		}
		return sb.String() + "true"
	}
	c.exec(t, testNS, "cbt-backup", backup("/backup/full", "/dev/snapa", full))
	c.exec(t, testNS, "cbt-backup", backup("/backup/incr", "/dev/snapb", incr))
	sizes := c.exec(t, testNS, "cbt-backup", "wc -c < /backup/full && wc -c < /backup/incr")
	if want := fmt.Sprintf("%d\n%d", total(full.tuples), total(incr.tuples)); sizes != want {
		t.Fatalf("backup files hold %q bytes, want %q", sizes, want)
	}
	c.exec(t, testNS, "cbt-backup", restore("/backup/full", full)+" && "+restore("/backup/incr", incr)+" && sync")
	sums := strings.Fields(c.exec(t, testNS, "cbt-backup", "sha256sum < /dev/target && sha256sum < /dev/snapb && sha256sum < /dev/snapa"))
	if len(sums) != 6 || sums[0] != sums[2] {
		t.Errorf("sha256 of the restored backup, of snap-b and of snap-a: %v; want the first two equal", sums)
	} else if sums[2] == sums[4] {
		t.Errorf("snap-a and snap-b read the same (%s): the incremental step proved nothing", sums[2])
	}
	t.Logf("full backup %d KiB in %d ranges, incremental %d KiB in %d ranges; restored sha256 %s", total(full.tuples)>>10, len(full.tuples), total(incr.tuples)>>10, len(incr.tuples), sums[0])
	c.deletePod(t, testNS, "cbt-backup")
	c.mustKubectl(t, "delete", "pvc", "-n", testNS, "cbt-ra", "cbt-rb", "cbt-t", "--wait=true", "--timeout=120s")
}

// Scenario 17: snap-a is deleted before the delta is asked: `lister -s snap-b
// -P <snap-a's handle>` still answers, the same ranges (snap-a's checkpoint
// bitmap is the oldest, so it stays). Then a VolumeSnapshotClass with
// blockMetadataType FIXED_LENGTH: the delta and the allocation of its
// snapshots come as 64 KiB blocks, every tuple aligned and of that size,
// covering exactly the clusters written.
func testCBTBaseDeletedAndFixed(t *testing.T, c *cluster) {
	c.mustKubectl(t, "delete", "volumesnapshot", "-n", testNS, "snap-a", "--wait=true", "--timeout=120s")
	delta := c.mustList(t, "-s", "snap-b", "-P", cbt.handleA)
	checkExact(t, "delta from the deleted snap-a to snap-b", delta, cbt.w1)

	c.mustApply(t, fmt.Sprintf(`apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata: {name: %s}
driver: %s
deletionPolicy: Delete
parameters: {blockMetadataType: FIXED_LENGTH}
`, fixedClass, driverName))
	defer c.kubectl("delete", "volumesnapshotclass", fixedClass)
	w2 := []rng{{300*mib + 60<<10, 8 << 10}, {301 * mib, 4096}}
	c.takeSnapshot(t, "snap-c", fixedClass)
	c.writeAt(t, "cbt-w", w2)
	c.takeSnapshot(t, "snap-d", fixedClass)
	for _, tc := range []struct {
		what    string
		args    []string
		written []rng
	}{
		{"FIXED_LENGTH delta snap-c..snap-d", []string{"-s", "snap-d", "-p", "snap-c"}, w2},
		{"FIXED_LENGTH allocated snap-c", []string{"-s", "snap-c"}, append(append([]rng(nil), cbt.w0...), cbt.w1...)},
	} {
		l := c.mustList(t, tc.args...)
		checkExact(t, tc.what, l, tc.written)
		if len(l.types) != 1 || !l.types[blockTypeFix] {
			t.Errorf("%s: block metadata types %v, want FIXED_LENGTH (%d) only", tc.what, l.types, blockTypeFix)
		}
		for _, b := range l.tuples {
			if b.n != cluster64k || b.off%cluster64k != 0 {
				t.Errorf("%s: tuple %v is not one aligned 64 KiB block", tc.what, b)
				break
			}
		}
	}
	c.mustKubectl(t, "delete", "volumesnapshot", "-n", testNS, "snap-c", "snap-d", "--wait=true", "--timeout=120s")
}

// Scenario 18: the node plugin is SIGKILLed between snap-e and snap-f, after
// writes that were synced. The plugin restarts; the delta snap-e..snap-f is
// still answered (crash-consistent tracking, the chart's default), covers
// every write, and is not a full listing: the data written before snap-a,
// untouched since, is not in it. docs/backup.md says what it may
// over-report after a crash (1 MiB units, runs ahead).
func testCBTPluginKilled(t *testing.T, c *cluster) {
	c.takeSnapshot(t, "snap-e", "qcow2")
	w3 := []rng{{700 * mib, 4096}, {800*mib + 512<<10, cluster64k}}
	c.writeAt(t, "cbt-w", w3)

	pod := c.nodePluginPod(t, cbt.node)
	restarts := func() string {
		return c.jsonpath(t, "pod", releaseNS, pod, `{.status.containerStatuses[?(@.name=="qcow2-csi")].restartCount}`)
	}
	before := restarts()
	pid := c.pluginPID(t, cbt.node)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("SIGKILL the node plugin (pid %d): %v", pid, err)
	}
	if err := c.waitFor("node plugin restarted", 3*time.Minute, nil, func() error {
		if now := restarts(); now == before {
			return fmt.Errorf("restartCount still %s", now)
		}
		_, err := c.kubectl("wait", "-n", releaseNS, "--for=condition=Ready", "pod/"+pod, "--timeout=5s")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	// On this cluster's fuse backend the writer's device died with the
	// plugin (kernel NBD would reconnect): the driver refuses to snapshot a
	// staged volume whose device is lost, so the pod goes first and snap-f
	// is taken of the unstaged volume. The writes were synced before the
	// kill; only the crash-consistent bitmap can tell the delta.
	c.mustKubectl(t, "delete", "pod", "-n", testNS, "cbt-w", "--grace-period=2", "--wait=true", "--timeout=180s")
	c.takeSnapshot(t, "snap-f", "qcow2")
	delta := c.mustList(t, "-s", "snap-f", "-p", "snap-e")
	for _, w := range w3 {
		if !covers(delta.tuples, w) {
			t.Errorf("delta across the crash %v misses the write %v", normalize(delta.tuples), w)
		}
	}
	for _, w := range cbt.w0 {
		for _, d := range delta.tuples {
			if d.off < w.off+w.n && w.off < d.off+d.n {
				t.Errorf("delta across the crash %v holds %v, written before snap-a and untouched: a full listing, not a delta", normalize(delta.tuples), w)
			}
		}
	}
	t.Logf("delta across the SIGKILL: %d KiB for %d KiB written: %v", total(delta.tuples)>>10, total(w3)>>10, normalize(delta.tuples))
	c.mustKubectl(t, "delete", "volumesnapshot", "-n", testNS, "snap-b", "snap-e", "snap-f", "--wait=true", "--timeout=120s")
	c.mustKubectl(t, "delete", "pvc", "-n", testNS, "cbt", "--wait=true", "--timeout=120s")
	c.kubectl("delete", "clusterrolebinding", "e2e-cbt-client")
	c.kubectl("delete", "serviceaccount", "-n", testNS, cbtClient, cbtNoRole)
	c.waitPoolsEmpty(t)
}

// taskPID is the host PID of a container's task on node (the nodes share
// the machine's PID namespace).
func (c *cluster) taskPID(t *testing.T, nodeName, id string) int {
	t.Helper()
	for _, n := range c.nodes {
		if n.name != nodeName {
			continue
		}
		out, err := c.ctr(n, "tasks", "ls")
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(out, "\n") {
			if f := strings.Fields(l); len(f) >= 2 && f[0] == id {
				pid, err := strconv.Atoi(f[1])
				if err != nil {
					t.Fatalf("ctr tasks ls: %q", l)
				}
				return pid
			}
		}
		t.Fatalf("no task %s on %s:\n%s", id, nodeName, out)
	}
	t.Fatalf("no node %s", nodeName)
	return 0
}

// rawCodec passes messages through as bytes.
type rawCodec struct{}

func (rawCodec) Name() string { return "proto" }

func (rawCodec) Marshal(v any) ([]byte, error) {
	if b, ok := v.([]byte); ok {
		return b, nil
	}
	return nil, fmt.Errorf("rawCodec: %T", v)
}

func (rawCodec) Unmarshal(data []byte, v any) error {
	p, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawCodec: %T", v)
	}
	*p = append((*p)[:0], data...)
	return nil
}

// Scenario 19 (opt-in, QCOW2_CSI_E2E_CBT_BENCH=1; tests/bench/cbt-sidecar.sh
// runs it): lister wall time for the delta and the allocation of a 10 GiB
// block volume with 1 GiB changed between two snapshots (1024 runs of
// 1 MiB, 10 MiB apart), through the sidecar (the whole lister process:
// API lookups, token, TLS, authentication, the stream) and through the
// controller's CSI socket directly (the stream alone), in the same run.
func testCBTBench(t *testing.T, c *cluster) {
	if os.Getenv("QCOW2_CSI_E2E_CBT_BENCH") != "1" {
		t.Skip("opt-in measurement: QCOW2_CSI_E2E_CBT_BENCH=1 (tests/bench/cbt-sidecar.sh)")
	}
	reps := 3
	if n, err := strconv.Atoi(os.Getenv("REPS")); err == nil && n > 0 {
		reps = n
	}
	c.backupServiceAccounts(t)
	defer c.kubectl("delete", "clusterrolebinding", "e2e-cbt-client")
	defer c.kubectl("delete", "serviceaccount", "-n", testNS, cbtClient, cbtNoRole)
	// A failed measurement must not leave its pod to scenario 8's upgrade.
	defer func() {
		c.kubectl("delete", "pod", "-n", testNS, "cbt-w", "--wait=true", "--timeout=120s")
		c.kubectl("delete", "volumesnapshot", "-n", testNS, "bench1", "bench2", "--ignore-not-found", "--wait=true", "--timeout=120s")
		c.kubectl("delete", "pvc", "-n", testNS, "cbt", "--ignore-not-found", "--wait=true", "--timeout=120s")
	}()
	c.mustApply(t, pvcManifest("cbt", "10Gi", "Block"))
	c.mustApply(t, podManifest("cbt-w", "cbt", true, "sleep 3600"))
	c.podReady(t, testNS, "cbt-w", 3*time.Minute)
	c.takeSnapshot(t, "bench1", "qcow2")
	c.exec(t, testNS, "cbt-w", "i=0; while [ $i -lt 1024 ]; do dd if=/dev/urandom of=/dev/xvda bs=1048576 seek=$((i*10)) count=1 conv=notrunc 2>/dev/null || exit 1; i=$((i+1)); done; sync")
	c.takeSnapshot(t, "bench2", "qcow2")
	base, target := c.snapshotHandle(t, "bench1"), c.snapshotHandle(t, "bench2")

	// The socket's path is longer than a unix socket address may be: dial
	// it through a short symlink.
	sock := filepath.Join(os.TempDir(), fmt.Sprintf("cbt-%d.sock", os.Getpid()))
	os.Remove(sock)
	if err := os.Symlink(c.controllerSocket(t), sock); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(sock)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	md := csi.NewSnapshotMetadataClient(conn)
	direct := func(delta bool) (time.Duration, int64) {
		ctx := context.Background()
		t0 := time.Now()
		var n int64
		var recv func() ([]*csi.BlockMetadata, error)
		if delta {
			s, err := md.GetMetadataDelta(ctx, &csi.GetMetadataDeltaRequest{BaseSnapshotId: base, TargetSnapshotId: target})
			if err != nil {
				t.Fatal(err)
			}
			recv = func() ([]*csi.BlockMetadata, error) { m, err := s.Recv(); return m.GetBlockMetadata(), err }
		} else {
			s, err := md.GetMetadataAllocated(ctx, &csi.GetMetadataAllocatedRequest{SnapshotId: target})
			if err != nil {
				t.Fatal(err)
			}
			recv = func() ([]*csi.BlockMetadata, error) { m, err := s.Recv(); return m.GetBlockMetadata(), err }
		}
		for {
			b, err := recv()
			if errors.Is(err, io.EOF) {
				return time.Since(t0), n
			}
			if err != nil {
				t.Fatal(err)
			}
			for _, x := range b {
				n += x.SizeBytes
			}
		}
	}
	type row struct {
		sidecar, socket []time.Duration
		bytes           [2]int64
	}
	rows := map[string]*row{"delta": {}, "allocated": {}}
	for range reps {
		for _, name := range []string{"delta", "allocated"} {
			r := rows[name]
			args := []string{"-s", "bench2"}
			if name == "delta" {
				args = append(args, "-p", "bench1")
			}
			l := c.mustList(t, args...)
			d, n := direct(name == "delta")
			r.sidecar, r.socket = append(r.sidecar, l.took), append(r.socket, d)
			r.bytes = [2]int64{total(l.tuples), n}
		}
	}
	minMed := func(ds []time.Duration) string {
		s := append([]time.Duration(nil), ds...)
		sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
		return fmt.Sprintf("%.0f/%.0f", float64(s[0])/1e6, float64(s[len(s)/2])/1e6)
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "10 GiB block volume, 1 GiB changed in 1024 runs; ms min/median of %d, same run\n", reps)
	fmt.Fprintf(&sb, "%-10s %22s %22s %10s\n", "list", "lister via sidecar", "CSI socket direct", "MiB listed")
	for _, name := range []string{"delta", "allocated"} {
		r := rows[name]
		if r.bytes[0] != r.bytes[1] {
			t.Errorf("%s: the lister listed %d bytes, the socket %d", name, r.bytes[0], r.bytes[1])
		}
		fmt.Fprintf(&sb, "%-10s %22s %22s %10d\n", name, minMed(r.sidecar), minMed(r.socket), r.bytes[0]>>20)
	}
	t.Logf("CBT-BENCH\n%s", sb.String())
}

// controllerSocket is the host path of a Ready controller pod's CSI socket
// (its socket-dir emptyDir, under its node's kubelet directory).
func (c *cluster) controllerSocket(t *testing.T) string {
	t.Helper()
	out := c.mustKubectl(t, "get", "pods", "-n", releaseNS, "-l", "app.kubernetes.io/component=controller", "-o",
		`jsonpath={range .items[*]}{.metadata.uid} {.spec.nodeName} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}`)
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(l)
		if len(f) != 3 || f[2] != "True" {
			continue
		}
		for _, n := range c.nodes {
			if n.name == f[1] {
				p := n.path("kubelet", "pods", f[0], "volumes/kubernetes.io~empty-dir/socket-dir/csi.sock")
				if _, err := os.Stat(p); err == nil {
					return p
				}
			}
		}
	}
	t.Fatalf("no controller CSI socket found:\n%s", out)
	return ""
}
