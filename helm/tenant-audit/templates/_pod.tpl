{{/*
The pod template of the Deployment and of the StatefulSet: the same container, probes,
security settings and volumes in both modes. The StatefulSet adds the shard index.
*/}}
{{- define "tenant-audit.podTemplate" -}}
metadata:
  annotations:
    # Restart the pod when the configuration changes (in StatefulSet mode also the shard count).
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  labels:
    {{- include "tenant-audit.labels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "tenant-audit.serviceAccountName" . }}
  automountServiceAccountToken: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  containers:
    - name: tenant-audit
      image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args: ["serve", "--config", "/etc/tenant-audit/config.toml", "--log-format", "json"
        {{- if .Values.web.existingSecret }}, "--web.config.file", "/etc/tenant-audit-web/{{ .Values.web.secretKey }}"{{ end }}]
      {{- $shardEnv := and (eq .Values.mode "statefulset") (semverCompare ">=1.28.0-0" .Capabilities.KubeVersion.Version) }}
      {{- if or (not .Values.targets) $shardEnv .Values.extraEnv }}
      env:
        {{- if not .Values.targets }}
        - name: TENANT_AUDIT_DATABASE_URL
          valueFrom:
            secretKeyRef:
              name: {{ .Values.database.existingSecret }}
              key: {{ .Values.database.secretKey }}
        {{- end }}
        {{- if $shardEnv }}
        # The shard of this pod: its ordinal, which the StatefulSet controller puts in this label
        # since Kubernetes 1.28. Before, the label does not exist and the variable is left out:
        # the daemon takes the ordinal from its host name, the pod's name NAME-N.
        - name: TENANT_AUDIT_SHARD_INDEX
          valueFrom:
            fieldRef:
              fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      ports:
        - name: http
          containerPort: 9841
          protocol: TCP
      livenessProbe:
        httpGet:
          path: /healthz
          port: http
          scheme: {{ .Values.web.scheme }}
        {{- toYaml .Values.livenessProbe | nindent 8 }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: http
          scheme: {{ .Values.web.scheme }}
        {{- toYaml .Values.readinessProbe | nindent 8 }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/tenant-audit
          readOnly: true
        {{- if .Values.web.existingSecret }}
        - name: web-config
          mountPath: /etc/tenant-audit-web
          readOnly: true
        {{- end }}
        {{- if .Values.web.tlsSecret }}
        - name: web-tls
          mountPath: /etc/tenant-audit-web-tls
          readOnly: true
        {{- end }}
        {{- if .Values.database.caSecret }}
        - name: db-ca
          mountPath: /etc/tenant-audit-db-ca
          readOnly: true
        {{- end }}
        {{- if .Values.database.clientCertSecret }}
        - name: db-client
          mountPath: /etc/tenant-audit-db-client
          readOnly: true
        {{- end }}
  volumes:
    - name: config
      {{- if .Values.targets }}
      # config.toml and every target's URL files in one volume, at targets/NAME/database_url and
      # targets/NAME/heal_database_url (the paths the chart writes into the config): a Secret
      # mounted inside the ConfigMap's read-only mount would need a mount point created in it.
      projected:
        # Readable by the pod's group (fsGroup) only.
        defaultMode: 0440
        sources:
          - configMap:
              name: {{ include "tenant-audit.fullname" . }}
          {{- range .Values.targets }}
          - secret:
              name: {{ .existingSecret }}
              items:
                - key: {{ .secretKey | default "url" }}
                  path: targets/{{ .name }}/database_url
          {{- if .healExistingSecret }}
          - secret:
              name: {{ .healExistingSecret }}
              items:
                - key: {{ .healSecretKey | default "url" }}
                  path: targets/{{ .name }}/heal_database_url
          {{- end }}
          {{- end }}
      {{- else }}
      configMap:
        name: {{ include "tenant-audit.fullname" . }}
      {{- end }}
    {{- if .Values.web.existingSecret }}
    - name: web-config
      secret:
        secretName: {{ .Values.web.existingSecret }}
        items:
          - key: {{ .Values.web.secretKey }}
            path: {{ .Values.web.secretKey }}
    {{- end }}
    {{- if .Values.web.tlsSecret }}
    - name: web-tls
      secret:
        secretName: {{ .Values.web.tlsSecret }}
        # Private keys readable by the pod's group (fsGroup) only.
        defaultMode: 0440
    {{- end }}
    {{- if .Values.database.caSecret }}
    - name: db-ca
      secret:
        secretName: {{ .Values.database.caSecret }}
        items:
          - key: {{ .Values.database.caSecretKey }}
            path: {{ .Values.database.caSecretKey }}
    {{- end }}
    {{- if .Values.database.clientCertSecret }}
    - name: db-client
      secret:
        secretName: {{ .Values.database.clientCertSecret }}
        defaultMode: 0440
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
The config file: `config`, then what the chart derives from its values: in StatefulSet mode
`[shard] count` = `replicas`, and one `[[targets]]` entry per `targets` item, reading its URLs
from the files the pod template mounts. Fails on what would make the file invalid.
*/}}
{{- define "tenant-audit.config" -}}
{{- $names := dict }}
{{- range .Values.targets }}
{{- if hasKey $names .name }}
{{- fail (printf "targets: the name %q is used twice; each target needs a unique name (its database label)" .name) }}
{{- end }}
{{- $_ := set $names .name true }}
{{- end }}
{{- if and (eq .Values.mode "statefulset") (regexMatch "(?m)^\\s*\\[\\s*shard\\s*\\]" .Values.config) }}
{{- fail "config: remove [shard]; in StatefulSet mode the chart sets [shard] count from replicas" }}
{{- end }}
{{- $added := include "tenant-audit.configAdded" . }}
{{- if $added }}
{{- trimSuffix "\n" .Values.config }}{{ $added }}
{{ else }}
{{- .Values.config }}
{{- end }}
{{- end }}

{{/* The sections the chart adds to `config`, each after a blank line; empty when none. */}}
{{- define "tenant-audit.configAdded" -}}
{{- if eq .Values.mode "statefulset" }}

# Added by the chart (mode: statefulset): one shard per replica; each pod's index comes from
# TENANT_AUDIT_SHARD_INDEX, its ordinal.
[shard]
count = {{ .Values.replicas }}
{{- end }}
{{- range .Values.targets }}

# Added by the chart: target {{ .name }}, its URL from Secret {{ .existingSecret }}.
[[targets]]
name = "{{ .name }}"
database_url_file = "/etc/tenant-audit/targets/{{ .name }}/database_url"
{{- with .schedule }}
schedule = "{{ . }}"
{{- end }}
{{- if .healExistingSecret }}
[targets.heal]
database_url_file = "/etc/tenant-audit/targets/{{ .name }}/heal_database_url"
{{- end }}
{{- end }}
{{- end }}
