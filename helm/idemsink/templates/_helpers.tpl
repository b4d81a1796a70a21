{{/* The chart's name, or nameOverride. */}}
{{- define "idemsink.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name, unique per release, at most 63 characters. */}}
{{- define "idemsink.fullname" -}}
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

{{- define "idemsink.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "idemsink.selectorLabels" -}}
app.kubernetes.io/name: {{ include "idemsink.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "idemsink.labels" -}}
helm.sh/chart: {{ include "idemsink.chart" . }}
{{ include "idemsink.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: sink
{{- end }}

{{- define "idemsink.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "idemsink.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "idemsink.configMapName" -}}
{{- default (printf "%s-pipelines" (include "idemsink.fullname" .)) .Values.existingConfigMap }}
{{- end }}

{{- define "idemsink.databaseSecretName" -}}
{{- default (printf "%s-database" (include "idemsink.fullname" .)) .Values.database.existingSecret }}
{{- end }}

{{- define "idemsink.kafkaSecretName" -}}
{{- default (printf "%s-kafka" (include "idemsink.fullname" .)) .Values.kafka.existingSecret }}
{{- end }}

{{- define "idemsink.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The environment every idemsink container gets: the database URL and Kafka credentials. */}}
{{- define "idemsink.env" -}}
- name: IDEMSINK_CONFIG
  value: /etc/idemsink/connectors
- name: IDEMSINK_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
{{- if or .Values.database.url .Values.database.existingSecret }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "idemsink.databaseSecretName" . }}
      key: {{ if .Values.database.existingSecret }}{{ .Values.database.existingSecretKey }}{{ else }}DATABASE_URL{{ end }}
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "idemsink.envFrom" -}}
{{- if or .Values.kafka.credentials .Values.kafka.existingSecret -}}
envFrom:
  - secretRef:
      name: {{ include "idemsink.kafkaSecretName" . }}
{{- end }}
{{- end }}
