//! Several databases in one daemon (`[[targets]]`): per-database metrics and reports, and one
//! database stopped mid-run leaving the other's scans and metrics untouched.

use std::time::{Duration, Instant};

use tenant_audit::config::{Env, Fleet};

use crate::support::pg::{connect, Cluster};
use crate::support::{metric_lines, start_daemon, RunningDaemon, BASE_SQL, DEMO_SQL};

/// `us`: two tenants, one with two NULL `created_at` values.
const US_SQL: &str = "SELECT pg_temp.create_tenant('tenant_u1');
    SELECT pg_temp.create_tenant('tenant_u2');
    UPDATE tenant_u2.users_userprofile SET created_at = NULL;
    INSERT INTO tenant_u2.users_userprofile (user_id, business_id, created_at, modified_at)
      VALUES (2, 'b0000000-0000-0000-0000-000000000001', NULL, now());";

/// A cluster holding database `app` built from `BASE_SQL` and `sql`.
async fn cluster_with(sql: &str) -> Cluster {
    let cluster = Cluster::start();
    connect(&cluster.url("postgres")).await.batch_execute("CREATE DATABASE app").await.unwrap();
    connect(&cluster.url("app")).await.batch_execute(&format!("{BASE_SQL}\n{sql}")).await.unwrap();
    cluster
}

/// The `/metrics` lines of `name` for target `database`.
async fn of(daemon: &RunningDaemon, name: &str, database: &str) -> Vec<String> {
    let label = format!("database=\"{database}\"");
    daemon.samples(name).await.into_iter().filter(|l| l.contains(&label)).collect()
}

/// The number of successful scans of `database` so far.
async fn successes(daemon: &RunningDaemon, database: &str) -> u64 {
    let prefix = format!("tenant_audit_scans_total{{database=\"{database}\",result=\"success\"}} ");
    let lines = daemon.samples("tenant_audit_scans_total").await;
    lines.iter().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |v| v.parse().unwrap())
}

/// Waits (60 s at most) until `database` has completed `n` successful scans.
async fn wait_for_successes(daemon: &RunningDaemon, database: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while successes(daemon, database).await < n {
        assert!(Instant::now() < deadline, "{database} never completed {n} scans");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn two_databases_in_one_daemon_are_isolated() {
    let (eu, us) = (cluster_with(DEMO_SQL).await, cluster_with(US_SQL).await);
    let text = format!(
        "[tenants]\ninclude = ['^tenant_']\n[database]\nping_interval = '100ms'\n\
         [serve]\nschedule = '* * * * * *'\nretry_initial_backoff = '50ms'\nretry_max_backoff = '100ms'\n\
         [[targets]]\nname = 'eu'\ndatabase_url = {:?}\n\
         [[targets]]\nname = 'us'\ndatabase_url = {:?}\n[targets.checks]\nrequired_timestamps = ['created_at']\n",
        eu.url("app"),
        us.url("app")
    );
    let fleet = Fleet::from_toml(&text, std::path::Path::new("fleet.toml"), Env::default()).unwrap();
    let daemon = start_daemon(fleet).await;
    wait_for_successes(&daemon, "eu", 1).await;
    wait_for_successes(&daemon, "us", 1).await;

    let findings = |database: &str, counts: [u32; 7]| -> Vec<String> {
        let checks = [
            "cross_schema_fk",
            "missing_schema",
            "null_timestamps",
            "orphan_rows",
            "schema_drift",
            "sequence_behind",
            "unregistered_schema",
        ];
        checks
            .iter()
            .zip(counts)
            .map(|(check, n)| format!("tenant_audit_findings{{check=\"{check}\",database=\"{database}\"}} {n}"))
            .collect()
    };
    let eu_findings = findings("eu", [1, 1, 1, 5, 5, 0, 1]);
    let us_findings = findings("us", [0, 0, 1, 0, 0, 0, 0]);
    assert_eq!(of(&daemon, "tenant_audit_findings", "eu").await, eu_findings);
    assert_eq!(of(&daemon, "tenant_audit_findings", "us").await, us_findings);
    assert_eq!(
        daemon.samples("tenant_audit_null_timestamps").await,
        [
            "tenant_audit_null_timestamps{column=\"created_at\",database=\"us\",schema=\"tenant_u2\",table=\"users_userprofile\"} 2",
            "tenant_audit_null_timestamps{column=\"updated_at\",database=\"eu\",schema=\"tenant_d4\",table=\"users_userprofile\"} 3",
        ]
    );
    assert_eq!(
        daemon.samples("tenant_audit_tenants_discovered").await,
        ["tenant_audit_tenants_discovered{database=\"eu\"} 7", "tenant_audit_tenants_discovered{database=\"us\"} 2",]
    );
    assert_eq!(
        daemon.samples("tenant_audit_database_up").await,
        ["tenant_audit_database_up{database=\"eu\"} 1", "tenant_audit_database_up{database=\"us\"} 1"]
    );
    assert_eq!(
        daemon.samples("tenant_audit_build_info").await,
        [format!("tenant_audit_build_info{{shard=\"0\",shards=\"1\",version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))]
    );

    // Reports: one per target, and all of them at once.
    let report = |body: &str| serde_json::from_str::<serde_json::Value>(body).unwrap();
    let (status, eu_body) = daemon.get("/report?database=eu").await;
    assert_eq!(status, 200);
    let eu_report = report(&eu_body);
    assert_eq!(
        (eu_report["tenants"]["discovered"].as_u64(), eu_report["findings"].as_array().unwrap().len()),
        (Some(7), 14)
    );
    let (status, us_body) = daemon.get("/report?database=us").await;
    assert_eq!(status, 200);
    let us_report = report(&us_body);
    assert_eq!(
        us_report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| format!("{} {} {}", f["check"], f["schema"], f["count"]))
            .collect::<Vec<_>>(),
        ["\"null_timestamps\" \"tenant_u2\" 2"]
    );
    let (status, all) = daemon.get("/report").await;
    assert_eq!(status, 200);
    let all = report(&all);
    assert_eq!(all["targets"].as_object().unwrap().keys().collect::<Vec<_>>(), ["eu", "us"]);
    assert_eq!(all["targets"]["us"]["tenants"], us_report["tenants"]);
    assert_eq!(daemon.get("/report?database=ap").await, (404, "{\"status\":\"no target named \\\"ap\\\"\"}".into()));
    assert_eq!(daemon.get("/readyz").await, (200, "ready\n".into()));

    // eu's cluster stops mid-run: us keeps scanning on schedule with the same results; eu is
    // down with its last good results kept.
    let mut eu_kept = of(&daemon, "tenant_audit_orphan_rows", "eu").await;
    eu_kept.extend(of(&daemon, "tenant_audit_last_success_timestamp_seconds", "eu").await);
    assert_eq!(eu_kept.len(), 6, "{eu_kept:?}");
    eu.stop();
    daemon.wait_for("tenant_audit_database_up{database=\"eu\"} 0").await;
    let us_before = successes(&daemon, "us").await;
    wait_for_successes(&daemon, "us", us_before + 3).await;
    assert_eq!(of(&daemon, "tenant_audit_findings", "us").await, us_findings);
    assert_eq!(of(&daemon, "tenant_audit_findings", "eu").await, eu_findings);
    assert_eq!(of(&daemon, "tenant_audit_database_up", "us").await, ["tenant_audit_database_up{database=\"us\"} 1"]);
    let (_, text) = daemon.get("/metrics").await;
    assert_eq!(metric_lines(&text, "tenant_audit_orphan_rows").iter().filter(|l| l.contains("\"eu\"")).count(), 5);
    assert_eq!(
        metric_lines(&text, "tenant_audit_last_success_timestamp_seconds")
            .into_iter()
            .filter(|l| l.contains("\"eu\""))
            .collect::<Vec<_>>(),
        eu_kept[5..]
    );
    assert_eq!(daemon.get("/report?database=eu").await, (200, eu_body));
    assert_eq!(daemon.get("/readyz").await, (503, "not ready: eu: database unreachable\n".into()));
    daemon.stop().await;
}
