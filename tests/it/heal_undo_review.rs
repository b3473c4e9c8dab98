//! Heal's and undo's preconditions against real PostgreSQL: every privilege a run needs (what it
//! reads too, on every inheritance child a backfill updates) is checked before anything is
//! written, for `heal --undo` as for heal; read-only commands (`--plan-out`, an undo's plan) work
//! on a hot standby; undo refuses a relation whose `BEFORE` row trigger heal would refuse and
//! compares keys with the built-in equality; a daemon locked out of the heal lease (another shard
//! heals) keeps its scans incremental.

use std::time::{Duration, Instant};

use crate::support::{cli, config, config_file, fixture_db, pg, start_daemon};

/// A tenant with one orphan whose parent the shared schema has (a copy), a NULL `updated_at` in
/// a table and in its inheritance child (a backfill of both).
const SQL: &str = "SELECT pg_temp.create_tenant('tenant_a');
    CREATE TABLE public.shop (id uuid PRIMARY KEY, name text);
    CREATE TABLE tenant_a.shop (id uuid PRIMARY KEY, name text);
    CREATE TABLE tenant_a.refs (id serial PRIMARY KEY, shop_id uuid REFERENCES tenant_a.shop (id));
    INSERT INTO public.shop VALUES ('f0000000-0000-0000-0000-000000000001', 'shop 1');
    SET session_replication_role = replica;
    INSERT INTO tenant_a.refs (shop_id) VALUES ('f0000000-0000-0000-0000-000000000001');
    RESET session_replication_role;
    CREATE TABLE tenant_a.note (id int PRIMARY KEY, created_at timestamptz NOT NULL, updated_at timestamptz);
    CREATE TABLE tenant_a.note_old () INHERITS (tenant_a.note);
    INSERT INTO tenant_a.note VALUES (1, '2026-01-01 00:00:00+00', NULL);
    INSERT INTO tenant_a.note_old VALUES (2, '2025-01-01 00:00:00+00', NULL);";

const HEAL: &str =
    "[tenants]\ninclude = ['^tenant_']\n[heal]\ncopy_missing_parents = true\nbackfill_null_timestamps = true\n";

/// Runs `tenant-audit heal` for the config text `toml` with `args`: (exit code, stdout, stderr).
fn heal(name: &str, toml: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let path = config_file(name, toml);
    let mut all = vec!["heal", "--config", path.to_str().unwrap()];
    all.extend(args);
    let out = cli(&all, &[]);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// The config that scans `url` and heals through `heal_url`.
fn scan_and_heal(url: &str, heal_url: &str, heal: &str) -> String {
    format!("database_url = {url:?}\n{heal}database_url = {heal_url:?}\n")
}

/// `heal --execute` as the superuser: its run id, after checking what it changed.
fn heal_run(url: &str, name: &str) -> String {
    let (code, stdout, stderr) = heal(name, &format!("database_url = {url:?}\n{HEAL}"), &["--execute"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[..2], ["backfill_null_timestamps: 2 change(s)", "copy_missing_parents: 1 change(s)"], "{stdout}");
    let last = lines.last().unwrap().strip_prefix("heal run ").unwrap();
    last.split(':').next().unwrap().to_string()
}

async fn rows(url: &str, sql: &str) -> Vec<String> {
    let client = pg::connect(url).await;
    client.query(sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

/// The tenant's rows and heal's own tables, as text: what "nothing written" compares.
const STATE: &str = "SELECT format('shop %s', (SELECT count(*) FROM tenant_a.shop))
    UNION ALL SELECT format('note %s %s', id, updated_at AT TIME ZONE 'UTC') FROM (SELECT * FROM tenant_a.note ORDER BY id) n
    UNION ALL SELECT format('heal_log %s', (SELECT count(*) FROM tenant_audit.heal_log))
    UNION ALL SELECT format('heal_lease %s', (SELECT count(*) FROM tenant_audit.heal_lease))";

/// The last line of stderr.
fn error_line(stderr: &str) -> &str {
    stderr.lines().last().unwrap_or_default()
}

/// A login role (created once per cluster) with heal's grants on its own tables and `grants`,
/// and the URL that connects to this database as it.
async fn role(url: &str, name: &str, grants: &str) -> String {
    let sql = format!(
        "DO $$ BEGIN CREATE ROLE {name} LOGIN; EXCEPTION WHEN duplicate_object THEN END $$;
         GRANT USAGE ON SCHEMA public, tenant_a, tenant_audit TO {name};
         GRANT SELECT, INSERT ON tenant_audit.heal_log TO {name};
         GRANT USAGE ON SEQUENCE tenant_audit.heal_log_id_seq TO {name};
         GRANT SELECT, INSERT, UPDATE, DELETE ON tenant_audit.heal_lease TO {name};
         {grants}"
    );
    pg::connect(url).await.batch_execute(&sql).await.unwrap();
    url.replacen("postgres://postgres@", &format!("postgres://{name}@"), 1)
}

/// Creates the audit and lease tables the way a first run does (a run with nothing to do).
fn create_heal_tables(url: &str, name: &str) {
    let toml = format!("database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\n[heal]\nadvance_sequences = true\n");
    let (code, stdout, stderr) = heal(name, &toml, &["--execute"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
}

#[tokio::test]
async fn heal_checks_what_it_reads_and_every_child_it_updates_before_writing() {
    let url = fixture_db("undo_review_reads", SQL).await;
    create_heal_tables(&url, "undo_review_reads_setup");
    let role_url = role(
        &url,
        "undo_review_reader",
        "GRANT SELECT, INSERT ON tenant_a.shop TO undo_review_reader;
         GRANT SELECT, UPDATE ON tenant_a.refs TO undo_review_reader;
         GRANT SELECT, UPDATE ON tenant_a.note TO undo_review_reader;",
    )
    .await;
    let before = rows(&url, STATE).await;
    assert_eq!(before, ["shop 0", "note 1 ", "note 2 ", "heal_log 0", "heal_lease 0"]);
    let toml = scan_and_heal(&url, &role_url, HEAL);

    // The copy reads the shared parent: no SELECT there is the error, before anything is written.
    let (code, _, stderr) = heal("undo_review_reads_shared", &toml, &["--execute"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(
        error_line(&stderr),
        "tenant-audit: error: the heal role lacks a privilege it needs: no SELECT on \"public\".\"shop\" (see docs/heal.md)"
    );
    assert_eq!(rows(&url, STATE).await, before);

    // The backfill updates the inheritance child by name: the parent's grants do not cover it.
    pg::connect(&url).await.batch_execute("GRANT SELECT ON public.shop TO undo_review_reader").await.unwrap();
    let (code, _, stderr) = heal("undo_review_reads_child", &toml, &["--execute"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(
        error_line(&stderr),
        "tenant-audit: error: the heal role lacks a privilege it needs: no SELECT on \"tenant_a\".\"note_old\" (see docs/heal.md)"
    );
    assert_eq!(rows(&url, STATE).await, before);

    pg::connect(&url)
        .await
        .batch_execute("GRANT SELECT, UPDATE ON tenant_a.note_old TO undo_review_reader")
        .await
        .unwrap();
    let (code, stdout, stderr) = heal("undo_review_reads_granted", &toml, &["--execute"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(
        rows(&url, STATE).await,
        ["shop 1", "note 1 2026-01-01 00:00:00", "note 2 2025-01-01 00:00:00", "heal_log 3", "heal_lease 0"]
    );
}

#[tokio::test]
async fn undo_checks_its_privileges_before_writing() {
    let url = fixture_db("undo_review_privileges", SQL).await;
    let run = heal_run(&url, "undo_review_privileges_heal");
    // The application deleted the orphan: the copied shop is free to be undone.
    pg::connect(&url).await.batch_execute("DELETE FROM tenant_a.refs").await.unwrap();
    let before = rows(&url, STATE).await;
    assert_eq!(
        before,
        ["shop 1", "note 1 2026-01-01 00:00:00", "note 2 2025-01-01 00:00:00", "heal_log 3", "heal_lease 0"]
    );

    // No SELECT on the audit table: even the plan says so, and which privilege.
    let blind = role(&url, "undo_review_blind", "REVOKE SELECT ON tenant_audit.heal_log FROM undo_review_blind;").await;
    let toml = format!("database_url = {blind:?}\n{HEAL}");
    for args in [&["--undo", run.as_str()][..], &["--undo", run.as_str(), "--execute"][..]] {
        let (code, stdout, stderr) = heal("undo_review_blind", &toml, args);
        assert_eq!((code, stdout.as_str()), (Some(2), ""), "{stderr}");
        assert_eq!(
            error_line(&stderr),
            "tenant-audit: error: the heal role lacks a privilege it needs: no SELECT on \"tenant_audit\".\"heal_log\" (see docs/heal.md)"
        );
    }

    // No DELETE on the copied table: refused before the backfill's undo (which comes first) is
    // written.
    let undoer = role(
        &url,
        "undo_review_undoer",
        "GRANT SELECT ON ALL TABLES IN SCHEMA tenant_a TO undo_review_undoer;
         GRANT UPDATE ON tenant_a.shop, tenant_a.note, tenant_a.note_old TO undo_review_undoer;",
    )
    .await;
    let toml = format!("database_url = {undoer:?}\n{HEAL}");
    let (code, stdout, stderr) = heal("undo_review_undoer", &toml, &["--undo", &run, "--execute"]);
    assert_eq!((code, stdout.as_str()), (Some(2), ""), "{stderr}");
    assert_eq!(
        error_line(&stderr),
        "tenant-audit: error: the heal role lacks a privilege it needs: no DELETE on \"tenant_a\".\"shop\" (see docs/heal.md)"
    );
    assert_eq!(rows(&url, STATE).await, before);

    pg::connect(&url).await.batch_execute("GRANT DELETE ON tenant_a.shop TO undo_review_undoer").await.unwrap();
    let (code, stdout, stderr) = heal("undo_review_undoer_granted", &toml, &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("undo: 3 change(s)\n"), "{stdout}");
    assert_eq!(rows(&url, STATE).await, ["shop 0", "note 1 ", "note 2 ", "heal_log 6", "heal_lease 0"]);

    // A database heal never wrote to has no audit table: said so, not a raw error.
    let empty = fixture_db("undo_review_no_audit_table", "SELECT pg_temp.create_tenant('tenant_a');").await;
    let (code, _, stderr) =
        heal("undo_review_no_audit_table", &format!("database_url = {empty:?}\n"), &["--undo", &run]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(
        error_line(&stderr),
        "tenant-audit: error: there is no audit table tenant_audit.heal_log in this database: no heal run has written to it, so there is nothing to undo"
    );
}

#[tokio::test]
async fn undo_refuses_a_relation_whose_before_row_trigger_is_not_allowed() {
    let url = fixture_db("undo_review_triggers", SQL).await;
    let run = heal_run(&url, "undo_review_triggers_heal");
    // Since the run: the orphan is gone, and the tables got triggers that would keep the copied
    // row (RETURN NULL) and run on the reset.
    pg::connect(&url)
        .await
        .batch_execute(
            "DELETE FROM tenant_a.refs;
             CREATE FUNCTION tenant_a.keep() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
             CREATE FUNCTION tenant_a.pass() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
             CREATE TRIGGER keep BEFORE DELETE ON tenant_a.shop FOR EACH ROW EXECUTE FUNCTION tenant_a.keep();
             CREATE TRIGGER pass BEFORE UPDATE ON tenant_a.note_old FOR EACH ROW EXECUTE FUNCTION tenant_a.pass();",
        )
        .await
        .unwrap();
    let before = rows(&url, STATE).await;
    let toml = format!("database_url = {url:?}\n{HEAL}");
    let (code, stdout, stderr) = heal("undo_review_triggers_refused", &toml, &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    let refusal = "can change or suppress the rows heal writes (heal's audit and undo would not match them); allow each with heal.allow_triggers = [{ table = ..., trigger = ... }]";
    assert_eq!(
        lines[..3],
        [
            "undo: 1 change(s)".to_string(),
            format!("set aside tenant_a.note: undo: BEFORE UPDATE trigger(s) note_old.pass {refusal}"),
            format!("set aside tenant_a.shop: undo: BEFORE DELETE trigger(s) shop.keep {refusal}"),
        ],
        "{stdout}"
    );
    assert_eq!(lines.len(), 4, "{stdout}");
    // Only the row of the relation without a trigger (tenant_a.note itself) was reset.
    assert_eq!(
        rows(&url, STATE).await,
        ["shop 1", "note 1 ", "note 2 2025-01-01 00:00:00", "heal_log 4", "heal_lease 0"]
    );
    assert_ne!(rows(&url, STATE).await, before);

    // Allowed by name, the undo goes on; the DELETE trigger still keeps its row, which is then
    // not audited as undone.
    let allowed = format!(
        "{toml}allow_triggers = [{{ table = \"note\", trigger = \"pass\" }}, {{ table = \"shop\", trigger = \"keep\" }}]\n"
    );
    let (code, stdout, stderr) = heal("undo_review_triggers_allowed", &allowed, &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "undo: 1 change(s)", "{stdout}");
    assert_eq!(
        lines[2..],
        ["left (still referenced): tenant_a.shop {\"id\": \"f0000000-0000-0000-0000-000000000001\"}"],
        "{stdout}"
    );
    assert_eq!(rows(&url, STATE).await, ["shop 1", "note 1 ", "note 2 ", "heal_log 5", "heal_lease 0"]);
}

/// Waits (60 s at most) until the standby has replayed everything the primary wrote so far.
async fn caught_up(primary: &str, standby: &str) {
    let (primary, standby) = (pg::connect(primary).await, pg::connect(standby).await);
    let lsn: String = primary.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let replayed = "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn";
    while !standby.query_one(replayed, &[&lsn]).await.unwrap().get::<_, bool>(0) {
        assert!(Instant::now() < deadline, "the standby never replayed {lsn}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `text` without its first line (which names the database).
fn after_first_line(text: &str) -> &str {
    text.split_once('\n').map_or("", |(_, rest)| rest)
}

#[tokio::test]
async fn plans_and_undo_plans_are_made_on_a_standby() {
    let primary = pg::Cluster::start();
    pg::connect(&primary.url("postgres")).await.batch_execute("CREATE DATABASE app").await.unwrap();
    let (app, dir) = (primary.url("app"), std::env::temp_dir());
    pg::connect(&app).await.batch_execute(&format!("{}\n{SQL}", crate::support::BASE_SQL)).await.unwrap();
    let replica = primary.standby();
    let standby = replica.url("app");
    caught_up(&app, &standby).await;
    let on = |url: &str| format!("database_url = {url:?}\n{HEAL}");

    // --plan-out reads only: the standby's plan is the primary's; --apply without --execute
    // prints it there too.
    let (mut plans, mut printed) = (Vec::new(), Vec::new());
    for (url, name) in [(&app, "primary"), (&standby, "standby")] {
        let file = dir.join(format!("tenant-audit-it-{}-undo-review-{name}.json", std::process::id()));
        let file = file.to_str().unwrap();
        let (code, stdout, stderr) = heal(&format!("undo_review_plan_{name}"), &on(url), &["--plan-out", file]);
        let expected = format!(
            "wrote the plan for 1 tenant(s) to {file}\n\
             left out of the plan: backfill_null_timestamps on tenant_a.note_old: {}\n",
            tenant_audit::heal::planfile::NO_PRIMARY_KEY
        );
        assert_eq!((code, stdout), (Some(0), expected), "{stderr}");
        let document: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        plans.push(document["plan"].clone());
        let (code, stdout, stderr) = heal(&format!("undo_review_apply_{name}"), &on(url), &["--apply", file]);
        assert_eq!(code, Some(0), "{stderr}");
        printed.push(after_first_line(&stdout).to_string());
    }
    assert_eq!(plans[0], plans[1]);
    assert_eq!(printed[0], printed[1]);
    assert!(printed[1].contains("\n-- copy_missing_parents on tenant_a.refs: "), "{}", printed[1]);
    assert_eq!(plans[1]["tenants"][0]["actions"].as_array().unwrap().len(), 2);

    let run = heal_run(&app, "undo_review_standby_heal");
    caught_up(&app, &standby).await;
    let (code, on_primary, stderr) = heal("undo_review_standby_undo_primary", &on(&app), &["--undo", &run]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, on_standby, stderr) = heal("undo_review_standby_undo", &on(&standby), &["--undo", &run]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(on_standby.starts_with("-- heal plan for "), "{on_standby}");
    assert_eq!(after_first_line(&on_standby), after_first_line(&on_primary));
    assert_eq!(on_standby.matches("\n-- undo on ").count(), 3, "{on_standby}");

    // Executing it there is refused, with what to do instead.
    let (code, stdout, stderr) = heal("undo_review_standby_execute", &on(&standby), &["--undo", &run, "--execute"]);
    assert_eq!((code, stdout.as_str()), (Some(2), ""), "{stderr}");
    assert_eq!(
        error_line(&stderr),
        "tenant-audit: error: heal refuses to run against a server in recovery (a replica); point heal.database_url at the primary"
    );
}

/// A tenant whose key is its own domain, with its own `=` for it that matches every row.
const TENANT_OPERATOR_SQL: &str = "SELECT pg_temp.create_tenant('tenant_a');
    CREATE DOMAIN tenant_a.note_id AS uuid;
    CREATE FUNCTION tenant_a.always(tenant_a.note_id, tenant_a.note_id) RETURNS bool LANGUAGE sql AS 'SELECT true';
    CREATE OPERATOR tenant_a.= (LEFTARG = tenant_a.note_id, RIGHTARG = tenant_a.note_id, FUNCTION = tenant_a.always);
    CREATE TABLE tenant_a.note (id tenant_a.note_id PRIMARY KEY, created_at timestamptz NOT NULL, updated_at timestamptz);
    INSERT INTO tenant_a.note VALUES
      ('a0000000-0000-0000-0000-000000000001', '2026-01-01 00:00:00+00', NULL),
      ('a0000000-0000-0000-0000-000000000002', '2026-01-01 00:00:00+00', '2026-01-01 00:00:00+00');";

#[tokio::test]
async fn undo_compares_keys_with_the_built_in_equality_not_a_tenant_operator() {
    let url = fixture_db("undo_review_operator", TENANT_OPERATOR_SQL).await;
    let toml = format!("database_url = {url:?}\n{HEAL}");
    let (code, stdout, stderr) = heal("undo_review_operator_heal", &toml, &["--execute"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("backfill_null_timestamps: 1 change(s)\n"), "{stdout}");
    let run = stdout.lines().last().unwrap().strip_prefix("heal run ").unwrap().split(':').next().unwrap().to_string();

    let (code, stdout, stderr) = heal("undo_review_operator_undo", &toml, &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("undo: 1 change(s)\n"), "{stdout}");
    // Only the row heal wrote is reset: the application's row 2 of the same value keeps it.
    let notes = "SELECT format('%s %s', id, updated_at AT TIME ZONE 'UTC') FROM tenant_a.note ORDER BY id::uuid";
    assert_eq!(
        rows(&url, notes).await,
        ["a0000000-0000-0000-0000-000000000001 ", "a0000000-0000-0000-0000-000000000002 2026-01-01 00:00:00"]
    );
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_audit.heal_log WHERE repair = 'undo'").await, ["1"]);
}

#[tokio::test]
async fn a_daemon_locked_out_of_the_heal_lease_keeps_its_scans_incremental() {
    let url = fixture_db("undo_review_locked_out", SQL).await;
    create_heal_tables(&url, "undo_review_locked_out_setup");
    // Another healer (a shard of the same database, a manual run) holds the lock all along.
    let holder = pg::connect(&url).await;
    holder.query_one("SELECT pg_advisory_lock($1)", &[&tenant_audit::heal::LOCK_KEY]).await.unwrap();
    let extra = format!("{HEAL}enabled = true\n[serve]\nschedule = '* * * * * *'\n");
    let daemon = start_daemon(config(&url, &extra)).await;
    daemon.wait_for("tenant_audit_heal_runs_total{database=\"default\",result=\"locked_out\"} 2").await;
    // Standing down wrote nothing: the scan after it is incremental, not forced full.
    daemon.wait_for("tenant_audit_scans_completed_total{database=\"default\",scan_kind=\"incremental\"} 1").await;
    assert_eq!(
        daemon.samples("tenant_audit_scans_completed_total").await[0],
        "tenant_audit_scans_completed_total{database=\"default\",scan_kind=\"full\"} 1"
    );
    daemon.stop().await;
    assert_eq!(rows(&url, STATE).await, ["shop 0", "note 1 ", "note 2 ", "heal_log 0", "heal_lease 0"]);
}
