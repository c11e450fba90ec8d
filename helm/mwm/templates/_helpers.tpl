{{/* vim: set filetype=mustache: */}}

{{- define "mwm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name, at most 63 characters (leaves room for "-<component>"). */}}
{{- define "mwm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mwm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels. Call with the root context. */}}
{{- define "mwm.labels" -}}
helm.sh/chart: {{ include "mwm.chart" . }}
app.kubernetes.io/name: {{ include "mwm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mwm
{{- end }}

{{/* Selector labels of one component. Call with (dict "root" $ "component" "api"). */}}
{{- define "mwm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mwm.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component. Call with (dict "root" $ "component" "api"). */}}
{{- define "mwm.componentLabels" -}}
{{ include "mwm.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "mwm.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}

{{- define "mwm.configMapName" -}}
{{- printf "%s-config" (include "mwm.fullname" .) }}
{{- end }}

{{- define "mwm.secretName" -}}
{{- default (printf "%s-secrets" (include "mwm.fullname" .)) .Values.secrets.existingSecret }}
{{- end }}

{{- define "mwm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mwm.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* ServiceAccount of the Argo engine (scheduler and monitor). */}}
{{- define "mwm.argoEngineServiceAccountName" -}}
{{- if .Values.argo.rbac.create }}
{{- printf "%s-argo-engine" (include "mwm.fullname" .) }}
{{- else }}
{{- include "mwm.serviceAccountName" . }}
{{- end }}
{{- end }}

{{/* ServiceAccount the Argo workflow pods run as. */}}
{{- define "mwm.workflowServiceAccountName" -}}
{{- default (printf "%s-workflow" (include "mwm.fullname" .)) .Values.argo.workflowServiceAccount.name }}
{{- end }}

{{- define "mwm.argoNamespace" -}}
{{- default .Release.Namespace .Values.argo.namespace }}
{{- end }}

{{/* Queue of one consumer. Call with (dict "root" $ "name" "discovery"). */}}
{{- define "mwm.queueName" -}}
{{- printf "%s.%s" .root.Values.rabbitmq.queuePrefix .name }}
{{- end }}

{{- define "mwm.terminationGracePeriodSeconds" -}}
{{- add (int (ceil .Values.config.drainTimeoutSeconds)) 15 }}
{{- end }}

{{/* The env vars read from the Secret; the optional keys may be absent from it. */}}
{{- define "mwm.secretEnv" -}}
{{- $keys := .Values.secrets.keys }}
{{- $name := include "mwm.secretName" . }}
- name: MWM_BUS__URL
  valueFrom:
    secretKeyRef: {name: {{ $name | quote }}, key: {{ $keys.busUrl | quote }}}
- name: MWM_MONGO__URL
  valueFrom:
    secretKeyRef: {name: {{ $name | quote }}, key: {{ $keys.mongoUrl | quote }}}
- name: MWM_OBJECT_STORE__ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ $name | quote }}, key: {{ $keys.objectStoreAccessKey | quote }}, optional: true}
- name: MWM_OBJECT_STORE__SECRET_KEY
  valueFrom:
    secretKeyRef: {name: {{ $name | quote }}, key: {{ $keys.objectStoreSecretKey | quote }}, optional: true}
- name: MWM_ARGO__TOKEN
  valueFrom:
    secretKeyRef: {name: {{ $name | quote }}, key: {{ $keys.argoToken | quote }}, optional: true}
- name: MWM_API__BOOTSTRAP_ADMIN_KEY
  valueFrom:
    secretKeyRef: {name: {{ $name | quote }}, key: {{ $keys.bootstrapAdminKey | quote }}, optional: true}
{{- end }}

{{/*
One MWM Deployment. Every role (api, gateway, each consumer) is rendered by this template.
Call with a dict:
  root          the root context ($)
  component     app.kubernetes.io/component, also the name suffix (api, gateway, consumer-discovery)
  args          the container args after the "mwm" command (list)
  spec          the component's values (replicas, resources, extraEnv, ...)
  manageReplicas  false when an autoscaler owns spec.replicas
  serviceAccountName
  ports         extra container ports (list of ContainerPort), besides the observability port
  readinessProbe  the readiness probe's handler (dict); the liveness probe is always /healthz
*/}}
{{- define "mwm.deployment" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $spec := .spec }}
apiVersion: apps/v1
kind: {{ if .volumeClaim }}StatefulSet{{ else }}Deployment{{ end }}
metadata:
  name: {{ printf "%s-%s" (include "mwm.fullname" $root) .component }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "mwm.componentLabels" (dict "root" $root "component" .component) | nindent 4 }}
spec:
  {{- with .volumeClaim }}
  serviceName: {{ .serviceName }}
  podManagementPolicy: Parallel
  {{- end }}
  {{- if .manageReplicas }}
  replicas: {{ $spec.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "mwm.selectorLabels" (dict "root" $root "component" .component) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "mwm.selectorLabels" (dict "root" $root "component" .component) | nindent 8 }}
        {{- with $v.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
        {{- if not $v.secrets.existingSecret }}
        checksum/secret: {{ include (print $root.Template.BasePath "/secret.yaml") $root | sha256sum }}
        {{- end }}
        {{- if $v.observability.prometheusAnnotations }}
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ $v.observability.port | quote }}
        prometheus.io/path: /metrics
        {{- end }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ .serviceAccountName }}
      automountServiceAccountToken: {{ .automountToken | default false }}
      {{- with $v.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      terminationGracePeriodSeconds: {{ include "mwm.terminationGracePeriodSeconds" $root }}
      securityContext:
        {{- toYaml $v.podSecurityContext | nindent 8 }}
      containers:
        - name: {{ .container | default .component }}
          image: {{ include "mwm.image" $root | quote }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          command: ["mwm"]
          args:
            {{- toYaml .args | nindent 12 }}
          ports:
            - name: observability
              containerPort: {{ $v.observability.port }}
              protocol: TCP
            {{- with .ports }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          envFrom:
            - configMapRef:
                name: {{ include "mwm.configMapName" $root }}
          env:
            {{- include "mwm.secretEnv" $root | trim | nindent 12 }}
            {{- with .env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
            {{- with $spec.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          livenessProbe:
            httpGet:
              path: /healthz
              port: observability
            {{- toYaml $v.probes.liveness | nindent 12 }}
          readinessProbe:
            {{- toYaml .readinessProbe | nindent 12 }}
            {{- toYaml $v.probes.readiness | nindent 12 }}
          resources:
            {{- toYaml $spec.resources | nindent 12 }}
          securityContext:
            {{- toYaml $v.securityContext | nindent 12 }}
          volumeMounts:
            - name: work
              mountPath: {{ $v.workDir.path }}
            - name: tmp
              mountPath: /tmp
            {{- with .volumeClaim }}
            - name: {{ .name }}
              mountPath: {{ .mountPath }}
            {{- end }}
      volumes:
        - name: work
          emptyDir:
            {{- with $v.workDir.sizeLimit }}
            sizeLimit: {{ . }}
            {{- end }}
        - name: tmp
          emptyDir:
            sizeLimit: 1Gi
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
  {{- with .volumeClaim }}
  volumeClaimTemplates:
    - metadata:
        name: {{ .name }}
      spec:
        accessModes: ["ReadWriteOnce"]
        {{- with .storageClassName }}
        storageClassName: {{ . }}
        {{- end }}
        resources:
          requests:
            storage: {{ .size }}
  {{- end }}
{{- end }}

{{/*
PodDisruptionBudget of one component, rendered when spec.pdb.enabled.
Call with (dict "root" $ "component" "api" "pdb" .Values.api.pdb).
*/}}
{{- define "mwm.pdb" -}}
{{- if .pdb.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ printf "%s-%s" (include "mwm.fullname" .root) .component }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "mwm.componentLabels" (dict "root" .root "component" .component) | nindent 4 }}
spec:
  {{- if hasKey .pdb "minAvailable" }}
  minAvailable: {{ .pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ .pdb.maxUnavailable | default 1 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "mwm.selectorLabels" (dict "root" .root "component" .component) | nindent 6 }}
{{- end }}
{{- end }}
