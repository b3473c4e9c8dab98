//! What `add_missing_columns` leaves behind across its steps and runs, against real PostgreSQL:
//! which locks a step holds while it reads the table, and the pending records it resumes from.

use crate::support::{
    column_definitions, config, config_file, fixture_db, heal_cli, lines, pg, rows, scan, BORROWED_SEQUENCE_SQL,
};

/// Heal's session (application `tenant-audit`) waiting on a lock on `tenant_b.doc`: its lock
/// mode, the statement it waits in (its first line), and the locks on the table it holds.
const WAITING: &str = "SELECT format('%s waits in %s, holds [%s]', l.mode, split_part(a.query, E'\\n', 1),
        (SELECT coalesce(string_agg(h.mode, ', ' ORDER BY h.mode), '') FROM pg_catalog.pg_locks h
          WHERE h.pid = l.pid AND h.granted AND h.relation = 'tenant_b.doc'::regclass))
      FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
     WHERE NOT l.granted AND l.relation = 'tenant_b.doc'::regclass AND a.application_name = 'tenant-audit'";

/// Waits (30 s at most) until `sql` returns a row, and returns its first column.
async fn first_row(client: &tokio_postgres::Client, sql: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(row) = client.query_opt(sql, &[]).await.unwrap() {
            return row.get(0);
        }
        assert!(std::time::Instant::now() < deadline, "nothing matched: {sql}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// F13: `SET DEFAULT nextval(...)` moves the sequence past `max(id)`, a read of the whole
/// table. It happens before the `ALTER`, in a transaction holding no lock but `ACCESS SHARE`
/// (an application's lookups go on), and again after it: a row inserted with an explicit id
/// while the `ALTER` waited is past the first move, and the sequence still ends past it.
#[tokio::test]
async fn a_sequence_moves_past_the_column_outside_the_alter_lock_before_and_after_it() {
    let sql = BORROWED_SEQUENCE_SQL;
    let url = fixture_db("heal_columns_state_advance", sql).await;
    let text = format!(
        "database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\nreference_schema = 'tenant_a'\n[heal]\nadd_missing_columns = true\nlock_timeout = '1min'\n"
    );
    config_file("heal_columns_state_advance", &text);
    // A migration holds the table; a second session queues a ROW EXCLUSIVE lock behind it.
    let (migration, writer, watcher) = (pg::connect(&url).await, pg::connect(&url).await, pg::connect(&url).await);
    migration.batch_execute("BEGIN; LOCK TABLE tenant_b.doc IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let queued = tokio::spawn(async move {
        writer.batch_execute("BEGIN; LOCK TABLE tenant_b.doc IN ROW EXCLUSIVE MODE").await.unwrap();
        writer
    });
    let run = tokio::task::spawn_blocking(move || heal_cli("heal_columns_state_advance", &text, &["--execute"]));
    assert_eq!(
        first_row(&watcher, WAITING).await,
        "AccessShareLock waits in WITH moved AS (, holds []",
        "the max() waits for the migration holding no lock on the table"
    );
    first_row(
        &watcher,
        "SELECT 'queued' FROM pg_catalog.pg_locks WHERE NOT granted AND mode = 'RowExclusiveLock'
           AND relation = 'tenant_b.doc'::regclass",
    )
    .await;
    migration.batch_execute("COMMIT").await.unwrap();
    let writer = queued.await.unwrap();
    assert_eq!(
        first_row(&watcher, &format!("{WAITING} AND l.mode = 'AccessExclusiveLock'")).await,
        "AccessExclusiveLock waits in LOCK TABLE \"tenant_b\".\"doc\" IN ACCESS EXCLUSIVE MODE, holds []",
        "the ALTER's lock comes after the first move committed"
    );
    assert_eq!(rows(&url, "SELECT last_value::text FROM tenant_b.doc_id_seq").await, ["10"]);
    writer.batch_execute("INSERT INTO tenant_b.doc (id, title) VALUES (50, 'explicit'); COMMIT").await.unwrap();
    let (code, stdout, stderr) = run.await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    // The default restored and the sequence's two moves.
    assert_eq!(stdout, ["add_missing_columns: 3 change(s)", "heal run: 3 change(s), 0 tenant(s) skipped, 0 error(s)"]);
    assert_eq!(
        rows(&url, "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = 'tenant_b.doc'::regclass").await,
        ["nextval('tenant_b.doc_id_seq'::regclass)"]
    );
    assert_eq!(rows(&url, "INSERT INTO tenant_b.doc (title) VALUES ('next') RETURNING id::text").await, ["51"]);
    assert_eq!(
        rows(
            &url,
            "SELECT format('%s %s', row_key->>'sequence', new_value->>'next_value') FROM tenant_audit.heal_log
              WHERE row_key ? 'sequence' ORDER BY id"
        )
        .await,
        ["doc_id_seq 11", "doc_id_seq 51"]
    );
}

/// `tenant_a.item` lacks the template's nullable `t`: heal adds it and, stopped by
/// `heal.max_rows_per_run = 3`, leaves its backfill pending with rows 4..10 NULL.
const PENDING: &str = "SELECT pg_temp.create_tenant(t) FROM unnest(ARRAY['tenant_template', 'tenant_a']) t;
    CREATE TABLE tenant_template.item (id int PRIMARY KEY, note text, t timestamptz DEFAULT clock_timestamp());
    CREATE TABLE tenant_a.item (id int PRIMARY KEY, note text);
    INSERT INTO tenant_a.item SELECT generate_series(1, 10);";

const HEAL: &str = "[tenants]\ninclude = ['^tenant_']\nreference_schema = 'tenant_template'\n\
    [heal]\nadd_missing_columns = true\n";

const NULLS: &str = "SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM tenant_a.item WHERE t IS NULL";

const STEPS: &str = "SELECT format('%s %s', row_key->>'step', coalesce(new_value->>'closed', ''))
    FROM tenant_audit.heal_log WHERE row_key ? 'step' ORDER BY id";

/// The database of [`PENDING`] after the first, limited run.
async fn pending(name: &str) -> String {
    let url = fixture_db(name, PENDING).await;
    let (code, stdout, stderr) =
        heal_cli(name, &format!("database_url = {url:?}\n{HEAL}max_rows_per_run = 3\n"), &["--execute"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stdout,
        [
            "add_missing_columns: 4 change(s)",
            "skipped tenant_a: max_rows_per_run",
            "heal run: 4 change(s), 1 tenant(s) skipped, 0 error(s)"
        ]
    );
    assert_eq!(rows(&url, NULLS).await, ["4,5,6,7,8,9,10"]);
    assert_eq!(
        rows(&url, "SELECT indexdef FROM pg_indexes WHERE indexname = 'heal_log_backfill_progress'").await,
        ["CREATE INDEX heal_log_backfill_progress ON tenant_audit.heal_log USING btree (schema_name, table_name, id) WHERE ((repair = 'add_missing_columns'::text) AND (row_key ? 'step'::text))"],
        "the pending records every run reads have an index"
    );
    url
}

/// F5: `VACUUM FULL` between the add and the resume gives every row a new `xmin`: the rule
/// "older than the add" would fill nothing and close the record. The backfill stays pending,
/// set aside with its reason on every run (exit 1), nothing filled or closed.
#[tokio::test]
async fn a_pending_backfill_of_a_table_rewritten_since_the_add_is_set_aside_not_closed() {
    let url = pending("heal_columns_state_rewritten").await;
    rows(&url, "VACUUM FULL tenant_a.item").await;
    let text = format!("database_url = {url:?}\n{HEAL}");
    for run in 0..2 {
        let (code, stdout, stderr) = heal_cli("heal_columns_state_rewritten", &text, &["--execute"]);
        assert_eq!(code, Some(1), "run {run}: {stderr}");
        assert_eq!(
            stdout,
            [
                "set aside tenant_a.item: backfill of t: the table was rewritten or its partitions changed since heal added the column (VACUUM FULL, CLUSTER, ALTER COLUMN TYPE, pg_repack, ATTACH PARTITION): every row has a new version, heal cannot tell the NULLs it left from the application's; the backfill stays pending, nothing filled (see docs/heal.md)",
                "heal run: 0 change(s), 0 tenant(s) skipped, 0 error(s)",
            ],
            "run {run}"
        );
    }
    assert_eq!(rows(&url, NULLS).await, ["4,5,6,7,8,9,10"]);
    assert_eq!(rows(&url, STEPS).await, ["add_column ", "backfill_pending "]);
}

/// F17: a migration dropped heal's `t` and added its own under the same name: the pending
/// record is closed without filling a row of it, once, and said so; the next run has nothing.
#[tokio::test]
async fn a_pending_backfill_of_a_column_dropped_and_added_again_is_closed_without_filling() {
    let url = pending("heal_columns_state_replaced").await;
    pg::connect(&url)
        .await
        .batch_execute(
            "ALTER TABLE tenant_a.item DROP COLUMN t;
             ALTER TABLE tenant_a.item ADD COLUMN t timestamptz;
             ALTER TABLE tenant_a.item ALTER COLUMN t SET DEFAULT clock_timestamp()",
        )
        .await
        .unwrap();
    let text = format!("database_url = {url:?}\n{HEAL}");
    let reason = "backfill of t: the column is not the one heal added (a migration dropped the table or the column and added it again since): its pending backfill is closed, nothing filled";
    let (code, stdout, stderr) = heal_cli("heal_columns_state_replaced", &text, &["--execute"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stdout,
        [
            format!("set aside tenant_a.item: {reason}"),
            "heal run: 0 change(s), 0 tenant(s) skipped, 0 error(s)".to_string(),
        ]
    );
    let (code, stdout, stderr) = heal_cli("heal_columns_state_replaced", &text, &["--execute"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, ["heal run: 0 change(s), 0 tenant(s) skipped, 0 error(s)"]);
    assert_eq!(rows(&url, NULLS).await, ["1,2,3,4,5,6,7,8,9,10"]);
    assert_eq!(
        rows(&url, STEPS).await,
        ["add_column ".to_string(), "backfill_pending ".to_string(), format!("backfill_done {reason}")]
    );
}

/// The collation of every collatable column of `schema.note`, `column collation`.
async fn collations(url: &str, schema: &str) -> Vec<String> {
    rows(
        url,
        &format!(
            "SELECT format('%s %s.%s', a.attname, cn.nspname, co.collname) FROM pg_attribute a
               JOIN pg_collation co ON co.oid = a.attcollation JOIN pg_namespace cn ON cn.oid = co.collnamespace
              WHERE a.attrelid = '{schema}.note'::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"
        ),
    )
    .await
}

/// F15: the template's `body` is `text COLLATE "C"`. `tenant_a` has it so (no finding),
/// `tenant_b` with the database's collation (a `collation_mismatch`, never healed), `tenant_c`
/// lacks it: heal adds it with `COLLATE "pg_catalog"."C"`, and the tenants that are identical
/// to the template then show no difference.
#[tokio::test]
async fn an_added_column_keeps_the_reference_collation_and_a_different_one_is_drift() {
    let sql =
        "SELECT pg_temp.create_tenant(t) FROM unnest(ARRAY['tenant_template', 'tenant_a', 'tenant_b', 'tenant_c']) t;
        CREATE TABLE tenant_template.note (id int PRIMARY KEY, body text COLLATE \"C\", label text);
        CREATE TABLE tenant_a.note (id int PRIMARY KEY, body text COLLATE \"C\", label text);
        CREATE TABLE tenant_b.note (id int PRIMARY KEY, body text, label text);
        CREATE TABLE tenant_c.note (id int PRIMARY KEY);";
    let url = fixture_db("heal_columns_state_collation", sql).await;
    let cfg = config(&url, HEAL);
    let mismatch = "schema_drift tenant_b.note(body) 1 CollationMismatch Some(\"\\\"pg_catalog\\\".\\\"C\\\"\") Some(\"default\") []";
    assert_eq!(
        lines(&scan(&cfg).await.findings),
        [
            mismatch,
            "schema_drift tenant_c.note(body) 1 MissingColumn Some(\"text\") None []",
            "schema_drift tenant_c.note(label) 1 MissingColumn Some(\"text\") None []",
        ]
    );
    let (code, stdout, stderr) =
        heal_cli("heal_columns_state_collation", &format!("database_url = {url:?}\n{HEAL}"), &["--execute"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, ["add_missing_columns: 2 change(s)", "heal run: 2 change(s), 0 tenant(s) skipped, 0 error(s)"]);
    assert_eq!(collations(&url, "tenant_c").await, ["body pg_catalog.C", "label pg_catalog.default"]);
    assert_eq!(collations(&url, "tenant_c").await, collations(&url, "tenant_a").await);
    assert_eq!(lines(&scan(&cfg).await.findings), [mismatch]);
}

/// F14: `--plan-out` of the staged add of [`PENDING`]'s `t`: its backfill's rows are resolved
/// before the column exists (every row is NULL once it is added), so the file lists all ten;
/// `--apply` adds the column and fills exactly those.
#[tokio::test]
async fn a_plan_file_lists_the_rows_of_a_column_it_adds_before_the_add() {
    let url = fixture_db("heal_columns_state_plan_out", PENDING).await;
    let file = std::env::temp_dir().join(format!("tenant-audit-it-{}-staged-add.json", std::process::id()));
    let text = format!("database_url = {url:?}\n{HEAL}");
    let (code, stdout, stderr) =
        heal_cli("heal_columns_state_plan_out", &text, &["--plan-out", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, [format!("wrote the plan for 1 tenant(s) to {}", file.display())]);
    let plan: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let steps = &plan["plan"]["tenants"][0]["actions"][0]["steps"];
    assert_eq!(steps[0]["Once"]["added"], serde_json::json!(["t", "timestamp with time zone"]));
    let only: Vec<String> = (1..=10).map(|id| format!("{{\"id\": {id}}}")).collect();
    assert_eq!(steps[1]["Backfill"]["only"], serde_json::json!(only));
    assert_eq!(column_definitions(&url, "tenant_a", "item").await, ["id integer NOT NULL", "note text"]);
    let (code, stdout, stderr) =
        heal_cli("heal_columns_state_plan_out", &text, &["--apply", file.to_str().unwrap(), "--execute"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stdout,
        ["add_missing_columns: 11 change(s)", "heal run: 11 change(s), 0 tenant(s) skipped, 0 error(s)"]
    );
    assert_eq!(rows(&url, NULLS).await, [""]);
}

/// F6: the pending backfill of [`PENDING`] resumed with `heal.fallbacks` `t = ["now()"]` fills
/// from `now()`, and its summary says so (it said `DEFAULT clock_timestamp()`).
#[tokio::test]
async fn a_resumed_pending_backfill_says_what_it_fills_from() {
    let url = pending("heal_columns_state_summary").await;
    let text = format!("database_url = {url:?}\n{HEAL}[heal.fallbacks]\nt = [\"now()\"]\n");
    let (code, stdout, stderr) = heal_cli("heal_columns_state_summary", &text, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains(
            &"-- add_missing_columns on tenant_a.item: finish the pending backfill of the added column t: the rows unchanged since it was added get now()"
                .to_string()
        ),
        "{stdout:?}"
    );
}
