//! Heal against real PostgreSQL: what it repairs, what it leaves, its audit rows, and each
//! safety rule (dry run, idempotence, lock timeout, SIGKILL, one healer, replicas, privileges).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tenant_audit::heal::{self, Plan, SkipReason};

use crate::support::{
    checksum, cli, config, config_file, fixture_db, lines, pg, scan, start_daemon, web_auth, BASE_SQL, DEMO_SQL,
};

/// The demo's discovery against a template schema, with every repair enabled.
const HEAL: &str = "[tenants]\ninclude = ['^tenant_']\nreference_schema = 'tenant_template'\n\
    [heal]\ncopy_missing_parents = true\nbackfill_null_timestamps = true\nadd_missing_columns = true\n";
/// The template every heal fixture starts with (add_missing_columns needs a reference schema).
const TEMPLATE: &str = "SELECT pg_temp.create_tenant('tenant_template');\n";

/// A heal fixture: the template, then `sql`.
async fn heal_db(name: &str, sql: &str) -> String {
    fixture_db(name, &format!("{TEMPLATE}{sql}")).await
}

fn b(n: &str) -> String {
    format!("b0000000-0000-0000-0000-0000000000{n}")
}

/// `schema table repair row_key` of every audit row, sorted.
async fn audit_rows(url: &str) -> Vec<String> {
    let client = pg::connect(url).await;
    let rows = client
        .query("SELECT format('%s %s %s %s', schema_name, table_name, repair, row_key::text) FROM tenant_audit.heal_log ORDER BY 1", &[])
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

async fn count(url: &str, sql: &str) -> i64 {
    pg::connect(url).await.query_one(sql, &[]).await.unwrap().get(0)
}

fn heal_cli(url: &str, name: &str, extra: &str, execute: bool) -> std::process::Output {
    let path = config_file(name, &format!("{HEAL}{extra}"));
    let mut args = vec!["heal", "--config", path.to_str().unwrap()];
    if execute {
        args.push("--execute");
    }
    cli(&args, &[("TENANT_AUDIT_DATABASE_URL", url)])
}

#[tokio::test]
async fn execute_repairs_what_is_healable_and_audits_every_change() {
    let url = heal_db("heal_execute", DEMO_SQL).await;
    let out = heal_cli(&url, "execute", "", true);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("add_missing_columns: 5 change(s)\nbackfill_null_timestamps: 3 change(s)\ncopy_missing_parents: 3 change(s)\n"), "{stdout}");

    let step = |t: &str, s: &str| {
        format!("{t} users_userprofile add_missing_columns {{\"step\": \"{s}\", \"column\": \"updated_at\"}}")
    };
    let mut expected = vec![
        format!("tenant_c3 business_business copy_missing_parents {{\"id\": \"{}\"}}", b("02")),
        format!("tenant_c3 business_business copy_missing_parents {{\"id\": \"{}\"}}", b("03")),
        format!("tenant_d4 business_business copy_missing_parents {{\"id\": \"{}\"}}", b("04")),
        "tenant_d4 users_userprofile backfill_null_timestamps {\"id\": 2}".to_string(),
        "tenant_d4 users_userprofile backfill_null_timestamps {\"id\": 3}".to_string(),
        "tenant_d4 users_userprofile backfill_null_timestamps {\"id\": 4}".to_string(),
        "tenant_e5 users_userprofile add_missing_columns {\"id\": 1}".to_string(),
        "tenant_e5 users_userprofile add_missing_columns {\"id\": 2}".to_string(),
    ];
    // tenant_e5 gets the column (with its default); tenant_d4, backfilled just before, gets its
    // lost default and its NOT NULL back.
    for s in ["add_column", "add_check", "validate_check", "set_not_null"] {
        expected.push(step("tenant_e5", s));
    }
    for s in ["set_default", "add_check", "validate_check", "set_not_null"] {
        expected.push(step("tenant_d4", s));
    }
    expected.sort();
    assert_eq!(audit_rows(&url).await, expected);
    // Backfilled from modified_at, the first fallback; the copied rows are the shared ones.
    assert_eq!(count(&url, "SELECT count(*) FROM tenant_d4.users_userprofile WHERE updated_at IS DISTINCT FROM modified_at AND id IN (2, 3, 4)").await, 0);
    assert_eq!(
        count(&url, "SELECT count(*) FROM tenant_e5.users_userprofile WHERE updated_at IS DISTINCT FROM modified_at")
            .await,
        0
    );
    assert_eq!(
        count(&url, "SELECT count(*) FROM tenant_c3.business_business t JOIN public.business_business s USING (id, name, created_at, updated_at)").await,
        2
    );

    // A new scan finds nothing healable; what needs a person is untouched.
    let report = scan(&config(&url, HEAL)).await;
    assert_eq!(
        lines(&report.findings),
        [
            "cross_schema_fk tenant_c3.users_userprofile(business_id) 1 -> public.business_business ShadowedByTenantTable []".to_string(),
            format!("orphan_rows tenant_d4.users_businessdetails(business_id) 1 -> tenant_d4.business_business Missing Inferred [{:?}]", b("99")),
            format!("orphan_rows tenant_e5.users_userprofile(business_id) 1 -> tenant_e5.business_business Missing Constraint [{:?}]", b("98")),
            format!("orphan_rows tenant_f6.users_userprofile(business_id) 2 -> tenant_f6.business_business Missing Constraint [{:?}, {:?}]", b("96"), b("97")),
            "missing_schema tenant_gone 1  []".to_string(),
            "schema_drift tenant_c3.users_userprofile(business_id) 1 ForeignKeyTarget Some(\"business_business(id)\") Some(\"public.business_business(id)\") []".to_string(),
            "schema_drift tenant_d4.users_businessdetails(business_id) 1 MissingForeignKey Some(\"business_business(id)\") None []".to_string(),
            "unregistered_schema tenant_zz9 1  []".to_string(),
        ]
    );

    // A second run changes nothing.
    let before = checksum(&url).await;
    let out = heal_cli(&url, "execute_again", "", true);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains(": 0 change(s), 0 tenant(s) skipped, 0 error(s)"));
    assert_eq!(checksum(&url).await, before);
}

#[tokio::test]
async fn dry_run_prints_the_sql_and_writes_nothing() {
    let url = heal_db("heal_dry_run", DEMO_SQL).await;
    let before = checksum(&url).await;
    let out = heal_cli(&url, "dry_run", "", false);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(plan.contains("-- tenant tenant_c3\n-- each transaction starts with SET LOCAL lock_timeout, statement_timeout and: SET LOCAL search_path = pg_catalog, \"tenant_c3\";\n-- copy_missing_parents on tenant_c3.users_userprofile: 2 orphan row(s) whose business_business row exists in public\n"), "{plan}");
    assert!(plan.contains("\nINSERT INTO \"tenant_c3\".\"business_business\" (\"id\", \"name\", \"business_num\", \"created_at\", \"updated_at\")\n"), "{plan}");
    assert!(plan.contains("ALTER TABLE \"tenant_e5\".\"users_userprofile\" ADD COLUMN IF NOT EXISTS \"updated_at\" timestamp with time zone, ALTER COLUMN \"updated_at\" SET DEFAULT now();\n"), "{plan}");
    assert!(plan.ends_with("-- 3 tenant(s) to heal\n"), "{plan}");
    assert!(
        plan.contains(
            "-- add_missing_columns on tenant_d4.users_userprofile: make updated_at NOT NULL as the reference has it\n"
        ),
        "{plan}"
    );
    assert_eq!(checksum(&url).await, before);
    assert_eq!(count(&url, "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_audit'").await, 0);
}

#[tokio::test]
async fn missing_ancestors_are_copied_with_their_parent() {
    // A tenant row points at business details that exist only in the shared schema, and those
    // details point at a business that exists only there too. The details' integer key is listed
    // as a same-entity key.
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE public.users_businessdetails (id int PRIMARY KEY, business_id uuid NOT NULL REFERENCES public.business_business (id), business_type text);
        INSERT INTO public.users_businessdetails VALUES (500, 'b0000000-0000-0000-0000-000000000005', 'shared details');
        CREATE TABLE tenant_a.users_location (id int PRIMARY KEY, details_id int REFERENCES tenant_a.users_businessdetails (id));
        SET session_replication_role = replica;
        INSERT INTO tenant_a.users_location VALUES (1, 500);
        RESET session_replication_role;";
    let url = heal_db("heal_ancestors", sql).await;
    let listed = "same_entity_keys = [{ table = 'users_businessdetails', columns = ['id'] }]\n";
    let out = heal_cli(&url, "ancestors", listed, true);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let client = pg::connect(&url).await;
    let rows =
        client.query("SELECT table_name, row_key::text FROM tenant_audit.heal_log ORDER BY id", &[]).await.unwrap();
    let rows: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        rows,
        [
            ("business_business".to_string(), format!("{{\"id\": \"{}\"}}", b("05"))),
            ("users_businessdetails".to_string(), "{\"id\": 500}".to_string()),
            (
                "users_businessdetails".to_string(),
                "{\"column\": \"id\", \"sequence\": \"users_businessdetails_id_seq\"}".to_string()
            ),
        ]
    );
    // The tenant's serial moved past the copied key: the application's next insert succeeds.
    client
        .batch_execute(
            "INSERT INTO tenant_a.users_businessdetails (business_id) VALUES ('b0000000-0000-0000-0000-000000000001')",
        )
        .await
        .unwrap();
    assert_eq!(count(&url, "SELECT max(id)::bigint FROM tenant_a.users_businessdetails").await, 501);
    let report = scan(&config(&url, &format!("{HEAL}{listed}"))).await;
    assert_eq!(lines(&report.findings), Vec::<String>::new());
}

#[tokio::test]
async fn a_locked_tenant_is_skipped_within_lock_timeout() {
    let url = heal_db("heal_locked", DEMO_SQL).await;
    let cfg = config(&url, &format!("{HEAL}lock_timeout = '300ms'\n"));
    let pool = tenant_audit::db::scan_pool(&cfg.database, &cfg.scan);
    let scanned = tenant_audit::scan::run(&cfg, &pool, &Default::default(), None).await.unwrap();
    let plan = Plan::build(&scanned, &cfg);

    let locker = pg::connect(&url).await;
    locker.batch_execute("BEGIN; LOCK TABLE tenant_d4.business_business IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let started = Instant::now();
    let outcome = heal::execute(
        &cfg.heal,
        &tenant_audit::db::heal_pool(&cfg.heal, cfg.scan.connect_timeout),
        &plan,
        None,
        &Default::default(),
    )
    .await
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_eq!(outcome.skipped, [("tenant_d4".to_string(), SkipReason::LockTimeout)]);
    assert_eq!(
        outcome.changed.into_iter().collect::<Vec<_>>(),
        [("add_missing_columns", 3), ("copy_missing_parents", 2)]
    );
    locker.batch_execute("COMMIT").await.unwrap();
    assert_eq!(count(&url, "SELECT count(*) FROM tenant_d4.users_userprofile WHERE updated_at IS NULL").await, 3);
    assert_eq!(count(&url, "SELECT count(*) FROM tenant_audit.heal_log WHERE schema_name = 'tenant_d4'").await, 0);
}

/// Tenant `tenant_a` with `n` profiles pointing at businesses that exist only in the shared schema.
fn many_orphans(n: u32) -> String {
    format!(
        "SELECT pg_temp.create_tenant('tenant_a');
        INSERT INTO public.business_business (id, name)
          SELECT ('c0000000-0000-0000-0000-' || lpad(g::text, 12, '0'))::uuid, 'shared ' || g FROM generate_series(1, {n}) g;
        SET session_replication_role = replica;
        INSERT INTO tenant_a.users_userprofile (user_id, business_id, created_at, modified_at)
          SELECT 1, ('c0000000-0000-0000-0000-' || lpad(g::text, 12, '0'))::uuid, now(), now() FROM generate_series(1, {n}) g;
        RESET session_replication_role;"
    )
}

const COPIED: &str = "SELECT count(*) FROM tenant_a.business_business WHERE id::text LIKE 'c%'";
const LOGGED: &str = "SELECT count(*) FROM tenant_audit.heal_log";

#[tokio::test]
async fn sigkill_leaves_whole_batches_and_a_rerun_completes() {
    let url = heal_db("heal_sigkill", &many_orphans(6000)).await;
    let path = config_file("sigkill", &format!("{HEAL}batch_size = 10\n"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_tenant-audit"))
        .args(["heal", "--config", path.to_str().unwrap(), "--execute"])
        .env("TENANT_AUDIT_DATABASE_URL", &url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let watcher = pg::connect(&url).await;
    loop {
        if watcher.query_one(COPIED, &[]).await.unwrap().get::<_, i64>(0) >= 100 {
            break;
        }
        assert!(Instant::now() < deadline, "heal never got going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let (copied, logged) = (count(&url, COPIED).await, count(&url, LOGGED).await);
    assert!(copied < 6000, "the run finished before the kill; nothing was tested");
    assert_eq!(copied, logged, "every copied row has its audit row and no other");
    assert_eq!(copied % 10, 0, "only whole batches of 10 were committed");

    let out = heal_cli(&url, "sigkill_rerun", "batch_size = 500\n", true);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!((count(&url, COPIED).await, count(&url, LOGGED).await), (6000, 6000));
    let report = scan(&config(&url, HEAL)).await;
    assert_eq!(lines(&report.findings), Vec::<String>::new());
}

#[tokio::test]
async fn only_one_healer_at_a_time() {
    let url = heal_db("heal_one_at_a_time", &many_orphans(3000)).await;
    // A lock held elsewhere: heal stands down without writing.
    let holder = pg::connect(&url).await;
    holder.query_one("SELECT pg_advisory_lock($1)", &[&heal::LOCK_KEY]).await.unwrap();
    let out = heal_cli(&url, "locked_out", "", true);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).lines().last(),
        Some("tenant-audit: another heal holds the heal lock on this database; this run is skipped")
    );
    assert_eq!(count(&url, COPIED).await, 0);
    holder.query_one("SELECT pg_advisory_unlock($1)", &[&heal::LOCK_KEY]).await.unwrap();

    // Two started together: exactly one heals.
    let path = config_file("two_healers", &format!("{HEAL}batch_size = 10\n"));
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
    let mut codes =
        vec![first.wait_with_output().unwrap().status.code(), second.wait_with_output().unwrap().status.code()];
    codes.sort();
    assert_eq!(codes, [Some(0), Some(1)]);
    assert_eq!((count(&url, COPIED).await, count(&url, LOGGED).await), (3000, 3000));
}

#[tokio::test]
async fn heal_refuses_replicas_but_scans_read_them() {
    let primary = pg::Cluster::start();
    pg::connect(&primary.url("postgres")).await.batch_execute("CREATE DATABASE app").await.unwrap();
    pg::connect(&primary.url("app")).await.batch_execute(&format!("{BASE_SQL}\n{TEMPLATE}{DEMO_SQL}")).await.unwrap();
    let standby = primary.standby();
    let replica_url = standby.url("app");
    // Wait until the standby has replayed the fixture.
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio_postgres::connect(&replica_url, tokio_postgres::NoTls).await.is_err()
        || count(&replica_url, "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_zz9'").await == 0
    {
        assert!(Instant::now() < deadline, "the standby never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let out = heal_cli(&replica_url, "replica", "", true);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).lines().last(),
        Some("tenant-audit: error: heal refuses to run against a server in recovery (a replica); point heal.database_url at the primary")
    );

    // Scanning the replica and healing the primary, as docs/heal.md recommends.
    let extra = format!("database_url = {:?}\n", primary.url("app"));
    let out = heal_cli(&replica_url, "replica_scan_primary_heal", &extra, true);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(count(&primary.url("app"), LOGGED).await, 16);
}

#[tokio::test]
async fn heal_without_write_privileges_is_a_clear_error() {
    let url = heal_db("heal_privileges", DEMO_SQL).await;
    let admin = pg::connect(&url).await;
    admin
        .batch_execute(&format!(
            "{}
             DROP ROLE IF EXISTS heal_reader; CREATE ROLE heal_reader LOGIN;
             GRANT pg_read_all_data TO heal_reader;",
            tenant_audit_table_sql()
        ))
        .await
        .unwrap();
    let reader = url.replacen("postgres://postgres@", "postgres://heal_reader@", 1);
    let before = checksum(&url).await;
    let out = heal_cli(&reader, "privileges", "", true);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).lines().last(),
        Some("tenant-audit: error: the heal role lacks a privilege it needs: no INSERT on \"tenant_audit\".\"heal_log\" (see docs/heal.md)")
    );
    assert_eq!(checksum(&url).await, before);
}

/// The audit table as an administrator creates it ahead of time (docs/heal.md).
fn tenant_audit_table_sql() -> &'static str {
    "CREATE SCHEMA tenant_audit;
     CREATE TABLE tenant_audit.heal_log (id bigserial PRIMARY KEY, healed_at timestamptz NOT NULL DEFAULT now(),
       run_id text NOT NULL, schema_name text NOT NULL, table_name text NOT NULL, repair text NOT NULL,
       row_key jsonb NOT NULL, old_value jsonb, new_value jsonb);"
}

/// `POST /scan` enabled, and allowed to heal.
const HEAL_ON_REQUEST: &str = "[web.scan_requests]\nenabled = true\nheal = true\n";

#[tokio::test]
async fn the_daemon_heals_after_each_scan_and_counts_it() {
    let url = heal_db("heal_daemon", DEMO_SQL).await;
    let web = web_auth::web_section("heal_daemon");
    let daemon = start_daemon(config(
        &url,
        &format!("{HEAL}enabled = true\n[serve]\nschedule = '0 0 0 1 1 *'\n{web}{HEAL_ON_REQUEST}"),
    ))
    .await;
    daemon.wait_for("tenant_audit_heal_runs_total{database=\"default\",result=\"success\"} 1").await;
    assert_eq!(
        daemon.samples("tenant_audit_healed_rows_total").await,
        [
            "tenant_audit_healed_rows_total{database=\"default\",repair=\"add_missing_columns\"} 5",
            "tenant_audit_healed_rows_total{database=\"default\",repair=\"advance_sequences\"} 0",
            "tenant_audit_healed_rows_total{database=\"default\",repair=\"backfill_null_timestamps\"} 3",
            "tenant_audit_healed_rows_total{database=\"default\",repair=\"copy_missing_parents\"} 3",
            "tenant_audit_healed_rows_total{database=\"default\",repair=\"undo\"} 0",
        ]
    );
    // The scan that ran before heal is what /metrics shows until the next one.
    assert_eq!(
        daemon.samples("tenant_audit_findings").await[3],
        "tenant_audit_findings{check=\"orphan_rows\",database=\"default\"} 5"
    );
    // Without credentials a request that would heal is refused.
    assert_eq!(daemon.post("/scan").await.0, 401);
    assert_eq!(web_auth::post(&daemon, "/scan").await, 202);
    daemon.wait_for("tenant_audit_heal_runs_total{database=\"default\",result=\"success\"} 2").await;
    assert_eq!(
        daemon.samples("tenant_audit_findings").await[3],
        "tenant_audit_findings{check=\"orphan_rows\",database=\"default\"} 3"
    );
    assert_eq!(daemon.samples("tenant_audit_heal_errors_total").await.iter().filter(|l| !l.ends_with(" 0")).count(), 0);
    assert_eq!(count(&url, LOGGED).await, 16);
    daemon.stop().await;
}
