package e2e

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// renderError carries helm's message.
type renderError string

func (e renderError) Error() string { return string(e) }

// helmTemplate renders the chart with the built helm; no cluster needed.
func helmTemplate(t *testing.T, set ...string) (string, error) {
	t.Helper()
	bin := buildTools(t)
	root := repoRoot(t)
	args := []string{"template", "qcow2-csi", filepath.Join(root, "charts/qcow2-csi"), "--namespace", "qcow2-csi"}
	for _, s := range set {
		args = append(args, "--set", s)
	}
	cmd := exec.Command(filepath.Join(bin, "helm"), args...)
	home := t.TempDir()
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+home, "HELM_CONFIG_HOME="+home, "HELM_DATA_HOME="+home)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", renderError(fmt.Sprintf("%v: %s", err, stderr.Bytes()))
	}
	return string(out), nil
}

// TestDeployManifestsCurrent: deploy/qcow2-csi.yaml is what `make manifests`
// renders from the chart now.
func TestDeployManifestsCurrent(t *testing.T) {
	buildTools(t)
	root := repoRoot(t)
	out := filepath.Join(t.TempDir(), "qcow2-csi.yaml")
	cmd := exec.Command(filepath.Join(root, "hack/e2e/render-manifests.sh"), out)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("render-manifests.sh: %v\n%s", err, b)
	}
	want, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	have, err := os.ReadFile(filepath.Join(root, "deploy/qcow2-csi.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(have, want) {
		t.Fatalf("deploy/qcow2-csi.yaml is not what the chart renders: run `make manifests` and commit it")
	}
}

// TestChartRender: the chart's switches produce the objects they promise,
// and invalid choices fail with a message naming the value.
func TestChartRender(t *testing.T) {
	lint := exec.Command(filepath.Join(buildTools(t), "helm"), "lint", "--strict", filepath.Join(repoRoot(t), "charts/qcow2-csi"))
	home := t.TempDir()
	lint.Env = append(os.Environ(), "HELM_CACHE_HOME="+home, "HELM_CONFIG_HOME="+home, "HELM_DATA_HOME="+home)
	if out, err := lint.CombinedOutput(); err != nil {
		t.Fatalf("helm lint --strict: %v\n%s", err, out)
	}
	tests := []struct {
		name    string
		set     []string
		has     []string
		hasNot  []string
		wantErr string
		// What the controller Deployment and the node DaemonSet, each
		// on its own, must (not) hold.
		controller, node, nodeNot []string
	}{
		{
			name: "defaults: controller Deployment with central sidecars, node DaemonSet with agent over mTLS",
			has: []string{"kind: CSIDriver", "attachRequired: false", "podInfoOnMount: true", "fsGroupPolicy: File",
				"kind: Deployment", "replicas: 2", "--mode=controller", "--agent-port=9821", "--agent-server-name=qcow2-csi-agent",
				"--agent-namespace=qcow2-csi", "--agent-selector=app.kubernetes.io/name=qcow2-csi,app.kubernetes.io/instance=qcow2-csi,app.kubernetes.io/component=node",
				"name: csi-provisioner", "name: csi-snapshotter", "name: csi-resizer", "--strict-topology=true", "--immediate-topology=false",
				"--extra-create-metadata=true", "--leader-election=true", "--kube-api-qps=20", "--kube-api-burst=40",
				"kind: DaemonSet", "--mode=node", "--agent-address=:9821", "--agent-client-name=qcow2-csi-controller",
				"--tls-ca=/tls/ca.crt", "--tls-cert=/tls/tls.crt", "--tls-key=/tls/tls.key",
				"name: qcow2-csi-agent-tls", "name: qcow2-csi-controller-tls", "type: kubernetes.io/tls",
				"name: node-driver-registrar", "name: liveness-probe", "--attach-backend=nbd", "mountPropagation: Bidirectional",
				"volumeBindingMode: WaitForFirstConsumer", "kind: VolumeSnapshotClass", "name: qcow2-csi-metrics", "name: qcow2-csi-controller-metrics",
				"storageCapacity: false", "registry.k8s.io/sig-storage/csi-node-driver-registrar:",
				"resources: [\"pods\"]\n    verbs: [\"get\", \"list\", \"watch\"]", "automountServiceAccountToken: false",
				"--feature-gates=VolumeAttributesClass=true", "kind: VolumeAttributesClass", "name: qcow2-standard", "name: qcow2-unlimited",
				"driverName: qcow2.csi.qcow2-csi.io\nparameters:\n  readBytesPerSecond: \"0\"",
				// changed block tracking for backup tools (issue 14)
				"name: csi-snapshot-metadata", "registry.k8s.io/sig-storage/csi-snapshot-metadata:v0.2.0", "--port=50051",
				"--max-streaming-duration-min=10", "tcpSocket:\n              port: cbt-grpc", "name: qcow2-csi-snapshot-metadata-tls",
				"kind: SnapshotMetadataService", "apiVersion: cbt.storage.k8s.io/v1alpha1", "address: qcow2-csi-snapshot-metadata.qcow2-csi.svc:6443",
				`audience: "qcow2.csi.qcow2-csi.io"`, "port: 6443\n      targetPort: cbt-grpc",
				`resources: ["volumesnapshots", "volumesnapshotcontents", "volumesnapshotclasses"]`, `resources: ["tokenreviews"]`, `resources: ["subjectaccessreviews"]`,
				// group snapshots (issue 15)
				"kind: VolumeGroupSnapshotClass", "apiVersion: groupsnapshot.storage.k8s.io/v1", "name: qcow2-group", "--feature-gates=CSIVolumeGroupSnapshot=true",
				`resources: ["volumegroupsnapshotcontents/status"]`,
				// the provisioner's finalizer on a snapshot it restores from
				"resources: [\"volumesnapshots\"]\n    verbs: [\"get\", \"list\", \"watch\", \"update\"]"},
			hasNot: []string{"--node-deployment", "groupsnapshot.storage.kubernetes.io/is-default-class", "--mode=all", "--controller-expand", "--register-with-kubelet", "--fuse-dir", "--fuse-uring", "--overcommit-ratio", "--pool-warning-percent",
				"kind: ServiceMonitor", "kind: PodMonitor", "kind: Certificate", "--enable-get-snapshot", "--group-hold-timeout", "--enable-capacity", "grpc_health_probe"},
			controller: []string{"livenessProbe:\n            httpGet:\n              path: /healthz\n              port: healthz\n            failureThreshold: 5",
				"readinessProbe:\n            httpGet:\n              path: /readyz\n              port: healthz\n            failureThreshold: 3"},
			nodeNot: []string{"path: /readyz"},
		},
		{
			name:       "group snapshot hold timeout reaches the controller and the nodes",
			set:        []string{"volumeGroupSnapshotClass.holdTimeout=2s"},
			controller: []string{"--group-hold-timeout=2s"},
			node:       []string{"--group-hold-timeout=2s"},
		},
		{
			name:       "controller probes are the controller's own",
			set:        []string{"controller.livenessProbe.periodSeconds=7", "controller.readinessProbe.periodSeconds=4", "node.livenessProbe.periodSeconds=13"},
			controller: []string{"path: /healthz", "periodSeconds: 7", "path: /readyz", "periodSeconds: 4"},
			node:       []string{"path: /healthz", "periodSeconds: 13"},
			nodeNot:    []string{"periodSeconds: 7", "periodSeconds: 4"},
		},
		{
			name: "user Secrets: no Secret rendered, the pods mount the named ones",
			set: []string{"agent.tls.source=secret", "agent.tls.agentSecret=my-agent", "agent.tls.controllerSecret=my-ctl",
				"snapshotMetadata.tls.source=secret", "snapshotMetadata.tls.secretName=my-smd", "snapshotMetadata.tls.caCert=my-ca"},
			has:    []string{"secretName: my-agent", "secretName: my-ctl", "secretName: my-smd", "caCert: bXktY2E="},
			hasNot: []string{"kind: Secret", "kind: Certificate"},
		},
		{
			name: "cert-manager Certificates from the given issuer",
			set: []string{"agent.tls.source=certManager", "agent.tls.certManager.issuerRef.name=ca-issuer", "agent.tls.certManager.issuerRef.kind=ClusterIssuer",
				"snapshotMetadata.tls.source=certManager", "snapshotMetadata.tls.certManager.issuerRef.name=ca-issuer", "snapshotMetadata.tls.caCert=my-ca"},
			has: []string{"kind: Certificate", "commonName: qcow2-csi-agent", "commonName: qcow2-csi-controller", "dnsNames: [qcow2-csi-controller]",
				`dnsNames: ["qcow2-csi-snapshot-metadata.qcow2-csi.svc","qcow2-csi-snapshot-metadata.qcow2-csi"]`, "secretName: qcow2-csi-snapshot-metadata-tls", "caCert: bXktY2E=",
				"usages: [digital signature, key encipherment, server auth]", "usages: [digital signature, key encipherment, client auth]",
				"name: ca-issuer", "kind: ClusterIssuer", "secretName: qcow2-csi-agent-tls", "secretName: qcow2-csi-controller-tls"},
			hasNot: []string{"kind: Secret"},
		},
		{
			name: "builtin registrar: no registrar or liveness sidecar, driver registers itself",
			set:  []string{"node.registrar=builtin", "attachBackend=fuse", "kubeletDir=/srv/kubelet", "fuseUring=true"},
			has: []string{"--register-with-kubelet", "--fuse-dir=/run/qcow2-csi/fuse", "--fuse-uring", "--registration-dir=/registration", "--kubelet-registration-path=/srv/kubelet/plugins/qcow2.csi.qcow2-csi.io/csi.sock", "--kubelet-dir=/srv/kubelet",
				"--health-address=:9808", "--attach-backend=fuse", "path: /srv/kubelet/plugins_registry"},
			hasNot: []string{"name: node-driver-registrar", "name: liveness-probe"},
			node:   []string{"path: /readyz"},
		},
		{
			name: "monitoring, capacity, GET_SNAPSHOT, no snapshots, no resizer",
			set: []string{"metrics.serviceMonitor.enabled=true", "metrics.podMonitor.enabled=true", "controller.storageCapacity=true",
				"controller.snapshotter.enabled=false", "volumeSnapshotClass.create=false", "controller.resizer.enabled=false",
				"controller.enableGetSnapshot=true", "controller.replicas=3"},
			has: []string{"kind: ServiceMonitor", "kind: PodMonitor", "values: [node, controller]", "storageCapacity: true", "--enable-capacity=true",
				"--capacity-ownerref-level=2", "--enable-get-snapshot", "replicas: 3"},
			hasNot: []string{"name: csi-snapshotter", "kind: VolumeSnapshotClass", "name: csi-resizer", "-resizer\n", "-snapshotter\n",
				"kind: VolumeGroupSnapshotClass", "CSIVolumeGroupSnapshot"},
		},
		{
			name:   "group snapshots off",
			set:    []string{"volumeGroupSnapshotClass.enabled=false"},
			has:    []string{"name: csi-snapshotter", "kind: VolumeSnapshotClass"},
			hasNot: []string{"kind: VolumeGroupSnapshotClass", "CSIVolumeGroupSnapshot"},
		},
		{
			name: "group snapshot class: default, retained, parameters",
			set: []string{"volumeGroupSnapshotClass.name=db", "volumeGroupSnapshotClass.isDefault=true",
				"volumeGroupSnapshotClass.deletionPolicy=Retain", "volumeGroupSnapshotClass.parameters.x=1"},
			has: []string{"kind: VolumeGroupSnapshotClass\nmetadata:\n  name: db\n", `groupsnapshot.storage.kubernetes.io/is-default-class: "true"`,
				"deletionPolicy: Retain\nparameters:\n  x: \"1\""},
		},
		{
			name:   "no VolumeAttributesClasses, modify left to the resizer's API detection",
			set:    []string{"volumeAttributesClasses=null", "controller.resizer.modifyVolume=false"},
			has:    []string{"name: csi-resizer"},
			hasNot: []string{"kind: VolumeAttributesClass", "--feature-gates=VolumeAttributesClass"},
		},
		{
			name:   "snapshot metadata off",
			set:    []string{"snapshotMetadata.enabled=false"},
			hasNot: []string{"csi-snapshot-metadata", "kind: SnapshotMetadataService", "snapshot-metadata-tls", "cbt.storage.k8s.io"},
		},
		{
			name: "snapshot metadata audience, port and arguments",
			set:  []string{"snapshotMetadata.audience=backup", "snapshotMetadata.servicePort=8443", "snapshotMetadata.extraArgs={--kube-api-qps=20}"},
			has:  []string{`audience: "backup"`, "address: qcow2-csi-snapshot-metadata.qcow2-csi.svc:8443", "--kube-api-qps=20"},
		},
		{
			name: "sidecars' API request limits",
			set:  []string{"controller.provisioner.kubeAPI.qps=7.5", "controller.snapshotter.kubeAPI.qps=50", "controller.snapshotter.kubeAPI.burst=100"},
			controller: []string{"--extra-create-metadata=true\n            - --default-fstype=ext4\n            - --kube-api-qps=7.5\n            - --kube-api-burst=40\n",
				"--feature-gates=CSIVolumeGroupSnapshot=true\n            - --kube-api-qps=50\n            - --kube-api-burst=100\n"},
		},
		{
			name: "pool space limits",
			set:  []string{"pool.overcommitRatio=0", "pool.warningPercent=90"},
			has:  []string{"--overcommit-ratio=0", "--pool-warning-percent=90"},
		},
		{
			name: "storage class parameters are quoted strings",
			set:  []string{"storageClasses[0].name=fast", "storageClasses[0].parameters.clusterSize=65536", "storageClasses[0].isDefault=true"},
			has:  []string{"name: fast", `clusterSize: "65536"`, `storageclass.kubernetes.io/is-default-class: "true"`},
		},
		{name: "bad TLS source", set: []string{"agent.tls.source=plaintext"}, wantErr: `agent.tls.source must be generate, secret or certManager, not "plaintext"`},
		{name: "cert-manager without issuer", set: []string{"agent.tls.source=certManager"}, wantErr: "agent.tls.certManager.issuerRef.name is required"},
		{name: "bad snapshot metadata TLS source", set: []string{"snapshotMetadata.tls.source=none"}, wantErr: `snapshotMetadata.tls.source must be generate, secret or certManager, not "none"`},
		{name: "snapshot metadata Secret without its CA", set: []string{"snapshotMetadata.tls.source=secret"},
			wantErr: "snapshotMetadata.tls.caCert is required with snapshotMetadata.tls.source=secret: the PEM of the CA that signs qcow2-csi-snapshot-metadata.qcow2-csi.svc"},
		{name: "snapshot metadata cert-manager without issuer", set: []string{"snapshotMetadata.tls.source=certManager", "snapshotMetadata.tls.caCert=x"},
			wantErr: "snapshotMetadata.tls.certManager.issuerRef.name is required"},
		{name: "bad group snapshot deletion policy", set: []string{"volumeGroupSnapshotClass.deletionPolicy=Keep"},
			wantErr: `volumeGroupSnapshotClass.deletionPolicy must be Delete or Retain, not "Keep"`},
		{name: "sidecar API rate zero", set: []string{"controller.snapshotter.kubeAPI.qps=0"},
			wantErr: `controller.snapshotter.kubeAPI.qps must be a number above 0, not "0"`},
		{name: "sidecar API burst not whole", set: []string{"controller.provisioner.kubeAPI.burst=2.5"},
			wantErr: `controller.provisioner.kubeAPI.burst must be a whole number of at least 1, not "2.5"`},
		{name: "sidecar API limits unset", set: []string{"controller.snapshotter.kubeAPI=null"},
			wantErr: `controller.snapshotter.kubeAPI.qps must be a number above 0, not "<nil>"`},
		{name: "no controller", set: []string{"controller.replicas=0"}, wantErr: "controller.replicas must be at least 1, not 0"},
		{name: "bad registrar", set: []string{"node.registrar=both"}, wantErr: `node.registrar must be sidecar or builtin, not "both"`},
		{name: "bad attach backend", set: []string{"attachBackend=iscsi"}, wantErr: `attachBackend must be nbd, fuse or auto, not "iscsi"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out, err := helmTemplate(t, tc.set...)
			if tc.wantErr != "" {
				if err == nil {
					t.Fatalf("rendered without error, want %q", tc.wantErr)
				}
				if msg := err.Error(); !strings.Contains(msg, tc.wantErr) {
					t.Fatalf("error %q, want it to contain %q", msg, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("helm template: %v", err)
			}
			for _, s := range tc.has {
				if !strings.Contains(out, s) {
					t.Errorf("rendered chart lacks %q", s)
				}
			}
			for _, s := range tc.hasNot {
				if strings.Contains(out, s) {
					t.Errorf("rendered chart has %q", s)
				}
			}
			ctl, node := chartDoc(t, out, "Deployment", "qcow2-csi-controller"), chartDoc(t, out, "DaemonSet", "qcow2-csi-node")
			for _, s := range tc.controller {
				if !strings.Contains(ctl, s) {
					t.Errorf("controller Deployment lacks %q", s)
				}
			}
			for _, s := range tc.node {
				if !strings.Contains(node, s) {
					t.Errorf("node DaemonSet lacks %q", s)
				}
			}
			for _, s := range tc.nodeNot {
				if strings.Contains(node, s) {
					t.Errorf("node DaemonSet has %q", s)
				}
			}
		})
	}
}

// chartDoc is the rendered object of that kind and name.
func chartDoc(t *testing.T, out, kind, name string) string {
	t.Helper()
	for _, doc := range strings.Split(out, "\n---") {
		if strings.Contains(doc, "\nkind: "+kind+"\n") && strings.Contains(doc, "\n  name: "+name+"\n") {
			return doc
		}
	}
	t.Fatalf("no %s %s in the rendered chart", kind, name)
	return ""
}

// TestChartCertificates: the generated Secrets hold an agent server
// certificate for qcow2-csi-agent and a controller client certificate for
// qcow2-csi-controller, both signed by the one CA both Secrets carry, with
// keys that match; and the csi-snapshot-metadata sidecar's server
// certificate for the DNS name of its Service, signed by the CA the
// SnapshotMetadataService gives clients.
func TestChartCertificates(t *testing.T) {
	out, err := helmTemplate(t)
	if err != nil {
		t.Fatal(err)
	}
	secrets := map[string]map[string][]byte{}
	for _, doc := range strings.Split(out, "\n---") {
		if !strings.Contains(doc, "\nkind: Secret") {
			continue
		}
		var name string
		data := map[string][]byte{}
		for _, l := range strings.Split(doc, "\n") {
			l = strings.TrimSpace(l)
			if v, ok := strings.CutPrefix(l, "name: "); ok && name == "" {
				name = v
			}
			for _, k := range []string{"ca.crt", "tls.crt", "tls.key"} {
				if v, ok := strings.CutPrefix(l, k+": "); ok {
					b, err := base64.StdEncoding.DecodeString(v)
					if err != nil {
						t.Fatalf("%s %s: %v", name, k, err)
					}
					data[k] = b
				}
			}
		}
		secrets[name] = data
	}
	if smd := secrets["qcow2-csi-snapshot-metadata-tls"]; smd == nil {
		t.Errorf("no Secret qcow2-csi-snapshot-metadata-tls rendered")
	} else {
		sms := chartDoc(t, out, "SnapshotMetadataService", "qcow2.csi.qcow2-csi.io")
		if want := "caCert: " + base64.StdEncoding.EncodeToString(smd["ca.crt"]); !strings.Contains(sms, want) {
			t.Errorf("the SnapshotMetadataService's caCert is not the sidecar Secret's ca.crt:\n%s", sms)
		}
		verifyChartCert(t, smd, smd["ca.crt"], "qcow2-csi-snapshot-metadata.qcow2-csi.svc", x509.ExtKeyUsageServerAuth)
		verifyChartCert(t, smd, smd["ca.crt"], "qcow2-csi-snapshot-metadata.qcow2-csi", x509.ExtKeyUsageServerAuth)
	}
	agent, ctl := secrets["qcow2-csi-agent-tls"], secrets["qcow2-csi-controller-tls"]
	if agent == nil || ctl == nil {
		t.Fatalf("rendered Secrets %v, want qcow2-csi-agent-tls and qcow2-csi-controller-tls", secrets)
	}
	if !bytes.Equal(agent["ca.crt"], ctl["ca.crt"]) {
		t.Fatalf("the two Secrets carry different CAs")
	}
	verifyChartCert(t, agent, agent["ca.crt"], "qcow2-csi-agent", x509.ExtKeyUsageServerAuth)
	verifyChartCert(t, ctl, agent["ca.crt"], "qcow2-csi-controller", x509.ExtKeyUsageClientAuth)
	if cn := chartCert(t, agent).Subject.CommonName; cn != "qcow2-csi-agent" {
		t.Errorf("agent certificate CN %q, want qcow2-csi-agent", cn)
	}
	if cn := chartCert(t, ctl).Subject.CommonName; cn != "qcow2-csi-controller" {
		t.Errorf("controller certificate CN %q, want qcow2-csi-controller", cn)
	}
}

// chartCert is the certificate of a rendered Secret's tls.crt, checked to
// match its tls.key.
func chartCert(t *testing.T, secret map[string][]byte) *x509.Certificate {
	t.Helper()
	pair, err := tls.X509KeyPair(secret["tls.crt"], secret["tls.key"])
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

// verifyChartCert checks that a rendered Secret's certificate is valid for
// name and usage under the CA in caPEM.
func verifyChartCert(t *testing.T, secret map[string][]byte, caPEM []byte, name string, usage x509.ExtKeyUsage) {
	t.Helper()
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		t.Fatalf("ca.crt is not a PEM certificate: %q", caPEM)
	}
	if _, err := chartCert(t, secret).Verify(x509.VerifyOptions{Roots: pool, DNSName: name, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
		t.Errorf("%s certificate: %v", name, err)
	}
}
