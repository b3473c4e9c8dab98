//! What `add_missing_columns` leaves behind across its steps and runs, against real PostgreSQL:
//! which locks a step holds while it reads the table, and the pending records it resumes from.

use crate::support::{config_file, fixture_db, heal_cli, pg, rows};

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
    let sql = "SELECT pg_temp.create_tenant(t) FROM unnest(ARRAY['tenant_a', 'tenant_b']) t;
        CREATE TABLE tenant_a.doc (id serial PRIMARY KEY, title text);
        CREATE TABLE tenant_b.doc (id serial PRIMARY KEY, title text);
        ALTER TABLE tenant_b.doc ALTER COLUMN id SET DEFAULT nextval('tenant_a.doc_id_seq');
        INSERT INTO tenant_b.doc (title) SELECT 'doc ' || g FROM generate_series(1, 10) g;";
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
    assert_eq!(stdout, ["add_missing_columns: 2 change(s)", "heal run: 2 change(s), 0 tenant(s) skipped, 0 error(s)"]);
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
