//! `heal --undo RUN_ID` against real PostgreSQL: backfills undone give back the pre-heal
//! checksum; copied rows any row references are left, and no `ON DELETE` action ever fires;
//! rows the application changed since are left and listed; a backfill on an inheritance parent
//! undoes only the row heal wrote, once; undo pages through the run in short transactions with
//! index scans.

use std::collections::BTreeMap;

use crate::support::{checksum, cli, config_file, fixture_db, pg, DEMO_SQL};

const COPY_AND_BACKFILL: &str =
    "[tenants]\ninclude = ['^tenant_']\n[heal]\ncopy_missing_parents = true\nbackfill_null_timestamps = true\n";

/// The checksum of everything but heal's own schema (its audit and lease tables).
async fn data_checksum(url: &str) -> BTreeMap<String, String> {
    let mut sum = checksum(url).await;
    sum.retain(|k, _| !k.starts_with("tenant_audit.") && k != "(columns)");
    let columns = "SELECT md5(string_agg(format('%s.%s.%s %s %s %s', table_schema, table_name, column_name,
                     data_type, is_nullable, column_default), '|' ORDER BY table_schema, table_name, column_name))
                   FROM information_schema.columns WHERE table_schema NOT IN ('pg_catalog', 'information_schema', 'tenant_audit')";
    let value: String = pg::connect(url).await.query_one(columns, &[]).await.unwrap().get(0);
    sum.insert("(columns)".into(), value);
    sum
}

/// Runs `heal` with `args` and returns (exit code, stdout).
fn heal(url: &str, name: &str, args: &[&str]) -> (Option<i32>, String) {
    let (code, stdout, stderr) = heal_with(url, name, COPY_AND_BACKFILL, args);
    assert!(code != Some(2), "{stderr}");
    (code, stdout)
}

/// Runs `heal` with the config `toml` (after the URL line) and `args`: (exit code, stdout, stderr).
fn heal_with(url: &str, name: &str, toml: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let path = config_file(name, &format!("database_url = {url:?}\n{toml}"));
    let mut all = vec!["heal", "--config", path.to_str().unwrap()];
    all.extend(args);
    let out = cli(&all, &[]);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// The run id `heal --execute` printed last.
fn run_id(stdout: &str) -> String {
    let last = stdout.lines().last().unwrap();
    last.strip_prefix("heal run ").unwrap().split(':').next().unwrap().to_string()
}

async fn rows(url: &str, sql: &str) -> Vec<String> {
    let client = pg::connect(url).await;
    client.query(sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

/// Heals the demo's copies and backfills; returns the run id.
fn heal_run(url: &str, name: &str) -> String {
    let (code, stdout) = heal(url, name, &["--execute"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.starts_with("backfill_null_timestamps: 3 change(s)\ncopy_missing_parents: 3 change(s)\n"),
        "{stdout}"
    );
    run_id(&stdout)
}

/// The copied businesses: the orphans they were copied for still reference them.
const LEFT_COPIES: [&str; 3] = [
    "left (still referenced): tenant_c3.business_business {\"id\": \"b0000000-0000-0000-0000-000000000002\"}",
    "left (still referenced): tenant_c3.business_business {\"id\": \"b0000000-0000-0000-0000-000000000003\"}",
    "left (still referenced): tenant_d4.business_business {\"id\": \"b0000000-0000-0000-0000-000000000004\"}",
];

#[tokio::test]
async fn undo_restores_the_pre_heal_checksum_when_nothing_changed_since() {
    let url = fixture_db("heal_undo_clean", DEMO_SQL).await;
    let before = data_checksum(&url).await;
    let run = heal_run(&url, "heal_undo_clean");
    assert_ne!(data_checksum(&url).await, before);

    // Without --execute: the plan, and nothing written.
    let (code, plan) = heal(&url, "heal_undo_clean_plan", &["--undo", &run]);
    assert_eq!(code, Some(0));
    assert!(
        plan.contains(
            "-- undo on tenant_c3.business_business: delete the copied rows (2 audited) that still hold what heal wrote and that no row references (2 relationship(s) checked)\n"
        ),
        "{plan}"
    );
    assert!(plan.contains("-- undo on tenant_d4.users_userprofile: set 3 updated_at value(s) back to NULL where they still hold what heal wrote\n"), "{plan}");
    assert_ne!(data_checksum(&url).await, before);

    let (code, stdout) = heal(&url, "heal_undo_clean_execute", &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(1), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "undo: 3 change(s)");
    assert_eq!(lines[2..], LEFT_COPIES);
    // Everything but the copies the orphans still reference is as before the heal.
    let outside = |mut sum: BTreeMap<String, String>| {
        sum.retain(|k, _| !k.ends_with(".business_business"));
        sum
    };
    assert_eq!(outside(data_checksum(&url).await), outside(before.clone()));
    // Once the application deleted the orphans, the copies are undone: the pre-heal contents
    // but for those orphans.
    pg::connect(&url)
        .await
        .batch_execute(
            "DELETE FROM tenant_c3.users_userprofile WHERE user_id IN (3, 4);
             DELETE FROM tenant_d4.users_businessdetails WHERE business_type = 'shared only';",
        )
        .await
        .unwrap();
    let (code, stdout) = heal(&url, "heal_undo_clean_after", &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.starts_with("undo: 3 change(s)\n"), "{stdout}");
    let sum = data_checksum(&url).await;
    for table in ["tenant_c3.business_business", "tenant_d4.business_business"] {
        assert_eq!(sum[table], before[table], "{table}");
    }
    // Undone once: a second undo changes nothing and writes no audit row.
    let audit_rows = rows(&url, "SELECT count(*)::text FROM tenant_audit.heal_log").await;
    let (code, stdout) = heal(&url, "heal_undo_clean_again", &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.starts_with("undo: 0 change(s)\n"), "{stdout}");
    assert_eq!(data_checksum(&url).await, sum);
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_audit.heal_log").await, audit_rows);
}

#[tokio::test]
async fn undo_leaves_and_lists_the_rows_the_application_changed() {
    let url = fixture_db("heal_undo_changed", DEMO_SQL).await;
    let run = heal_run(&url, "heal_undo_changed");
    pg::connect(&url)
        .await
        .batch_execute(
            "UPDATE tenant_c3.business_business SET name = 'renamed by the application' WHERE id = 'b0000000-0000-0000-0000-000000000002';
             UPDATE tenant_d4.users_userprofile SET updated_at = '2000-01-01' WHERE id = 3;",
        )
        .await
        .unwrap();
    let (code, stdout) = heal(&url, "heal_undo_changed_execute", &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(1), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "undo: 2 change(s)");
    assert_eq!(
        lines[2..],
        [
            "left (changed since the run): tenant_c3.business_business {\"id\": \"b0000000-0000-0000-0000-000000000002\"}",
            LEFT_COPIES[1],
            LEFT_COPIES[2],
            "left (changed since the run): tenant_d4.users_userprofile {\"id\": 3}",
        ]
    );
    let client = pg::connect(&url).await;
    let names: Vec<String> = client
        .query("SELECT name FROM tenant_c3.business_business ORDER BY name", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, ["own business", "renamed by the application", "shared business 3"]);
    let nulls: Vec<String> = client
        .query("SELECT format('%s %s', id, coalesce(updated_at::text, 'NULL')) FROM tenant_d4.users_userprofile WHERE id IN (2, 3, 4) ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(nulls, ["2 NULL", "3 2000-01-01 00:00:00+00", "4 NULL"]);
}

/// The orphans of the review: profiles pointing at shared businesses 2 and 3, behind a `NOT VALID`
/// foreign key `ON DELETE CASCADE` (tenant_a) and `ON DELETE SET NULL` (tenant_b); tenant_c has no
/// constraint, only the configured relationship.
const REFERENCED_SQL: &str = "SELECT pg_temp.create_tenant('tenant_a');
    SELECT pg_temp.create_tenant('tenant_b');
    SELECT pg_temp.create_tenant('tenant_c');
    ALTER TABLE tenant_a.users_userprofile DROP CONSTRAINT users_userprofile_business_id_fk;
    ALTER TABLE tenant_b.users_userprofile DROP CONSTRAINT users_userprofile_business_id_fk;
    ALTER TABLE tenant_c.users_userprofile DROP CONSTRAINT users_userprofile_business_id_fk;
    INSERT INTO tenant_a.users_userprofile (user_id, business_id, created_at, modified_at) VALUES
      (2, 'b0000000-0000-0000-0000-000000000002', now(), now()),
      (3, 'b0000000-0000-0000-0000-000000000002', now(), now()),
      (4, 'b0000000-0000-0000-0000-000000000003', now(), now());
    INSERT INTO tenant_b.users_userprofile (user_id, business_id, created_at, modified_at)
      SELECT user_id, business_id, created_at, modified_at FROM tenant_a.users_userprofile WHERE id > 1 ORDER BY id;
    INSERT INTO tenant_c.users_userprofile (user_id, business_id, created_at, modified_at) VALUES
      (2, 'b0000000-0000-0000-0000-000000000002', now(), now());
    ALTER TABLE tenant_a.users_userprofile ADD CONSTRAINT users_userprofile_business_id_fk
      FOREIGN KEY (business_id) REFERENCES tenant_a.business_business(id) ON DELETE CASCADE NOT VALID;
    ALTER TABLE tenant_b.users_userprofile ADD CONSTRAINT users_userprofile_business_id_fk
      FOREIGN KEY (business_id) REFERENCES tenant_b.business_business(id) ON DELETE SET NULL NOT VALID;";

const COPY_WITH_RELATIONSHIP: &str = "[tenants]\ninclude = ['^tenant_']\n[heal]\ncopy_missing_parents = true\n[[checks.relationships]]\ntable = 'users_userprofile'\ncolumns = ['business_id']\nparent_table = 'business_business'\nparent_columns = ['id']\n";

/// Every profile of the three tenants, as text.
async fn profiles(url: &str) -> Vec<String> {
    rows(url, "SELECT format('%s %s', tableoid::regclass, t::text) FROM (SELECT tableoid, * FROM tenant_a.users_userprofile UNION ALL SELECT tableoid, * FROM tenant_b.users_userprofile UNION ALL SELECT tableoid, * FROM tenant_c.users_userprofile) t ORDER BY 1").await
}

#[tokio::test]
async fn undo_leaves_every_copied_row_a_row_references_and_fires_no_on_delete_action() {
    let url = fixture_db("heal_undo_referenced", REFERENCED_SQL).await;
    let before = profiles(&url).await;
    assert_eq!(before.len(), 10);
    let (code, stdout, stderr) = heal_with(&url, "heal_undo_referenced", COPY_WITH_RELATIONSHIP, &["--execute"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("copy_missing_parents: 5 change(s)\n"), "{stdout}");
    let run = run_id(&stdout);
    // The application then adds a profile for the business copied into tenant_c (no constraint).
    pg::connect(&url)
        .await
        .batch_execute("INSERT INTO tenant_c.users_userprofile (id, user_id, business_id, created_at, modified_at) VALUES (50, 5, 'b0000000-0000-0000-0000-000000000002', '2026-01-01', '2026-01-01')")
        .await
        .unwrap();
    let before_undo = profiles(&url).await;
    let (code, stdout, stderr) =
        heal_with(&url, "heal_undo_referenced_undo", COPY_WITH_RELATIONSHIP, &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "undo: 0 change(s)");
    let left = |tenant: &str, n: u8| {
        format!("left (still referenced): {tenant}.business_business {{\"id\": \"b0000000-0000-0000-0000-00000000000{n}\"}}")
    };
    assert_eq!(
        lines[2..],
        [left("tenant_a", 2), left("tenant_a", 3), left("tenant_b", 2), left("tenant_b", 3), left("tenant_c", 2)]
    );
    // Every profile is as it was: none deleted by a cascade, none set to NULL.
    assert_eq!(profiles(&url).await, before_undo);
    assert_eq!(before_undo[..10], before[..]);
    assert_eq!(
        rows(
            &url,
            "SELECT format('%s %s', schema_name, count(*)) FROM tenant_audit.heal_log GROUP BY schema_name ORDER BY 1"
        )
        .await,
        ["tenant_a 2", "tenant_b 2", "tenant_c 1"]
    );
    // Once nothing references them (the application re-pointed its profiles), they are undone,
    // and still nothing cascades.
    pg::connect(&url)
        .await
        .batch_execute(
            "UPDATE tenant_a.users_userprofile SET business_id = 'b0000000-0000-0000-0000-000000000001' WHERE business_id <> 'b0000000-0000-0000-0000-000000000001';
             UPDATE tenant_b.users_userprofile SET business_id = 'b0000000-0000-0000-0000-000000000001' WHERE business_id = 'b0000000-0000-0000-0000-000000000003';",
        )
        .await
        .unwrap();
    let repointed = profiles(&url).await;
    let (code, stdout, stderr) =
        heal_with(&url, "heal_undo_referenced_again", COPY_WITH_RELATIONSHIP, &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "undo: 3 change(s)");
    assert_eq!(lines[2..], [left("tenant_b", 2), left("tenant_c", 2)]);
    assert_eq!(profiles(&url).await, repointed);
    assert_eq!(
        rows(&url, "SELECT format('%s %s', table_schema, string_agg(right(id::text, 1), ',' ORDER BY id)) FROM (SELECT 'tenant_a' AS table_schema, id FROM tenant_a.business_business UNION ALL SELECT 'tenant_b', id FROM tenant_b.business_business UNION ALL SELECT 'tenant_c', id FROM tenant_c.business_business) b GROUP BY table_schema ORDER BY 1").await,
        ["tenant_a 1", "tenant_b 1,2", "tenant_c 1,2"]
    );
}

/// The review's inheritance case: the parent's row 1 backfilled, the archive's row 1 (same key)
/// set by the application.
const INHERITANCE_SQL: &str = "SELECT pg_temp.create_tenant('tenant_a');
    CREATE TABLE tenant_a.note (id int PRIMARY KEY, body text, created_at timestamptz NOT NULL, updated_at timestamptz);
    CREATE TABLE tenant_a.note_archive (PRIMARY KEY (id)) INHERITS (tenant_a.note);
    INSERT INTO tenant_a.note VALUES (1, 'live note', '2026-01-01 00:00+00', NULL);
    INSERT INTO tenant_a.note_archive VALUES (1, 'archived note, edited once', '2026-01-01 00:00+00', '2026-01-01 00:00+00');";

const BACKFILL: &str = "[tenants]\ninclude = ['^tenant_']\n[heal]\nbackfill_null_timestamps = true\n";

async fn notes(url: &str) -> Vec<String> {
    rows(url, "SELECT format('%s %s %s', tableoid::regclass, id, coalesce(updated_at::text, 'NULL')) FROM tenant_a.note ORDER BY 1").await
}

#[tokio::test]
async fn undo_of_a_backfill_on_an_inheritance_parent_resets_only_the_row_heal_wrote_once() {
    let url = fixture_db("heal_undo_inheritance", INHERITANCE_SQL).await;
    let (code, stdout, stderr) = heal_with(&url, "heal_undo_inheritance", BACKFILL, &["--execute"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("backfill_null_timestamps: 1 change(s)\n"), "{stdout}");
    let run = run_id(&stdout);
    // The audit key names the relation: primary keys are unique within one relation only.
    assert_eq!(
        rows(&url, "SELECT row_key::text FROM tenant_audit.heal_log").await,
        ["{\"id\": 1, \"relation\": \"tenant_a.note\"}"]
    );
    assert_eq!(
        notes(&url).await,
        ["tenant_a.note 1 2026-01-01 00:00:00+00", "tenant_a.note_archive 1 2026-01-01 00:00:00+00"]
    );
    let (code, plan, _) = heal_with(&url, "heal_undo_inheritance_plan", BACKFILL, &["--undo", &run]);
    assert_eq!(code, Some(0));
    assert!(plan.contains("UPDATE ONLY \"tenant_a\".\"note\" c SET \"updated_at\" = NULL FROM x\n"), "{plan}");
    let (code, stdout, stderr) =
        heal_with(&url, "heal_undo_inheritance_undo", BACKFILL, &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("undo: 1 change(s)\n"), "{stdout}");
    assert_eq!(notes(&url).await, ["tenant_a.note 1 NULL", "tenant_a.note_archive 1 2026-01-01 00:00:00+00"]);
    assert_eq!(
        rows(&url, "SELECT format('%s %s', repair, old_value) FROM tenant_audit.heal_log ORDER BY id").await,
        ["backfill_null_timestamps {\"updated_at\": null}", "undo {\"undoes\": 1}"]
    );
    // A second undo of the run changes nothing and writes no audit row.
    let (code, stdout, stderr) =
        heal_with(&url, "heal_undo_inheritance_again", BACKFILL, &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("undo: 0 change(s)\n"), "{stdout}");
    assert_eq!(notes(&url).await, ["tenant_a.note 1 NULL", "tenant_a.note_archive 1 2026-01-01 00:00:00+00"]);
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_audit.heal_log").await, ["2"]);
}

#[tokio::test]
async fn undo_reads_backfill_keys_of_earlier_versions_and_refuses_them_on_an_inheritance_parent() {
    let sql = format!(
        "{INHERITANCE_SQL}
        CREATE TABLE tenant_a.memo (id int PRIMARY KEY, updated_at timestamptz);
        INSERT INTO tenant_a.memo VALUES (1, '2026-01-01 00:00+00'), (2, '2026-01-01 00:00+00');
        UPDATE tenant_a.note SET updated_at = '2026-01-01 00:00+00';
        CREATE SCHEMA tenant_audit;
        CREATE TABLE tenant_audit.heal_log (id bigserial PRIMARY KEY, healed_at timestamptz NOT NULL DEFAULT now(),
          run_id text NOT NULL, schema_name text NOT NULL, table_name text NOT NULL, repair text NOT NULL,
          row_key jsonb NOT NULL, old_value jsonb, new_value jsonb);
        INSERT INTO tenant_audit.heal_log (run_id, schema_name, table_name, repair, row_key, old_value, new_value)
        SELECT 'old-run', 'tenant_a', t, 'backfill_null_timestamps', jsonb_build_object('id', 1),
          '{{\"updated_at\": null}}', '{{\"updated_at\": \"2026-01-01T00:00:00+00:00\"}}' FROM unnest(ARRAY['memo', 'note']) t;"
    );
    let url = fixture_db("heal_undo_old_keys", &sql).await;
    let (code, stdout, stderr) = heal_with(&url, "heal_undo_old_keys", BACKFILL, &["--undo", "old-run", "--execute"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "undo: 1 change(s)",
            stdout.lines().nth(1).unwrap(),
            "not undone: tenant_a.note: 1 backfill_null_timestamps change(s) not undone: audited by an earlier version, whose key does not name the relation, and the table has inheritance children whose rows can share its primary key values",
        ]
    );
    assert_eq!(
        rows(&url, "SELECT format('%s %s', id, coalesce(updated_at::text, 'NULL')) FROM tenant_a.memo ORDER BY id")
            .await,
        ["1 NULL", "2 2026-01-01 00:00:00+00"]
    );
    assert_eq!(
        notes(&url).await,
        ["tenant_a.note 1 2026-01-01 00:00:00+00", "tenant_a.note_archive 1 2026-01-01 00:00:00+00"]
    );
    // The audit table of the earlier version got the indexes undo reads it by.
    assert_eq!(
        rows(&url, "SELECT indexname::text FROM pg_indexes WHERE tablename = 'heal_log' ORDER BY 1").await,
        ["heal_log_backfill_progress", "heal_log_pkey", "heal_log_run_table", "heal_log_undoes"]
    );
}

#[tokio::test]
async fn a_failed_undo_statement_is_a_failure_not_left_rows() {
    let url = fixture_db("heal_undo_failed", INHERITANCE_SQL).await;
    let (code, stdout, stderr) = heal_with(&url, "heal_undo_failed", BACKFILL, &["--execute"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let run = run_id(&stdout);
    pg::connect(&url)
        .await
        .batch_execute(
            "CREATE FUNCTION tenant_a.refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'refused by the application'; END $$;
             CREATE TRIGGER refuse BEFORE UPDATE ON tenant_a.note FOR EACH ROW EXECUTE FUNCTION tenant_a.refuse();",
        )
        .await
        .unwrap();
    // Allowed, so that the undo's statement runs and fails (a refused trigger is not undone at all).
    let allowed = format!("{BACKFILL}allow_triggers = [{{ table = \"note\", trigger = \"refuse\" }}]\n");
    let (code, stdout, stderr) = heal_with(&url, "heal_undo_failed_undo", &allowed, &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(stdout.starts_with("undo: 0 change(s)\n"), "{stdout}");
    assert!(!stdout.contains("left"), "{stdout}");
    assert!(stderr.contains("1 repair(s) failed; first: undo on tenant_a: "), "{stderr}");
    assert!(stderr.contains("refused by the application"), "{stderr}");
}

/// 200,000 rows, every 1,000th without `updated_at`.
const BIG_SQL: &str = "SELECT pg_temp.create_tenant('tenant_a');
    CREATE TABLE tenant_a.note (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, updated_at timestamptz);
    INSERT INTO tenant_a.note SELECT g, '2026-01-01'::timestamptz + g * interval '1 s',
      CASE WHEN g % 1000 = 0 THEN NULL ELSE '2026-06-01'::timestamptz END FROM generate_series(1, 200000) g;
    ANALYZE tenant_a.note;";

#[tokio::test]
async fn undo_pages_in_short_transactions_by_index_within_max_rows_per_run() {
    let url = fixture_db("heal_undo_big", BIG_SQL).await;
    let (code, stdout, stderr) =
        heal_with(&url, "heal_undo_big", &format!("{BACKFILL}batch_size = 5000\n"), &["--execute"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("backfill_null_timestamps: 200 change(s)\n"), "{stdout}");
    let run = run_id(&stdout);
    let small = format!("{BACKFILL}batch_size = 50\nmax_rows_per_run = 120\n");
    let (code, plan, _) = heal_with(&url, "heal_undo_big_plan", &small, &["--undo", &run]);
    assert_eq!(code, Some(0));
    // The exact statements undo prints, explained with the parameters of the first batch.
    let after = plan
        .split("-- batched: $1 = 50 (heal.batch_size, heal.max_rows_per_run in all), $2 = the smallest audit id of the previous batch (9223372036854775807 first); repeated until no audit row is left, and the whole group again while a sweep undid a row and left one still referenced:\n")
        .nth(1)
        .unwrap_or_else(|| panic!("{plan}"));
    let (pick, rest) =
        after.split_once(";\n-- then in the same transaction ($1 = run id, $2 = the audit ids picked), repeated while it undoes a row and leaves one:\n").unwrap();
    let undo = rest.split_once(";\n").unwrap().0;
    let client = pg::connect(&url).await;
    client
        .batch_execute(&format!("PREPARE pick(bigint, bigint) AS {pick}; PREPARE undo(text, bigint[]) AS {undo}"))
        .await
        .unwrap();
    let explain = |sql: &str| {
        let client = &client;
        let sql = sql.to_string();
        async move {
            let rows = client.query(&sql, &[]).await.unwrap();
            rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>().join("\n")
        }
    };
    let ids = &rows(
        &url,
        "SELECT format('%L', array_agg(id)) FROM (SELECT id FROM tenant_audit.heal_log ORDER BY id DESC LIMIT 50) i",
    )
    .await[0];
    for plan in [
        explain("EXPLAIN EXECUTE pick(50, 9223372036854775807)").await,
        explain(&format!("EXPLAIN EXECUTE undo('r', {ids})")).await,
    ] {
        assert!(plan.contains("Index Scan using note_pkey on note c"), "{plan}");
        assert!(!plan.contains("Seq Scan on note"), "{plan}");
    }
    // max_rows_per_run = 120 in batches of 50: three transactions, then the tenant is skipped.
    let (code, stdout, stderr) = heal_with(&url, "heal_undo_big_undo", &small, &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stdout.starts_with("undo: 120 change(s)\nskipped tenant_a: max_rows_per_run\n"), "{stdout}");
    let transactions =
        "SELECT format('%s %s', count(*), count(DISTINCT xmin::text)) FROM tenant_audit.heal_log WHERE repair = 'undo'";
    assert_eq!(rows(&url, transactions).await, ["120 3"]);
    // The next undo finishes: 80 more in two transactions, no row left.
    let (code, stdout, stderr) = heal_with(&url, "heal_undo_big_rest", &small, &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("undo: 80 change(s)\n"), "{stdout}");
    assert_eq!(rows(&url, transactions).await, ["200 5"]);
    assert_eq!(
        rows(&url, "SELECT format('%s %s', count(*), count(*) FILTER (WHERE id % 1000 = 0)) FROM tenant_a.note WHERE updated_at IS NULL").await,
        ["200 200"]
    );
}

/// A backfill onto a column made NOT NULL since the run cannot be set back to NULL: undo lists
/// that group as not undone and exits 1, and still undoes the run's other groups.
#[tokio::test]
async fn undo_lists_a_backfill_onto_a_column_made_not_null_since_and_undoes_the_rest() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE tenant_a.memo (id int PRIMARY KEY, created_at timestamptz NOT NULL, updated_at timestamptz);
        CREATE TABLE tenant_a.note (id int PRIMARY KEY, created_at timestamptz NOT NULL, updated_at timestamptz);
        INSERT INTO tenant_a.memo VALUES (1, '2026-01-01 00:00+00', NULL), (2, '2026-01-01 00:00+00', '2026-02-01 00:00+00');
        INSERT INTO tenant_a.note VALUES (1, '2026-01-01 00:00+00', NULL);";
    let url = fixture_db("heal_undo_not_null", sql).await;
    let (code, stdout, stderr) = heal_with(&url, "heal_undo_not_null", BACKFILL, &["--execute"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("backfill_null_timestamps: 2 change(s)\n"), "{stdout}");
    let run = run_id(&stdout);
    pg::connect(&url)
        .await
        .batch_execute("ALTER TABLE tenant_a.note ALTER COLUMN updated_at SET NOT NULL")
        .await
        .unwrap();

    let (code, stdout, stderr) = heal_with(&url, "heal_undo_not_null_undo", BACKFILL, &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "undo: 1 change(s)",
            stdout.lines().nth(1).unwrap(),
            "not undone: tenant_a.note: 1 backfill_null_timestamps change(s) not undone: column updated_at is NOT NULL now",
        ]
    );
    assert!(stdout.lines().nth(1).unwrap().starts_with("heal run "), "{stdout}");
    assert_eq!(
        rows(&url, "SELECT format('%s %s', id, coalesce(updated_at::text, 'NULL')) FROM tenant_a.memo ORDER BY id")
            .await,
        ["1 NULL", "2 2026-02-01 00:00:00+00"]
    );
    assert_eq!(
        rows(
            &url,
            "SELECT (n.updated_at = (l.new_value->>'updated_at')::timestamptz)::text FROM tenant_a.note n
             JOIN tenant_audit.heal_log l ON l.table_name = 'note' AND l.repair = 'backfill_null_timestamps'"
        )
        .await,
        ["true"]
    );
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_audit.heal_log WHERE repair = 'undo'").await, ["1"]);
}
