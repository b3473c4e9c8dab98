//! The Helm chart (helm/tenant-audit): `helm lint --strict`, and `helm template` with the default
//! values and with each ci/*-values.yaml, validated by kubernetes-validate; what the default
//! renders; the StatefulSet mode's shard wiring (shard count, pod ordinal, targets' Secrets,
//! PodDisruptionBudget); the rules and dashboard it ships equal to dashboards/; every value
//! documented; and the configuration of each variant accepted by tenant-audit on the demo
//! database.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::dashboard::dashboard;
use crate::support::{cli, config_file, fixture_db, DEMO_SQL};
use crate::tools::{repo, run_ok, temp_dir, tool};

const CHART: &str = "helm/tenant-audit";
/// The oldest Kubernetes the chart supports (Chart.yaml `kubeVersion`) and the newest that
/// kubernetes-validate knows.
const KUBERNETES: [&str; 2] = ["1.25.0", "1.37.0"];

/// helm with its cache, config and data in `home`, run from the repository root.
fn helm(home: &Path) -> Command {
    let mut cmd = Command::new(tool("helm"));
    cmd.current_dir(repo())
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    cmd
}

/// `helm template` of the chart with `args` (values files, `--set`, `--show-only`...).
fn render(home: &Path, args: &[&str]) -> String {
    run_ok(helm(home).args(["template", "tenant-audit", CHART]).args(args))
}

/// The ci/*-values.yaml files, relative to the repository root.
fn ci_values() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(repo().join(CHART).join("ci"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with("-values.yaml"))
        .map(|name| format!("{CHART}/ci/{name}"))
        .collect();
    files.sort();
    files
}

/// helm arguments of each values variant: the defaults, then each ci/*-values.yaml.
fn variants(ci: &[String]) -> Vec<Vec<&str>> {
    [vec![]].into_iter().chain(ci.iter().map(|f| vec!["-f", f.as_str()])).collect()
}

/// The lines of `text` after the line `marker`, with `indent` leading spaces removed.
fn block_after(text: &str, marker: &str, indent: usize) -> String {
    let lines = text.lines().skip_while(|l| *l != marker).skip(1);
    lines.map(|l| l.get(indent..).unwrap_or("").trim_end()).collect::<Vec<_>>().join("\n").trim_end().to_string() + "\n"
}

/// The manifests of a render, as JSON values, in order.
fn manifests(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The one manifest of `kind` in `docs`.
fn only<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "{kind}: {found:?}");
    found[0]
}

/// The config file a render's ConfigMap holds, parsed.
fn rendered_config(docs: &[Value]) -> toml::Table {
    let configmap = docs.iter().find(|d| d["kind"] == "ConfigMap" && d["data"]["config.toml"].is_string()).unwrap();
    configmap["data"]["config.toml"].as_str().unwrap().parse().unwrap()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn chart_lints_and_renders_valid_manifests() {
    let home = temp_dir("helm-lint");
    let ci = ci_values();
    assert!(ci.len() >= 2, "{ci:?}");
    assert!(ci.contains(&format!("{CHART}/ci/statefulset-values.yaml")), "{ci:?}");
    for args in variants(&ci) {
        run_ok(helm(&home).args(["lint", "--strict", CHART]).args(&args));
        let manifests = home.join("manifests.yaml");
        for version in KUBERNETES {
            // Rendered for that version: what the chart adds only where the API has it
            // (the PodDisruptionBudget's unhealthyPodEvictionPolicy) is validated there.
            std::fs::write(&manifests, render(&home, &[&args[..], &["--kube-version", version]].concat())).unwrap();
            // Custom resources (ServiceMonitor, PrometheusRule) only warn: no schema is bundled.
            run_ok(
                Command::new(tool("kubernetes-validate")).args(["--strict", "--quiet", "-k", version]).arg(&manifests),
            );
        }
    }
    std::fs::remove_dir_all(&home).unwrap();
}

#[test]
fn default_values_render_a_locked_down_single_replica() {
    let home = temp_dir("helm-default");
    let out = render(&home, &[]);
    let image = format!("image: \"ghcr.io/tenant-audit/tenant-audit:{}\"", env!("CARGO_PKG_VERSION"));
    for expected in [
        "kind: Deployment",
        "kind: Service",
        "kind: ServiceAccount",
        "replicas: 1",
        "type: Recreate",
        "automountServiceAccountToken: false",
        "checksum/config: ",
        image.as_str(),
        "args: [\"serve\", \"--config\", \"/etc/tenant-audit/config.toml\", \"--log-format\", \"json\"]",
        "- name: TENANT_AUDIT_DATABASE_URL",
        "name: tenant-audit-database",
        "mountPath: /etc/tenant-audit",
        "path: /healthz",
        "path: /readyz",
        "containerPort: 9841",
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "- ALL",
        "type: RuntimeDefault",
        "publishNotReadyAddresses: true",
        "grafana_dashboard: \"1\"",
    ] {
        assert!(out.contains(expected), "default render lacks {expected:?}:\n{out}");
    }
    for absent in [
        "kind: ServiceMonitor",
        "kind: PrometheusRule",
        "kind: StatefulSet",
        "kind: PodDisruptionBudget",
        "clusterIP: None",
        "TENANT_AUDIT_SHARD_INDEX",
        "[shard]",
        "[[targets]]",
        "projected:",
    ] {
        assert!(!out.contains(absent), "{absent} is off by default");
    }
    std::fs::remove_dir_all(&home).unwrap();
}

const STATEFULSET: &str = "helm/tenant-audit/ci/statefulset-values.yaml";
const POD_INDEX: &str = "metadata.labels['apps.kubernetes.io/pod-index']";

/// The projected volume's sources and the config's `[[targets]]` of ci/statefulset-values.yaml:
/// each target's URL (and heal URL) file from its Secret, at the path its entry reads.
fn statefulset_targets() -> (Value, Value) {
    // Kubernetes reads 0440 as YAML 1.1 octal (r--r-----), as kubernetes-validate does; the
    // YAML 1.2 parser here keeps it as written.
    let volume = json!({"name": "config", "projected": {"defaultMode": "0440", "sources": [
        {"configMap": {"name": "tenant-audit"}},
        {"secret": {"name": "orders-db-auditor",
                    "items": [{"key": "database-url", "path": "targets/orders/database_url"}]}},
        {"secret": {"name": "billing-db-replica",
                    "items": [{"key": "url", "path": "targets/billing/database_url"}]}},
        {"secret": {"name": "billing-db-healer",
                    "items": [{"key": "database-url", "path": "targets/billing/heal_database_url"}]}},
    ]}});
    let targets = json!([
        {"name": "orders", "database_url_file": "/etc/tenant-audit/targets/orders/database_url"},
        {"name": "billing", "database_url_file": "/etc/tenant-audit/targets/billing/database_url",
         "schedule": "0 */10 * * * *",
         "heal": {"database_url_file": "/etc/tenant-audit/targets/billing/heal_database_url"}},
    ]);
    (volume, targets)
}

#[test]
fn statefulset_mode_shards_by_pod_ordinal_and_mounts_each_target() {
    let home = temp_dir("helm-statefulset");
    let (volume, targets) = statefulset_targets();
    for (replicas, set) in [(3, "replicas=3"), (5, "replicas=5")] {
        let docs = manifests(&render(&home, &["-f", STATEFULSET, "--set", set, "--kube-version", "1.37.0"]));
        let mut kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        kinds.sort();
        assert_eq!(
            kinds,
            [
                "ConfigMap",
                "ConfigMap",
                "PodDisruptionBudget",
                "PrometheusRule",
                "Service",
                "ServiceAccount",
                "ServiceMonitor",
                "StatefulSet"
            ]
        );
        let (sts, service, pdb) =
            (only(&docs, "StatefulSet"), only(&docs, "Service"), only(&docs, "PodDisruptionBudget"));
        let selector = json!({"app.kubernetes.io/name": "tenant-audit", "app.kubernetes.io/instance": "tenant-audit"});

        // One shard per replica: the config's count is the StatefulSet's replicas.
        let config = rendered_config(&docs);
        assert_eq!(sts["spec"]["replicas"], replicas);
        assert_eq!(config["shard"].as_table().unwrap().clone(), toml::toml! { count = replicas }, "{config}");
        assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel");
        assert_eq!(sts["spec"]["selector"]["matchLabels"], selector);

        // The pod's index is its ordinal, from the label the StatefulSet controller sets; no
        // single database URL beside the targets.
        let pod = &sts["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        assert_eq!(
            container["env"],
            json!([{"name": "TENANT_AUDIT_SHARD_INDEX", "valueFrom": {"fieldRef": {"fieldPath": POD_INDEX}}}])
        );
        assert_eq!(
            container["volumeMounts"],
            json!([{"name": "config", "mountPath": "/etc/tenant-audit", "readOnly": true}])
        );
        assert_eq!(pod["volumes"], json!([volume]));
        let entries = serde_json::to_value(&config["targets"]).unwrap();
        assert_eq!(entries, targets);
        // Every URL file an entry reads is one the volume provides.
        for entry in entries.as_array().unwrap() {
            let files = [&entry["database_url_file"], &entry["heal"]["database_url_file"]];
            for file in files.into_iter().filter_map(Value::as_str) {
                let path = file.strip_prefix("/etc/tenant-audit/").unwrap();
                let provided = volume["projected"]["sources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["secret"]["items"][0]["path"] == path);
                assert!(provided, "{file} is not mounted");
            }
        }
        assert_eq!(
            (&config["tenants"]["registry_table"], &config["serve"]["listen"]),
            (&"customers_client".into(), &"0.0.0.0:9841".into())
        );

        // The headless Service the StatefulSet names, scraped per pod.
        assert_eq!(sts["spec"]["serviceName"], service["metadata"]["name"]);
        assert_eq!((&service["spec"]["clusterIP"], &service["spec"]["selector"]), (&json!("None"), &selector));
        assert_eq!(service["spec"]["publishNotReadyAddresses"], true);
        // A drain evicts one shard at a time; unready pods (their database down) always.
        assert_eq!(
            pdb["spec"],
            json!({"maxUnavailable": 1, "unhealthyPodEvictionPolicy": "AlwaysAllow", "selector": {"matchLabels": selector}})
        );
    }

    // Kubernetes 1.26: no pod-index label (before 1.28: the daemon reads the ordinal from the
    // host name) and no unhealthyPodEvictionPolicy (before 1.27).
    let old = manifests(&render(&home, &["-f", STATEFULSET, "--kube-version", "1.26.0"]));
    let container = &only(&old, "StatefulSet")["spec"]["template"]["spec"]["containers"][0];
    assert!(container.get("env").is_none(), "{container}");
    assert!(only(&old, "PodDisruptionBudget")["spec"].get("unhealthyPodEvictionPolicy").is_none());
    let off = manifests(&render(&home, &["-f", STATEFULSET, "--set", "pdb.enabled=false"]));
    assert!(off.iter().all(|d| d["kind"] != "PodDisruptionBudget"));
    std::fs::remove_dir_all(&home).unwrap();
}

#[test]
fn deployment_mode_with_targets_mounts_them_without_sharding() {
    let home = temp_dir("helm-targets");
    let docs = manifests(&render(&home, &["-f", STATEFULSET, "--set", "mode=deployment,replicas=1"]));
    assert!(docs.iter().all(|d| !matches!(d["kind"].as_str(), Some("StatefulSet" | "PodDisruptionBudget"))));
    let deployment = only(&docs, "Deployment");
    assert_eq!(
        (&deployment["spec"]["replicas"], &deployment["spec"]["strategy"]),
        (&json!(1), &json!({"type": "Recreate"}))
    );
    let pod = &deployment["spec"]["template"]["spec"];
    let (volume, targets) = statefulset_targets();
    assert_eq!(pod["volumes"], json!([volume]));
    assert!(pod["containers"][0].get("env").is_none(), "{}", pod["containers"][0]);
    let config = rendered_config(&docs);
    assert_eq!(serde_json::to_value(&config["targets"]).unwrap(), targets);
    assert!(!config.contains_key("shard"), "{config}");
    assert_eq!(only(&docs, "Service")["spec"].get("clusterIP"), None);
    std::fs::remove_dir_all(&home).unwrap();
}

#[test]
fn secure_values_mount_the_web_config_and_certificates() {
    let home = temp_dir("helm-secure");
    let out = render(&home, &["-f", "helm/tenant-audit/ci/secure-values.yaml"]);
    for expected in [
        "args: [\"serve\", \"--config\", \"/etc/tenant-audit/config.toml\", \"--log-format\", \"json\", \"--web.config.file\", \"/etc/tenant-audit-web/web.yml\"]",
        "mountPath: /etc/tenant-audit-web\n",
        "secretName: tenant-audit-web\n",
        "mountPath: /etc/tenant-audit-web-tls\n",
        "secretName: tenant-audit-web-tls\n",
        "mountPath: /etc/tenant-audit-db-ca\n",
        "secretName: orders-db-ca\n",
        "mountPath: /etc/tenant-audit-db-client\n",
        "secretName: orders-db-auditor-cert\n",
        "defaultMode: 0440",
        "scheme: HTTPS",
        "scheme: https",
        "basicAuth:\n        password:\n          key: password\n          name: tenant-audit-scraper",
        "kind: NetworkPolicy",
        "- Egress",
        "cidr: 10.20.0.0/16",
    ] {
        assert!(out.contains(expected), "secure render lacks {expected:?}:\n{out}");
    }
    let default = render(&home, &[]);
    for absent in ["--web.config.file", "kind: NetworkPolicy", "tenant-audit-db-ca", "scheme: HTTPS"] {
        assert!(!default.contains(absent), "{absent} is off by default");
    }
    assert_eq!(default.matches("scheme: HTTP\n").count(), 2, "both probes use plain HTTP by default");
    let no_egress =
        render(&home, &["--set", "networkPolicy.enabled=true", "--show-only", "templates/networkpolicy.yaml"]);
    assert!(no_egress.contains("- Ingress") && !no_egress.contains("Egress"), "{no_egress}");
    std::fs::remove_dir_all(&home).unwrap();
}

#[test]
fn chart_ships_the_rules_and_dashboard_of_dashboards() {
    for (copy, original) in
        [("files/alerts.yml", "dashboards/alerts.yml"), ("files/tenant-audit.json", "dashboards/tenant-audit.json")]
    {
        assert!(
            read(&format!("{CHART}/{copy}")) == read(original),
            "{CHART}/{copy} differs: cp {original} {CHART}/{copy}"
        );
    }
    let home = temp_dir("helm-files");
    let on = ["--set", "prometheusRule.enabled=true"];
    let rule = render(&home, &[&on[..], &["--show-only", "templates/prometheusrule.yaml"]].concat());
    let original: String = read("dashboards/alerts.yml").lines().map(|l| l.trim_end().to_string() + "\n").collect();
    assert_eq!(block_after(&rule, "spec:", 2), original);
    let dashboards = render(&home, &["--show-only", "templates/dashboards-configmap.yaml"]);
    let json: serde_json::Value = serde_json::from_str(&block_after(&dashboards, "  tenant-audit.json: |", 4)).unwrap();
    assert_eq!(json, dashboard());
    std::fs::remove_dir_all(&home).unwrap();
}

#[test]
fn values_schema_rejects_unknown_keys_and_a_missing_secret() {
    let home = temp_dir("helm-schema");
    for (set, error) in [
        ("nope=1", "additional properties 'nope' not allowed"),
        ("database.existingSecret=", "/database/existingSecret"),
        ("service.publishNotReadyAddresses=maybe", "/service/publishNotReadyAddresses"),
        ("web.scheme=https", "/web/scheme"),
        ("mode=sharded", "at '/mode': value must be one of 'deployment', 'statefulset'"),
        ("replicas=3", "at '/replicas': value must be 1"),
        ("mode=statefulset,replicas=0", "at '/replicas': minimum: got 0, want 1"),
        ("mode=statefulset,replicas=1025", "at '/replicas': maximum: got 1,025, want 1,024"),
        ("mode=statefulset,service.type=NodePort", "at '/service/type': value must be 'ClusterIP'"),
        ("targets[0].name=orders", "at '/targets/0': missing property 'existingSecret'"),
        ("targets[0].name=Orders,targets[0].existingSecret=s", "at '/targets/0/name': 'Orders' does not match pattern"),
        ("targets[0].name=a,targets[0].existingSecret=s,targets[0].schedule=x\"y", "at '/targets/0/schedule'"),
        ("pdb.maxUnavailable=0", "at '/pdb/maxUnavailable'"),
        (
            "targets[0].name=a,targets[0].existingSecret=s,targets[1].name=a,targets[1].existingSecret=t",
            "targets: the name \"a\" is used twice",
        ),
        (
            "mode=statefulset,replicas=2,config=[shard]\ncount = 2\n",
            "config: remove [shard]; in StatefulSet mode the chart sets [shard] count from replicas",
        ),
    ] {
        let out = helm(&home).args(["template", "tenant-audit", CHART, "--set", set]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(error), "--set {set}: {stderr}");
    }
    std::fs::remove_dir_all(&home).unwrap();
}

#[test]
fn readme_documents_every_value() {
    let schema: serde_json::Value = serde_json::from_str(&read(&format!("{CHART}/values.schema.json"))).unwrap();
    let readme = read(&format!("{CHART}/README.md"));
    let mut paths = Vec::new();
    value_paths(&schema, "", &mut paths);
    assert!(paths.len() > 30, "{paths:?}");
    for path in paths {
        assert!(readme.contains(&format!("| `{path}` |")), "{CHART}/README.md has no row for `{path}`");
    }
}

/// Dotted paths of the values the schema declares: its leaves (free-form maps included).
fn value_paths(schema: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    for (key, sub) in schema["properties"].as_object().unwrap() {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        if sub.get("properties").is_some() {
            value_paths(sub, &path, out);
        } else {
            out.push(path);
        }
    }
}

#[tokio::test]
async fn rendered_configs_scan_the_demo_database() {
    let home = temp_dir("helm-config");
    let url = fixture_db("chart_config", DEMO_SQL).await;
    let ci = ci_values();
    let mut sharded = 0;
    for args in variants(&ci) {
        let configmap = render(&home, &[&args[..], &["--show-only", "templates/configmap.yaml"]].concat());
        let config = block_after(&configmap, "  config.toml: |", 4);
        assert!(config.contains("listen = \"0.0.0.0:9841\""), "{args:?}: {config}");
        if config.contains("[[targets]]") {
            sharded += 1;
            scan_every_shard_of_every_target(&home, &config, &url);
            continue;
        }
        let path: PathBuf = config_file("chart", &config);
        let out = cli(&["scan", "--config", path.to_str().unwrap()], &[("TENANT_AUDIT_DATABASE_URL", &url)]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("ORPHAN_ROWS (critical): 5 findings"), "{args:?}: {stdout}");
    }
    assert_eq!(sharded, 1, "ci/statefulset-values.yaml renders [[targets]]");
    std::fs::remove_dir_all(&home).unwrap();
}

/// The StatefulSet variant's config as its pods run it: the URL files where the pod mounts
/// them (here under `home`), each shard's index from `TENANT_AUDIT_SHARD_INDEX` as the chart
/// passes it. Every target's summary, summed over the shards, is exactly an unsharded scan's.
fn scan_every_shard_of_every_target(home: &Path, config: &str, url: &str) {
    let toml: toml::Table = config.parse().unwrap();
    let count = toml["shard"]["count"].as_integer().unwrap();
    let mount = home.join("etc-tenant-audit");
    for name in ["orders", "billing"] {
        std::fs::create_dir_all(mount.join("targets").join(name)).unwrap();
        for file in ["database_url", "heal_database_url"] {
            std::fs::write(mount.join("targets").join(name).join(file), url).unwrap();
        }
    }
    let config = config.replace("/etc/tenant-audit/", &format!("{}/", mount.display()));
    let path = config_file("chart-sharded", &config);
    let summary = |extra: &[&str], env: &[(&str, &str)]| -> Value {
        let args = [&["scan", "--config", path.to_str().unwrap(), "--format", "json"][..], extra].concat();
        let out = cli(&args, env);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{args:?} {env:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str::<Value>(&stdout).unwrap()["summary"].clone()
    };
    let unsharded = {
        let single = config_file("chart-unsharded", "[tenants]\nregistry_table = \"customers_client\"\n");
        let out = cli(
            &["scan", "--config", single.to_str().unwrap(), "--format", "json"],
            &[("TENANT_AUDIT_DATABASE_URL", url)],
        );
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["summary"].clone()
    };
    assert_eq!(unsharded["orphan_rows"]["findings"], 5, "{unsharded}");
    for target in ["orders", "billing"] {
        let mut total = json!({});
        for index in 0..count {
            let shard = summary(&["--target", target], &[("TENANT_AUDIT_SHARD_INDEX", &index.to_string())]);
            for (check, s) in shard.as_object().unwrap() {
                for key in ["findings", "count"] {
                    let sum = total[check][key].as_u64().unwrap_or(0) + s[key].as_u64().unwrap();
                    total[check][key] = sum.into();
                }
            }
        }
        for (check, s) in unsharded.as_object().unwrap() {
            for key in ["findings", "count"] {
                assert_eq!(total[check][key], s[key], "{target}: {check} {key} summed over {count} shards");
            }
        }
    }
}
