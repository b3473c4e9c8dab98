//! The scan never hurts the database it audits: it holds locks only on the table at hand, a
//! table locked by a migration costs only that table, and a terminated session only its tenant.

use tenant_audit::report::{ErrorKind, Report, ScanError, TenantCounts};

use crate::support::{
    cli, config, config_file, fixture_db, lines, lock_audit_trail, pg, scan, wait_until_scan_blocked, DEMO_SQL,
    LOCKABLE_SQL,
};

/// Relation locks held or awaited by tenant-audit sessions: (relation, mode, granted).
async fn scan_locks(watcher: &tokio_postgres::Client) -> Vec<(String, String, bool)> {
    let rows = watcher
        .query(
            "SELECT l.relation::regclass::text, l.mode, l.granted FROM pg_locks l
             JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE a.application_name = 'tenant-audit' AND a.datname = current_database() AND l.locktype = 'relation'
             ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect()
}

#[tokio::test]
async fn a_scan_holds_locks_only_on_the_table_it_is_reading() {
    // 30 tables; the last one (in scan order) is large, and a NULL in t01 is found before it.
    let sql = "
        CREATE SCHEMA tenant_a;
        DO $$ BEGIN
          FOR i IN 1..29 LOOP
            EXECUTE format('CREATE TABLE tenant_a.%I (id int PRIMARY KEY, parent_id int REFERENCES tenant_a.%I,
                              created_at timestamptz DEFAULT now())', format('t%s', lpad(i::text, 2, '0')),
                           format('t%s', lpad(greatest(i - 1, 1)::text, 2, '0')));
          END LOOP; END $$;
        INSERT INTO tenant_a.t01 VALUES (1, 1, NULL);
        CREATE TABLE tenant_a.zz_large (id int PRIMARY KEY, created_at timestamptz);
        INSERT INTO tenant_a.zz_large SELECT g, CASE WHEN g % 1000 = 0 THEN NULL ELSE now() END
          FROM generate_series(1, 200000) g;";
    let url = fixture_db("locks_footprint", sql).await;
    // A migration that got there first: the scan must wait for it on the large table alone.
    let migration = pg::connect(&url).await;
    migration.batch_execute("BEGIN; LOCK TABLE tenant_a.zz_large IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let cfg = config(&url, "[tenants]\nregistry = false\ninclude = ['^tenant_']\n[scan]\nlock_timeout = '60s'\n");
    let running = tokio::spawn(async move { scan(&cfg).await });
    wait_until_scan_blocked(&url).await;

    let watcher = pg::connect(&url).await;
    assert_eq!(scan_locks(&watcher).await, [("tenant_a.zz_large".to_string(), "AccessShareLock".to_string(), false)]);
    // Tables scanned earlier are free: a migration's ALTER TABLE gets its lock at once.
    let other = pg::connect(&url).await;
    other
        .batch_execute("SET lock_timeout = '1s'; ALTER TABLE tenant_a.t01 ADD COLUMN note text; ALTER TABLE tenant_a.t29 ADD COLUMN note text")
        .await
        .unwrap();

    migration.batch_execute("COMMIT").await.unwrap();
    let report = running.await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        lines(&report.findings),
        [
            "null_timestamps tenant_a.t01(created_at) 1 timestamp with time zone [\"1\"]",
            "null_timestamps tenant_a.zz_large(created_at) 200 timestamp with time zone [\"1000\", \"2000\", \"3000\", \"4000\", \"5000\", \"6000\", \"7000\", \"8000\", \"9000\", \"10000\"]",
        ]
    );
    assert_eq!(scan_locks(&watcher).await, []);
}

#[tokio::test]
async fn a_table_locked_through_the_whole_scan_costs_only_that_table() {
    let url = fixture_db("locks_migration", DEMO_SQL).await;
    // Held from before the scan starts until after it ends; the table has column defaults, which
    // the catalog reads without touching the table.
    let migration = pg::connect(&url).await;
    migration.batch_execute("BEGIN; LOCK TABLE tenant_c3.users_userprofile IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let path = config_file(
        "locks_migration",
        &format!("database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\n[scan]\nlock_timeout = '200ms'\n"),
    );
    let out = cli(&["scan", "--config", path.to_str().unwrap(), "--format", "json"], &[]);
    migration.batch_execute("COMMIT").await.unwrap();

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr,
        "tenant-audit: error: scan incomplete: 1 errors; first [timeout] tenant_c3.users_userprofile: \
         canceling statement due to lock timeout\n"
    );
    let report: Report = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report.errors,
        [ScanError {
            kind: ErrorKind::Timeout,
            schema: Some("tenant_c3".into()),
            table: Some("users_userprofile".into()),
            message: "canceling statement due to lock timeout".into(),
        }]
    );
    assert_eq!(report.tenants, TenantCounts { discovered: 7, scanned: 6, failed: 1 });
    // Every finding of the demo but the locked table's orphans.
    let b = |n: &str| format!("b0000000-0000-0000-0000-0000000000{n}");
    assert_eq!(
        lines(&report.findings),
        [
            "cross_schema_fk tenant_c3.users_userprofile(business_id) 1 -> public.business_business ShadowedByTenantTable []".to_string(),
            format!("orphan_rows tenant_d4.users_businessdetails(business_id) 1 -> tenant_d4.business_business Shared Inferred [{:?}]", b("04")),
            format!("orphan_rows tenant_d4.users_businessdetails(business_id) 1 -> tenant_d4.business_business Missing Inferred [{:?}]", b("99")),
            format!("orphan_rows tenant_e5.users_userprofile(business_id) 1 -> tenant_e5.business_business Missing Constraint [{:?}]", b("98")),
            format!("orphan_rows tenant_f6.users_userprofile(business_id) 2 -> tenant_f6.business_business Missing Constraint [{:?}, {:?}]", b("96"), b("97")),
            "missing_schema tenant_gone 1  []".to_string(),
            "null_timestamps tenant_d4.users_userprofile(updated_at) 3 timestamp with time zone [\"2\", \"3\", \"4\"]".to_string(),
            "schema_drift tenant_c3.users_userprofile(business_id) 1 ForeignKeyTarget Some(\"business_business(id)\") Some(\"public.business_business(id)\") []".to_string(),
            "schema_drift tenant_d4.users_businessdetails(business_id) 1 MissingForeignKey Some(\"business_business(id)\") None []".to_string(),
            "schema_drift tenant_d4.users_userprofile(updated_at) 1 NullabilityMismatch Some(\"NOT NULL\") Some(\"NULL\") []".to_string(),
            "schema_drift tenant_d4.users_userprofile(updated_at) 1 DefaultMismatch Some(\"now()\") None []".to_string(),
            "schema_drift tenant_e5.users_userprofile(updated_at) 1 MissingColumn Some(\"timestamp with time zone NOT NULL DEFAULT now()\") None []".to_string(),
            "unregistered_schema tenant_zz9 1  []".to_string(),
        ]
    );
}

#[tokio::test]
async fn a_terminated_scan_session_fails_only_its_tenant() {
    let url = fixture_db("locks_terminate", LOCKABLE_SQL).await;
    let locker = lock_audit_trail(&url).await;
    let cfg = config(&url, "[scan]\nlock_timeout = '60s'\nconcurrency = 2\n");
    let running = tokio::spawn(async move { scan(&cfg).await });
    wait_until_scan_blocked(&url).await;
    let admin = pg::connect(&url).await;
    let terminated: bool = admin
        .query_one(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'tenant-audit' AND wait_event_type = 'Lock' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(terminated);
    locker.batch_execute("COMMIT").await.unwrap();

    let report = running.await.unwrap();
    assert_eq!(
        report.errors,
        [ScanError {
            kind: ErrorKind::Terminated,
            schema: Some("tenant_b".into()),
            table: Some("audit_trail".into()),
            message: "terminating connection due to administrator command".into(),
        }]
    );
    assert_eq!(report.tenants, TenantCounts { discovered: 3, scanned: 2, failed: 1 });
    // The catalog checks of tenant_b still hold; its data checks ended with the session.
    assert_eq!(
        lines(&report.findings),
        [
            "schema_drift tenant_b.business_business() 1 MissingTable Some(\"business_business\") None []",
            "schema_drift tenant_b.users_businessdetails() 1 MissingTable Some(\"users_businessdetails\") None []",
            "schema_drift tenant_b.users_userprofile() 1 MissingTable Some(\"users_userprofile\") None []",
        ]
    );
}

#[tokio::test]
async fn a_table_that_exhausts_the_lock_table_costs_only_that_table() {
    // A small shared lock table (10 locks x 20 connections) and a partitioned table whose
    // statement needs a lock per partition and per index: far more than there are.
    let cluster = pg::Cluster::start_with("-c max_locks_per_transaction=10 -c max_connections=20");
    let admin = pg::connect(&cluster.url("postgres")).await;
    admin.batch_execute("CREATE DATABASE locks").await.unwrap();
    let url = cluster.url("locks");
    let client = pg::connect(&url).await;
    client
        .batch_execute(
            "CREATE SCHEMA tenant_a;
             CREATE TABLE tenant_a.wide (id int PRIMARY KEY, created_at timestamptz) PARTITION BY RANGE (id);
             CREATE TABLE tenant_a.small (id int PRIMARY KEY, created_at timestamptz);
             INSERT INTO tenant_a.small VALUES (1, NULL);",
        )
        .await
        .unwrap();
    // A few partitions per transaction: creating them all at once would run out of locks too.
    for batch in 0..75 {
        let partitions: Vec<String> = (batch * 20..batch * 20 + 20)
            .map(|i| {
                format!(
                    "CREATE TABLE tenant_a.wide_{i} PARTITION OF tenant_a.wide FOR VALUES FROM ({}) TO ({})",
                    i * 10,
                    i * 10 + 10
                )
            })
            .collect();
        client.batch_execute(&format!("BEGIN; {}; COMMIT", partitions.join("; "))).await.unwrap();
    }
    let report = scan(&config(&url, "[tenants]\nregistry = false\ninclude = ['^tenant_']\n")).await;
    assert_eq!(
        report.errors,
        [ScanError {
            kind: ErrorKind::Resources,
            schema: Some("tenant_a".into()),
            table: Some("wide".into()),
            message: "out of shared memory".into(),
        }]
    );
    assert_eq!(
        lines(&report.findings),
        ["null_timestamps tenant_a.small(created_at) 1 timestamp with time zone [\"1\"]"]
    );
}

#[tokio::test]
async fn the_catalog_is_read_without_jit() {
    // JIT for every statement (at no optimisation cost), every plan logged: the catalog's must
    // have no JIT section, while a data statement's has one (JIT works on this server).
    let cluster = pg::Cluster::start_with(
        "-c jit=on -c jit_above_cost=0 -c jit_inline_above_cost=-1 -c jit_optimize_above_cost=-1 \
         -c session_preload_libraries=auto_explain -c auto_explain.log_min_duration=0",
    );
    let admin = pg::connect(&cluster.url("postgres")).await;
    admin.batch_execute("CREATE DATABASE jit").await.unwrap();
    let url = cluster.url("jit");
    let client = pg::connect(&url).await;
    client
        .batch_execute(
            "CREATE SCHEMA tenant_a;
             CREATE TABLE tenant_a.events (id int PRIMARY KEY, created_at timestamptz);
             INSERT INTO tenant_a.events VALUES (1, NULL);",
        )
        .await
        .unwrap();
    let report = scan(&config(&url, "[tenants]\nregistry = false\ninclude = ['^tenant_']\n")).await;
    assert_eq!(
        lines(&report.findings),
        ["null_timestamps tenant_a.events(created_at) 1 timestamp with time zone [\"1\"]"]
    );
    let log = std::fs::read_to_string(cluster.log()).unwrap();
    // 7 catalog statements: the table list, then 3 for the shared schema and 3 for the tenants.
    // auto_explain writes one entry per plan: "LOG:  duration: ... plan:\n\tQuery Text: ...".
    let plans: Vec<&str> = log.split("plan:\n").skip(1).map(|p| p.split("\n20").next().unwrap_or(p)).collect();
    let with_jit = |marker: &str| {
        let of: Vec<&&str> = plans.iter().filter(|p| p.contains(marker)).collect();
        (of.len(), of.iter().filter(|p| p.contains("JIT:")).count())
    };
    assert_eq!(with_jit("tenant-audit:catalog"), (7, 0), "{log}");
    let (data, data_jit) = with_jit("FROM ONLY \"tenant_a\".\"events\"");
    assert!(data >= 1 && data_jit == data, "{data} data plans, {data_jit} with JIT:\n{log}");
}
