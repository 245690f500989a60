{{/*
Names and labels.
*/}}
{{- define "tally.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tally.fullname" -}}
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

{{- define "tally.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "tally.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tally
{{- end }}

{{- define "tally.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tally.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component: (dict "ctx" $ "component" "parser"). */}}
{{- define "tally.componentLabels" -}}
{{ include "tally.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "tally.componentSelector" -}}
{{ include "tally.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "tally.image" -}}
{{ printf "%s:%s" .Values.image.repository (toString .Values.image.tag) }}
{{- end }}

{{- define "tally.configMapName" -}}
{{ include "tally.fullname" . }}-config
{{- end }}

{{- define "tally.secretName" -}}
{{- if .Values.secret.existingSecret }}{{ .Values.secret.existingSecret }}{{ else }}{{ include "tally.fullname" . }}{{ end }}
{{- end }}

{{/* Where the Secret's keys are mounted. */}}
{{- define "tally.secretDir" -}}
/etc/tally/secrets
{{- end }}

{{/* Whether a secret is used ("true" or ""): asked for, or created by the chart from a value. */}}
{{- define "tally.useDatabasePassword" -}}
{{- if or .Values.database.passwordFromSecret (and (not .Values.secret.existingSecret) .Values.secret.databasePassword) }}true{{ end }}
{{- end }}

{{- define "tally.useKafkaSaslPassword" -}}
{{- if or .Values.kafka.sasl.passwordFromSecret (and (not .Values.secret.existingSecret) .Values.secret.kafkaSaslPassword) }}true{{ end }}
{{- end }}

{{- define "tally.createSecret" -}}
{{- if and (not .Values.secret.existingSecret) (or .Values.secret.databasePassword .Values.secret.kafkaSaslPassword .Values.secret.ingestTokens .Values.secret.apiTokens .Values.secret.alertRules) }}true{{ end }}
{{- end }}

{{/* The files partition count (KEDA's and the parsers' upper bound). */}}
{{- define "tally.filesPartitions" -}}
{{- int (default "6" (index .Values.config "TALLY_FILES_PARTITIONS")) }}
{{- end }}

{{- define "tally.sumsPartitions" -}}
{{- int (default "6" (index .Values.config "TALLY_SUMS_PARTITIONS")) }}
{{- end }}

{{/*
Refuses values that would put a secret into a ConfigMap or a pod spec, or that cannot work.
Included by every template, so `helm template` fails whatever is rendered.
*/}}
{{- define "tally.validate" -}}
{{- $v := .Values }}
{{- $reserved := list "KAFKA_BOOTSTRAP_SERVERS" "TALLY_TOPIC_PREFIX" "DATABASE_URL" "TALLY_HTTP_ADDR" "TALLY_INSTANCE_ID" "TALLY_DATA_ROOT" "TALLY_FROM_TOTALS" "TALLY_INGEST_DIR" "TALLY_INGEST_LISTEN" "TALLY_INGEST_TOKENS_FILE" "TALLY_INGEST_TLS_CERT_FILE" "TALLY_INGEST_TLS_KEY_FILE" "TALLY_API_LISTEN" "TALLY_API_TOKENS_FILE" "TALLY_API_TLS_CERT_FILE" "TALLY_API_TLS_KEY_FILE" "TALLY_API_ALERT_RULES" "TALLY_KAFKA_SECURITY_PROTOCOL" "TALLY_KAFKA_SASL_MECHANISM" "TALLY_KAFKA_SASL_USERNAME" "TALLY_KAFKA_SASL_PASSWORD_FILE" "TALLY_DATABASE_PASSWORD_FILE" "TALLY_DATABASE_SSL_MODE" "TALLY_CONFIG" "PGPASSWORD" }}
{{- range $key, $value := $v.config }}
{{- if has $key $reserved }}
{{- fail (printf "config.%s: set by the chart (see values.yaml), not in config" $key) }}
{{- end }}
{{- if or (contains "PASSWORD" (upper $key)) (contains "TOKEN" (upper $key)) (contains "SECRET" (upper $key)) }}
{{- fail (printf "config.%s: secrets do not go into the ConfigMap; use the Secret (secret.* or secret.existingSecret)" $key) }}
{{- end }}
{{- if or (kindIs "map" $value) (kindIs "slice" $value) }}
{{- fail (printf "config.%s: must be a string" $key) }}
{{- end }}
{{- end }}
{{- if not (regexMatch "^postgres(ql)?://" $v.database.url) }}
{{- fail "database.url: must start with postgres:// or postgresql://" }}
{{- end }}
{{- if or (regexMatch "^postgres(ql)?://[^/@]*:[^/@]*@" $v.database.url) (regexMatch "[?&]password=" $v.database.url) }}
{{- fail "database.url: holds a password; put it into the Secret (secret.databasePassword or secret.existingSecret + database.passwordFromSecret)" }}
{{- end }}
{{- range $v.kafka.options }}
{{- if not (regexMatch "^[^=]+=" (toString .)) }}
{{- fail (printf "kafka.options: %q is not key=value" (toString .)) }}
{{- end }}
{{- if contains "password" (lower (toString .)) }}
{{- fail "kafka.options: no passwords on the command line; use kafka.sasl and the Secret" }}
{{- end }}
{{- end }}
{{- if and (not $v.data.existingClaim) (not $v.data.hostPath.path) }}
{{- fail "data: set data.existingClaim (a ReadWriteMany claim) or data.hostPath.path" }}
{{- end }}
{{- if not (hasPrefix "/" $v.data.mountPath) }}
{{- fail "data.mountPath: must be an absolute path" }}
{{- end }}
{{- if and $v.api.enabled (not $v.secret.existingSecret) (not $v.secret.apiTokens) }}
{{- fail "api.enabled: tally api needs its read tokens: secret.apiTokens, or secret.existingSecret with the key secret.keys.apiTokens" }}
{{- end }}
{{- if and $v.api.enabled $v.api.alerts (not $v.secret.existingSecret) (not $v.secret.alertRules) }}
{{- fail "api.alerts: the alert rules go into the Secret: secret.alertRules, or secret.existingSecret with the key secret.keys.alertRules" }}
{{- end }}
{{- if and $v.ingest.enabled (not $v.secret.existingSecret) (not $v.secret.ingestTokens) }}
{{- fail "ingest.enabled: producer serve needs its tokens: secret.ingestTokens, or secret.existingSecret with the key secret.keys.ingestTokens" }}
{{- end }}
{{- if and $v.ingest.enabled (ne $v.ingest.dir $v.data.mountPath) (not (hasPrefix (printf "%s/" (trimSuffix "/" $v.data.mountPath)) $v.ingest.dir)) }}
{{- fail "ingest.dir: must be the data folder (data.mountPath) or a folder under it" }}
{{- end }}
{{- if not $v.secret.existingSecret }}
{{- if and $v.database.passwordFromSecret (not $v.secret.databasePassword) }}
{{- fail "database.passwordFromSecret: set secret.databasePassword, or secret.existingSecret" }}
{{- end }}
{{- if and $v.kafka.sasl.passwordFromSecret (not $v.secret.kafkaSaslPassword) }}
{{- fail "kafka.sasl.passwordFromSecret: set secret.kafkaSaslPassword, or secret.existingSecret" }}
{{- end }}
{{- end }}
{{- $files := int (include "tally.filesPartitions" .) }}
{{- $sums := int (include "tally.sumsPartitions" .) }}
{{- if $v.keda.enabled }}
{{- if gt (int $v.keda.maxReplicas) $files }}
{{- fail (printf "keda.maxReplicas %d exceeds the files topic's %d partitions (config.TALLY_FILES_PARTITIONS): parsers beyond it idle and never turn ready" (int $v.keda.maxReplicas) $files) }}
{{- end }}
{{- if gt (int $v.keda.minReplicas) (int $v.keda.maxReplicas) }}
{{- fail "keda.minReplicas exceeds keda.maxReplicas" }}
{{- end }}
{{- else if gt (int $v.parser.replicas) $files }}
{{- fail (printf "parser.replicas %d exceeds the files topic's %d partitions (config.TALLY_FILES_PARTITIONS)" (int $v.parser.replicas) $files) }}
{{- end }}
{{- if and $v.aggregator.enabled (gt (int $v.aggregator.replicas) $sums) }}
{{- fail (printf "aggregator.replicas %d exceeds the sums topic's %d partitions (config.TALLY_SUMS_PARTITIONS)" (int $v.aggregator.replicas) $sums) }}
{{- end }}
{{- if gt (int $v.dbClient.replicas) $sums }}
{{- fail (printf "dbClient.replicas %d exceeds the %d partitions it reads (config.TALLY_SUMS_PARTITIONS)" (int $v.dbClient.replicas) $sums) }}
{{- end }}
{{- end }}

{{/*
A stage's or the init Job's pod template.
(dict "ctx" $ "component" "parser" "stage" .Values.parser "args" (list …)
      "data" "ro"|"rw"|"" "database" true "instanceId" true "ingest" true "http" true)
*/}}
{{- define "tally.podTemplate" -}}
{{- $ := .ctx }}
{{- $v := $.Values }}
{{- $stage := .stage }}
{{- $secretDir := include "tally.secretDir" $ }}
{{- $dbPassword := and .database (include "tally.useDatabasePassword" $) }}
{{- $saslPassword := include "tally.useKafkaSaslPassword" $ }}
{{- $tokens := or .ingest .api }}
{{- $rules := and .api $v.api.alerts }}
{{- $anySecret := or $dbPassword $saslPassword $tokens -}}
metadata:
  labels:
    {{- include "tally.componentSelector" (dict "ctx" $ "component" .component) | nindent 4 }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") $ | sha256sum }}
    {{- with (merge (dict) ($stage.podAnnotations | default dict) $v.podAnnotations) }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $v.serviceAccountName }}
  serviceAccountName: {{ $v.serviceAccountName }}
  {{- end }}
  automountServiceAccountToken: false
  {{- if .job }}
  restartPolicy: Never
  {{- else }}
  terminationGracePeriodSeconds: {{ $stage.terminationGracePeriodSeconds }}
  {{- end }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  {{- with (default $v.nodeSelector $stage.nodeSelector) }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (default $v.tolerations $stage.tolerations) }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (default $v.affinity $stage.affinity) }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $stage.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .component }}
      image: {{ include "tally.image" $ | quote }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- with .command }}
      command:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      args:
        {{- toYaml .args | nindent 8 }}
      envFrom:
        - configMapRef:
            name: {{ include "tally.configMapName" $ }}
      {{- if or .instanceId $dbPassword $saslPassword $v.extraEnv }}
      env:
        {{- end }}
        {{- if .instanceId }}
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: TALLY_INSTANCE_ID
          value: {{ printf "%s$(POD_NAME)" (toString (default "" $stage.instanceIdPrefix)) | quote }}
        {{- end }}
        {{- if $dbPassword }}
        - name: TALLY_DATABASE_PASSWORD_FILE
          value: {{ printf "%s/%s" $secretDir $v.secret.keys.databasePassword | quote }}
        {{- end }}
        {{- if $saslPassword }}
        - name: TALLY_KAFKA_SASL_PASSWORD_FILE
          value: {{ printf "%s/%s" $secretDir $v.secret.keys.kafkaSaslPassword | quote }}
        {{- end }}
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if .http }}
      ports:
        - name: http
          containerPort: {{ .httpPort | default 9100 }}
          protocol: TCP
        {{- if .ingest }}
        - name: ingest
          containerPort: {{ $v.ingest.port }}
          protocol: TCP
        {{- end }}
      startupProbe:
        httpGet: {path: /livez, port: http}
        {{- toYaml $v.probes.startup | nindent 8 }}
      livenessProbe:
        httpGet: {path: /livez, port: http}
        {{- toYaml $v.probes.liveness | nindent 8 }}
      readinessProbe:
        httpGet: {path: /readyz, port: http}
        {{- toYaml $v.probes.readiness | nindent 8 }}
      {{- end }}
      resources:
        {{- toYaml $stage.resources | nindent 8 }}
      securityContext:
        {{- toYaml $v.containerSecurityContext | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        {{- if .data }}
        - name: data
          mountPath: {{ $v.data.mountPath }}
          readOnly: {{ eq .data "ro" }}
        {{- end }}
        {{- if $anySecret }}
        - name: secrets
          mountPath: {{ $secretDir }}
          readOnly: true
        {{- end }}
        {{- if and .ingest $v.ingest.tlsSecretName }}
        - name: ingest-tls
          mountPath: /etc/tally/ingest-tls
          readOnly: true
        {{- end }}
        {{- if and .api $v.api.tlsSecretName }}
        - name: api-tls
          mountPath: /etc/tally/api-tls
          readOnly: true
        {{- end }}
        {{- with $v.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: 64Mi
    {{- if .data }}
    - name: data
      {{- if $v.data.hostPath.path }}
      hostPath:
        path: {{ $v.data.hostPath.path }}
        type: {{ $v.data.hostPath.type }}
      {{- else }}
      persistentVolumeClaim:
        claimName: {{ $v.data.existingClaim }}
        readOnly: {{ eq .data "ro" }}
      {{- end }}
    {{- end }}
    {{- if $anySecret }}
    - name: secrets
      secret:
        secretName: {{ include "tally.secretName" $ }}
        defaultMode: 0440
        items:
          {{- if $dbPassword }}
          - key: {{ $v.secret.keys.databasePassword }}
            path: {{ $v.secret.keys.databasePassword }}
          {{- end }}
          {{- if $saslPassword }}
          - key: {{ $v.secret.keys.kafkaSaslPassword }}
            path: {{ $v.secret.keys.kafkaSaslPassword }}
          {{- end }}
          {{- if .ingest }}
          - key: {{ $v.secret.keys.ingestTokens }}
            path: {{ $v.secret.keys.ingestTokens }}
          {{- end }}
          {{- if .api }}
          - key: {{ $v.secret.keys.apiTokens }}
            path: {{ $v.secret.keys.apiTokens }}
          {{- end }}
          {{- if $rules }}
          - key: {{ $v.secret.keys.alertRules }}
            path: {{ $v.secret.keys.alertRules }}
          {{- end }}
    {{- end }}
    {{- if and .ingest $v.ingest.tlsSecretName }}
    - name: ingest-tls
      secret:
        secretName: {{ $v.ingest.tlsSecretName }}
        defaultMode: 0440
    {{- end }}
    {{- if and .api $v.api.tlsSecretName }}
    - name: api-tls
      secret:
        secretName: {{ $v.api.tlsSecretName }}
        defaultMode: 0440
    {{- end }}
    {{- with $v.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/*
A stage: its workload (StatefulSet with static membership, else Deployment), its Service (port
http; headless unless it is the ingest Service) and its PodDisruptionBudget.
(dict "ctx" $ "component" "parser" "stage" .Values.parser "args" (list …) "data" "ro"
      "database" false "static" true "replicas" true "ingest" false)
*/}}
{{- define "tally.stage" -}}
{{- $ := .ctx }}
{{- $stage := .stage }}
{{- $name := printf "%s-%s" (include "tally.fullname" $) .component }}
{{- $static := .static }}
{{- $pod := dict "ctx" $ "component" .component "stage" $stage "args" .args "data" .data "database" .database "instanceId" $static "ingest" .ingest "http" true }}
apiVersion: apps/v1
kind: {{ if $static }}StatefulSet{{ else }}Deployment{{ end }}
metadata:
  name: {{ $name }}
  labels:
    {{- include "tally.componentLabels" (dict "ctx" $ "component" .component) | nindent 4 }}
spec:
  {{- if .replicas }}
  replicas: {{ $stage.replicas | default 1 }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "tally.componentSelector" (dict "ctx" $ "component" .component) | nindent 6 }}
  {{- if $static }}
  serviceName: {{ $name }}
  # All pods start (and are replaced) at once, not one after another once ready: a group member
  # turns ready only once the group assigned it partitions.
  podManagementPolicy: Parallel
  updateStrategy:
    type: RollingUpdate
  {{- else if .single }}
  # One process per folder: the old pod is gone before the new one starts.
  strategy:
    type: Recreate
  {{- else }}
  strategy:
    type: RollingUpdate
    rollingUpdate: {maxSurge: 0, maxUnavailable: 1}
  {{- end }}
  template:
    {{- include "tally.podTemplate" $pod | nindent 4 }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}
  labels:
    {{- include "tally.componentLabels" (dict "ctx" $ "component" .component) | nindent 4 }}
    tally.dev/metrics: "true"
  {{- if .ingest }}
  {{- with $.Values.ingest.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- end }}
spec:
  {{- if .ingest }}
  type: {{ $.Values.ingest.service.type }}
  publishNotReadyAddresses: {{ $.Values.ingest.service.publishNotReadyAddresses }}
  {{- else }}
  # Headless: the StatefulSet's governing Service and the scrape target of each pod. Not-ready
  # pods (no partition assignment) are scraped too.
  clusterIP: None
  publishNotReadyAddresses: true
  {{- end }}
  selector:
    {{- include "tally.componentSelector" (dict "ctx" $ "component" .component) | nindent 4 }}
  ports:
    - name: http
      port: 9100
      targetPort: http
      protocol: TCP
    {{- if .ingest }}
    - name: ingest
      port: {{ $.Values.ingest.port }}
      targetPort: ingest
      protocol: TCP
    {{- end }}
{{- if $stage.pdb.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $name }}
  labels:
    {{- include "tally.componentLabels" (dict "ctx" $ "component" .component) | nindent 4 }}
spec:
  maxUnavailable: {{ $stage.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "tally.componentSelector" (dict "ctx" $ "component" .component) | nindent 6 }}
{{- end }}
{{- end }}
