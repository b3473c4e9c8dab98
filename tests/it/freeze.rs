//! Bounded waits (docs/reliability.md): a cluster frozen with SIGSTOP and a TCP peer that
//! accepts and never answers. `scan` exits 2 within its documented bound; the daemon reports the
//! database down within its bound while `/metrics` keeps answering, and scans again once the
//! server answers. Each test has a dedicated cluster: a frozen shared one would hang the others.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::freeze::{freeze, Proxy};
use crate::support::{
    cli, config, config_file, lock_audit_trail, many_orphans, metric_lines, pg, start_daemon, wait_until_scan_blocked,
    RunningDaemon, BASE_SQL, LOCKABLE_SQL,
};

/// Process start-up and scheduling on a loaded two-core CI machine, added to each documented
/// bound; the bounds themselves are seconds apart from "waits forever".
const SLACK: Duration = Duration::from_secs(3);
/// `scan.connect_timeout` (C) of these tests; one host.
const C: Duration = Duration::from_secs(2);
/// `scan.max_duration` (D).
const D: Duration = Duration::from_secs(3);
/// `database.ping_interval` (P) and `database.ping_timeout` (T).
const P: Duration = Duration::from_secs(1);
const T: Duration = Duration::from_secs(1);

const SCAN_TOML: &str =
    "[scan]\nconnect_timeout = '2s'\nmax_duration = '3s'\nlock_timeout = '60s'\nstatement_timeout = '60s'\n";
const DAEMON_TOML: &str = "[serve]\nschedule = '* * * * * *'\nready_max_age = '1h'\n\
    [database]\nping_interval = '1s'\nping_timeout = '1s'\n\
    [scan]\nconnect_timeout = '2s'\nmax_duration = '3s'\n";

/// A dedicated cluster with database `app` holding the lockable fixture.
async fn dedicated() -> (pg::Cluster, String) {
    let cluster = pg::Cluster::start();
    pg::connect(&cluster.url("postgres")).await.batch_execute("CREATE DATABASE app").await.unwrap();
    let url = cluster.url("app");
    pg::connect(&url).await.batch_execute(&format!("{BASE_SQL}\n{LOCKABLE_SQL}")).await.unwrap();
    (cluster, url)
}

fn scan_cli(name: &str, url: &str) -> (Option<i32>, String, Duration) {
    let path = config_file(name, SCAN_TOML);
    let started = Instant::now();
    let out = cli(&["scan", "--config", path.to_str().unwrap()], &[("TENANT_AUDIT_DATABASE_URL", url)]);
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned(), started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_exits_2_within_its_bound_when_the_server_freezes() {
    let (cluster, url) = dedicated().await;

    // Frozen before the scan connects: the set-up deadline, H x C.
    let frozen = freeze(&cluster);
    let (code, err, took) = scan_cli("freeze_connect", &url);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(
        err,
        format!(
            "tenant-audit: error: cannot connect to database 127.0.0.1:{}/app: no answer within 2s (connection set-up: \
             TCP, TLS and authentication)\n",
            cluster.port
        )
    );
    assert!(took < C + SLACK, "took {took:?}; the bound is C = {C:?}");
    frozen.thaw();

    // Frozen while the scan runs (a probe waits on a lock, so it is surely mid-scan): D + C.
    let locker = lock_audit_trail(&url).await;
    let path = config_file("freeze_running", SCAN_TOML);
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_tenant-audit"))
        .args(["scan", "--config", path.to_str().unwrap()])
        .env("TENANT_AUDIT_DATABASE_URL", &url)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_scan_blocked(&url).await;
    let frozen = freeze(&cluster);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(
        err.lines().last(),
        Some(
            "tenant-audit: error: the scan did not finish within scan.max_duration (3s); its statements were cancelled"
        ),
        "{err}"
    );
    assert!(took < D + C + SLACK, "took {took:?}; the bound is D + C = {:?}", D + C);

    // Thawed, the next scan succeeds.
    frozen.thaw();
    locker.batch_execute("COMMIT").await.unwrap();
    let (code, err, _) = scan_cli("freeze_after", &url);
    assert_eq!(code, Some(0), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heal_stops_within_its_bound_when_the_server_freezes() {
    let cluster = pg::Cluster::start();
    pg::connect(&cluster.url("postgres")).await.batch_execute("CREATE DATABASE app").await.unwrap();
    let url = cluster.url("app");
    let fixture = format!("{BASE_SQL}\nSELECT pg_temp.create_tenant('tenant_template');\n{}", many_orphans(6000));
    pg::connect(&url).await.batch_execute(&fixture).await.unwrap();
    // heal.statement_timeout 1 s + lock_timeout 1 s: a transaction without an answer in
    // 1 + 1 + 1 = 3 s stops the run (docs/reliability.md).
    let toml = "[tenants]\ninclude = ['^tenant_']\nreference_schema = 'tenant_template'\n\
        [scan]\nconnect_timeout = '2s'\n\
        [heal]\ncopy_missing_parents = true\nbatch_size = 5\nstatement_timeout = '1s'\nlock_timeout = '1s'\n";
    let path = config_file("freeze_heal", toml);
    // The rerun in big batches: only the frozen run needs to be slow. Its timeout is not under
    // test: a 500-key batch must not time out on a loaded machine.
    let rerun = toml
        .replace("batch_size = 5", "batch_size = 500")
        .replace("statement_timeout = '1s'", "statement_timeout = '30s'");
    let rerun_path = config_file("freeze_heal_rerun", &rerun);
    let heal = |path: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_tenant-audit"))
            .args(["heal", "--config", path.to_str().unwrap(), "--execute"])
            .env("TENANT_AUDIT_DATABASE_URL", &url)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let copied = "SELECT count(*) FROM tenant_a.business_business WHERE id::text LIKE 'c%'";
    let watcher = pg::connect(&url).await;
    let child = heal(&path);
    let deadline = Instant::now() + Duration::from_secs(30);
    while watcher.query_one(copied, &[]).await.unwrap().get::<_, i64>(0) == 0 {
        assert!(Instant::now() < deadline, "heal never got going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let frozen = freeze(&cluster);
    let since = Instant::now();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    let took = since.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(
        err.lines().last(),
        Some(
            "tenant-audit: error: 1 repair(s) failed; first: copy_missing_parents on tenant_a: the server did not \
             answer within 3s"
        ),
        "{err}"
    );
    // The transaction's 3 s, the cancel request's C, the lease release's heal.statement_timeout.
    let bound = Duration::from_secs(3) + C + Duration::from_secs(1);
    assert!(took < bound + SLACK, "took {took:?}; the bound is 3 s + C + 1 s = {bound:?}");

    // Thawed, the next run finishes the job.
    frozen.thaw();
    let rerun = heal(&rerun_path);
    let out = tokio::task::spawn_blocking(move || rerun.wait_with_output().unwrap()).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let logged = "SELECT count(*) FROM tenant_audit.heal_log";
    let counts = (
        watcher.query_one(copied, &[]).await.unwrap().get::<_, i64>(0),
        watcher.query_one(logged, &[]).await.unwrap().get::<_, i64>(0),
    );
    assert_eq!(counts, (6000, 6000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_exits_2_within_its_bound_against_a_silent_peer() {
    let (cluster, _) = dedicated().await;
    let peer = Proxy::start(cluster.port, true).await;
    for query in ["sslmode=disable", "sslmode=prefer", "sslmode=require"] {
        let url = format!("postgres://postgres@127.0.0.1:{}/app?{query}", peer.port);
        let (code, err, took) = scan_cli("silent_peer", &url);
        assert_eq!(code, Some(2), "{query}: {err}");
        assert!(
            err.ends_with(&format!(
                "cannot connect to database 127.0.0.1:{}/app: no answer within 2s (connection set-up: TCP, TLS and \
                 authentication)\n",
                peer.port
            )),
            "{query}: {err}"
        );
        assert!(took < C + SLACK, "{query}: took {took:?}; the bound is C = {C:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_reports_a_frozen_server_down_and_recovers() {
    let (cluster, url) = dedicated().await;
    let daemon = start_daemon(config(&url, DAEMON_TOML)).await;
    goes_down_and_recovers(&daemon, || freeze(&cluster), |frozen| frozen.thaw()).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_reports_a_silent_peer_down_and_recovers() {
    let (cluster, _) = dedicated().await;
    let peer = Proxy::start(cluster.port, false).await;
    let url = format!("postgres://postgres@127.0.0.1:{}/app", peer.port);
    let daemon = start_daemon(config(&url, DAEMON_TOML)).await;
    goes_down_and_recovers(&daemon, || peer.silence(), |()| peer.resume()).await;
    daemon.stop().await;
}

/// Up and scanning; `stop` the server: `database_up` 0 and `/readyz` 503 within P + T while
/// `/metrics` answers; `resume` it: up again and a new scan succeeds.
async fn goes_down_and_recovers<S>(daemon: &RunningDaemon, stop: impl FnOnce() -> S, resume: impl FnOnce(S)) {
    poll(daemon, |m| gauge(m, "tenant_audit_database_up") == 1 && successes(m) >= 1).await;
    assert_eq!(daemon.get("/readyz").await, (200, "ready\n".to_string()));

    let stopped = stop();
    let since = Instant::now();
    poll(daemon, |m| gauge(m, "tenant_audit_database_up") == 0).await;
    let took = since.elapsed();
    assert_eq!(daemon.get("/readyz").await, (503, "not ready: database unreachable\n".to_string()));
    assert!(took < P + T + SLACK, "took {took:?}; the bound is P + T = {:?}", P + T);

    let before = successes(&daemon.get("/metrics").await.1);
    resume(stopped);
    poll(daemon, |m| gauge(m, "tenant_audit_database_up") == 1 && successes(m) > before).await;
    assert_eq!(daemon.get("/readyz").await, (200, "ready\n".to_string()));
}

/// Polls `/metrics` (60 s at most; every response must be a 200) until `done` holds.
async fn poll(daemon: &RunningDaemon, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, text) = daemon.get("/metrics").await;
        assert_eq!(status, 200, "/metrics must keep answering");
        if done(&text) {
            return;
        }
        assert!(Instant::now() < deadline, "condition never held; /metrics:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn gauge(metrics: &str, name: &str) -> i64 {
    let lines = metric_lines(metrics, name);
    lines[0].rsplit(' ').next().unwrap().parse().unwrap()
}

fn successes(metrics: &str) -> u64 {
    metric_lines(metrics, "tenant_audit_scans_total")
        .iter()
        .find_map(|l| l.strip_prefix("tenant_audit_scans_total{database=\"default\",result=\"success\"} "))
        .map(|v| v.parse().unwrap())
        .unwrap()
}
