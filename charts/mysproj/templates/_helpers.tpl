{{/* Chart name, 63 characters at most. */}}
{{- define "mysproj.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped name prefix, 63 characters at most, so many runs coexist in one namespace. Stage Job names
add a suffix; the controller shortens this prefix to fit them into 52 characters. */}}
{{- define "mysproj.fullname" -}}
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

{{- define "mysproj.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable across upgrades. `mysproj.io/run` is what `kubectl get jobs -l` and
`mysproj status` select on. */}}
{{- define "mysproj.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mysproj.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
mysproj.io/run: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mysproj.labels" -}}
helm.sh/chart: {{ include "mysproj.chart" . }}
{{ include "mysproj.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mysproj
{{- end }}

{{/* image: (dict "image" .Values.images.cpu "root" .) */}}
{{- define "mysproj.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{- define "mysproj.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-controller" (include "mysproj.fullname" .) | trunc 63 | trimSuffix "-") .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mysproj.controllerName" -}}
{{- printf "%s-controller" (include "mysproj.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The controller Job of this revision: an upgrade starts a new one on the new values (Helm deletes the previous
revision's, and the garbage collector its stage Jobs), so a finished run's Job never hides changed values. */}}
{{- define "mysproj.controllerJobName" -}}
{{- $rev := printf "-%d" (int .Release.Revision) }}
{{- printf "%s%s" (include "mysproj.controllerName" . | trunc (int (sub 63 (len $rev))) | trimSuffix "-") $rev }}
{{- end }}

{{/* Values the schema cannot check and the pipeline would refuse only once the controller runs. */}}
{{- define "mysproj.validate" -}}
{{- $sources := default dict .Values.pipeline.sources }}
{{- $accepted := default list .Values.pipeline.accept_terms }}
{{- range .Values.pipeline.datasets }}
{{- if and (eq . "imagefolder") (not (get $sources .)) }}
{{- fail (printf "pipeline.sources has no entry for dataset '%s': set pipeline.sources.%s to the URI of its files (s3://... or a path the pods can read)" . .) }}
{{- end }}
{{- if and (eq . "crisismmd") (not (get $sources .)) (not (has . $accepted)) }}
{{- fail "dataset 'crisismmd' is published on terms you must accept first (https://crisisnlp.qcri.org/crisismmd): read them, then set pipeline.accept_terms={crisismmd}, or name your own copy in pipeline.sources.crisismmd" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mysproj.configMapName" -}}
{{- printf "%s-pipeline" (include "mysproj.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mysproj.serviceName" -}}
{{- printf "%s-ft" (include "mysproj.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The run root every stage output lives below. */}}
{{- define "mysproj.root" -}}
{{- if .Values.pipeline.root }}
{{- .Values.pipeline.root }}
{{- else }}
{{- $parts := list .Values.storage.bucket }}
{{- if .Values.storage.prefix }}{{ $parts = append $parts (trimAll "/" .Values.storage.prefix) }}{{ end }}
{{- printf "s3://%s/%s" (join "/" $parts) .Release.Name }}
{{- end }}
{{- end }}

{{/* Container security context of every container: no privilege escalation, no capabilities, read-only root. */}}
{{- define "mysproj.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Environment shared by every pod: storage (credentials only through secretKeyRef), scratch locations, logging. */}}
{{- define "mysproj.env" -}}
{{- $scratch := .Values.stages.scratchDir }}
{{- with .Values.storage.endpoint }}
- name: MYSPROJ_S3_ENDPOINT
  value: {{ . | quote }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.storage.region | quote }}
{{- with .Values.storage.credentialsSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.storage.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.storage.secretAccessKeyKey }}
{{- end }}
{{- with .Values.trackingSecret }}
{{- range $key := list "MLFLOW_TRACKING_TOKEN" "MLFLOW_TRACKING_USERNAME" "MLFLOW_TRACKING_PASSWORD" "WANDB_API_KEY" }}
- name: {{ $key }}
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.trackingSecret }}
      key: {{ $key }}
      optional: true
{{- end }}
{{- end }}
- name: MYSPROJ_SCRATCH
  value: {{ $scratch | quote }}
- name: HOME
  value: {{ printf "%s/home" $scratch | quote }}
- name: TMPDIR
  value: {{ printf "%s/tmp" $scratch | quote }}
- name: XDG_CACHE_HOME
  value: {{ printf "%s/cache" $scratch | quote }}
- name: MYSPROJ_CACHE_DIR
  value: {{ printf "%s/cache/mysproj" $scratch | quote }}
- name: HF_HOME
  value: {{ printf "%s/cache/huggingface" $scratch | quote }}
- name: TORCH_EXTENSIONS_DIR
  value: {{ printf "%s/cache/torch_extensions" $scratch | quote }}
- name: TRITON_CACHE_DIR
  value: {{ printf "%s/cache/triton" $scratch | quote }}
- name: TORCHINDUCTOR_CACHE_DIR
  value: {{ printf "%s/cache/torchinductor" $scratch | quote }}
- name: MPLCONFIGDIR
  value: {{ printf "%s/cache/matplotlib" $scratch | quote }}
- name: PYTHONUNBUFFERED
  value: "1"
- name: MYSPROJ_LOG_LEVEL
  value: {{ .Values.stages.logLevel | quote }}
- name: MYSPROJ_RUN
  value: {{ .Release.Name | quote }}
{{- end }}

{{/* Volumes shared by every pod: the read-only root filesystem needs writable /tmp and scratch. */}}
{{- define "mysproj.volumes" -}}
- name: tmp
  emptyDir: {}
- name: scratch
  emptyDir:
    {{- with .Values.stages.scratchSize }}
    sizeLimit: {{ . }}
    {{- else }} {}
    {{- end }}
{{- end }}

{{- define "mysproj.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: scratch
  mountPath: {{ .Values.stages.scratchDir }}
{{- end }}

{{/* A stage Job template the controller instantiates: (dict "root" . "kind" "cpu"|"gpu"|"finetune"|"fetch").
The controller fills in the name, ownerReferences, the stage label, the entry point and MYSPROJ_* config env. */}}
{{- define "mysproj.stageJob" -}}
{{- $root := .root }}
{{- $kind := .kind }}
{{- $v := $root.Values }}
{{- $gpus := 0 }}
{{- $resources := $v.cpu.resources }}
{{- $image := $v.images.cpu }}
{{- if eq $kind "gpu" }}{{ $gpus = int $v.gpu.gpusPerPod }}{{ $resources = $v.gpu.resources }}{{ $image = $v.images.gpu }}{{ end }}
{{- if eq $kind "finetune" }}{{ $gpus = int $v.finetune.gpusPerPod }}{{ $resources = $v.finetune.resources }}{{ $image = $v.images.gpu }}{{ end }}
{{- if eq $kind "fetch" }}{{ $resources = $v.fetch.resources }}{{ $image = $v.images.gpu }}{{ end }}
apiVersion: batch/v1
kind: Job
metadata:
  labels:
    {{- include "mysproj.labels" $root | nindent 4 }}
    app.kubernetes.io/component: stage
spec:
  backoffLimit: {{ $v.stages.backoffLimit }}
  {{- if gt (int $v.stages.activeDeadlineSeconds) 0 }}
  activeDeadlineSeconds: {{ int $v.stages.activeDeadlineSeconds }}
  {{- end }}
  {{- if semverCompare ">=1.26-0" $root.Capabilities.KubeVersion.Version }}
  # Bad input (exit 64) is final and evictions do not count as failures. Older servers lack the field (Helm would
  # refuse it there); on them the controller reads each pod's exit code itself.
  podFailurePolicy:
    rules:
      - action: FailJob
        onExitCodes:
          containerName: stage
          operator: In
          values: [64]
      - action: Ignore
        onPodConditions:
          - type: DisruptionTarget
            status: "True"
  {{- end }}
  template:
    metadata:
      labels:
        {{- include "mysproj.selectorLabels" $root | nindent 8 }}
        app.kubernetes.io/component: stage
        {{- if eq $kind "fetch" }}
        mysproj.io/egress: "true"
        {{- end }}
    spec:
      restartPolicy: Never
      automountServiceAccountToken: false
      enableServiceLinks: false
      {{- if eq $kind "finetune" }}
      # SIGTERM (eviction, node drain) -> the step in flight, a checkpoint, exit 143; SIGKILL only after this.
      terminationGracePeriodSeconds: {{ int $v.finetune.terminationGracePeriodSeconds }}
      {{- end }}
      securityContext:
        {{- toYaml $v.podSecurityContext | nindent 8 }}
      {{- with $v.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- $pool := ternary $v.cpu $v.gpu (eq $kind "cpu") }}
      {{- if eq $kind "fetch" }}{{ $pool = $v.fetch }}{{ end }}
      {{- with $pool.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $pool.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: stage
          image: {{ include "mysproj.image" (dict "image" $image "root" $root) }}
          imagePullPolicy: {{ $image.pullPolicy }}
          command: [{{ $v.stages.python | quote }}, "-u"]
          terminationMessagePolicy: FallbackToLogsOnError
          securityContext:
            {{- include "mysproj.containerSecurityContext" $root | nindent 12 }}
          env:
            {{- include "mysproj.env" $root | nindent 12 }}
            - name: MYSPROJ_IMAGE
              value: {{ include "mysproj.image" (dict "image" $image "root" $root) | quote }}
            {{- if eq $kind "finetune" }}
            - name: MYSPROJ_NPROC_PER_NODE
              value: {{ $gpus | quote }}
            - name: MASTER_PORT
              value: {{ $v.finetune.masterPort | quote }}
            - name: MYSPROJ_DNS_WAIT_SECONDS
              value: {{ $v.finetune.dnsWaitSeconds | quote }}
            # torchrun passes SIGTERM on to its workers, then kills them after this many seconds: a little less
            # than the pod's grace period, so that the checkpoint gets the time the pod has.
            - name: TORCH_ELASTIC_SHUTDOWN_TIMEOUT
              value: {{ max 1 (sub (int $v.finetune.terminationGracePeriodSeconds) 10) | quote }}
            {{- end }}
            {{- if eq $kind "fetch" }}
            {{- include "mysproj.fetchEnv" $root | nindent 12 }}
            {{- else }}
            # Only fetch pods reach the hub; a library that would try anyway fails at once.
            - name: HF_HUB_OFFLINE
              value: "1"
            {{- end }}
            {{- with $v.stages.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          resources:
            {{- $res := deepCopy $resources }}
            {{- if gt $gpus 0 }}
            {{- $limits := merge (dict "nvidia.com/gpu" $gpus) (default dict $res.limits) }}
            {{- $_ := set $res "limits" $limits }}
            {{- end }}
            {{- toYaml $res | nindent 12 }}
          volumeMounts:
            {{- include "mysproj.volumeMounts" $root | nindent 12 }}
            {{- if or (eq $kind "gpu") (eq $kind "finetune") }}
            - name: dshm
              mountPath: /dev/shm
            {{- end }}
      volumes:
        {{- include "mysproj.volumes" $root | nindent 8 }}
        {{- if or (eq $kind "gpu") (eq $kind "finetune") }}
        - name: dshm
          emptyDir:
            medium: Memory
            sizeLimit: {{ $v.gpu.shmSize }}
        {{- end }}
{{- end }}

{{/* The fetch pods' credentials and mirror: only they get the hub and Kaggle tokens. */}}
{{- define "mysproj.fetchEnv" -}}
{{- $f := .Values.fetch }}
# The GPU image sets HF_HUB_OFFLINE=1 for every other stage; fetch pods are the ones that reach the hub.
- name: HF_HUB_OFFLINE
  value: "0"
- name: HF_HUB_DISABLE_TELEMETRY
  value: "1"
{{- with $f.hfEndpoint }}
- name: HF_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- with $f.hfTokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $f.hfTokenKey }}
{{- end }}
{{- with $f.kaggleSecret }}
{{- range $key := list "KAGGLE_API_TOKEN" "KAGGLE_USERNAME" "KAGGLE_KEY" }}
- name: {{ $key }}
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.fetch.kaggleSecret }}
      key: {{ $key }}
      optional: true
{{- end }}
{{- end }}
{{- end }}
