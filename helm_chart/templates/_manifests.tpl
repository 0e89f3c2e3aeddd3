{{/*
The registry's Deployment, Service and ConfigMap, as named templates: the chart renders them
once for the registry, and once more for each of `mirrors` with that mirror's context
(templates/mirrors.yaml).
*/}}
{{- define "registry.deployment" -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "registry.fullname" . }}
  namespace: {{ include "registry.namespace" . }}
  labels: {{- include "registry.labels" . | nindent 4 }}
  {{- with .Values.deploymentAnnotations }}
  annotations: {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  replicas: {{ .Values.replicaCount }}
  strategy:
    type: {{ .Values.updateStrategy.type }}
    {{- if eq .Values.updateStrategy.type "RollingUpdate" }}
    {{- with .Values.updateStrategy.rollingUpdate }}
    rollingUpdate: {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- end }}
  selector:
    matchLabels: {{- include "registry.selectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "registry.selectorLabels" . | nindent 8 }}
        {{- with .Values.podLabels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        checksum/config: {{ include "registry.config" . | sha256sum }}
        checksum/secret: {{ list .Values.tlsSecretName .Values.secrets .Values.s3.caBundleSecretName .Values.secretsChecksum | toJson | sha256sum }}
        {{- with .Values.podAnnotations }}{{ toYaml . | nindent 8 }}{{ end }}
    spec:
      {{- include "registry.podSpec" . | trim | nindent 6 }}
      containers:
        - name: registry
          {{- include "registry.container" . | nindent 10 }}
          args: ["serve", "/etc/docker/registry/config.yml"]
          ports:
            - name: registry
              containerPort: 5000
              protocol: TCP
            - name: debug
              containerPort: {{ .Values.metrics.port }}
              protocol: TCP
          {{- /* Liveness and startup ask the debug server, which answers while the process
          serves; readiness asks the registry itself, which distribution answers through its
          storage health check. */}}
          startupProbe:
            httpGet: {path: /debug/vars, port: debug, scheme: HTTP}
            {{- toYaml .Values.startupProbe | nindent 12 }}
          livenessProbe:
            httpGet: {path: /debug/vars, port: debug, scheme: HTTP}
            {{- toYaml .Values.livenessProbe | nindent 12 }}
          readinessProbe:
            httpGet: {path: /, port: registry, scheme: {{ ternary "HTTPS" "HTTP" (not (empty .Values.tlsSecretName)) }}}
            {{- toYaml .Values.readinessProbe | nindent 12 }}
          {{- if .Values.shutdownDelaySeconds }}
          lifecycle:
            preStop:
              exec: {command: [sleep, {{ .Values.shutdownDelaySeconds | quote }}]}
          {{- end }}
          {{- with .Values.resources }}
          resources: {{- toYaml . | nindent 12 }}
          {{- end }}
        {{- with .Values.sidecars }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
{{- end }}

{{- define "registry.service" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "registry.fullname" . }}
  namespace: {{ include "registry.namespace" . }}
  labels:
    {{- include "registry.labels" . | nindent 4 }}
    {{- with .Values.service.labels }}{{ toYaml . | nindent 4 }}{{ end }}
  {{- with .Values.service.annotations }}
  annotations: {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ .Values.service.type }}
  {{- if and (eq .Values.service.type "ClusterIP") .Values.service.clusterIP }}
  clusterIP: {{ .Values.service.clusterIP }}
  {{- end }}
  {{- if and (eq .Values.service.type "LoadBalancer") .Values.service.loadBalancerIP }}
  loadBalancerIP: {{ .Values.service.loadBalancerIP }}
  {{- end }}
  {{- if and (eq .Values.service.type "LoadBalancer") .Values.service.loadBalancerSourceRanges }}
  loadBalancerSourceRanges: {{- toYaml .Values.service.loadBalancerSourceRanges | nindent 4 }}
  {{- end }}
  sessionAffinity: {{ .Values.service.sessionAffinity }}
  {{- if and (eq .Values.service.sessionAffinity "ClientIP") .Values.service.sessionAffinityConfig }}
  sessionAffinityConfig: {{- toYaml .Values.service.sessionAffinityConfig | nindent 4 }}
  {{- end }}
  selector: {{- include "registry.selectorLabels" . | nindent 4 }}
  ports:
    - name: {{ .Values.service.name }}
      port: {{ .Values.service.port }}
      targetPort: registry
      protocol: TCP
      {{- if and (ne .Values.service.type "ClusterIP") .Values.service.nodePort }}
      nodePort: {{ .Values.service.nodePort }}
      {{- end }}
    {{- if .Values.metrics.enabled }}
    - name: metrics
      port: {{ .Values.metrics.port }}
      targetPort: debug
      protocol: TCP
    {{- end }}
{{- end }}

{{- define "registry.configMap" -}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "registry.fullname" . }}-config
  namespace: {{ include "registry.namespace" . }}
  labels: {{- include "registry.labels" . | nindent 4 }}
data:
  config.yml: |
    {{- include "registry.config" . | nindent 4 }}
{{- end }}

