//! The daemon: metrics scraped over HTTP from a real scan, series removed once fixed, the
//! cardinality cap, no database query on a scrape, database outages, and shutdown.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{
    config, config_file, fixture_db, lock_audit_trail, metric_lines, pg, start_daemon, wait_until_scan_blocked,
    BASE_SQL, DEMO_SQL, LOCKABLE_SQL,
};

/// Registry and patterns as in the demo; a schedule that will not fire during a test (scans run
/// at start-up and on POST /scan, enabled here and not rate limited).
const DAEMON: &str = "[tenants]\ninclude = ['^tenant_']\n[web.scan_requests]\nenabled = true\nmin_interval = '1ms'\n\
    [serve]\nschedule = '0 0 0 1 1 *'\n";
/// `POST /scan` enabled, without its rate limit.
const SCAN_REQUESTS: &str = "[web.scan_requests]\nenabled = true\nmin_interval = '1ms'\n";

fn sorted<const N: usize>(lines: [String; N]) -> Vec<String> {
    let mut v = lines.to_vec();
    v.sort();
    v
}

#[tokio::test]
async fn metrics_show_every_check_and_drop_fixed_series() {
    let url = fixture_db("daemon_metrics", DEMO_SQL).await;
    let daemon = start_daemon(config(&url, DAEMON)).await;
    daemon.wait_for("tenant_audit_scans_total{database=\"default\",result=\"success\"} 1").await;

    let orphan = |schema: &str, table: &str, location: &str, n: u32| {
        format!("tenant_audit_orphan_rows{{column=\"business_id\",database=\"default\",parent_location=\"{location}\",parent_table=\"business_business\",schema=\"{schema}\",table=\"{table}\"}} {n}")
    };
    assert_eq!(
        daemon.samples("tenant_audit_orphan_rows").await,
        sorted([
            orphan("tenant_c3", "users_userprofile", "shared", 2),
            orphan("tenant_d4", "users_businessdetails", "missing", 1),
            orphan("tenant_d4", "users_businessdetails", "shared", 1),
            orphan("tenant_e5", "users_userprofile", "missing", 1),
            orphan("tenant_f6", "users_userprofile", "missing", 2),
        ])
    );
    assert_eq!(
        daemon.samples("tenant_audit_null_timestamps").await,
        ["tenant_audit_null_timestamps{column=\"updated_at\",database=\"default\",schema=\"tenant_d4\",table=\"users_userprofile\"} 3"]
    );
    assert_eq!(
        daemon.samples("tenant_audit_cross_schema_fks").await,
        ["tenant_audit_cross_schema_fks{column=\"business_id\",database=\"default\",reason=\"shadowed_by_tenant_table\",schema=\"tenant_c3\",table=\"users_userprofile\",target_schema=\"public\",target_table=\"business_business\"} 1"]
    );
    let drift = |schema: &str, table: &str, column: &str, difference: &str| {
        format!("tenant_audit_schema_drift{{column=\"{column}\",database=\"default\",difference=\"{difference}\",schema=\"{schema}\",table=\"{table}\"}} 1")
    };
    assert_eq!(
        daemon.samples("tenant_audit_schema_drift").await,
        sorted([
            drift("tenant_c3", "users_userprofile", "business_id", "foreign_key_target"),
            drift("tenant_d4", "users_businessdetails", "business_id", "missing_foreign_key"),
            drift("tenant_d4", "users_userprofile", "updated_at", "default_mismatch"),
            drift("tenant_d4", "users_userprofile", "updated_at", "nullability_mismatch"),
            drift("tenant_e5", "users_userprofile", "updated_at", "missing_column"),
        ])
    );
    assert_eq!(
        daemon.samples("tenant_audit_registry_findings").await,
        [
            "tenant_audit_registry_findings{check=\"missing_schema\",database=\"default\",schema=\"tenant_gone\"} 1",
            "tenant_audit_registry_findings{check=\"unregistered_schema\",database=\"default\",schema=\"tenant_zz9\"} 1",
        ]
    );
    assert_eq!(
        daemon.samples("tenant_audit_table_orphan_rows").await,
        [
            "tenant_audit_table_orphan_rows{column=\"business_id\",database=\"default\",parent_location=\"missing\",parent_table=\"business_business\",table=\"users_businessdetails\"} 1",
            "tenant_audit_table_orphan_rows{column=\"business_id\",database=\"default\",parent_location=\"missing\",parent_table=\"business_business\",table=\"users_userprofile\"} 3",
            "tenant_audit_table_orphan_rows{column=\"business_id\",database=\"default\",parent_location=\"shared\",parent_table=\"business_business\",table=\"users_businessdetails\"} 1",
            "tenant_audit_table_orphan_rows{column=\"business_id\",database=\"default\",parent_location=\"shared\",parent_table=\"business_business\",table=\"users_userprofile\"} 2",
        ]
    );
    assert_eq!(
        daemon.samples("tenant_audit_affected_tenants").await,
        [
            "tenant_audit_affected_tenants{check=\"cross_schema_fk\",database=\"default\",table=\"users_userprofile\"} 1",
            "tenant_audit_affected_tenants{check=\"missing_schema\",database=\"default\",table=\"\"} 1",
            "tenant_audit_affected_tenants{check=\"null_timestamps\",database=\"default\",table=\"users_userprofile\"} 1",
            "tenant_audit_affected_tenants{check=\"orphan_rows\",database=\"default\",table=\"users_businessdetails\"} 1",
            "tenant_audit_affected_tenants{check=\"orphan_rows\",database=\"default\",table=\"users_userprofile\"} 3",
            "tenant_audit_affected_tenants{check=\"schema_drift\",database=\"default\",table=\"users_businessdetails\"} 1",
            "tenant_audit_affected_tenants{check=\"schema_drift\",database=\"default\",table=\"users_userprofile\"} 3",
            "tenant_audit_affected_tenants{check=\"unregistered_schema\",database=\"default\",table=\"\"} 1",
        ]
    );
    assert_eq!(
        daemon.samples("tenant_audit_findings").await,
        [
            "tenant_audit_findings{check=\"cross_schema_fk\",database=\"default\"} 1",
            "tenant_audit_findings{check=\"missing_schema\",database=\"default\"} 1",
            "tenant_audit_findings{check=\"null_timestamps\",database=\"default\"} 1",
            "tenant_audit_findings{check=\"orphan_rows\",database=\"default\"} 5",
            "tenant_audit_findings{check=\"schema_drift\",database=\"default\"} 5",
            "tenant_audit_findings{check=\"sequence_behind\",database=\"default\"} 0",
            "tenant_audit_findings{check=\"unregistered_schema\",database=\"default\"} 1",
        ]
    );
    for (name, value) in [
        ("tenant_audit_tenants_discovered", "7"),
        ("tenant_audit_tenants_scanned", "7"),
        ("tenant_audit_last_scan_success", "1"),
        ("tenant_audit_database_up", "1"),
        ("tenant_audit_series_dropped", "0"),
    ] {
        assert_eq!(daemon.samples(name).await, [format!("{name}{{database=\"default\"}} {value}")]);
    }
    let (status, report) = daemon.get("/report").await;
    assert_eq!(status, 200);
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["summary"]["orphan_rows"]["count"], 7);
    assert_eq!(report["findings"][1]["sample_keys"][0], "b0000000-0000-0000-0000-000000000002");
    assert_eq!(daemon.get("/readyz").await, (200, "ready\n".to_string()));

    // Fix tenant_d4's timestamps and tenant_f6's orphans; their series must go.
    let db = pg::connect(&url).await;
    db.batch_execute(
        "UPDATE tenant_d4.users_userprofile SET updated_at = now() WHERE updated_at IS NULL;
         DELETE FROM tenant_f6.users_userprofile WHERE business_id NOT IN (SELECT id FROM tenant_f6.business_business);",
    )
    .await
    .unwrap();
    assert_eq!(daemon.post("/scan").await.0, 202);
    daemon.wait_for("tenant_audit_scans_total{database=\"default\",result=\"success\"} 2").await;
    assert_eq!(daemon.samples("tenant_audit_null_timestamps").await, Vec::<String>::new());
    assert_eq!(
        daemon.samples("tenant_audit_orphan_rows").await,
        sorted([
            orphan("tenant_c3", "users_userprofile", "shared", 2),
            orphan("tenant_d4", "users_businessdetails", "missing", 1),
            orphan("tenant_d4", "users_businessdetails", "shared", 1),
            orphan("tenant_e5", "users_userprofile", "missing", 1),
        ])
    );
    assert_eq!(
        daemon.samples("tenant_audit_table_orphan_rows").await.iter().filter(|l| l.contains("users_userprofile")).collect::<Vec<_>>(),
        [
            "tenant_audit_table_orphan_rows{column=\"business_id\",database=\"default\",parent_location=\"missing\",parent_table=\"business_business\",table=\"users_userprofile\"} 1",
            "tenant_audit_table_orphan_rows{column=\"business_id\",database=\"default\",parent_location=\"shared\",parent_table=\"business_business\",table=\"users_userprofile\"} 2",
        ]
    );
    assert_eq!(
        daemon.samples("tenant_audit_findings").await[2],
        "tenant_audit_findings{check=\"null_timestamps\",database=\"default\"} 0"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn tenant_series_are_capped() {
    let url = fixture_db("daemon_cap", DEMO_SQL).await;
    let daemon = start_daemon(config(&url, &format!("{DAEMON}[metrics]\nmax_tenant_series = 3\n"))).await;
    daemon.wait_for("tenant_audit_scans_total{database=\"default\",result=\"success\"} 1").await;
    let (_, text) = daemon.get("/metrics").await;
    let per_schema: Vec<String> =
        text.lines().filter(|l| !l.starts_with('#') && l.contains("schema=\"")).map(str::to_string).collect();
    // The most severe and largest first: the cross-schema key, then the two largest orphan counts.
    assert_eq!(
        per_schema,
        [
            "tenant_audit_cross_schema_fks{column=\"business_id\",database=\"default\",reason=\"shadowed_by_tenant_table\",schema=\"tenant_c3\",table=\"users_userprofile\",target_schema=\"public\",target_table=\"business_business\"} 1",
            "tenant_audit_orphan_rows{column=\"business_id\",database=\"default\",parent_location=\"missing\",parent_table=\"business_business\",schema=\"tenant_f6\",table=\"users_userprofile\"} 2",
            "tenant_audit_orphan_rows{column=\"business_id\",database=\"default\",parent_location=\"shared\",parent_table=\"business_business\",schema=\"tenant_c3\",table=\"users_userprofile\"} 2",
        ]
    );
    assert_eq!(
        metric_lines(&text, "tenant_audit_series_dropped"),
        ["tenant_audit_series_dropped{database=\"default\"} 11"]
    );
    // Aggregates still cover everything.
    assert_eq!(
        metric_lines(&text, "tenant_audit_affected_rows")[4],
        "tenant_audit_affected_rows{check=\"orphan_rows\",database=\"default\",table=\"users_userprofile\"} 5"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn scrapes_never_query_the_database() {
    let url = fixture_db("daemon_no_query", &format!("CREATE EXTENSION pg_stat_statements;\n{DEMO_SQL}")).await;
    let daemon = start_daemon(config(&url, DAEMON)).await;
    daemon.wait_for("tenant_audit_scans_total{database=\"default\",result=\"success\"} 1").await;
    let db = pg::connect(&url).await;
    db.batch_execute("SELECT pg_stat_statements_reset()").await.unwrap();
    for path in ["/metrics", "/report", "/readyz", "/healthz", "/metrics"] {
        assert_eq!(daemon.get(path).await.0, 200, "{path}");
    }
    let calls: i64 = db
        .query_one(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND query NOT LIKE '%pg_stat_statements%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(calls, 0);
    daemon.stop().await;
}

#[tokio::test]
async fn database_outages_keep_last_results_and_recover() {
    let cluster = pg::Cluster::start();
    let admin = pg::connect(&cluster.url("postgres")).await;
    admin.batch_execute("CREATE DATABASE outage").await.unwrap();
    let url = cluster.url("outage");
    pg::connect(&url).await.batch_execute(&format!("{BASE_SQL}\n{DEMO_SQL}")).await.unwrap();
    drop(admin);
    cluster.stop();

    // Down at start-up: the daemon serves, reports the database down, and retries.
    let extra = format!("{DAEMON}retry_initial_backoff = '50ms'\nretry_max_backoff = '200ms'\n");
    let daemon = start_daemon(config(&url, &extra)).await;
    daemon.wait_for("tenant_audit_database_up{database=\"default\"} 0").await;
    assert_eq!(daemon.get("/healthz").await.0, 200);
    assert_eq!(daemon.get("/readyz").await, (503, "not ready: database unreachable\n".to_string()));
    assert_eq!(daemon.get("/report").await.0, 503);
    cluster.restart();
    daemon.wait_for("tenant_audit_scans_total{database=\"default\",result=\"success\"} 1").await;
    let good_orphans = daemon.samples("tenant_audit_orphan_rows").await;
    let good_time = daemon.samples("tenant_audit_last_success_timestamp_seconds").await;
    let (_, good_report) = daemon.get("/report").await;
    assert_eq!(good_orphans.len(), 5);

    // Down between scans: the scan fails, the last good results stay, with their timestamp.
    cluster.stop();
    assert_eq!(daemon.post("/scan").await.0, 202);
    daemon.wait_for("tenant_audit_scans_total{database=\"default\",result=\"failure\"} 1").await;
    assert_eq!(
        daemon.samples("tenant_audit_last_scan_success").await,
        ["tenant_audit_last_scan_success{database=\"default\"} 0"]
    );
    assert_eq!(daemon.samples("tenant_audit_database_up").await, ["tenant_audit_database_up{database=\"default\"} 0"]);
    assert!(daemon
        .samples("tenant_audit_scan_errors_total")
        .await
        .contains(&"tenant_audit_scan_errors_total{database=\"default\",kind=\"connection\"} 1".to_string()));
    assert_eq!(daemon.samples("tenant_audit_orphan_rows").await, good_orphans);
    assert_eq!(daemon.samples("tenant_audit_last_success_timestamp_seconds").await, good_time);
    assert_eq!(daemon.get("/report").await, (200, good_report));
    assert_eq!(daemon.get("/readyz").await.0, 503);

    // Back up: the next scan succeeds without a restart.
    cluster.restart();
    assert_eq!(daemon.post("/scan").await.0, 202);
    daemon.wait_for("tenant_audit_scans_total{database=\"default\",result=\"success\"} 2").await;
    assert_eq!(
        daemon.samples("tenant_audit_last_scan_success").await,
        ["tenant_audit_last_scan_success{database=\"default\"} 1"]
    );
    assert_eq!(daemon.samples("tenant_audit_database_up").await, ["tenant_audit_database_up{database=\"default\"} 1"]);
    assert_eq!(daemon.get("/readyz").await.0, 200);
    daemon.stop().await;
}

#[tokio::test]
async fn database_restart_in_the_middle_of_a_scan_fails_it_and_the_next_succeeds() {
    let cluster = pg::Cluster::start();
    pg::connect(&cluster.url("postgres")).await.batch_execute("CREATE DATABASE restart").await.unwrap();
    let url = cluster.url("restart");
    pg::connect(&url).await.batch_execute(&format!("{BASE_SQL}\n{LOCKABLE_SQL}")).await.unwrap();
    let extra = format!("{SCAN_REQUESTS}[serve]\nschedule = '0 0 0 1 1 *'\n[scan]\nlock_timeout = '60s'\n");
    let daemon = start_daemon(config(&url, &extra)).await;
    daemon.wait_for("tenant_audit_scans_total{database=\"default\",result=\"success\"} 1").await;

    // The next scan blocks on a lock; the server crashes and restarts under it. (The cluster
    // runs with synchronous_commit off: a checkpoint first, so the crash loses no fixture.)
    pg::connect(&url).await.batch_execute("CHECKPOINT").await.unwrap();
    let _locker = lock_audit_trail(&url).await;
    assert_eq!(daemon.post("/scan").await.0, 202);
    wait_until_scan_blocked(&url).await;
    // A crash rather than a fast shutdown: on a fast one the locker's session may end first and
    // let the blocked read finish before its own session is told to stop.
    cluster.crash();
    cluster.restart();
    daemon.wait_for("tenant_audit_scans_total{database=\"default\",result=\"failure\"} 1").await;
    assert_eq!(
        daemon.samples("tenant_audit_last_scan_success").await,
        ["tenant_audit_last_scan_success{database=\"default\"} 0"]
    );
    assert_eq!(
        daemon.samples("tenant_audit_tenants_scanned").await,
        ["tenant_audit_tenants_scanned{database=\"default\"} 3"],
        "the last good scan stays"
    );
    assert!(daemon
        .samples("tenant_audit_scan_errors_total")
        .await
        .contains(&"tenant_audit_scan_errors_total{database=\"default\",kind=\"connection\"} 1".to_string()));
    assert_eq!(daemon.post("/scan").await.0, 202);
    daemon.wait_for("tenant_audit_scans_total{database=\"default\",result=\"success\"} 2").await;
    assert_eq!(
        daemon.samples("tenant_audit_last_scan_success").await,
        ["tenant_audit_last_scan_success{database=\"default\"} 1"]
    );
    daemon.stop().await;
}

#[tokio::test]
async fn overlapping_scans_are_skipped_or_refused() {
    // A locked table keeps the first scheduled scan running while more ticks and a request arrive.
    let url = fixture_db("daemon_overlap", LOCKABLE_SQL).await;
    let locker = lock_audit_trail(&url).await;
    let extra = format!(
        "{SCAN_REQUESTS}[serve]\nschedule = '* * * * * *'\nscan_on_start = false\n[scan]\nlock_timeout = '60s'\n"
    );
    let daemon = start_daemon(config(&url, &extra)).await;
    daemon.wait_for("tenant_audit_skipped_ticks_total{database=\"default\"} 1").await;
    assert_eq!(daemon.post("/scan").await, (409, "{\"status\":\"a scan is already running\"}".to_string()));
    assert_eq!(
        daemon.samples("tenant_audit_scans_total").await[1],
        "tenant_audit_scans_total{database=\"default\",result=\"success\"} 0"
    );
    locker.batch_execute("COMMIT").await.unwrap();
    daemon.wait_for("tenant_audit_scans_total{database=\"default\",result=\"success\"} 1").await;
    daemon.stop().await;
}

#[tokio::test]
async fn sigterm_cancels_running_queries_and_exits_in_time() {
    let url = fixture_db("daemon_sigterm", LOCKABLE_SQL).await;
    let locker = lock_audit_trail(&url).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let path = config_file(
        "sigterm",
        &format!("database_url = {url:?}\n[scan]\nlock_timeout = '60s'\n[serve]\nlisten = '127.0.0.1:{port}'\nshutdown_timeout = '5s'\n"),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_tenant-audit"))
        .args(["serve", "--config", path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    wait_until_scan_blocked(&url).await;
    let watcher = pg::connect(&url).await;
    let sessions = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tenant-audit' AND datname = current_database()";

    let sent = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(sent.elapsed() < Duration::from_secs(10), "still running 10 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
    assert!(sent.elapsed() < Duration::from_secs(5), "took {:?}, shutdown_timeout is 5 s", sent.elapsed());
    // The blocked query was cancelled on the server: no session of ours is left waiting.
    let deadline = Instant::now() + Duration::from_secs(5);
    while watcher.query_one(sessions, &[]).await.unwrap().get::<_, i64>(0) != 0 {
        assert!(Instant::now() < deadline, "a tenant-audit session outlived the process");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    locker.batch_execute("COMMIT").await.unwrap();
}
