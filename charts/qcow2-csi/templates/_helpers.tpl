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
