//! Through a real PgBouncer (Debian's, started by the test with its defaults: `options` refused,
//! named prepared statements not carried across transactions), in transaction and session
//! mode: concurrent scans and a heal find and change exactly what a direct connection does,
//! `scan.statement_timeout` applies (it is set with `SET LOCAL`), and of two healers exactly one
//! heals, leaving no lock behind.

use std::process::{Command, Stdio};

use tenant_audit::heal::{self, Plan};
use tenant_audit::report::ErrorKind;

use crate::support::pgbouncer::PgBouncer;
use crate::support::{
    config, config_file, lines, lock_audit_trail, many_orphans, pg, scan, BASE_SQL, DEMO_SQL, LOCKABLE_SQL,
};

/// The demo's discovery against a template schema, with every repair enabled.
const HEAL: &str = "[tenants]\ninclude = ['^tenant_']\nreference_schema = 'tenant_template'\n\
    [heal]\ncopy_missing_parents = true\nbackfill_null_timestamps = true\nadd_missing_columns = true\n";
const TEMPLATE: &str = "SELECT pg_temp.create_tenant('tenant_template');\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pooling() {
    through_pgbouncer("transaction", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pooling() {
    // Session mode keeps a server connection per client session: enough for every pool.
    through_pgbouncer("session", 40).await;
}

async fn through_pgbouncer(mode: &str, pool_size: usize) {
    let cluster = pg::Cluster::start();
    let admin = pg::connect(&cluster.url("postgres")).await;
    for (db, sql) in [
        ("direct", format!("{TEMPLATE}{DEMO_SQL}")),
        ("pooled", format!("{TEMPLATE}{DEMO_SQL}")),
        ("lockable", LOCKABLE_SQL.to_string()),
        ("healers", format!("{TEMPLATE}{}", many_orphans(3000))),
    ] {
        admin.batch_execute(&format!("CREATE DATABASE {db}")).await.unwrap();
        pg::connect(&cluster.url(db)).await.batch_execute(&format!("{BASE_SQL}\n{sql}")).await.unwrap();
    }
    let bouncer = PgBouncer::start(cluster.port, mode, pool_size);

    // Three concurrent scans through the pooler find what a direct scan finds.
    let direct_cfg = config(&cluster.url("direct"), HEAL);
    let pooled_cfg = config(&bouncer.url("pooled"), HEAL);
    let direct = scan(&direct_cfg).await;
    assert!(!direct.findings.is_empty() && direct.errors.is_empty());
    let (a, b, c) = tokio::join!(scan(&pooled_cfg), scan(&pooled_cfg), scan(&pooled_cfg));
    for pooled in [&a, &b, &c] {
        assert_eq!(lines(&pooled.findings), lines(&direct.findings), "{mode}");
        assert_eq!(pooled.errors, [], "{mode}");
    }
    assert!(bouncer.log().contains("login attempt: db=pooled user=postgres"), "{mode}: the scans went elsewhere");

    // A heal through the pooler changes what a heal on a direct connection changes.
    let direct_outcome = heal_in_process(&direct_cfg).await;
    let pooled_outcome = heal_in_process(&pooled_cfg).await;
    assert!(!pooled_outcome.changed.is_empty(), "{mode}: the demo has repairs");
    assert_eq!(pooled_outcome.changed, direct_outcome.changed, "{mode}");
    assert_eq!(
        (&pooled_outcome.skipped, &pooled_outcome.errors, pooled_outcome.interrupted),
        (&direct_outcome.skipped, &direct_outcome.errors, direct_outcome.interrupted),
        "{mode}"
    );
    assert_eq!(lines(&scan(&pooled_cfg).await.findings), lines(&scan(&direct_cfg).await.findings), "{mode}");
    let logged = "SELECT count(*) FROM tenant_audit.heal_log";
    assert_eq!(count(&cluster.url("pooled"), logged).await, count(&cluster.url("direct"), logged).await);

    // scan.statement_timeout holds through the pooler: a probe kept waiting (behind a lock,
    // lock_timeout far away) is cancelled by it.
    let locker = lock_audit_trail(&cluster.url("lockable")).await;
    let timeouts = "[scan]\nstatement_timeout = '1s'\nlock_timeout = '60s'\n";
    let report = scan(&config(&bouncer.url("lockable"), timeouts)).await;
    let errors: Vec<_> =
        report.errors.iter().map(|e| (e.kind, e.schema.as_deref(), e.table.as_deref(), e.message.as_str())).collect();
    assert_eq!(
        errors,
        [(ErrorKind::Timeout, Some("tenant_b"), Some("audit_trail"), "canceling statement due to statement timeout")],
        "{mode}"
    );
    locker.batch_execute("COMMIT").await.unwrap();

    // Two healers through the pooler: exactly one heals, and neither leaves a lock or a lease.
    let path = config_file(&format!("pgbouncer_healers_{mode}"), &format!("{HEAL}batch_size = 10\n"));
    let url = bouncer.url("healers");
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_tenant-audit"))
            .args(["heal", "--config", path.to_str().unwrap(), "--execute"])
            .env("TENANT_AUDIT_DATABASE_URL", &url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (first, second) = (spawn(), spawn());
    let outputs =
        tokio::task::spawn_blocking(move || [first.wait_with_output().unwrap(), second.wait_with_output().unwrap()])
            .await
            .unwrap();
    let mut codes: Vec<_> = outputs.iter().map(|o| o.status.code()).collect();
    codes.sort();
    let stderr: Vec<_> = outputs.iter().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).collect();
    assert_eq!(codes, [Some(0), Some(1)], "{mode}: {stderr:#?}");
    assert!(
        stderr.iter().any(|e| e.ends_with("another heal holds the heal lock on this database; this run is skipped\n")),
        "{stderr:#?}"
    );
    let healers = cluster.url("healers");
    let copied = "SELECT count(*) FROM tenant_a.business_business WHERE id::text LIKE 'c%'";
    assert_eq!((count(&healers, copied).await, count(&healers, logged).await), (3000, 3000), "{mode}");
    assert_eq!(count(&healers, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").await, 0, "{mode}");
    assert_eq!(count(&healers, "SELECT count(*) FROM tenant_audit.heal_lease").await, 0, "{mode}");
}

async fn heal_in_process(cfg: &tenant_audit::config::Config) -> heal::Outcome {
    let pool = tenant_audit::db::scan_pool(&cfg.database, &cfg.scan);
    let scanned = tenant_audit::scan::run(cfg, &pool, &Default::default(), None).await.unwrap();
    let plan = Plan::build(&scanned, cfg);
    let heal_pool = tenant_audit::db::heal_pool(&cfg.heal, cfg.scan.connect_timeout);
    heal::execute(&cfg.heal, &heal_pool, &plan, None, &Default::default()).await.unwrap()
}

async fn count(url: &str, sql: &str) -> i64 {
    pg::connect(url).await.query_one(sql, &[]).await.unwrap().get(0)
}
