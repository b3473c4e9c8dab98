//! The Helm chart (helm/tenant-audit): `helm lint --strict`, and `helm template` with the default
//! values and with each ci/*-values.yaml, validated by kubernetes-validate; what the default
//! renders; the rules and dashboard it ships equal to dashboards/; every value documented; and
//! the configuration of each variant accepted by tenant-audit on the demo database.

use std::path::{Path, PathBuf};
use std::process::Command;

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

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn chart_lints_and_renders_valid_manifests() {
    let home = temp_dir("helm-lint");
    let ci = ci_values();
    assert!(ci.len() >= 2, "{ci:?}");
    for args in variants(&ci) {
        run_ok(helm(&home).args(["lint", "--strict", CHART]).args(&args));
        let manifests = home.join("manifests.yaml");
        std::fs::write(&manifests, render(&home, &args)).unwrap();
        for version in KUBERNETES {
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
    for absent in ["kind: ServiceMonitor", "kind: PrometheusRule"] {
        assert!(!out.contains(absent), "{absent} is off by default");
    }
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
    for args in variants(&ci) {
        let configmap = render(&home, &[&args[..], &["--show-only", "templates/configmap.yaml"]].concat());
        let config = block_after(&configmap, "  config.toml: |", 4);
        assert!(config.contains("listen = \"0.0.0.0:9841\""), "{args:?}: {config}");
        let path: PathBuf = config_file("chart", &config);
        let out = cli(&["scan", "--config", path.to_str().unwrap()], &[("TENANT_AUDIT_DATABASE_URL", &url)]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("ORPHAN_ROWS (critical): 5 findings"), "{args:?}: {stdout}");
    }
    std::fs::remove_dir_all(&home).unwrap();
}
