{{/* Chart name, truncated to the DNS label limit. */}}
{{- define "qcow2-csi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified app name: the release name when it already holds the chart name. */}}
{{- define "qcow2-csi.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "qcow2-csi.labels" -}}
app.kubernetes.io/name: {{ include "qcow2-csi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "qcow2-csi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qcow2-csi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "qcow2-csi.nodeServiceAccount" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-node" (include "qcow2-csi.fullname" .)) .Values.serviceAccount.node -}}
{{- else -}}
{{- required "serviceAccount.node is required when serviceAccount.create is false" .Values.serviceAccount.node -}}
{{- end -}}
{{- end -}}

{{/* image renders repository:tag for one entry of .Values.image; an empty tag means the appVersion. */}}
{{- define "qcow2-csi.image" -}}
{{- $img := index .root.Values.image .name -}}
{{- printf "%s:%s" $img.repository (default .root.Chart.AppVersion $img.tag) -}}
{{- end -}}

{{/* pluginDir is the kubelet plugin directory that holds the driver's socket. */}}
{{- define "qcow2-csi.pluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.kubeletDir) .Values.driver.name -}}
{{- end -}}

{{- define "qcow2-csi.controllerServiceAccount" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-controller" (include "qcow2-csi.fullname" .)) .Values.serviceAccount.controller -}}
{{- else -}}
{{- required "serviceAccount.controller is required when serviceAccount.create is false" .Values.serviceAccount.controller -}}
{{- end -}}
{{- end -}}

{{/* The Secrets holding the agent's server and the controller's client certificates (ca.crt, tls.crt, tls.key). */}}
{{- define "qcow2-csi.agentTLSSecret" -}}
{{- default (printf "%s-agent-tls" (include "qcow2-csi.fullname" .)) .Values.agent.tls.agentSecret -}}
{{- end -}}
{{- define "qcow2-csi.controllerTLSSecret" -}}
{{- default (printf "%s-controller-tls" (include "qcow2-csi.fullname" .)) .Values.agent.tls.controllerSecret -}}
{{- end -}}

{{/* The names the two certificates carry; the driver's --agent-server-name and --agent-client-name check them. */}}
{{- define "qcow2-csi.agentServerName" -}}qcow2-csi-agent{{- end -}}
{{- define "qcow2-csi.agentClientName" -}}qcow2-csi-controller{{- end -}}

{{/* Label selector of the node plugin Pods: where the controller finds the agents. */}}
{{- define "qcow2-csi.nodeSelectorString" -}}
app.kubernetes.io/name={{ include "qcow2-csi.name" . }},app.kubernetes.io/instance={{ .Release.Name }},app.kubernetes.io/component=node
{{- end -}}

{{/* The csi-snapshot-metadata sidecar's Service, its DNS name (the certificate's SAN) and the address backup clients dial. */}}
{{- define "qcow2-csi.snapshotMetadataService" -}}
{{- printf "%s-snapshot-metadata" (include "qcow2-csi.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "qcow2-csi.snapshotMetadataHost" -}}
{{- printf "%s.%s.svc" (include "qcow2-csi.snapshotMetadataService" .) .Release.Namespace -}}
{{- end -}}
{{- define "qcow2-csi.snapshotMetadataTLSSecret" -}}
{{- default (printf "%s-snapshot-metadata-tls" (include "qcow2-csi.fullname" .)) .Values.snapshotMetadata.tls.secretName -}}
{{- end -}}

{{- define "qcow2-csi.validate" -}}
{{- if not (has .Values.agent.tls.source (list "generate" "secret" "certManager")) -}}
{{- fail (printf "agent.tls.source must be generate, secret or certManager, not %q" .Values.agent.tls.source) -}}
{{- end -}}
{{- if and (eq .Values.agent.tls.source "certManager") (not .Values.agent.tls.certManager.issuerRef.name) -}}
{{- fail "agent.tls.certManager.issuerRef.name is required when agent.tls.source is certManager" -}}
{{- end -}}
{{- if .Values.snapshotMetadata.enabled -}}
{{- if not (has .Values.snapshotMetadata.tls.source (list "generate" "secret" "certManager")) -}}
{{- fail (printf "snapshotMetadata.tls.source must be generate, secret or certManager, not %q" .Values.snapshotMetadata.tls.source) -}}
{{- end -}}
{{- if and (eq .Values.snapshotMetadata.tls.source "certManager") (not .Values.snapshotMetadata.tls.certManager.issuerRef.name) -}}
{{- fail "snapshotMetadata.tls.certManager.issuerRef.name is required when snapshotMetadata.tls.source is certManager" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.volumeGroupSnapshotClass.enabled (not (has .Values.volumeGroupSnapshotClass.deletionPolicy (list "Delete" "Retain"))) -}}
{{- fail (printf "volumeGroupSnapshotClass.deletionPolicy must be Delete or Retain, not %q" .Values.volumeGroupSnapshotClass.deletionPolicy) -}}
{{- end -}}
{{- if lt (int .Values.controller.replicas) 1 -}}
{{- fail (printf "controller.replicas must be at least 1, not %v" .Values.controller.replicas) -}}
{{- end -}}
{{- end -}}

{{- /*
qcow2-csi.kubeAPIArgs: a sidecar's client-side limit on its Kubernetes API
requests (--kube-api-qps, --kube-api-burst; upstream 5 and 10, which a
burst of snapshots or restores waits on). Called with (dict "v" <the
kubeAPI value> "name" <its path, for the error>); qps must be a number
above 0 and burst a whole number of at least 1, or the render fails
naming the value.
*/ -}}
{{- define "qcow2-csi.kubeAPIArgs" -}}
{{- $v := .v | default dict -}}
{{- $qps := toString $v.qps -}}
{{- $burst := toString $v.burst -}}
{{- /* a values file's numbers are float64: 1000000 would print as 1e+06 */ -}}
{{- if and (kindIs "float64" $v.qps) (eq (float64 (int64 $v.qps)) $v.qps) -}}
{{- $qps = toString (int64 $v.qps) -}}
{{- end -}}
{{- if and (kindIs "float64" $v.burst) (eq (float64 (int64 $v.burst)) $v.burst) -}}
{{- $burst = toString (int64 $v.burst) -}}
{{- end -}}
{{- if not (and (regexMatch "^[0-9]*[.]?[0-9]+$" $qps) (gt (float64 $qps) 0.0)) -}}
{{- fail (printf "%s.qps must be a number above 0, not %q" .name $qps) -}}
{{- end -}}
{{- if not (and (regexMatch "^[0-9]+$" $burst) (ge (int64 $burst) 1)) -}}
{{- fail (printf "%s.burst must be a whole number of at least 1, not %q" .name $burst) -}}
{{- end -}}
- --kube-api-qps={{ $qps }}
- --kube-api-burst={{ $burst }}
{{- end -}}
