//! End to end with a real Prometheus: it scrapes the daemon auditing two targets (two copies of
//! the demo database, one scanned on a streaming standby) and evaluates dashboards/alerts.yml; then every dashboard query and
//! variable and every alert expression runs through its HTTP API with the expected result, for
//! both databases and for one (the `database` variable), and every metric they name is on
//! `/metrics`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tenant_audit::config::{Env, Fleet};

use crate::dashboard::{dashboard, queries, variable};
use crate::rules::alerts;
use crate::support::pg::{connect, Cluster};
use crate::support::{fixture_db, metric_lines, start_daemon, BASE_SQL, DEMO_SQL};
use crate::tools::{metric_names, repo, temp_dir, tool};

/// Tenants as in the demo; a schedule that does not fire during the test (the scan runs at start-up).
const DAEMON: &str = "[tenants]\ninclude = ['^tenant_']\n[serve]\nschedule = '0 0 0 1 1 *'\n";
/// The targets' names, sorted.
const DATABASES: [&str; 2] = ["billing", "orders"];
/// The alerts whose expressions hold on the demo database: it has every kind of finding, and a
/// healthy daemon, database and scrape, and heal disabled (`DAEMON` has no `[heal]`), so neither
/// TenantAuditHealErrors nor TenantAuditHealFailing holds.
const FIRING_ON_DEMO: [&str; 4] = [
    "TenantAuditOrphanRows",
    "TenantAuditNullRequiredTimestamps",
    "TenantAuditCrossSchemaForeignKey",
    "TenantAuditSchemaDrift",
];

#[tokio::test]
async fn dashboard_and_alert_queries_run_on_a_real_prometheus() {
    // orders: the demo database on the shared test server. billing: a copy on a cluster of its
    // own, scanned on its hot standby (made by pg_basebackup after the copy), so that the replica
    // lag panel and alert have their series.
    let orders = fixture_db("prometheus_orders", DEMO_SQL).await;
    let primary = Cluster::start();
    connect(&primary.url("postgres")).await.batch_execute("CREATE DATABASE billing").await.unwrap();
    connect(&primary.url("billing")).await.batch_execute(&format!("{BASE_SQL}\n{DEMO_SQL}")).await.unwrap();
    let standby = primary.standby();
    let mut text = DAEMON.to_string();
    for (name, url) in [("billing", standby.url("billing")), ("orders", orders)] {
        text.push_str(&format!("[[targets]]\nname = '{name}'\ndatabase_url = {url:?}\n"));
    }
    let fleet = Fleet::from_toml(&text, Path::new("test.toml"), Env::default()).unwrap();
    let daemon = start_daemon(fleet).await;
    for name in DATABASES {
        daemon.wait_for(&format!("tenant_audit_scans_total{{database=\"{name}\",result=\"success\"}} 1")).await;
    }
    let target = daemon.base.strip_prefix("http://").unwrap().to_string();
    let mut prometheus = Prometheus::start(&target);
    prometheus.wait_for_scrapes().await;

    // Every panel has data for both databases and for one; a query of one database's panel
    // returns only that database's series.
    let dashboard = dashboard();
    for q in queries(&dashboard) {
        let all = substitute(&q.expr, ".*");
        assert!(!prometheus.query(&all).await.is_empty(), "panel {:?} got no data from {all}", q.panel);
        let one = substitute(&q.expr, "billing");
        let result = prometheus.query(&one).await;
        assert!(!result.is_empty(), "panel {:?} got no data from {one}", q.panel);
        for series in &result {
            let database = &series["metric"]["database"];
            assert!(database.is_null() || database == "billing", "panel {:?}: {series} from {one}", q.panel);
        }
    }
    // The two copies of the demo database have 7 orphan rows each.
    let orphans = queries(&dashboard).into_iter().find(|q| q.panel == "Orphan rows now").unwrap();
    for (database, rows) in [(".*", "14"), ("orders", "7"), ("billing", "7")] {
        let result = prometheus.query(&substitute(&orphans.expr, database)).await;
        assert_eq!(result.len(), 1, "{result:?}");
        assert_eq!(result[0]["value"][1], rows, "orphan rows of {database}");
    }
    let tenants = ["tenant_c3", "tenant_d4", "tenant_e5", "tenant_f6", "tenant_gone", "tenant_zz9"];
    assert_eq!(prometheus.variable_values(variable(&dashboard, "job")).await, ["tenant-audit"]);
    assert_eq!(prometheus.variable_values(variable(&dashboard, "database")).await, DATABASES);
    assert_eq!(prometheus.variable_values(variable(&dashboard, "instance")).await, [target.as_str()]);
    assert_eq!(prometheus.variable_values(variable(&dashboard, "tenant")).await, tenants);

    // The rules as Prometheus parsed them: each expression holds exactly when expected, and
    // the rule manager made pending (or firing) exactly those alerts.
    let names: Vec<String> = alerts().into_iter().map(|a| a.name).collect();
    let rules = prometheus.alerting_rules().await;
    assert_eq!(rules.iter().map(|r| r["name"].as_str().unwrap()).collect::<Vec<_>>(), names);
    for rule in &rules {
        let (name, expr) = (rule["name"].as_str().unwrap(), rule["query"].as_str().unwrap());
        let result = prometheus.query(expr).await;
        assert_eq!(!result.is_empty(), FIRING_ON_DEMO.contains(&name), "{name}: {expr}");
        // A finding alert holds once per database (and table), summed: never per instance.
        for series in &result {
            assert!(series["metric"].get("instance").is_none(), "{name}: {series}");
        }
        let mut databases: Vec<&str> = result.iter().map(|s| s["metric"]["database"].as_str().unwrap()).collect();
        databases.sort();
        databases.dedup();
        if !result.is_empty() {
            assert_eq!(databases, DATABASES, "{name}: {result:?}");
        }
    }
    prometheus.wait_for_active_alerts(&FIRING_ON_DEMO).await;

    let used = format!(
        "{}\n{}",
        std::fs::read_to_string(repo().join("dashboards/tenant-audit.json")).unwrap(),
        std::fs::read_to_string(repo().join("dashboards/alerts.yml")).unwrap()
    );
    let (status, exposition) = daemon.get("/metrics").await;
    assert_eq!(status, 200);
    let used = metric_names(&used);
    assert!(used.len() > 20, "{used:?}");
    for name in used {
        assert!(
            !metric_lines(&exposition, &name).is_empty(),
            "{name} is used by a dashboard or alert but not on /metrics"
        );
    }
    daemon.stop().await;
    drop((standby, primary));
}

/// Grafana's variables as this test sets them, with `$database` = `database` (a regex: `.*` is
/// "All").
fn substitute(expr: &str, database: &str) -> String {
    let expr = expr
        .replace("$__rate_interval", "1m")
        .replace("$job", "tenant-audit")
        .replace("$database", database)
        .replace("$instance", ".*")
        .replace("$tenant", "tenant_c3");
    assert!(!expr.contains('$'), "unknown variable in {expr}");
    expr
}

/// A Prometheus server on loopback; killed, and its directory removed, on drop (also when the
/// test panics).
struct Prometheus {
    base: String,
    dir: PathBuf,
    child: Child,
    http: reqwest::Client,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (`host:port`) every second as job `tenant-audit` and
    /// evaluating the alert rules every second.
    fn start(target: &str) -> Prometheus {
        let dir = temp_dir("prometheus");
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: tenant-audit\n    static_configs:\n      - targets: ['{target}']\n",
            repo().join("dashboards/alerts.yml").display()
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Prometheus { base: format!("http://127.0.0.1:{port}"), dir, child, http: reqwest::Client::new() }
    }

    /// Polls until the target is up and scraped with findings at least twice (so that rates
    /// have two samples); the first scrape comes about 5 s after start.
    async fn wait_for_scrapes(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("prometheus exited ({status}):\n{}", self.log());
            }
            if self.answers().await
                && !self.query("up{job=\"tenant-audit\"} == 1").await.is_empty()
                && !self.query("tenant_audit_findings").await.is_empty()
                && !self
                    .query("count_over_time(tenant_audit_findings{check=\"orphan_rows\"}[1m]) >= 2")
                    .await
                    .is_empty()
            {
                return;
            }
            assert!(Instant::now() < deadline, "no scrape of the daemon within 60 s:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Polls until the rules were evaluated without error and the active (pending or firing)
    /// alerts are exactly `expected`.
    async fn wait_for_active_alerts(&self, expected: &[&str]) {
        let mut expected = expected.to_vec();
        expected.sort();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let healthy = self.alerting_rules().await.iter().all(|r| r["health"] == "ok");
            let alerts = self.get("/api/v1/alerts").await;
            let mut active: Vec<&str> = alerts["data"]["alerts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["labels"]["alertname"].as_str().unwrap())
                .collect();
            active.sort();
            active.dedup();
            if healthy && active == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "active alerts {active:?}, expected {expected:?}; rules healthy: {healthy}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The alerting rules Prometheus loaded, in file order (`name`, `query`, `health`...).
    async fn alerting_rules(&self) -> Vec<Value> {
        let rules = self.get("/api/v1/rules?type=alert").await;
        rules["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect()
    }

    /// The values a Grafana query variable offers: `label_values(SELECTOR, LABEL)`, or
    /// `query_result(EXPR)` with the regex `/LABEL="([^"]+)"/`. Sorted, deduplicated.
    async fn variable_values(&self, var: &Value) -> Vec<String> {
        let definition = substitute(var["definition"].as_str().unwrap(), ".*");
        let (expr, label) = match definition.strip_prefix("label_values(") {
            Some(args) => {
                let (expr, label) = args.strip_suffix(')').unwrap().rsplit_once(", ").unwrap();
                (expr.to_string(), label.to_string())
            }
            None => {
                let expr = definition.strip_prefix("query_result(").and_then(|e| e.strip_suffix(')')).unwrap();
                let regex = var["regex"].as_str().unwrap();
                let label = regex.strip_prefix('/').and_then(|r| r.strip_suffix("=\"([^\"]+)\"/")).unwrap();
                (expr.to_string(), label.to_string())
            }
        };
        let mut values: Vec<String> =
            self.query(&expr).await.iter().map(|s| s["metric"][&label].as_str().unwrap().to_string()).collect();
        values.sort();
        values.dedup();
        values
    }

    /// The result vector of `expr` evaluated now; panics unless Prometheus accepted it.
    async fn query(&self, expr: &str) -> Vec<Value> {
        let response =
            self.http.post(format!("{}/api/v1/query", self.base)).form(&[("query", expr)]).send().await.unwrap();
        let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
        assert_eq!(body["status"], "success", "{expr}: {body}");
        body["data"]["result"].as_array().unwrap().clone()
    }

    async fn get(&self, path: &str) -> Value {
        let response = self.http.get(format!("{}{path}", self.base)).send().await.unwrap();
        serde_json::from_str(&response.text().await.unwrap()).unwrap()
    }

    /// Whether the server is up and ready to answer queries.
    async fn answers(&self) -> bool {
        let ready = self.http.get(format!("{}/-/ready", self.base)).send().await;
        ready.is_ok_and(|r| r.status().is_success())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
