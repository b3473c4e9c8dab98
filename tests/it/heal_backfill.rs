//! Backfills against real PostgreSQL: a partitioned table, an inheritance parent whose child's
//! rows share `ctid`s with the parent's, and a 1M-row table: every NULL row changed exactly once.

use crate::support::{cli, config_file, fixture_db, pg};

async fn rows(url: &str, sql: &str) -> Vec<String> {
    let client = pg::connect(url).await;
    client.query(sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

fn heal(url: &str, name: &str, extra: &str) -> std::process::Output {
    let path = config_file(
        name,
        &format!(
            "database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\n[heal]\nbackfill_null_timestamps = true\nmax_rows_per_run = 1000000\n{extra}"
        ),
    );
    cli(&["heal", "--config", path.to_str().unwrap(), "--execute"], &[])
}

/// The journal's `BEFORE UPDATE` trigger changes nothing: heal may fire it.
const ALLOW: &str = "allow_triggers = [{ table = 'journal', trigger = 'audit_note' }]\n";

#[tokio::test]
async fn partitioned_and_inheritance_tables_have_each_null_row_changed_exactly_once() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE tenant_a.events (id int PRIMARY KEY, modified_at timestamptz, updated_at timestamptz)
          PARTITION BY RANGE (id);
        CREATE TABLE tenant_a.events_1 PARTITION OF tenant_a.events FOR VALUES FROM (0) TO (1000);
        CREATE TABLE tenant_a.events_2 PARTITION OF tenant_a.events FOR VALUES FROM (1000) TO (2000);
        INSERT INTO tenant_a.events SELECT g, '2020-01-01'::timestamptz + g * interval '1 minute',
          CASE WHEN g % 3 = 0 THEN NULL ELSE now() END FROM generate_series(1, 1999) g;
        CREATE TABLE tenant_a.journal (note text, modified_at timestamptz, updated_at timestamptz);
        CREATE TABLE tenant_a.journal_2020 () INHERITS (tenant_a.journal);
        INSERT INTO tenant_a.journal SELECT 'parent ' || g, '2021-01-01'::timestamptz + g * interval '1 hour', NULL
          FROM generate_series(1, 300) g;
        INSERT INTO tenant_a.journal_2020 SELECT 'child ' || g, '2022-01-01'::timestamptz + g * interval '1 hour',
          CASE WHEN g % 2 = 0 THEN NULL ELSE now() END FROM generate_series(1, 300) g;
        CREATE FUNCTION tenant_a.keep() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
        CREATE TRIGGER audit_note BEFORE UPDATE ON tenant_a.journal FOR EACH ROW EXECUTE FUNCTION tenant_a.keep();
        CREATE TRIGGER on_insert BEFORE INSERT ON tenant_a.journal FOR EACH ROW EXECUTE FUNCTION tenant_a.keep();";
    let url = fixture_db("heal_backfill_shapes", sql).await;
    // The plan names the triggers heal's writes fire. The scan counts each row once: the
    // parent's own rows (read with ONLY) under the parent, the child's under the child.
    let path = config_file(
        "heal_backfill_shapes_plan",
        &format!(
            "database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\n[heal]\nbackfill_null_timestamps = true\n{ALLOW}"
        ),
    );
    let plan = cli(&["heal", "--config", path.to_str().unwrap()], &[]);
    let plan = String::from_utf8_lossy(&plan.stdout);
    assert!(
        plan.contains("-- backfill_null_timestamps on tenant_a.journal: 300 NULL updated_at value(s) set from modified_at, created_at, now()\n-- fires triggers: tenant_a.journal.audit_note (BEFORE UPDATE)\n"),
        "{plan}"
    );
    assert!(
        plan.contains("-- backfill_null_timestamps on tenant_a.journal_2020: 150 NULL updated_at value(s) set from modified_at, created_at, now()\n"),
        "{plan}"
    );
    // Batches of one block: many ranges, and the child's ctids equal the parent's.
    let out = heal(&url, "heal_backfill_shapes", &format!("batch_size = 1\n{ALLOW}"));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        rows(
            &url,
            "SELECT count(*)::text FROM tenant_a.events WHERE updated_at IS DISTINCT FROM modified_at AND id % 3 = 0"
        )
        .await,
        ["0"]
    );
    // Every parent row and every even child row was NULL, and now holds its modified_at.
    assert_eq!(
        rows(&url, "SELECT count(*)::text FROM tenant_a.journal WHERE (note LIKE 'parent%' OR note ~ '[02468]$') AND updated_at = modified_at").await,
        ["450"]
    );
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_a.journal WHERE updated_at IS NULL").await, ["0"]);
    // One audit row per NULL row, never two for one row: 666 events, 300 + 150 journal rows.
    assert_eq!(
        rows(&url, "SELECT format('%s %s %s', table_name, count(*), count(DISTINCT row_key)) FROM tenant_audit.heal_log GROUP BY table_name ORDER BY 1").await,
        ["events 666 666", "journal 450 450"]
    );
    assert_eq!(
        rows(&url, "SELECT count(*)::text FROM tenant_audit.heal_log WHERE table_name = 'journal' AND row_key->>'relation' = 'tenant_a.journal_2020'").await,
        ["150"]
    );
}

#[tokio::test]
async fn a_million_row_table_has_each_null_row_changed_exactly_once() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE tenant_a.big (id int PRIMARY KEY, modified_at timestamptz, updated_at timestamptz);
        INSERT INTO tenant_a.big SELECT g, '2020-01-01'::timestamptz + g * interval '1 second',
          CASE WHEN g % 10 = 0 THEN NULL ELSE now() END FROM generate_series(1, 1000000) g;";
    let url = fixture_db("heal_backfill_million", sql).await;
    let out = heal(&url, "heal_backfill_million", "batch_size = 10000\n");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("backfill_null_timestamps: 100000 change(s)\n"));
    assert_eq!(
        rows(
            &url,
            "SELECT count(*)::text FROM tenant_a.big WHERE id % 10 = 0 AND updated_at IS DISTINCT FROM modified_at"
        )
        .await,
        ["0"]
    );
    assert_eq!(
        rows(&url, "SELECT format('%s %s', count(*), count(DISTINCT row_key->>'id')) FROM tenant_audit.heal_log").await,
        ["100000 100000"]
    );
}

/// A partitioned table with a default partition, healed in two runs (the first stopped by
/// `max_rows_per_run`), while the application moves rows between partitions in between: a fixed
/// row into a partition not yet read, NULL rows into one already read. Every NULL row is changed
/// exactly once, and no row that was not NULL is ever changed.
#[tokio::test]
async fn rows_moved_between_partitions_mid_run_are_changed_exactly_once() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE tenant_a.ev (id int, bucket int, modified_at timestamptz NOT NULL, updated_at timestamptz,
          PRIMARY KEY (id, bucket)) PARTITION BY LIST (bucket);
        CREATE TABLE tenant_a.ev_1 PARTITION OF tenant_a.ev FOR VALUES IN (1);
        CREATE TABLE tenant_a.ev_2 PARTITION OF tenant_a.ev FOR VALUES IN (2);
        CREATE TABLE tenant_a.ev_d PARTITION OF tenant_a.ev DEFAULT;
        INSERT INTO tenant_a.ev SELECT g, (g - 1) / 10 + 1, '2020-01-01 00:00:00+00'::timestamptz + g * interval '1 day',
          CASE WHEN g % 2 = 0 THEN '1999-01-01 00:00:00+00'::timestamptz END FROM generate_series(1, 30) g;";
    let url = fixture_db("heal_backfill_moved", sql).await;
    let path = config_file(
        "heal_backfill_moved_1",
        &format!("database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\n[heal]\nbackfill_null_timestamps = true\nbatch_size = 1\nmax_rows_per_run = 5\n"),
    );
    let out = cli(&["heal", "--config", path.to_str().unwrap(), "--execute"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        rows(&url, "SELECT string_agg(id::text, ',' ORDER BY id) FROM tenant_a.ev WHERE updated_at = modified_at")
            .await,
        ["1,3,5,7,9"],
        "the first run stopped after the first partition's 5 NULL rows (max_rows_per_run = 5)"
    );
    rows(
        &url,
        "WITH a AS (UPDATE tenant_a.ev SET bucket = 3 WHERE id = 3 RETURNING 1),
              b AS (UPDATE tenant_a.ev SET bucket = 1 WHERE id = 13 RETURNING 1),
              c AS (UPDATE tenant_a.ev SET bucket = 2 WHERE id = 23 RETURNING 1)
         SELECT 'moved' FROM a, b, c",
    )
    .await;
    let out = heal(&url, "heal_backfill_moved_2", "batch_size = 1\n");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        rows(&url, "SELECT format('%s %s', count(*), count(DISTINCT row_key->>'id')) FROM tenant_audit.heal_log").await,
        ["15 15"]
    );
    assert_eq!(
        rows(
            &url,
            "SELECT format('%s %s', count(*) FILTER (WHERE id % 2 = 1 AND updated_at = modified_at),
                                   count(*) FILTER (WHERE id % 2 = 0 AND updated_at = '1999-01-01 00:00:00+00'))
             FROM tenant_a.ev"
        )
        .await,
        ["15 15"]
    );
}

/// A primary key is unique within one relation only: an inheritance child may hold the parent's
/// key. The audit names the child's relation, and undo reverts exactly the rows heal wrote.
#[tokio::test]
async fn undo_of_a_backfill_on_an_inheritance_parent_reverts_only_the_rows_heal_wrote() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE tenant_a.note (id int PRIMARY KEY, body text, created_at timestamptz NOT NULL, updated_at timestamptz);
        CREATE TABLE tenant_a.note_archive (PRIMARY KEY (id)) INHERITS (tenant_a.note);
        INSERT INTO tenant_a.note VALUES (1, 'live note', '2026-01-01 00:00+00', NULL);
        INSERT INTO tenant_a.note_archive VALUES (1, 'archived, edited', '2026-01-01 00:00+00', '2026-01-01 00:00+00'),
          (2, 'archived, never edited', '2026-01-02 00:00+00', NULL);";
    let url = fixture_db("heal_backfill_inherit_undo", sql).await;
    let out = heal(&url, "heal_backfill_inherit_undo", "");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        rows(&url, "SELECT format('%s %s', table_name, row_key) FROM tenant_audit.heal_log ORDER BY id").await,
        [
            "note {\"id\": 1, \"relation\": \"tenant_a.note\"}",
            "note {\"id\": 2, \"relation\": \"tenant_a.note_archive\"}"
        ]
    );
    let run_id = rows(&url, "SELECT DISTINCT run_id FROM tenant_audit.heal_log").await.remove(0);
    let path = config_file(
        "heal_backfill_inherit_undo_undo",
        &format!("database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\n"),
    );
    let out = cli(&["heal", "--config", path.to_str().unwrap(), "--undo", &run_id, "--execute"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("undo: 2 change(s)\n"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        rows(&url, "SELECT format('%s %s %s', tableoid::regclass, id, coalesce(updated_at::text, 'NULL')) FROM tenant_a.note ORDER BY tableoid::regclass::text, id").await,
        ["tenant_a.note 1 NULL", "tenant_a.note_archive 1 2026-01-01 00:00:00+00", "tenant_a.note_archive 2 NULL"]
    );
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_audit.heal_log WHERE repair = 'undo'").await, ["2"]);
}
