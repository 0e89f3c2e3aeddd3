{{/* Names and labels. */}}
{{- define "registry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "registry.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- end }}

{{- define "registry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "registry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "registry.labels" -}}
{{ include "registry.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The registry's config.yml: configData plus the storage, TLS and auth sections. */}}
{{- define "registry.config" -}}
{{- $config := deepCopy .Values.configData }}
{{- $storage := deepCopy (default dict $config.storage) }}
{{- if eq .Values.storage "s3" }}
{{- $s3 := dict "region" .Values.s3.region "bucket" .Values.s3.bucket "encrypt" .Values.s3.encrypt "secure" .Values.s3.secure }}
{{- with .Values.s3.regionEndpoint }}{{ $_ := set $s3 "regionendpoint" . }}{{ end }}
{{- with .Values.s3.rootdirectory }}{{ $_ := set $s3 "rootdirectory" . }}{{ end }}
{{- $_ := set $storage "s3" $s3 }}
{{- $_ := set $storage "redirect" (dict "disable" .Values.s3.disableRedirect) }}
{{- else }}
{{- $_ := set $storage "filesystem" (dict "rootdirectory" "/var/lib/registry") }}
{{- end }}
{{- $_ := set $config "storage" $storage }}
{{- if .Values.tlsSecretName }}
{{- $_ := set $config.http "tls" (dict "certificate" "/etc/ssl/docker/tls.crt" "key" "/etc/ssl/docker/tls.key") }}
{{- end }}
{{- if .Values.secrets.htpasswdSecretName }}
{{- $_ := set $config "auth" (dict "htpasswd" (dict "realm" "Registry Realm" "path" "/auth/htpasswd")) }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* The environment, shared by the Deployment and the garbage-collect CronJob. */}}
{{- define "registry.env" -}}
{{- with .Values.secrets.haSharedSecretName }}
- name: REGISTRY_HTTP_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: haSharedSecret
{{- end }}
{{- if eq .Values.storage "s3" }}
{{- with .Values.secrets.s3.secretRef }}
- name: REGISTRY_STORAGE_S3_ACCESSKEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: s3AccessKey
- name: REGISTRY_STORAGE_S3_SECRETKEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: s3SecretKey
{{- end }}
{{- if .Values.s3.skipVerify }}
- name: REGISTRY_STORAGE_S3_SKIPVERIFY
  value: "true"
{{- end }}
{{- if .Values.s3.caBundleSecretName }}
{{- /* Go reads every directory in SSL_CERT_DIR: the system's CAs and the S3 endpoint's. */}}
- name: SSL_CERT_DIR
  value: /etc/ssl/certs:/etc/ssl/s3
{{- end }}
{{- end }}
{{- with .Values.extraEnvVars }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "registry.volumeMounts" -}}
{{ include "registry.storageVolumeMounts" . }}
{{- if .Values.tlsSecretName }}
- name: tls
  mountPath: /etc/ssl/docker
  readOnly: true
{{- end }}
{{- if .Values.secrets.htpasswdSecretName }}
- name: auth
  mountPath: /auth
  readOnly: true
{{- end }}
{{- end }}

{{/* What a garbage collection needs too: the config and the storage. */}}
{{- define "registry.storageVolumeMounts" -}}
- name: config
  mountPath: /etc/docker/registry
  readOnly: true
{{- if eq .Values.storage "filesystem" }}
- name: data
  mountPath: /var/lib/registry
{{- else if .Values.s3.caBundleSecretName }}
- name: s3-ca
  mountPath: /etc/ssl/s3
  readOnly: true
{{- end }}
{{- end }}

{{- define "registry.volumes" -}}
{{ include "registry.storageVolumes" . }}
{{- with .Values.tlsSecretName }}
- name: tls
  secret:
    secretName: {{ . }}
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
{{- end }}
{{- with .Values.secrets.htpasswdSecretName }}
- name: auth
  secret:
    secretName: {{ . }}
    items:
      - {key: htpasswd, path: htpasswd}
{{- end }}
{{- end }}

{{- define "registry.storageVolumes" -}}
- name: config
  configMap:
    name: {{ include "registry.fullname" . }}-config
{{- if eq .Values.storage "filesystem" }}
- name: data
{{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ .Values.persistence.existingClaim | default (include "registry.fullname" .) }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- else if .Values.s3.caBundleSecretName }}
- name: s3-ca
  secret:
    secretName: {{ .Values.s3.caBundleSecretName }}
    items:
      - {key: ca.crt, path: ca.crt}
{{- end }}
{{- end }}

{{/* The registry container, less what differs between the server and garbage collection. */}}
{{- define "registry.container" -}}
{{ include "registry.containerBase" . }}
volumeMounts: {{- include "registry.volumeMounts" . | trim | nindent 2 }}
{{- end }}

{{- define "registry.gcContainer" -}}
{{ include "registry.containerBase" . }}
volumeMounts: {{- include "registry.storageVolumeMounts" . | trim | nindent 2 }}
{{- end }}

{{- define "registry.containerBase" -}}
image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
imagePullPolicy: {{ .Values.image.pullPolicy }}
command: ["/bin/registry"]
env: {{- include "registry.env" . | trim | nindent 2 }}
securityContext: {{- toYaml .Values.containerSecurityContext | nindent 2 }}
{{- end }}

{{- define "registry.podSpecCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
securityContext: {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "registry.podSpec" -}}
{{ include "registry.podSpecCommon" . }}
volumes: {{- include "registry.volumes" . | nindent 2 }}
{{- end }}

{{/* A garbage collection's pod: the config and the storage, no TLS key, no htpasswd. */}}
{{- define "registry.gcPodSpec" -}}
{{ include "registry.podSpecCommon" . }}
volumes: {{- include "registry.storageVolumes" . | nindent 2 }}
{{- end }}

{{/*
CronJob's API: what the cluster lists, else what its version implies. Offline `helm template`
lists group/versions but no kinds, so there the version decides (batch/v1 from 1.21 on).
*/}}
{{- define "registry.cronJobApiVersion" -}}
{{- $v1 := .Capabilities.APIVersions.Has "batch/v1/CronJob" -}}
{{- $onlyBeta := .Capabilities.APIVersions.Has "batch/v1beta1/CronJob" -}}
{{- if or $v1 (and (not $onlyBeta) (semverCompare ">=1.21-0" .Capabilities.KubeVersion.Version)) -}}
batch/v1
{{- else -}}
batch/v1beta1
{{- end }}
{{- end }}
