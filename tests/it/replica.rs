//! Scans of a streaming replica: a statement cancelled by a recovery conflict is tried again and
//! its tenant scanned; unlogged tables, unreadable there, are skipped and reported as such.

use std::time::{Duration, Instant};

use tenant_audit::report::{ErrorKind, ScanError, TenantCounts};

use crate::support::pg::{connect, Cluster};
use crate::support::{config, lines, scan, BASE_SQL};

/// Waits (60 s at most) until the standby has replayed everything the primary wrote so far.
async fn caught_up(primary: &tokio_postgres::Client, standby: &tokio_postgres::Client) {
    let lsn: String = primary.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let replayed: bool =
            standby.query_one("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", &[&lsn]).await.unwrap().get(0);
        if replayed {
            return;
        }
        assert!(Instant::now() < deadline, "the standby never replayed {lsn}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_recovery_conflict_is_retried_and_unlogged_tables_are_skipped() {
    let primary = Cluster::start();
    let admin = connect(&primary.url("postgres")).await;
    // Copied into the standby by pg_basebackup: queries that hold back replay are cancelled at once.
    admin.batch_execute("ALTER SYSTEM SET max_standby_streaming_delay = 0").await.unwrap();
    admin.batch_execute("CREATE DATABASE app").await.unwrap();
    let app = connect(&primary.url("app")).await;
    let sql = format!(
        "{BASE_SQL}
        SELECT pg_temp.create_tenant('tenant_a');
        SELECT pg_temp.create_tenant('tenant_b');
        CREATE TABLE tenant_a.big_parent (id int PRIMARY KEY);
        CREATE TABLE tenant_a.big_child (id int PRIMARY KEY, parent_id int REFERENCES tenant_a.big_parent);
        INSERT INTO tenant_a.big_parent SELECT g FROM generate_series(1, 2000000) g;
        SET session_replication_role = replica;
        INSERT INTO tenant_a.big_child SELECT g, g FROM generate_series(1, 2000003) g;
        RESET session_replication_role;
        CREATE UNLOGGED TABLE tenant_b.cache (id int PRIMARY KEY, created_at timestamptz);
        INSERT INTO tenant_b.cache VALUES (1, NULL);
        CREATE TABLE public.churn (id int);"
    );
    app.batch_execute(&sql).await.unwrap();
    app.batch_execute("VACUUM ANALYZE").await.unwrap();
    let replica = primary.standby();
    let standby = connect(&replica.url("app")).await;
    caught_up(&app, &standby).await;

    let cfg = config(&replica.url("app"), "[checks]\nrequired_timestamps = ['created_at']\n[scan]\nconcurrency = 1\n");
    let running = tokio::spawn(async move { scan(&cfg).await });
    // While the scan reads tenant_a.big_child on the standby, the primary removes rows that the
    // scan's snapshot could still see; replaying that cancels the scan's statement.
    let reading = "SELECT count(*) FROM pg_stat_activity
        WHERE application_name = 'tenant-audit' AND state = 'active' AND query LIKE '%big_child%'";
    let conflicts = "SELECT confl_snapshot FROM pg_stat_database_conflicts WHERE datname = 'app'";
    let deadline = Instant::now() + Duration::from_secs(60);
    while standby.query_one(reading, &[]).await.unwrap().get::<_, i64>(0) == 0 {
        assert!(Instant::now() < deadline, "the scan never read big_child");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while standby.query_one(conflicts, &[]).await.unwrap().get::<_, i64>(0) == 0 {
        assert!(Instant::now() < deadline && !running.is_finished(), "no recovery conflict happened");
        // Separate transactions: a row deleted by the transaction that inserted it conflicts with
        // no snapshot.
        for statement in ["INSERT INTO public.churn VALUES (1)", "DELETE FROM public.churn", "VACUUM public.churn"] {
            app.batch_execute(statement).await.unwrap();
        }
    }

    let report = running.await.unwrap();
    assert_eq!(
        report.errors,
        [ScanError {
            kind: ErrorKind::Skipped,
            schema: Some("tenant_b".into()),
            table: Some("cache".into()),
            message: "unlogged table: its rows cannot be read on a standby".into(),
        }]
    );
    assert_eq!(report.tenants, TenantCounts { discovered: 2, scanned: 2, failed: 0 });
    assert_eq!(report.failures().count(), 0);
    assert_eq!(
        lines(&report.findings),
        ["orphan_rows tenant_a.big_child(parent_id) 3 -> tenant_a.big_parent Missing Constraint [\"2000001\", \"2000002\", \"2000003\"]"]
    );
}
