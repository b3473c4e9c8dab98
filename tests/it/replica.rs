//! Scans of a streaming replica: a statement cancelled by a recovery conflict is tried again and
//! its tenant scanned; unlogged tables, unreadable there, are skipped and reported as such; a
//! daemon scanning a replica and healing on its primary heals a finding not yet replayed once,
//! and exports the replica lag.

use std::time::{Duration, Instant};

use tenant_audit::report::{ErrorKind, ScanError, TenantCounts};

use crate::support::pg::{connect, Cluster};
use crate::support::{config, lines, scan, start_daemon, BASE_SQL};

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
    // Watched from a session of its own per look: the conflict it waits for can terminate a
    // session whose query held a snapshot when the removal was replayed.
    let url = replica.url("app");
    let count = |sql: &'static str| {
        let url = url.clone();
        async move {
            match connect(&url).await.query_one(sql, &[]).await {
                Ok(row) => row.get::<_, i64>(0),
                Err(_) => 0,
            }
        }
    };
    while count(conflicts).await == 0 {
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

#[tokio::test]
async fn scans_on_a_replica_heal_on_its_primary_once_and_export_the_lag() {
    let primary = Cluster::start();
    connect(&primary.url("postgres")).await.batch_execute("CREATE DATABASE app").await.unwrap();
    let app = connect(&primary.url("app")).await;
    let sql = format!(
        "{BASE_SQL}
        SELECT pg_temp.create_tenant('tenant_a');
        UPDATE tenant_a.users_userprofile SET modified_at = NULL;"
    );
    app.batch_execute(&sql).await.unwrap();
    let replica = primary.standby();
    let standby = connect(&replica.url("app")).await;
    caught_up(&app, &standby).await;
    // What heal writes on the primary is not replayed until resumed: every scan of the standby
    // still sees the NULL.
    standby.batch_execute("SELECT pg_wal_replay_pause()").await.unwrap();

    let extra = format!(
        "[tenants]\ninclude = ['^tenant_']\n[checks]\nrequired_timestamps = ['modified_at']\n\
         [heal]\nenabled = true\nbackfill_null_timestamps = true\ndatabase_url = {:?}\n\
         [serve]\nschedule = '* * * * * *'\n",
        primary.url("app")
    );
    let daemon = start_daemon(config(&replica.url("app"), &extra)).await;
    let null = "tenant_audit_null_timestamps{column=\"modified_at\",database=\"default\",schema=\"tenant_a\",table=\"users_userprofile\"}";
    let healed = "tenant_audit_healed_rows_total{database=\"default\",repair=\"backfill_null_timestamps\"}";
    let heal_runs = "tenant_audit_heal_runs_total{database=\"default\",result=\"success\"}";
    daemon.wait_above(heal_runs, 2.0).await;
    // Three scans of the standby found the NULL and three heal runs planned its backfill; the
    // primary's re-checked predicate wrote it once.
    assert_eq!(daemon.value(null).await, Some(1.0));
    assert_eq!(daemon.value(healed).await, Some(1.0));
    let audit = "SELECT format('%s %s %s', schema_name, table_name, repair) FROM tenant_audit.heal_log";
    let audit_rows = || async {
        let rows = app.query(audit, &[]).await.unwrap();
        rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>()
    };
    assert_eq!(audit_rows().await, ["tenant_a users_userprofile backfill_null_timestamps"]);
    let lag_seconds = "tenant_audit_replica_lag_seconds{database=\"default\"}";
    let lag_bytes = "tenant_audit_replica_lag_bytes{database=\"default\"}";
    // The heal's WAL reached the standby but waits for replay: bytes behind the primary.
    daemon.wait_above(lag_bytes, 0.0).await;
    assert!(daemon.value(lag_seconds).await.is_some(), "the standby's lag in seconds is exported");

    // Replayed: the finding is gone, the lag back to 0, and nothing was healed again.
    standby.batch_execute("SELECT pg_wal_replay_resume()").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while daemon.value(null).await.is_some() {
        assert!(Instant::now() < deadline, "the replayed backfill never reached the scans");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    daemon.wait_for("tenant_audit_replica_lag_seconds{database=\"default\"} 0").await;
    assert_eq!(daemon.value(healed).await, Some(1.0));
    assert_eq!(audit_rows().await, ["tenant_a users_userprofile backfill_null_timestamps"]);
    daemon.stop().await;

    // On the primary there is no replica lag to export.
    let daemon = start_daemon(config(&primary.url("app"), "[tenants]\ninclude = ['^tenant_']\n")).await;
    daemon.wait_for("tenant_audit_scans_total{database=\"default\",result=\"success\"} 1").await;
    assert_eq!(daemon.samples("tenant_audit_replica_lag_seconds").await, Vec::<String>::new());
    assert_eq!(daemon.samples("tenant_audit_replica_lag_bytes").await, Vec::<String>::new());
    daemon.stop().await;
}
