//! Heal's column repairs and backfills against real PostgreSQL, on the hazards a DBA looks for:
//! an added column with a volatile default never rewrites the table, a backfill keeps exactly to
//! `heal.batch_size` per transaction and `heal.max_rows_per_run` per run.

use tenant_audit::heal;

use crate::support::{cli, column_definitions, config, config_file, fixture_db, lines, pg, rows, scan};

const HEAL: &str = "[tenants]\ninclude = ['^tenant_']\nreference_schema = 'tenant_template'\n\
    [heal]\nadd_missing_columns = true\n";

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
        ["ALTER TABLE 13", "CREATE INDEX 3", "CREATE SCHEMA 2", "CREATE TABLE 2"]
    );
    let reference = column_definitions(&url, "tenant_template", "item").await;
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
    assert_eq!(column_definitions(&url, "tenant_a", "item").await, reference);
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

/// The template's `item.t` is nullable with a volatile default; `tenant_a.item` lacks it and has
/// 10 rows.
const NULLABLE: &str = "SELECT pg_temp.create_tenant(t) FROM unnest(ARRAY['tenant_template', 'tenant_a']) t;
    CREATE TABLE tenant_template.item (id int PRIMARY KEY, note text, t timestamptz DEFAULT clock_timestamp());
    CREATE TABLE tenant_a.item (id int PRIMARY KEY, note text);
    INSERT INTO tenant_a.item SELECT generate_series(1, 10);";

/// The plan for `url`, as `heal` without a plan file builds it.
async fn planned(url: &str) -> (tenant_audit::config::Config, heal::Plan) {
    let cfg = config(url, HEAL);
    let pool = tenant_audit::db::scan_pool(&cfg.database, &cfg.scan);
    let scanned = tenant_audit::scan::run(&cfg, &pool, &Default::default(), None).await.unwrap();
    let mut plan = heal::Plan::build(&scanned, &cfg);
    let heal_pool = tenant_audit::db::heal_pool(&cfg.heal, cfg.scan.connect_timeout);
    heal::resume_pending(&mut plan, &scanned, &cfg, &heal_pool).await.unwrap();
    (cfg, plan)
}

async fn execute(cfg: &tenant_audit::config::Config, plan: &heal::Plan) -> heal::Outcome {
    let heal_pool = tenant_audit::db::heal_pool(&cfg.heal, cfg.scan.connect_timeout);
    heal::execute(&cfg.heal, &heal_pool, plan, None, &Default::default()).await.unwrap()
}

/// An add of a nullable column is stopped after its `ADD COLUMN ... SET DEFAULT` (by a kill, or
/// by `max_rows_per_run` within its backfill): the next scan sees no drift, and the pending
/// backfill the add recorded is what the next run finishes. The rows the application wrote in
/// between (an insert with NULL, an update of another column, a NULL set explicitly) are its
/// own and keep their NULL.
#[tokio::test]
async fn an_interrupted_add_of_a_nullable_column_is_finished_by_the_next_run_and_leaves_the_application_rows() {
    for stop in ["after_add", "max_rows_per_run"] {
        let name = format!("heal_columns_pending_{stop}");
        let url = fixture_db(&name, NULLABLE).await;
        let (cfg, mut plan) = planned(&url).await;
        let [tenant] = plan.tenants.as_mut_slice() else { panic!("one tenant: {plan:?}") };
        let [action] = tenant.actions.as_mut_slice() else { panic!("one action: {tenant:?}") };
        assert!(matches!(action.steps.as_slice(), [heal::Step::Once(_), heal::Step::Backfill(_)]), "{action:?}");
        let outcome = match stop {
            "after_add" => {
                action.steps.truncate(1);
                execute(&cfg, &plan).await
            }
            _ => {
                let mut limited = cfg.clone();
                limited.heal.max_rows_per_run = 3;
                execute(&limited, &plan).await
            }
        };
        assert_eq!(outcome.errors, []);
        let filled_first = if stop == "after_add" { 0 } else { 3 };
        let null = "SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM tenant_a.item WHERE t IS NULL";
        assert_eq!(
            rows(&url, "SELECT count(*)::text FROM tenant_a.item WHERE t IS NOT NULL").await,
            [filled_first.to_string()]
        );
        // The application, knowing the column now: a row inserted with NULL, another column of
        // row 8 updated, row 9's t set to NULL explicitly.
        rows(
            &url,
            "WITH a AS (INSERT INTO tenant_a.item (id, t) VALUES (11, NULL) RETURNING 1),
                  b AS (UPDATE tenant_a.item SET note = 'edited' WHERE id = 8 RETURNING 1),
                  c AS (UPDATE tenant_a.item SET t = NULL WHERE id = 9 RETURNING 1)
             SELECT 'written' FROM a, b, c",
        )
        .await;
        assert_eq!(lines(&scan(&cfg).await.findings), Vec::<String>::new(), "no drift: only the record knows");
        let path = config_file(&format!("{name}_plan"), &format!("database_url = {url:?}\n{HEAL}"));
        let dry = String::from_utf8_lossy(&cli(&["heal", "--config", path.to_str().unwrap()], &[]).stdout).into_owned();
        assert!(
            dry.contains("-- add_missing_columns on tenant_a.item: finish the pending backfill of the added column t: the rows unchanged since it was added get DEFAULT clock_timestamp()\n"),
            "{dry}"
        );
        let out = heal(&url, &format!("{name}_1"), "");
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).lines().next(),
            Some(format!("add_missing_columns: {} change(s)", 8 - filled_first).as_str())
        );
        assert_eq!(rows(&url, null).await, ["8,9,11"]);
        // The next run's pass finds nothing left and closes the record; then nothing is planned.
        let out = heal(&url, &format!("{name}_2"), "");
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().next(), Some("add_missing_columns: 0 change(s)"));
        let dry = String::from_utf8_lossy(&cli(&["heal", "--config", path.to_str().unwrap()], &[]).stdout).into_owned();
        assert!(dry.ends_with("-- 0 tenant(s) to heal\n"), "{dry}");
        assert_eq!(rows(&url, null).await, ["8,9,11"]);
        assert_eq!(
            rows(&url, "SELECT row_key->>'step' FROM tenant_audit.heal_log WHERE row_key ? 'step' ORDER BY id").await,
            ["add_column", "backfill_pending", "backfill_done"]
        );
        assert_eq!(
            rows(&url, "SELECT count(*)::text FROM tenant_audit.heal_log WHERE NOT row_key ? 'step'").await,
            ["8"]
        );
    }
}

/// A migration adds the column between the plan and its execution, with a default of its own:
/// heal changes nothing (no `SET DEFAULT` over the migration's) and audits nothing.
#[tokio::test]
async fn a_column_that_appeared_since_the_plan_is_left_alone_and_not_audited() {
    let url = fixture_db("heal_columns_appeared", NULLABLE).await;
    let (cfg, plan) = planned(&url).await;
    let migration = pg::connect(&url).await;
    migration
        .batch_execute("ALTER TABLE tenant_a.item ADD COLUMN t timestamptz DEFAULT '2001-01-01 00:00+00'")
        .await
        .unwrap();
    let outcome = execute(&cfg, &plan).await;
    assert_eq!(outcome.errors, []);
    assert_eq!(
        outcome.not_applied,
        [("tenant_a".to_string(), "item".to_string(), "{\"column\": \"t\", \"step\": \"add_column\"}".to_string())]
    );
    assert_eq!(outcome.total_changed(), 0);
    assert_eq!(
        column_definitions(&url, "tenant_a", "item").await,
        [
            "id integer NOT NULL",
            "note text",
            "t timestamp with time zone DEFAULT '2001-01-01 00:00:00+00'::timestamp with time zone"
        ]
    );
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_audit.heal_log").await, ["0"]);
}

/// Row 7's fallback (its `modified_at`, 1990) violates the table's `CHECK`: the batch holding it
/// is split in halves, each its own transaction, down to row 7, which is set aside with the
/// error; every other row is written. Each run does so again (and reports it) until the row is
/// fixed.
#[tokio::test]
async fn a_row_that_fails_its_update_is_set_aside_and_the_others_are_written() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE tenant_a.note (id int PRIMARY KEY, modified_at timestamptz,
          updated_at timestamptz CONSTRAINT recent CHECK (updated_at > '2000-01-01 00:00+00'));
        INSERT INTO tenant_a.note SELECT g, CASE WHEN g = 7 THEN '1990-01-01 00:00+00'::timestamptz
          ELSE '2020-01-01 00:00+00'::timestamptz + g * interval '1 day' END, NULL FROM generate_series(1, 20) g;";
    let url = fixture_db("heal_columns_set_aside", sql).await;
    let path = config_file(
        "heal_columns_set_aside",
        &format!("database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\n[heal]\nbackfill_null_timestamps = true\nbatch_size = 10\n"),
    );
    let set_aside = "set aside tenant_a.note key ({\"id\": 7}): backfill of updated_at: new row for relation \"note\" violates check constraint \"recent\"";
    for run in 0..2 {
        let out = cli(&["heal", "--config", path.to_str().unwrap(), "--execute"], &[]);
        assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let changed = if run == 0 { 19 } else { 0 };
        assert_eq!(
            stdout.lines().take(2).collect::<Vec<_>>(),
            [format!("backfill_null_timestamps: {changed} change(s)").as_str(), set_aside],
            "{stdout}"
        );
    }
    // The first batch (rows 1-10) split: 1-5, then 6-7 (6, and 7 set aside), then 8-10; the
    // second batch whole.
    assert_eq!(batches(&url, 0).await, ["10", "5", "3", "1"]);
    assert_eq!(
        rows(&url, "SELECT string_agg(id::text, ',' ORDER BY id) FROM tenant_a.note WHERE updated_at IS NULL").await,
        ["7"]
    );
}

/// A staged add of a NOT NULL column stopped after its `NOT VALID` check: the next plan says it
/// validates that check (no `ADD CONSTRAINT` again), and the run issues exactly the `VALIDATE`
/// and the `SET NOT NULL` with the check dropped.
#[tokio::test]
async fn a_not_valid_check_left_by_an_interrupted_add_is_validated_as_it_is() {
    let sql = format!(
        "SELECT pg_temp.create_tenant(t) FROM unnest(ARRAY['tenant_template', 'tenant_a']) t;
        CREATE TABLE tenant_template.item (id int PRIMARY KEY, u uuid NOT NULL DEFAULT gen_random_uuid());
        CREATE TABLE tenant_a.item (id int PRIMARY KEY);
        INSERT INTO tenant_a.item SELECT generate_series(1, 10);
        {DDL_LOG}"
    );
    let url = fixture_db("heal_columns_not_valid", &sql).await;
    let (cfg, mut plan) = planned(&url).await;
    let [tenant] = plan.tenants.as_mut_slice() else { panic!("one tenant: {plan:?}") };
    let [action] = tenant.actions.as_mut_slice() else { panic!("one action: {tenant:?}") };
    assert_eq!(action.steps.len(), 5, "{action:?}");
    action.steps.truncate(3);
    assert_eq!(execute(&cfg, &plan).await.errors, []);
    assert_eq!(
        rows(
            &url,
            "SELECT format('%s %s', conname, convalidated) FROM pg_constraint WHERE conname LIKE 'tenant_audit%'"
        )
        .await,
        ["tenant_audit_u_not_null f"]
    );
    let path = config_file("heal_columns_not_valid_plan", &format!("database_url = {url:?}\n{HEAL}"));
    let dry = String::from_utf8_lossy(&cli(&["heal", "--config", path.to_str().unwrap()], &[]).stdout).into_owned();
    assert!(
        dry.contains("-- add_missing_columns on tenant_a.item: make u NOT NULL as the reference has it: VALIDATE the existing NOT VALID check tenant_audit_u_not_null an interrupted run left, then SET NOT NULL\n"),
        "{dry}"
    );
    assert_eq!(
        dry.lines().filter(|l| l.starts_with("ALTER TABLE")).collect::<Vec<_>>(),
        [
            "ALTER TABLE \"tenant_a\".\"item\" VALIDATE CONSTRAINT \"tenant_audit_u_not_null\";",
            "ALTER TABLE \"tenant_a\".\"item\" ALTER COLUMN \"u\" SET NOT NULL; ALTER TABLE \"tenant_a\".\"item\" DROP CONSTRAINT \"tenant_audit_u_not_null\";",
        ]
    );
    let ddl = pg::connect(&url).await;
    ddl.batch_execute("DELETE FROM public.ddl_log").await.unwrap();
    let out = heal(&url, "heal_columns_not_valid", "");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        rows(&url, "SELECT format('%s %s', tag, count(*)) FROM public.ddl_log GROUP BY tag ORDER BY tag").await,
        ["ALTER TABLE 3"]
    );
    assert_eq!(
        column_definitions(&url, "tenant_a", "item").await,
        column_definitions(&url, "tenant_template", "item").await
    );
    assert_eq!(rows(&url, "SELECT count(*)::text FROM pg_constraint WHERE conname LIKE 'tenant_audit%'").await, ["0"]);
    assert_eq!(rows(&url, "SELECT count(DISTINCT u)::text FROM tenant_a.item").await, ["10"]);
}
