{{/*
Chart name, truncated to 63 characters (the DNS label limit).
*/}}
{{- define "pqfed.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, or the release name when it already contains the chart name.
*/}}
{{- define "pqfed.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
chart label value: <name>-<version>.
*/}}
{{- define "pqfed.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: stable for the life of a release (Deployment selectors are immutable).
*/}}
{{- define "pqfed.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pqfed.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Standard labels on every object of the chart.
*/}}
{{- define "pqfed.labels" -}}
helm.sh/chart: {{ include "pqfed.chart" . }}
{{ include "pqfed.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pqfed
{{- end }}

{{/*
The operator's ServiceAccount name.
*/}}
{{- define "pqfed.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pqfed.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference; the tag defaults to the chart's appVersion.
*/}}
{{- define "pqfed.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
"true" when more than one operator replica runs, i.e. kopf peering is on.
*/}}
{{- define "pqfed.peering" -}}
{{- if gt (int .Values.operator.replicas) 1 }}true{{ end }}
{{- end }}

{{/*
Name of the kopf peering object(s) the replicas share.
*/}}
{{- define "pqfed.peeringName" -}}
{{- include "pqfed.fullname" . }}
{{- end }}

{{/*
Namespace a namespaced check (helm test) looks at: the first watched one, else the release's.
*/}}
{{- define "pqfed.checkNamespace" -}}
{{- if .Values.watchNamespaces }}{{ first .Values.watchNamespaces }}{{ else }}{{ .Release.Namespace }}{{ end }}
{{- end }}

{{/*
The least-privilege rules the operator needs in every namespace it watches.
*/}}
{{- define "pqfed.rbacRules" -}}
# FederationJobs: watch them, add finalizers, write status. The operator never creates or
# deletes jobs. list/watch do not exist on subresources.
- apiGroups: ["pqfed.io"]
  resources: ["federationjobs"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["pqfed.io"]
  resources: ["federationjobs/status", "federationjobs/finalizers"]
  verbs: ["get", "patch", "update"]
# The aggregator, client and edge pods of each job, and their logs for `pqfed status`.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete", "patch"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
# Per-job aggregator Service, PQC identity and checkpoint Secrets, job ConfigMaps.
- apiGroups: [""]
  resources: ["services", "secrets", "configmaps"]
  verbs: ["get", "list", "watch", "create", "delete", "patch"]
# Per-job NetworkPolicy: only the sidecars' PQC port is reachable on the pod network.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "create", "delete"]
# kopf reports handler progress and errors as Events.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
