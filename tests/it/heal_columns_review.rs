//! Heal's column repairs and backfills against real PostgreSQL, on the hazards a DBA looks for:
//! an added column with a volatile default never rewrites the table, a backfill keeps exactly to
//! `heal.batch_size` per transaction and `heal.max_rows_per_run` per run.

use crate::support::{cli, config, config_file, fixture_db, lines, pg, scan};

const HEAL: &str = "[tenants]\ninclude = ['^tenant_']\nreference_schema = 'tenant_template'\n\
    [heal]\nadd_missing_columns = true\n";

async fn rows(url: &str, sql: &str) -> Vec<String> {
    let client = pg::connect(url).await;
    client.query(sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

/// `column type [NOT NULL] [DEFAULT expr]` of every column of `schema.table`.
async fn definition(url: &str, schema: &str, table: &str) -> Vec<String> {
    let sql = format!(
        "SELECT format('%s %s%s%s', a.attname, format_type(a.atttypid, a.atttypmod),
                CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END,
                coalesce(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), ''))
         FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE a.attrelid = '{schema}.{table}'::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"
    );
    rows(url, &sql).await
}

fn heal(url: &str, name: &str, extra: &str) -> std::process::Output {
    let path = config_file(name, &format!("database_url = {url:?}\n{HEAL}{extra}"));
    cli(&["heal", "--config", path.to_str().unwrap(), "--execute"], &[])
}

/// Counts every DDL command (by tag) the server runs.
const DDL_LOG: &str = "CREATE TABLE public.ddl_log (id serial PRIMARY KEY, tag text NOT NULL);
    CREATE FUNCTION public.log_ddl() RETURNS event_trigger LANGUAGE plpgsql AS
      $$ BEGIN INSERT INTO public.ddl_log (tag) VALUES (tg_tag); END $$;
    CREATE EVENT TRIGGER count_ddl ON ddl_command_start EXECUTE FUNCTION public.log_ddl();";

const VOLATILE: &str = "SELECT pg_temp.create_tenant(t) FROM unnest(ARRAY['tenant_template', 'tenant_a']) t;
    CREATE SEQUENCE public.counter;
    CREATE TABLE tenant_template.item (id int PRIMARY KEY,
      n bigint DEFAULT nextval('public.counter'),
      r float8 NOT NULL DEFAULT random(),
      s timestamptz NOT NULL DEFAULT now(),
      t timestamptz DEFAULT clock_timestamp(),
      u uuid NOT NULL DEFAULT gen_random_uuid());
    CREATE TABLE tenant_a.item (id int PRIMARY KEY);
    INSERT INTO tenant_a.item SELECT generate_series(1, 10);";

/// `gen_random_uuid()`, `clock_timestamp()`, `random()` and `nextval` are volatile: `ADD COLUMN`
/// with them would rewrite the table under `ACCESS EXCLUSIVE`. Heal takes the staged path for
/// them (no rewrite: the table's file stays the same), and the one-statement add for the stable
/// `now()`, which PostgreSQL evaluates once.
#[tokio::test]
async fn volatile_defaults_take_the_staged_path_and_never_rewrite_the_table() {
    let url = fixture_db("heal_columns_volatile", &format!("{VOLATILE}\n{DDL_LOG}")).await;
    let path = config_file("heal_columns_volatile_plan", &format!("database_url = {url:?}\n{HEAL}"));
    let plan = String::from_utf8_lossy(&cli(&["heal", "--config", path.to_str().unwrap()], &[]).stdout).into_owned();
    let statements: Vec<&str> = plan.lines().filter(|l| l.starts_with("ALTER TABLE")).collect();
    assert_eq!(
        statements,
        [
            "ALTER TABLE \"tenant_a\".\"item\" ADD COLUMN IF NOT EXISTS \"n\" bigint, ALTER COLUMN \"n\" SET DEFAULT nextval('public.counter'::regclass);",
            "ALTER TABLE \"tenant_a\".\"item\" ADD COLUMN IF NOT EXISTS \"r\" double precision, ALTER COLUMN \"r\" SET DEFAULT random();",
            "ALTER TABLE \"tenant_a\".\"item\" DROP CONSTRAINT IF EXISTS \"tenant_audit_r_not_null\", ADD CONSTRAINT \"tenant_audit_r_not_null\" CHECK (\"r\" IS NOT NULL) NOT VALID;",
            "ALTER TABLE \"tenant_a\".\"item\" VALIDATE CONSTRAINT \"tenant_audit_r_not_null\";",
            "ALTER TABLE \"tenant_a\".\"item\" ALTER COLUMN \"r\" SET NOT NULL; ALTER TABLE \"tenant_a\".\"item\" DROP CONSTRAINT \"tenant_audit_r_not_null\";",
            "ALTER TABLE \"tenant_a\".\"item\" ADD COLUMN IF NOT EXISTS \"s\" timestamp with time zone NOT NULL DEFAULT now();",
            "ALTER TABLE \"tenant_a\".\"item\" ADD COLUMN IF NOT EXISTS \"t\" timestamp with time zone, ALTER COLUMN \"t\" SET DEFAULT clock_timestamp();",
            "ALTER TABLE \"tenant_a\".\"item\" ADD COLUMN IF NOT EXISTS \"u\" uuid, ALTER COLUMN \"u\" SET DEFAULT gen_random_uuid();",
            "ALTER TABLE \"tenant_a\".\"item\" DROP CONSTRAINT IF EXISTS \"tenant_audit_u_not_null\", ADD CONSTRAINT \"tenant_audit_u_not_null\" CHECK (\"u\" IS NOT NULL) NOT VALID;",
            "ALTER TABLE \"tenant_a\".\"item\" VALIDATE CONSTRAINT \"tenant_audit_u_not_null\";",
            "ALTER TABLE \"tenant_a\".\"item\" ALTER COLUMN \"u\" SET NOT NULL; ALTER TABLE \"tenant_a\".\"item\" DROP CONSTRAINT \"tenant_audit_u_not_null\";",
        ],
        "{plan}"
    );

    let filenode = "SELECT pg_relation_filenode('tenant_a.item')::text";
    let before = rows(&url, filenode).await;
    let out = heal(&url, "heal_columns_volatile", "");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(rows(&url, filenode).await, before, "no statement rewrote the table");
    // The audit and lease tables, then 5 ALTER TABLE per staged NOT NULL column (add, check,
    // validate, SET NOT NULL and the check dropped), 1 per nullable or stable one.
    assert_eq!(
        rows(&url, "SELECT format('%s %s', tag, count(*)) FROM public.ddl_log GROUP BY tag ORDER BY tag").await,
        ["ALTER TABLE 13", "CREATE INDEX 2", "CREATE SCHEMA 2", "CREATE TABLE 2"]
    );
    let reference = definition(&url, "tenant_template", "item").await;
    assert_eq!(
        reference,
        [
            "id integer NOT NULL",
            "n bigint DEFAULT nextval('counter'::regclass)",
            "r double precision NOT NULL DEFAULT random()",
            "s timestamp with time zone NOT NULL DEFAULT now()",
            "t timestamp with time zone DEFAULT clock_timestamp()",
            "u uuid NOT NULL DEFAULT gen_random_uuid()",
        ]
    );
    assert_eq!(definition(&url, "tenant_a", "item").await, reference);
    // Every existing row got its own value of each volatile default, the one value of now().
    assert_eq!(
        rows(
            &url,
            "SELECT format('%s %s %s %s %s %s', count(*), count(DISTINCT u), count(t), count(r), count(DISTINCT n), count(DISTINCT s)) FROM tenant_a.item"
        )
        .await,
        ["10 10 10 10 10 1"]
    );
    assert_eq!(lines(&scan(&config(&url, HEAL)).await.findings), Vec::<String>::new());
}

/// 1000 NULL `updated_at` in a table of about 170 rows per block: with `heal.batch_size = 10`
/// a block range of one block holds far more rows than a batch may change.
const DENSE: &str = "SELECT pg_temp.create_tenant('tenant_a');
    CREATE TABLE tenant_a.note (id int PRIMARY KEY, modified_at timestamptz, updated_at timestamptz);
    INSERT INTO tenant_a.note SELECT g, '2020-01-01'::timestamptz + g * interval '1 minute', NULL
      FROM generate_series(1, 1000) g;";

/// Rows changed per transaction of one run, largest first (the audit rows' `xmin` is the
/// transaction that wrote them).
async fn batches(url: &str, run: usize) -> Vec<String> {
    let sql = format!(
        "SELECT count(*)::text FROM tenant_audit.heal_log
         WHERE run_id = (SELECT run_id FROM tenant_audit.heal_log GROUP BY run_id ORDER BY min(id) OFFSET {run} LIMIT 1)
         GROUP BY xmin::text ORDER BY count(*) DESC, min(id)"
    );
    rows(url, &sql).await
}

#[tokio::test]
async fn a_backfill_changes_at_most_batch_size_rows_per_transaction_and_max_rows_per_run_per_run() {
    let url = fixture_db("heal_columns_limits", DENSE).await;
    let blocks = "SELECT (pg_relation_size('tenant_a.note') / current_setting('block_size')::int)::text";
    assert_eq!(rows(&url, blocks).await, ["6"]);
    let backfill = |name: &str, max: u32| {
        let path = config_file(
            name,
            &format!(
                "database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\n[heal]\nbackfill_null_timestamps = true\nbatch_size = 10\nmax_rows_per_run = {max}\n"
            ),
        );
        cli(&["heal", "--config", path.to_str().unwrap(), "--execute"], &[])
    };
    for run in 0..2 {
        let out = backfill(&format!("heal_columns_limits_{run}"), 25);
        assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stdout.lines().take(2).collect::<Vec<_>>(),
            ["backfill_null_timestamps: 25 change(s)", "skipped tenant_a: max_rows_per_run"]
        );
        assert_eq!(batches(&url, run).await, ["10", "10", "5"]);
        let left = "SELECT count(*)::text FROM tenant_a.note WHERE updated_at IS NULL";
        assert_eq!(rows(&url, left).await, [(1000 - 25 * (run + 1)).to_string()]);
    }
    let out = backfill("heal_columns_limits_rest", 1_000_000);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let sizes = batches(&url, 2).await;
    assert_eq!(sizes.first().map(String::as_str), Some("10"));
    assert_eq!(sizes.iter().map(|n| n.parse::<u32>().unwrap()).sum::<u32>(), 950);
    // Every row changed exactly once, to its own modified_at.
    assert_eq!(
        rows(&url, "SELECT format('%s %s', count(*), count(DISTINCT row_key)) FROM tenant_audit.heal_log").await,
        ["1000 1000"]
    );
    assert_eq!(
        rows(&url, "SELECT count(*)::text FROM tenant_a.note WHERE updated_at IS DISTINCT FROM modified_at").await,
        ["0"]
    );
}
