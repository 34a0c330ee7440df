{{/* Names, labels and paths shared by the dynsnap chart's templates. */}}
{{- define "dynsnap.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dynsnap.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dynsnap.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dynsnap.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node-agent
{{- end -}}

{{- define "dynsnap.labels" -}}
{{ include "dynsnap.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "dynsnap.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dynsnap.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "dynsnap.socketPath" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.agent.socketDir) .Values.agent.socketName -}}
{{- end -}}

{{- define "dynsnap.claimName" -}}
{{- default (printf "%s-snapshots" (include "dynsnap.fullname" .)) .Values.storage.pvc.existingClaim -}}
{{- end -}}
