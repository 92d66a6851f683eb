package e2e

import (
	"bytes"
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
	}{
		{
			name: "defaults: standard sidecars, nbd, WaitForFirstConsumer, no Deployment",
			has: []string{"kind: CSIDriver", "attachRequired: false", "podInfoOnMount: true", "fsGroupPolicy: File",
				"name: node-driver-registrar", "name: liveness-probe", "name: csi-provisioner", "name: csi-snapshotter",
				"name: csi-resizer", "--node-deployment=true", "--attach-backend=nbd", "mountPropagation: Bidirectional",
				"volumeBindingMode: WaitForFirstConsumer", "kind: VolumeSnapshotClass", "kind: Service",
				"storageCapacity: false", "registry.k8s.io/sig-storage/csi-node-driver-registrar:", "--controller-expand=false",
				"--mode=all", "--leader-election=true"},
			hasNot: []string{"--register-with-kubelet", "--fuse-dir", "kind: ServiceMonitor", "kind: PodMonitor", "kind: Deployment"},
		},
		{
			name:   "builtin registrar: no registrar or liveness sidecar, driver registers itself",
			set:    []string{"node.registrar=builtin", "attachBackend=fuse", "kubeletDir=/srv/kubelet"},
			has:    []string{"--register-with-kubelet", "--fuse-dir=/run/qcow2-csi/fuse", "--registration-dir=/registration", "--kubelet-registration-path=/srv/kubelet/plugins/qcow2.csi.qcow2-csi.io/csi.sock", "--health-address=:9808", "--attach-backend=fuse", "path: /srv/kubelet/plugins_registry"},
			hasNot: []string{"name: node-driver-registrar", "name: liveness-probe"},
		},
		{
			name: "monitoring, capacity, no snapshots, no resizer",
			set: []string{"metrics.serviceMonitor.enabled=true", "metrics.podMonitor.enabled=true", "node.storageCapacity=true",
				"node.snapshotter.enabled=false", "volumeSnapshotClass.create=false", "node.resizer.enabled=false"},
			has:    []string{"kind: ServiceMonitor", "kind: PodMonitor", "storageCapacity: true", "--enable-capacity=true"},
			hasNot: []string{"name: csi-snapshotter", "kind: VolumeSnapshotClass", "name: csi-resizer", "-resizer\n"},
		},
		{
			name: "storage class parameters are quoted strings",
			set:  []string{"storageClasses[0].name=fast", "storageClasses[0].parameters.clusterSize=65536", "storageClasses[0].isDefault=true"},
			has:  []string{"name: fast", `clusterSize: "65536"`, `storageclass.kubernetes.io/is-default-class: "true"`},
		},
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
		})
	}
}
