//! The Grafana dashboard (dashboards/tenant-audit.json): data source and variables, the job,
//! database and instance filter on every query, and what keeps it fast at 10,000 tenants: only
//! the drill-down row reads per-schema series. prometheus.rs runs its queries.

use serde_json::{json, Value};

use crate::tools::{metric_names, repo};

/// The per-schema finding series (docs/metrics.md): one series per tenant and finding, so only
/// the drill-down row may read them.
pub const PER_SCHEMA: [&str; 5] = [
    "tenant_audit_orphan_rows",
    "tenant_audit_null_timestamps",
    "tenant_audit_cross_schema_fks",
    "tenant_audit_schema_drift",
    "tenant_audit_registry_findings",
];
/// Title prefix of the drill-down row.
pub const DRILL_DOWN: &str = "Tenant drill-down";
/// The selector every per-target series is read with.
const FILTER: &str = "{job=~\"$job\", database=~\"$database\", instance=~\"$instance\"";
/// Process-wide series, without a `database` label (docs/metrics.md).
const PROCESS_WIDE: [&str; 2] = ["up", "tenant_audit_build_info"];
/// How a query of a process-wide series keeps the instances that audit the selected databases
/// (remembered for an hour, so that a pod that stopped answering stays in).
const AUDITS_DATABASE: &str = " and on (job, instance) last_over_time(tenant_audit_database_up{job=~\"$job\", \
                               database=~\"$database\", instance=~\"$instance\"}[1h])";

/// One query of a panel.
pub struct Query {
    pub panel: String,
    /// Title of the row the panel is in.
    pub row: String,
    /// PromQL with Grafana variables (`$job`, `$__rate_interval`...).
    pub expr: String,
}

pub fn dashboard() -> Value {
    let text = std::fs::read_to_string(repo().join("dashboards/tenant-audit.json")).unwrap();
    serde_json::from_str(&text).expect("dashboards/tenant-audit.json is JSON")
}

/// Every panel other than rows, with the title of its row, in order (collapsed rows included).
pub fn panels(dashboard: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut row = String::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            row = panel["title"].as_str().unwrap().to_string();
            out.extend(panel["panels"].as_array().unwrap().iter().map(|p| (row.clone(), p.clone())));
        } else {
            out.push((row.clone(), panel.clone()));
        }
    }
    out
}

pub fn queries(dashboard: &Value) -> Vec<Query> {
    panels(dashboard)
        .into_iter()
        .flat_map(|(row, panel)| {
            let title = panel["title"].as_str().unwrap().to_string();
            let exprs: Vec<String> =
                panel["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_string()).collect();
            exprs.into_iter().map(move |expr| Query { panel: title.clone(), row: row.clone(), expr })
        })
        .collect()
}

/// The templating variable `name`.
pub fn variable<'a>(dashboard: &'a Value, name: &str) -> &'a Value {
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    vars.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no variable {name}"))
}

#[test]
fn every_panel_uses_the_datasource_variable_and_filters_job_database_and_instance() {
    let dashboard = dashboard();
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 39);
    assert_eq!(dashboard["uid"], "tenant-audit");
    let datasource = json!({"type": "prometheus", "uid": "${datasource}"});
    let mut ids = vec![];
    for (_, panel) in panels(&dashboard) {
        let title = &panel["title"];
        ids.push(panel["id"].as_u64().unwrap());
        assert_eq!(panel["datasource"], datasource, "{title}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no query");
        for target in targets {
            assert_eq!(target["datasource"], datasource, "{title}");
        }
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), panels(&dashboard).len(), "panel ids are unique");
    for q in queries(&dashboard) {
        let selectors: Vec<_> = q.expr.match_indices('{').collect();
        assert!(!selectors.is_empty(), "{}: {}", q.panel, q.expr);
        for (at, _) in selectors {
            let before = &q.expr[..at];
            let name = &before[before.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(0, |i| i + 1)..];
            if PROCESS_WIDE.contains(&name) {
                let filter = "{job=~\"$job\", instance=~\"$instance\"}";
                assert!(q.expr[at..].starts_with(filter), "{}: {name} without {filter}: {}", q.panel, q.expr);
                assert!(q.expr.contains(AUDITS_DATABASE), "{}: {name} not narrowed to $database: {}", q.panel, q.expr);
            } else {
                assert!(q.expr[at..].starts_with(FILTER), "{}: a selector without {FILTER}}}: {}", q.panel, q.expr);
            }
        }
        for name in metric_names(&q.expr) {
            assert!(q.expr.contains(&format!("{name}{{")), "{}: {name} without a selector", q.panel);
        }
        // A breakdown by table, schema or shard keeps databases apart: two databases have
        // tables (and tenants) of the same names.
        for (at, _) in q.expr.match_indices(" by (") {
            let labels = &q.expr[at + 5..at + q.expr[at..].find(')').unwrap()];
            let labels: Vec<&str> = labels.split(", ").collect();
            if labels.iter().any(|l| ["table", "schema", "instance"].contains(l)) {
                assert!(
                    labels.contains(&"database"),
                    "{}: by ({}) without database: {}",
                    q.panel,
                    labels.join(", "),
                    q.expr
                );
            }
        }
    }
}

#[test]
fn only_the_drill_down_row_reads_per_schema_series() {
    let dashboard = dashboard();
    let mut drill_down = 0;
    let schema_label = regex::Regex::new(r"\bschema\b").unwrap();
    for q in queries(&dashboard) {
        let per_schema = metric_names(&q.expr).iter().any(|n| PER_SCHEMA.contains(&n.as_str()));
        if q.row.starts_with(DRILL_DOWN) {
            drill_down += 1;
            assert!(per_schema, "drill-down panel {} reads no per-schema series", q.panel);
        } else {
            assert!(!per_schema, "overview panel {} (row {}) reads per-schema series: {}", q.panel, q.row, q.expr);
            assert!(!schema_label.is_match(&q.expr), "overview panel {} uses the schema label: {}", q.panel, q.expr);
        }
    }
    assert!(drill_down >= 3);
}

#[test]
fn variables_select_datasource_job_database_instance_and_tenant() {
    let dashboard = dashboard();
    let names: Vec<&str> =
        dashboard["templating"]["list"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["datasource", "job", "database", "instance", "tenant"]);
    let datasource = variable(&dashboard, "datasource");
    assert_eq!((&datasource["type"], &datasource["query"]), (&json!("datasource"), &json!("prometheus")));
    assert_eq!(variable(&dashboard, "job")["definition"], "label_values(tenant_audit_build_info, job)");
    assert_eq!(
        variable(&dashboard, "database")["definition"],
        "label_values(tenant_audit_database_up{job=~\"$job\"}, database)"
    );
    assert_eq!(
        variable(&dashboard, "instance")["definition"],
        "label_values(tenant_audit_database_up{job=~\"$job\", database=~\"$database\"}, instance)"
    );
    for var in ["job", "database", "instance"] {
        let v = variable(&dashboard, var);
        assert_eq!(
            (&v["multi"], &v["includeAll"], &v["allValue"]),
            (&json!(true), &json!(true), &json!(".*")),
            "{var}"
        );
    }
    let tenant = variable(&dashboard, "tenant")["definition"].as_str().unwrap();
    assert_eq!(metric_names(tenant), {
        let mut v = PER_SCHEMA.map(String::from).to_vec();
        v.sort();
        v
    });
    for var in ["job", "database", "instance", "tenant"] {
        let v = variable(&dashboard, var);
        assert_eq!(v["definition"], v["query"]["query"], "{var}");
        assert_eq!(v["datasource"]["uid"], "${datasource}", "{var}");
    }
}
