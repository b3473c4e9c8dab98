//! Incremental scans against full scans of the same database: a randomized differential test
//! (fixed seed, many rounds of random changes between scans, the statistics flushed), and the
//! staleness bound when the flush is not forced.

use std::collections::BTreeSet;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tenant_audit::config::Config;
use tenant_audit::incremental::State;
use tenant_audit::report::{Check, Report, ScanKind};
use tokio_util::sync::CancellationToken;

use crate::support::{config, lines, pg, start_daemon, BASE_SQL};

/// Registry plus pattern discovery; one connection so the scan order is deterministic.
const CONFIG: &str = "[tenants]\ninclude = ['^tenant_']\n";

/// The database: `BASE_SQL` plus `tenants` tenants, built by the returned session (which keeps
/// `pg_temp.create_tenant` for tenants added later).
async fn database(name: &str, tenants: usize) -> (String, tokio_postgres::Client) {
    let url = pg::fresh_db(name).await;
    let client = pg::connect(&url).await;
    client.batch_execute(BASE_SQL).await.expect("base fixture");
    for i in 0..tenants {
        client.batch_execute(&format!("SELECT pg_temp.create_tenant('tenant_{i}')")).await.expect("tenant");
    }
    (url, client)
}

/// The incremental scan (keeping `state`) and a full scan, one after the other.
async fn both(config: &Config, pool: &tenant_audit::db::Pool, state: &mut State) -> (Report, Report) {
    let never = CancellationToken::new();
    let incremental = tenant_audit::scan::run_with(config, pool, &never, None, Some(state)).await;
    let full = tenant_audit::scan::run(config, pool, &never, None).await;
    (incremental.expect("incremental scan").report, full.expect("full scan").report)
}

/// Statements of one random change to the database (rows get explicit keys: a sequence may
/// have been set behind). `tenants` are the current tenants (at
/// least one); `next` numbers new tenants.
fn change(rng: &mut SmallRng, tenants: &mut Vec<String>, next: &mut usize) -> String {
    // Statements on the shared business table only when it has its usual name (case 19
    // renames it back and forth).
    let shared_business = |sql: String| {
        format!(
            "DO $$ BEGIN IF pg_catalog.to_regclass('public.business_business') IS NOT NULL THEN {sql}; END IF; END $$"
        )
    };
    let t = tenants[rng.gen_range(0..tenants.len())].clone();
    let business = |rng: &mut SmallRng| format!("b0000000-0000-0000-0000-0000000000{:02}", rng.gen_range(1..=12));
    let replica =
        |sql: String| format!("SET session_replication_role = replica; {sql}; RESET session_replication_role");
    match rng.gen_range(0..21) {
        0 => format!(
            "INSERT INTO {t}.users_userprofile (id, user_id, business_id, created_at, modified_at) \
             SELECT (SELECT coalesce(max(id), 0) FROM {t}.users_userprofile) + row_number() OVER (), u.id, b.id, now(), now() \
             FROM public.auth_user u, {t}.business_business b ORDER BY u.id, b.id LIMIT 3"
        ),
        // An orphan (or a row whose parent exists), loaded the way a replica-mode load bypasses the key.
        1 => replica(format!(
            "INSERT INTO {t}.users_userprofile (id, user_id, business_id, created_at, modified_at) \
             VALUES ((SELECT coalesce(max(id), 0) + 1 FROM {t}.users_userprofile), {}, '{}', now(), now())",
            rng.gen_range(1..=25),
            business(rng)
        )),
        2 => format!(
            "UPDATE {t}.users_userprofile SET modified_at = NULL WHERE id = (SELECT min(id) FROM {t}.users_userprofile)"
        ),
        3 => format!("UPDATE {t}.users_userprofile SET modified_at = now() WHERE modified_at IS NULL"),
        // Parents: in the tenant and in the shared schema, removed under the children's feet.
        4 => replica(format!("DELETE FROM {t}.business_business WHERE id = '{}'", business(rng))),
        5 => format!("INSERT INTO {t}.business_business (id, name) VALUES ('{}', 'x') ON CONFLICT DO NOTHING", business(rng)),
        6 => replica(shared_business(format!("DELETE FROM public.business_business WHERE id = '{}'", business(rng)))),
        7 => shared_business(format!(
            "INSERT INTO public.business_business (id, name) VALUES ('{}', 'x') ON CONFLICT DO NOTHING",
            business(rng)
        )),
        8 => replica(format!("DELETE FROM public.auth_user WHERE id = {}", rng.gen_range(1..=25))),
        9 => format!(
            "INSERT INTO public.auth_user (id, username) VALUES ({0}, 'u{0}') ON CONFLICT DO NOTHING",
            rng.gen_range(1..=25)
        ),
        10 => {
            let table = ["users_userprofile", "users_businessdetails"][rng.gen_range(0..2)];
            format!("TRUNCATE {t}.{table}")
        }
        // A dropped constraint, re-added NOT VALID (the orphans stay where they are).
        11 => format!(
            "DO $$ BEGIN
               IF EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'users_userprofile_business_id_fk'
                          AND conrelid = '{t}.users_userprofile'::regclass) THEN
                 ALTER TABLE {t}.users_userprofile DROP CONSTRAINT users_userprofile_business_id_fk;
               ELSE
                 ALTER TABLE {t}.users_userprofile ADD CONSTRAINT users_userprofile_business_id_fk
                   FOREIGN KEY (business_id) REFERENCES {t}.business_business (id) NOT VALID;
               END IF;
             END $$"
        ),
        12 => {
            let name = format!("tenant_{next}");
            *next += 1;
            tenants.push(name.clone());
            format!("SELECT pg_temp.create_tenant('{name}')")
        }
        13 if tenants.len() > 2 => {
            tenants.retain(|x| *x != t);
            format!("DROP SCHEMA {t} CASCADE; DELETE FROM public.customers_client WHERE schema_name = '{t}'")
        }
        14 if rng.gen_bool(0.5) => "ANALYZE".to_string(),
        // A sequence set behind its column (or back past it): no table counter moves.
        14 => match rng.gen_bool(0.5) {
            true => format!("SELECT setval('{t}.users_userprofile_id_seq', 1)"),
            false => format!(
                "SELECT setval('{t}.users_userprofile_id_seq', (SELECT coalesce(max(id), 0) + 1 FROM {t}.users_userprofile))"
            ),
        },
        // DDL on one tenant, which only the catalog fingerprint notices: a column dropped and
        // added back (schema drift), NOT NULL dropped and set again (a required timestamp
        // becomes checkable), a new table with a NULL required timestamp.
        15 => format!(
            "DO $$ BEGIN
               IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '{t}.users_businessdetails'::regclass
                          AND attname = 'date_founded' AND NOT attisdropped) THEN
                 ALTER TABLE {t}.users_businessdetails DROP COLUMN date_founded;
               ELSE
                 ALTER TABLE {t}.users_businessdetails ADD COLUMN date_founded date;
               END IF;
             END $$"
        ),
        16 => format!(
            "DO $$ BEGIN
               IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '{t}.users_userprofile'::regclass
                          AND attname = 'updated_at' AND attnotnull) THEN
                 ALTER TABLE {t}.users_userprofile ALTER COLUMN updated_at DROP NOT NULL;
                 UPDATE {t}.users_userprofile SET updated_at = NULL WHERE id = (SELECT max(id) FROM {t}.users_userprofile);
               ELSE
                 UPDATE {t}.users_userprofile SET updated_at = now() WHERE updated_at IS NULL;
                 ALTER TABLE {t}.users_userprofile ALTER COLUMN updated_at SET NOT NULL;
               END IF;
             END $$"
        ),
        17 => {
            let table = format!("extra_{next}");
            *next += 1;
            format!(
                "CREATE TABLE {t}.{table} (id serial PRIMARY KEY,
                   business_id uuid REFERENCES {t}.business_business (id), created_at timestamptz);
                 INSERT INTO {t}.{table} (business_id, created_at) VALUES ('b0000000-0000-0000-0000-000000000001', NULL)"
            )
        }
        // DDL on the shared schema: a column added or dropped, and the shared business table
        // renamed away and back (where the tenants' orphans find their parents changes).
        18 => "DO $$ BEGIN
                 IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'public.auth_user'::regclass
                            AND attname = 'email' AND NOT attisdropped) THEN
                   ALTER TABLE public.auth_user DROP COLUMN email;
                 ELSE
                   ALTER TABLE public.auth_user ADD COLUMN email text;
                 END IF;
               END $$"
            .to_string(),
        19 => "DO $$ BEGIN
                 IF pg_catalog.to_regclass('public.business_business') IS NOT NULL THEN
                   ALTER TABLE public.business_business RENAME TO business_business_away;
                 ELSE
                   ALTER TABLE public.business_business_away RENAME TO business_business;
                 END IF;
               END $$"
            .to_string(),
        _ => "SELECT pg_stat_reset()".to_string(),
    }
}

#[tokio::test]
async fn incremental_scans_equal_full_scans_under_random_changes() {
    let (url, session) = database("incremental_differential", 4).await;
    let config = config(&url, CONFIG);
    let pool = tenant_audit::db::scan_pool(&config.database, &config.scan);
    let mut state = State::default();
    let mut rng = SmallRng::seed_from_u64(11);
    let mut tenants: Vec<String> = (0..4).map(|i| format!("tenant_{i}")).collect();
    let mut next = tenants.len();
    let (mut carried, mut incremental_rounds, mut resets, mut sequence_rounds) = (0, 0, 0, 0);
    let (mut tenant_ddl, mut shared_ddl) = (0, 0);
    for round in 0..80 {
        let mut applied = Vec::new();
        // Most rounds change little (which is what incremental scans are for), some change more.
        for _ in 0..rng.gen_range(0..=3) {
            let sql = change(&mut rng, &mut tenants, &mut next);
            session.batch_execute(&sql).await.unwrap_or_else(|e| panic!("round {round}: {sql}: {e}"));
            applied.push(sql);
        }
        // The changing session's pending statistics are flushed when it next goes idle.
        session.batch_execute("SELECT pg_stat_force_next_flush()").await.expect("flush");
        let (inc, full) = both(&config, &pool, &mut state).await;
        assert_eq!(lines(&inc.findings), lines(&full.findings), "round {round} after {applied:#?}");
        assert_eq!(inc.errors, full.errors, "round {round} after {applied:#?}");
        assert_eq!(inc.tenants, full.tenants, "round {round}");
        assert_eq!(full.scan.kind, ScanKind::Full);
        sequence_rounds += usize::from(full.findings.iter().any(|f| f.check == Check::SequenceBehind));
        let reset = applied.iter().any(|s| s.contains("pg_stat_reset"));
        if reset {
            resets += 1;
            assert_eq!(inc.scan.kind, ScanKind::Full, "round {round}: a statistics reset makes the scan full");
        }
        if inc.scan.kind == ScanKind::Incremental {
            incremental_rounds += 1;
            carried += inc.scan.tables_carried_forward;
            let ddl = |on: &str| applied.iter().any(|s| s.contains(&format!("TABLE {on}")));
            tenant_ddl += usize::from(ddl("tenant_"));
            shared_ddl += usize::from(ddl("public."));
        }
        assert_eq!(
            inc.scan.tables_checked + inc.scan.tables_carried_forward,
            full.scan.tables_checked,
            "round {round}: every table is either checked or carried forward"
        );
        assert_eq!(inc.scan.oldest_carried_forward_at.is_some(), inc.scan.tables_carried_forward > 0);
    }
    // The test must exercise what it claims: statistics resets, and incremental rounds that
    // carried most tables forward.
    assert!(resets >= 2, "{resets} statistics resets");
    assert!(sequence_rounds >= 5, "{sequence_rounds} rounds with a sequence behind");
    assert!(incremental_rounds >= 50, "{incremental_rounds} incremental rounds of 80");
    assert!(tenant_ddl >= 5, "{tenant_ddl} incremental rounds after DDL on a tenant");
    assert!(shared_ddl >= 3, "{shared_ddl} incremental rounds after DDL on the shared schema");
    assert!(carried >= incremental_rounds * 4, "{carried} tables carried forward in {incremental_rounds} rounds");
}

/// The tuples inserted into `table` as the shared statistics have them (a fresh transaction:
/// no cached snapshot).
async fn inserted(observer: &tokio_postgres::Client, table: &str) -> i64 {
    let row =
        observer.query_one("SELECT pg_stat_get_tuples_inserted($1::text::regclass)", &[&table]).await.expect("counter");
    row.get(0)
}

/// Without a forced flush, a change is reported by the first incremental scan that starts
/// after the writing session's statistics reach the shared counters (docs/performance.md,
/// "Staleness"); scans before that may carry the old result forward.
#[tokio::test]
async fn unflushed_changes_are_reported_once_the_statistics_are_flushed() {
    let (url, session) = database("incremental_staleness", 3).await;
    session.batch_execute("CREATE TABLE public.scratch (x int)").await.expect("scratch table");
    let observer = pg::connect(&url).await;
    let config = config(&url, CONFIG);
    let pool = tenant_audit::db::scan_pool(&config.database, &config.scan);
    let never = CancellationToken::new();
    let mut state = State::default();
    session.batch_execute("SELECT pg_stat_force_next_flush()").await.expect("flush");
    let first = tenant_audit::scan::run_with(&config, &pool, &never, None, Some(&mut state)).await.expect("scan");
    assert_eq!(first.report.scan.kind, ScanKind::Full);
    let mut rng = SmallRng::seed_from_u64(12);
    let mut stale_scans = 0;
    // An idle session's pending statistics wait up to PGSTAT_IDLE_INTERVAL (10 s): few rounds.
    for round in 0..3 {
        let table = format!("tenant_{}.users_userprofile", rng.gen_range(0..3));
        let expected = inserted(&observer, &table).await + 1;
        // Two statements back to back: the first (on a table no check reads) may flush the
        // session's statistics, so the second's stay pending (PGSTAT_MIN_INTERVAL) until the
        // session has been idle a while. The row has an explicit key: drawing one from the
        // sequence would move the sequence's state, a signal that needs no flush.
        session.batch_execute("INSERT INTO public.scratch VALUES (1)").await.expect("scratch");
        session
            .batch_execute(&format!(
                "SET session_replication_role = replica;
                 INSERT INTO {table} (id, user_id, business_id, created_at, modified_at)
                 VALUES (1000 + {round}, 1, 'c0000000-0000-0000-0000-0000000000{round:02}', now(), now());
                 RESET session_replication_role"
            ))
            .await
            .expect("orphan");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let flushed = inserted(&observer, &table).await >= expected;
            let scanned = tenant_audit::scan::run_with(&config, &pool, &never, None, Some(&mut state)).await;
            let inc = scanned.expect("incremental scan").report;
            let full = tenant_audit::scan::run(&config, &pool, &never, None).await.expect("full scan").report;
            if lines(&inc.findings) == lines(&full.findings) {
                break;
            }
            assert!(!flushed, "round {round}: the scan started after the flush and still missed the change");
            assert_eq!(inc.scan.kind, ScanKind::Incremental);
            stale_scans += 1;
            assert!(std::time::Instant::now() < deadline, "round {round}: the statistics were never flushed");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    // The bound was exercised: some scan ran while a change was committed but not yet counted.
    assert!(stale_scans >= 1, "no scan saw a committed but unflushed change");
}

/// The daemon: scheduled scans after the first are incremental and say so in the metrics and
/// the report; a change is checked alone; `POST /scan` is full.
#[tokio::test]
async fn scheduled_scans_are_incremental_and_report_what_they_carried() {
    let (url, session) = database("incremental_daemon", 3).await;
    session.batch_execute("SELECT pg_stat_force_next_flush()").await.expect("flush");
    let extra = "[serve]\nschedule = '* * * * * *'\n[web.scan_requests]\nenabled = true\nmin_interval = '1ms'\n";
    let daemon = start_daemon(config(&url, &format!("{CONFIG}{extra}"))).await;
    daemon.wait_for("tenant_audit_scans_completed_total{database=\"default\",scan_kind=\"incremental\"} 1").await;
    assert_eq!(
        daemon.samples("tenant_audit_scans_completed_total").await[0],
        "tenant_audit_scans_completed_total{database=\"default\",scan_kind=\"full\"} 1"
    );
    // Three tenants, two tables with data checks each (business_business has none: its
    // timestamps are NOT NULL and it has no foreign key); nothing changed.
    assert_eq!(
        daemon.samples("tenant_audit_scan_tables").await,
        [
            "tenant_audit_scan_tables{database=\"default\",scan_kind=\"incremental\",state=\"carried_forward\"} 6",
            "tenant_audit_scan_tables{database=\"default\",scan_kind=\"incremental\",state=\"checked\"} 0",
        ]
    );
    session
        .batch_execute(
            "SET session_replication_role = replica;
             INSERT INTO tenant_1.users_userprofile (user_id, business_id) VALUES (1, 'c0000000-0000-0000-0000-000000000001');
             RESET session_replication_role;",
        )
        .await
        .expect("orphan");
    session.batch_execute("SELECT pg_stat_force_next_flush()").await.expect("flush");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let report = loop {
        let (status, text) = daemon.get("/report").await;
        assert_eq!(status, 200);
        let report: Report = serde_json::from_str(&text).expect("report JSON");
        if report.summary.values().any(|s| s.findings > 0) {
            break report;
        }
        assert!(std::time::Instant::now() < deadline, "the orphan was never reported");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        lines(&report.findings),
        [
            "orphan_rows tenant_1.users_userprofile(business_id) 1 -> tenant_1.business_business Missing Constraint [\"c0000000-0000-0000-0000-000000000001\"]",
            "null_timestamps tenant_1.users_userprofile(created_at) 1 timestamp with time zone [\"2\"]",
            "null_timestamps tenant_1.users_userprofile(modified_at) 1 timestamp with time zone [\"2\"]",
        ]
    );
    assert_eq!(report.scan.kind, ScanKind::Incremental);
    assert_eq!((report.scan.tables_checked, report.scan.tables_carried_forward), (1, 5));
    let oldest = report.scan.oldest_carried_forward_at.expect("carried-forward results have an age");
    assert!(oldest < report.started_at);
    // A scan asked for is full (the schedule may be running one: ask until accepted).
    while daemon.post("/scan").await.0 != 202 {
        assert!(std::time::Instant::now() < deadline, "POST /scan never accepted");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    daemon.wait_for("tenant_audit_scans_completed_total{database=\"default\",scan_kind=\"full\"} 2").await;
    daemon.stop().await;
}

/// The sequence states are read 64 sequences per statement on several sessions at once (as
/// tenants are scanned), all before any tenant's data: a batch that fails (here: a sequence the
/// scanning role may not read) leaves only its own 64 sequences without a state, so only their
/// tables are checked, and a sequence moved in another batch is still noticed.
#[tokio::test]
async fn sequence_batches_run_on_several_sessions_and_fail_alone() {
    let cluster = pg::Cluster::start_with("-c log_statement=all");
    pg::connect(&cluster.url("postgres")).await.batch_execute("CREATE DATABASE app").await.unwrap();
    let url = cluster.url("app");
    let admin = pg::connect(&url).await;
    admin.batch_execute(BASE_SQL).await.expect("base fixture");
    // 70 tenants, two sequences each: batches of 64, 64 and 12 sequences, in (schema, name)
    // order, so tenant_0's are in the first batch and tenant_9's in the last.
    admin
        .batch_execute(
            "SELECT pg_temp.create_tenant('tenant_' || i) FROM generate_series(0, 69) i;
             CREATE ROLE audit_batches LOGIN;
             DO $$ DECLARE s text; BEGIN
               FOR s IN SELECT nspname FROM pg_namespace WHERE nspname ~ '^(public|tenant_)' LOOP
                 EXECUTE format('GRANT USAGE ON SCHEMA %1$I TO audit_batches;
                                 GRANT SELECT ON ALL TABLES IN SCHEMA %1$I TO audit_batches;
                                 GRANT SELECT ON ALL SEQUENCES IN SCHEMA %1$I TO audit_batches', s);
               END LOOP; END $$;
             REVOKE SELECT ON SEQUENCE tenant_0.users_userprofile_id_seq FROM audit_batches;
             SELECT pg_stat_force_next_flush();",
        )
        .await
        .expect("tenants and role");
    let as_role = url.replacen("postgres://postgres@", "postgres://audit_batches@", 1);
    let config = config(&as_role, CONFIG);
    let pool = tenant_audit::db::scan_pool(&config.database, &config.scan);
    let never = CancellationToken::new();
    let mut state = State::default();
    let first = tenant_audit::scan::run_with(&config, &pool, &never, None, Some(&mut state)).await.expect("scan");
    assert_eq!(first.report.scan.kind, ScanKind::Full);
    assert_eq!(first.report.scan.tables_checked, 140);
    let logged = std::fs::read_to_string(cluster.log()).unwrap().len();
    admin.batch_execute("SELECT setval('tenant_9.users_userprofile_id_seq', 1, false)").await.expect("setval");
    let (inc, full) = both(&config, &pool, &mut state).await;
    assert_eq!(inc.scan.kind, ScanKind::Incremental);
    assert_eq!(lines(&inc.findings), lines(&full.findings));
    assert!(
        lines(&inc.findings).contains(
            &"sequence_behind tenant_9.users_userprofile(id) 1 tenant_9.users_userprofile_id_seq next 1 max 1 []"
                .to_string()
        ),
        "{:#?}",
        lines(&inc.findings)
    );
    assert_eq!(inc.errors, full.errors);
    assert_eq!(inc.errors.len(), 1, "{:?}", inc.errors);
    // The first batch's 64 tables (its sequences have no state) and tenant_9's moved one.
    assert_eq!((inc.scan.tables_checked, inc.scan.tables_carried_forward), (65, 75));
    // The incremental scan's three batches, each in a transaction of its own, on more than one
    // session, all before its first tenant statement.
    let log = std::fs::read_to_string(cluster.log()).unwrap();
    let entries: Vec<&str> = log[logged..].split("\n20").collect();
    let batches: Vec<usize> = (0..entries.len())
        .filter(|&i| {
            entries[i].contains("LOG:  statement: BEGIN READ ONLY;") && entries[i].contains("tenant-audit:signals")
        })
        .collect();
    assert_eq!(batches.len(), 3);
    let pid = |entry: &str| entry.split(['[', ']']).nth(1).map(str::to_string);
    let sessions: BTreeSet<Option<String>> = batches.iter().map(|&i| pid(entries[i])).collect();
    assert!(sessions.len() > 1, "{sessions:?}");
    let first_data =
        entries.iter().position(|e| e.contains("LOG:  statement: BEGIN READ ONLY;") && !e.contains("tenant-audit:"));
    assert!(first_data.is_some_and(|d| batches.iter().all(|&i| i < d)), "{first_data:?} {batches:?}");
}
