{{/* Names and labels. */}}
{{- define "registry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "registry.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- end }}

{{- define "registry.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "registry.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "registry.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
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
{{- if .Values.mirror }}
app.kubernetes.io/component: mirror
{{- end }}
{{- end }}

{{/* The registry's config.yml: configData plus the storage, TLS and auth sections. */}}
{{- define "registry.config" -}}
{{- $config := deepCopy .Values.configData }}
{{- $storage := deepCopy (default dict $config.storage) }}
{{- if eq .Values.storage "s3" }}
{{- /* Distribution's S3 options, by their config names; "" leaves the driver's default. */}}
{{- $s3 := dict }}
{{- range $key, $value := omit .Values.s3 "regionEndpoint" "disableRedirect" "caBundleSecretName" "skipVerify" }}
{{- if not (eq (toString $value) "") }}{{ $_ := set $s3 $key $value }}{{ end }}
{{- end }}
{{- with .Values.s3.regionEndpoint }}{{ $_ := set $s3 "regionendpoint" . }}{{ end }}
{{- with .Values.mirror }}{{ $_ := set $s3 "rootdirectory" (printf "%s/mirrors/%s" (trimSuffix "/" (toString (default "" $.Values.s3.rootdirectory))) .name) }}{{ end }}
{{- $_ := set $storage "s3" $s3 }}
{{- $_ := set $storage "redirect" (dict "disable" .Values.s3.disableRedirect) }}
{{- else }}
{{- $_ := set $storage "filesystem" (dict "rootdirectory" (ternary (printf "/var/lib/registry/mirrors/%s" (default dict .Values.mirror).name) "/var/lib/registry" (not (empty .Values.mirror)))) }}
{{- end }}
{{- $_ := set $config "storage" $storage }}
{{- $http := deepCopy (default dict $config.http) }}
{{- $_ := set $http "debug" (dict "addr" (printf ":%d" (int .Values.metrics.port)) "prometheus" (dict "enabled" .Values.metrics.enabled "path" .Values.metrics.path)) }}
{{- $_ := set $config "http" $http }}
{{- if .Values.tlsSecretName }}
{{- $_ := set $http "tls" (dict "certificate" "/etc/ssl/docker/tls.crt" "key" "/etc/ssl/docker/tls.key") }}
{{- end }}
{{- if .Values.secrets.htpasswdSecretName }}
{{- $_ := set $config "auth" (dict "htpasswd" (dict "realm" "Registry Realm" "path" "/auth/htpasswd")) }}
{{- end }}
{{- with .Values.mirror }}
{{- /* Proxy mode; the upstream's login comes from the environment (registry.env), never here. */}}
{{- $_ := set $config "proxy" (dict "remoteurl" .remoteurl) }}
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
{{- end }}
{{- /* Go reads every directory in SSL_CERT_DIR: the system's CAs, the S3 endpoint's, an upstream's. */}}
{{- $caDirs := list }}
{{- if and (eq .Values.storage "s3") .Values.s3.caBundleSecretName }}{{ $caDirs = append $caDirs "/etc/ssl/s3" }}{{ end }}
{{- if and .Values.mirror (.Values.mirror).caBundleSecretName }}{{ $caDirs = append $caDirs "/etc/ssl/upstream" }}{{ end }}
{{- with $caDirs }}
- name: SSL_CERT_DIR
  value: {{ prepend . "/etc/ssl/certs" | join ":" }}
{{- end }}
{{- with (default dict .Values.mirror).secretRef }}
- name: REGISTRY_PROXY_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: username
- name: REGISTRY_PROXY_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: password
{{- end }}
{{- with .Values.extraEnvVars }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "registry.volumeMounts" -}}
{{ include "registry.storageVolumeMounts" . }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
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
{{- if (default dict .Values.mirror).caBundleSecretName }}
- name: upstream-ca
  mountPath: /etc/ssl/upstream
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
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
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
{{- with (default dict .Values.mirror).caBundleSecretName }}
- name: upstream-ca
  secret:
    secretName: {{ . }}
    items:
      - {key: ca.crt, path: ca.crt}
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
serviceAccountName: {{ include "registry.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
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
{{- with .Values.topologySpreadConstraints }}
topologySpreadConstraints:
{{- range . }}
  - {{- toYaml (merge (deepCopy .) (dict "labelSelector" (dict "matchLabels" (fromYaml (include "registry.selectorLabels" $))))) | nindent 4 }}
{{- end }}
{{- end }}
{{- $owner := and (eq .Values.storage "filesystem") .Values.persistence.enabled .Values.persistence.chownOnStart }}
{{- if or $owner .Values.initContainers }}
initContainers:
{{- if $owner }}
  {{- /* A hostPath folder is the kubelet's (root, 0755), and fsGroup does not apply to it. */}}
  - name: data-owner
    image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: ["/bin/sh", "-c", "chown {{ .Values.podSecurityContext.runAsUser }}:{{ .Values.podSecurityContext.runAsGroup }} /var/lib/registry"]
    securityContext:
      runAsUser: 0
      runAsNonRoot: false
      allowPrivilegeEscalation: false
      readOnlyRootFilesystem: true
      capabilities: {drop: [ALL], add: [CHOWN]}
    volumeMounts:
      - name: data
        mountPath: /var/lib/registry
{{- end }}
{{- with .Values.initContainers }}
{{ toYaml . | indent 2 }}
{{- end }}
{{- end }}
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
{{- define "registry.pdbApiVersion" -}}
{{- if or (.Capabilities.APIVersions.Has "policy/v1/PodDisruptionBudget") (semverCompare ">=1.21-0" .Capabilities.KubeVersion.Version) -}}
policy/v1
{{- else -}}
policy/v1beta1
{{- end }}
{{- end }}

{{- define "registry.cronJobApiVersion" -}}
{{- $v1 := .Capabilities.APIVersions.Has "batch/v1/CronJob" -}}
{{- $onlyBeta := .Capabilities.APIVersions.Has "batch/v1beta1/CronJob" -}}
{{- if or $v1 (and (not $onlyBeta) (semverCompare ">=1.21-0" .Capabilities.KubeVersion.Version)) -}}
batch/v1
{{- else -}}
batch/v1beta1
{{- end }}
{{- end }}

{{/*
Mistakes caught at render time, each with what to do. First the names of the community
chart (and near misses) that mean something else here; the schema lets exactly these through
so that the message can name ours.
*/}}
{{- define "registry.validate" -}}
{{- $v := .Values }}
{{- $hints := list
  (list $v "replicas" "replicas: use replicaCount")
  (list $v "tlsSecret" "tlsSecret: use tlsSecretName (an existing kubernetes.io/tls Secret)")
  (list $v "proxy" "proxy: each pull-through cache is an entry of mirrors: [{name, remoteurl, secretRef}] (one per upstream)")
  (list $v.persistence "enable" "persistence.enable: use persistence.enabled")
  (list $v.persistence "storageclass" "persistence.storageclass: use persistence.storageClass")
  (list $v.persistence "deleteEnabled" "persistence.deleteEnabled: use configData.storage.delete.enabled")
  (list $v.service "loadBalancerIp" "service.loadBalancerIp: use service.loadBalancerIP")
  (list $v.s3 "skipverify" "s3.skipverify: use s3.skipVerify")
  (list $v.s3 "regionendpoint" "s3.regionendpoint: use s3.regionEndpoint")
  (list $v.secrets "htpasswd" "secrets.htpasswd: crflow references an existing Secret: secrets.htpasswdSecretName (key htpasswd)")
  (list $v.secrets "haSharedSecret" "secrets.haSharedSecret: crflow references an existing Secret: secrets.haSharedSecretName (key haSharedSecret)")
  (list $v.secrets.s3 "accessKey" "secrets.s3.accessKey: crflow references an existing Secret: secrets.s3.secretRef (keys s3AccessKey, s3SecretKey)")
  (list $v.secrets.s3 "secretKey" "secrets.s3.secretKey: crflow references an existing Secret: secrets.s3.secretRef (keys s3AccessKey, s3SecretKey)")
}}
{{- range $hints }}
{{- if hasKey (index . 0) (index . 1) }}{{ fail (index . 2) }}{{ end }}
{{- end }}
{{- with $v.configData.storage }}{{ with .s3 }}
{{- fail (printf "configData.storage.s3: set the S3 options as s3.<option> (%s); the keys come from secrets.s3.secretRef" (keys . | sortAlpha | join ", ")) }}
{{- end }}{{ end }}
{{- with $v.configData.http }}{{ with .debug }}
{{- fail "configData.http.debug: the chart runs the debug server; set metrics.port and metrics.enabled" }}
{{- end }}{{ end }}
{{- if gt (int $v.replicaCount) 1 }}
{{- if and (eq $v.storage "filesystem") (or (not $v.persistence.enabled) (ne $v.persistence.accessMode "ReadWriteMany")) }}
{{- fail (printf "replicaCount: %d replicas on filesystem storage would each see different images; use storage s3, or a ReadWriteMany claim (persistence.enabled and persistence.accessMode ReadWriteMany), or replicaCount 1" (int $v.replicaCount)) }}
{{- end }}
{{- if not $v.secrets.haSharedSecretName }}
{{- fail (printf "replicaCount: %d replicas need one http.secret, or an upload started on one pod fails on another; set secrets.haSharedSecretName (an existing Secret with key haSharedSecret)" (int $v.replicaCount)) }}
{{- end }}
{{- end }}
{{- end }}
