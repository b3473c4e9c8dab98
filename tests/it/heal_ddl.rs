//! Heal's DDL against real PostgreSQL: types and defaults compared and written structurally
//! (schema names inside literals, schemas whose name ends another's, a tenant's own types), the
//! one-statement add-column, the staged add-column stopped after each of its steps, and what
//! each repair of a column counts as changes.

use tenant_audit::heal::{self, Plan, Step};

use crate::support::{cli, column_definitions, config, config_file, fixture_db, heal_cli, lines, pg, rows, scan};

const HEAL: &str = "[tenants]\ninclude = ['^tenant_']\nreference_schema = 'tenant_template'\n\
    [heal]\nadd_missing_columns = true\n";

/// Every tenant (and the template) has its own `status` enum and a `pages` table whose defaults
/// hold the template's name as text and a type of `extra_tenant_a`, a schema whose name ends with
/// a tenant's name. `tenant_b` lacks two columns.
const STRUCTURAL: &str =
    "SELECT pg_temp.create_tenant(t) FROM unnest(ARRAY['tenant_template', 'tenant_a', 'tenant_b']) t;
    CREATE SCHEMA extra_tenant_a;
    CREATE TYPE extra_tenant_a.mood AS ENUM ('happy', 'sad');
    DO $$ DECLARE s text; BEGIN
      FOREACH s IN ARRAY ARRAY['tenant_template', 'tenant_a', 'tenant_b'] LOOP
        EXECUTE format('CREATE TYPE %I.status AS ENUM (''new'', ''old'')', s);
        EXECUTE format('CREATE TABLE %1$I.pages (id serial PRIMARY KEY,
          page text NOT NULL DEFAULT ''tenant_template.html'',
          mood extra_tenant_a.mood DEFAULT ''happy'',
          status %1$I.status NOT NULL DEFAULT ''new'')', s);
      END LOOP;
    END $$;
    ALTER TABLE tenant_b.pages DROP COLUMN page, DROP COLUMN status;
    INSERT INTO tenant_b.pages (mood) VALUES ('sad'), (NULL);
    CREATE TABLE public.ddl_log (id serial PRIMARY KEY, tag text NOT NULL);
    CREATE FUNCTION public.log_ddl() RETURNS event_trigger LANGUAGE plpgsql AS
      $$ BEGIN INSERT INTO public.ddl_log (tag) VALUES (tg_tag); END $$;
    CREATE EVENT TRIGGER count_ddl ON ddl_command_start EXECUTE FUNCTION public.log_ddl();";

#[tokio::test]
async fn schema_names_in_text_never_drift_and_heal_writes_the_reference_definition_in_one_statement() {
    let url = fixture_db("heal_ddl_structural", STRUCTURAL).await;
    let cfg = config(&url, HEAL);
    // Identical tenants do not differ: only tenant_b's two missing columns are found.
    let report = scan(&cfg).await;
    assert_eq!(
        lines(&report.findings),
        [
            "schema_drift tenant_b.pages(page) 1 MissingColumn Some(\"text NOT NULL DEFAULT 'tenant_template.html'::text\") None []",
            "schema_drift tenant_b.pages(status) 1 MissingColumn Some(\"status NOT NULL DEFAULT 'new'::status\") None []",
        ]
    );

    let filenode = "SELECT pg_relation_filenode('tenant_b.pages')::text";
    let before = rows(&url, filenode).await;
    let path = config_file("heal_ddl_structural", &format!("database_url = {url:?}\n{HEAL}"));
    let out = cli(&["heal", "--config", path.to_str().unwrap(), "--execute"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    // The lease and audit tables (with the audit table's three indexes), then one metadata-only
    // statement per column: no other DDL, no rewrite.
    assert_eq!(
        rows(&url, "SELECT tag FROM public.ddl_log ORDER BY id").await,
        [
            "CREATE SCHEMA",
            "CREATE TABLE",
            "CREATE SCHEMA",
            "CREATE TABLE",
            "CREATE INDEX",
            "CREATE INDEX",
            "CREATE INDEX",
            "ALTER TABLE",
            "ALTER TABLE"
        ]
    );
    assert_eq!(rows(&url, filenode).await, before);
    assert_eq!(
        column_definitions(&url, "tenant_b", "pages").await,
        [
            "id integer NOT NULL DEFAULT nextval('tenant_b.pages_id_seq'::regclass)",
            "mood extra_tenant_a.mood DEFAULT 'happy'::extra_tenant_a.mood",
            "page text NOT NULL DEFAULT 'tenant_template.html'::text",
            "status tenant_b.status NOT NULL DEFAULT 'new'::tenant_b.status",
        ]
    );
    assert_eq!(
        rows(&url, "SELECT format('%s %s %s', id, page, status) FROM tenant_b.pages ORDER BY id").await,
        ["1 tenant_template.html new", "2 tenant_template.html new"]
    );
    assert_eq!(lines(&scan(&cfg).await.findings), Vec::<String>::new());
}

/// The suffix traps, where the text-editing catalog (which stripped `<schema>.` anywhere)
/// found false drift and wrote wrong definitions: a tenant named `c`, a suffix of `public`
/// (`public.mood` read `publimood`; here in the default `'c.public.mood'` both tables have), and
/// a type of `old_tenant_template`, whose name ends with the reference schema's (it read
/// `old_kind`). `c` lacks the columns `mood` and `kind`; `tenant_a` is identical to the template.
/// Checked to fail with that stripping put back into the catalog's type and default text.
const SUFFIXES: &str = "SELECT pg_temp.create_tenant(t) FROM unnest(ARRAY['tenant_template', 'tenant_a', 'c']) t;
    CREATE TYPE public.mood AS ENUM ('happy', 'sad');
    CREATE SCHEMA old_tenant_template;
    CREATE TYPE old_tenant_template.kind AS ENUM ('k1', 'k2');
    CREATE TABLE tenant_template.pages (id int PRIMARY KEY, mood public.mood NOT NULL DEFAULT 'happy',
      kind old_tenant_template.kind DEFAULT 'k2', label text DEFAULT 'c.public.mood');
    CREATE TABLE tenant_a.pages (LIKE tenant_template.pages INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
    CREATE TABLE c.pages (id int PRIMARY KEY, label text DEFAULT 'c.public.mood');
    INSERT INTO c.pages (id) VALUES (1), (2);";

#[tokio::test]
async fn schemas_whose_names_end_another_never_drift_and_heal_adds_the_reference_definition() {
    let url = fixture_db("heal_ddl_suffixes", SUFFIXES).await;
    let text = HEAL.replace("include = ['^tenant_']", "include = ['^tenant_', '^c$']");
    let cfg = config(&url, &text);
    assert_eq!(
        lines(&scan(&cfg).await.findings),
        [
            "schema_drift c.pages(kind) 1 MissingColumn Some(\"old_tenant_template.kind DEFAULT 'k2'::old_tenant_template.kind\") None []",
            "schema_drift c.pages(mood) 1 MissingColumn Some(\"public.mood NOT NULL DEFAULT 'happy'::public.mood\") None []",
        ]
    );
    let path = config_file("heal_ddl_suffixes", &format!("database_url = {url:?}\n{text}"));
    let out = cli(&["heal", "--config", path.to_str().unwrap(), "--execute"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("add_missing_columns: 2 change(s)\n"));
    let reference = column_definitions(&url, "tenant_template", "pages").await;
    assert_eq!(
        reference,
        [
            "id integer NOT NULL",
            "mood mood NOT NULL DEFAULT 'happy'::mood",
            "kind old_tenant_template.kind DEFAULT 'k2'::old_tenant_template.kind",
            "label text DEFAULT 'c.public.mood'::text",
        ]
    );
    let mut added = column_definitions(&url, "c", "pages").await;
    added.sort();
    let mut expected = reference.clone();
    expected.sort();
    assert_eq!(added, expected, "the reference's definitions, column order aside");
    assert_eq!(
        rows(&url, "SELECT format('%s %s %s %s', id, mood, kind, label) FROM c.pages ORDER BY id").await,
        ["1 happy k2 c.public.mood", "2 happy k2 c.public.mood"]
    );
    assert_eq!(lines(&scan(&cfg).await.findings), Vec::<String>::new());
}

/// `tenant_x` lacks `updated_at`, which the template has NOT NULL DEFAULT now(); its fallback
/// `modified_at` makes it the staged path.
const STAGED: &str = "SELECT pg_temp.create_tenant(t) FROM unnest(ARRAY['tenant_template', 'tenant_x']) t;
    INSERT INTO tenant_x.users_userprofile (user_id, created_at, modified_at)
      SELECT g, now(), '2020-01-01'::timestamptz + g * interval '1 day' FROM generate_series(1, 5) g;
    ALTER TABLE tenant_x.users_userprofile DROP COLUMN updated_at;";

const FINAL: [&str; 6] = [
    "id integer NOT NULL DEFAULT nextval('tenant_x.users_userprofile_id_seq'::regclass)",
    "user_id integer NOT NULL",
    "business_id uuid",
    "created_at timestamp with time zone",
    "modified_at timestamp with time zone",
    "updated_at timestamp with time zone NOT NULL DEFAULT now()",
];

/// Checks the end state of a staged add-column: the reference's definition, every row filled
/// from `modified_at`, no check left behind, no finding.
async fn assert_finished(url: &str) {
    assert_eq!(column_definitions(url, "tenant_x", "users_userprofile").await, FINAL);
    assert_eq!(
        rows(
            url,
            "SELECT count(*)::text FROM tenant_x.users_userprofile WHERE updated_at IS DISTINCT FROM modified_at"
        )
        .await,
        ["0"]
    );
    assert_eq!(rows(url, "SELECT count(*)::text FROM pg_constraint WHERE conname LIKE 'tenant_audit%'").await, ["0"]);
    assert_eq!(lines(&scan(&config(url, HEAL)).await.findings), Vec::<String>::new());
}

async fn heal_all(url: &str, name: &str) {
    let path = config_file(name, &format!("database_url = {url:?}\n{HEAL}"));
    let out = cli(&["heal", "--config", path.to_str().unwrap(), "--execute"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn a_staged_add_column_stopped_after_any_step_is_finished_by_the_next_run() {
    let steps = ["add_column", "backfill", "add_check", "validate_check", "set_not_null"];
    for stop_after in 1..=steps.len() {
        let url = fixture_db(&format!("heal_ddl_staged_{stop_after}"), STAGED).await;
        let cfg = config(&url, HEAL);
        let pool = tenant_audit::db::scan_pool(&cfg.database, &cfg.scan);
        let scanned = tenant_audit::scan::run(&cfg, &pool, &Default::default(), None).await.unwrap();
        let mut plan = Plan::build(&scanned, &cfg);
        let [tenant] = plan.tenants.as_mut_slice() else { panic!("one tenant to heal: {plan:?}") };
        let [action] = tenant.actions.as_mut_slice() else { panic!("one action: {tenant:?}") };
        let names: Vec<&str> = action
            .steps
            .iter()
            .map(|s| match s {
                Step::Backfill(_) => "backfill",
                Step::Batched(_) => "batched",
                Step::Copy(_) => "copy",
                Step::Undo(_) => "undo",
                Step::Once(o) if o.sql.contains("VALIDATE") => "validate_check",
                Step::Once(o) if o.sql.contains("ADD CONSTRAINT") => "add_check",
                Step::Once(o) if o.sql.contains("SET NOT NULL") => "set_not_null",
                Step::Once(_) => "add_column",
            })
            .collect();
        assert_eq!(names, steps);
        // The stop: only the first steps run, as when a run is killed between two of them.
        action.steps.truncate(stop_after);
        let heal_pool = tenant_audit::db::heal_pool(&cfg.heal, cfg.scan.connect_timeout);
        let outcome = heal::execute(&cfg.heal, &heal_pool, &plan, None, &Default::default()).await.unwrap();
        assert_eq!(outcome.errors, []);
        heal_all(&url, &format!("heal_ddl_staged_{stop_after}")).await;
        assert_finished(&url).await;
    }
}

#[tokio::test]
async fn a_column_that_lost_its_default_gets_it_back_before_its_not_null() {
    // What an interrupted add-column of an earlier version left: the column, nullable, no default.
    let sql = format!(
        "{STAGED}
        ALTER TABLE tenant_x.users_userprofile ADD COLUMN updated_at timestamptz;
        UPDATE tenant_x.users_userprofile SET updated_at = modified_at WHERE id < 3;"
    );
    let url = fixture_db("heal_ddl_lost_default", &sql).await;
    assert_eq!(
        lines(&scan(&config(&url, HEAL)).await.findings),
        [
            "null_timestamps tenant_x.users_userprofile(updated_at) 4 timestamp with time zone [\"3\", \"4\", \"5\", \"6\"]",
            "schema_drift tenant_x.users_userprofile(updated_at) 1 NullabilityMismatch Some(\"NOT NULL\") Some(\"NULL\") []",
            "schema_drift tenant_x.users_userprofile(updated_at) 1 DefaultMismatch Some(\"now()\") None []",
        ]
    );
    heal_all(&url, "heal_ddl_lost_default").await;
    assert_finished(&url).await;
    let steps =
        rows(&url, "SELECT row_key->>'step' FROM tenant_audit.heal_log WHERE row_key ? 'step' ORDER BY id").await;
    assert_eq!(steps, ["set_default", "add_check", "validate_check", "set_not_null"]);
}

/// PostgreSQL 15 rewrites the table for `ADD COLUMN` of a domain with constraints, whatever the
/// default and nullability (it checks every row); a domain without constraints is metadata-only.
/// Heal adds the plain one in one statement, sets the constrained one aside unless
/// `heal.allow_table_rewrite`, and says so in the plan.
#[tokio::test]
async fn a_column_of_a_constrained_domain_is_never_added_by_a_silent_rewrite() {
    let sql = "SELECT pg_temp.create_tenant(t) FROM unnest(ARRAY['tenant_template', 'tenant_a']) t;
        CREATE DOMAIN public.score AS int CHECK (VALUE >= 0);
        CREATE DOMAIN public.label AS text;
        CREATE TABLE tenant_template.item (id int PRIMARY KEY, label public.label NOT NULL DEFAULT 'x', score public.score NOT NULL DEFAULT 1);
        CREATE TABLE tenant_a.item (id int PRIMARY KEY);
        INSERT INTO tenant_a.item SELECT generate_series(1, 10);";
    let url = fixture_db("heal_ddl_domain", sql).await;
    let filenode = "SELECT pg_relation_filenode('tenant_a.item')::text";
    let before = rows(&url, filenode).await;
    let path = config_file("heal_ddl_domain", &format!("database_url = {url:?}\n{HEAL}"));
    let plan = String::from_utf8_lossy(&cli(&["heal", "--config", path.to_str().unwrap()], &[]).stdout).into_owned();
    assert!(
        plan.contains("-- add_missing_columns on tenant_a.item: add column score public.score NOT NULL DEFAULT 1 as the reference has it\n-- first, in the same transaction ($1 = 'public.score'): set aside, unless heal.allow_table_rewrite, when the type is a domain with constraints (adding it rewrites the table):\n"),
        "{plan}"
    );
    let out = cli(&["heal", "--config", path.to_str().unwrap(), "--execute"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "add_missing_columns: 1 change(s)",
            "set aside tenant_a.item: add column score: its type public.score is a domain with constraints, and adding a column of it rewrites the whole table under ACCESS EXCLUSIVE (no staged path avoids it); allow it with heal.allow_table_rewrite = true",
            stdout.lines().last().unwrap(),
        ]
    );
    assert_eq!(rows(&url, filenode).await, before, "the plain domain is added without a rewrite");
    assert_eq!(
        column_definitions(&url, "tenant_a", "item").await,
        ["id integer NOT NULL", "label label NOT NULL DEFAULT 'x'::text"]
    );

    // Allowed: the rewrite happens, on purpose.
    let path =
        config_file("heal_ddl_domain_allowed", &format!("database_url = {url:?}\n{HEAL}allow_table_rewrite = true\n"));
    let out = cli(&["heal", "--config", path.to_str().unwrap(), "--execute"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_ne!(rows(&url, filenode).await, before, "adding the constrained domain rewrote the table");
    assert_eq!(
        column_definitions(&url, "tenant_a", "item").await,
        ["id integer NOT NULL", "label label NOT NULL DEFAULT 'x'::text", "score score NOT NULL DEFAULT 1"]
    );
}

/// `tenant_a` of the base fixture, as its template but for `ALTER`, with `add_missing_columns`.
fn tenant_a(alter: &str) -> String {
    format!(
        "SELECT pg_temp.create_tenant(t) FROM unnest(ARRAY['tenant_template', 'tenant_a']) t;
        ALTER TABLE tenant_a.users_userprofile {alter};"
    )
}

/// The `step` of every one-off audit row, in order.
const STEP_ROWS: &str = "SELECT row_key->>'step' FROM tenant_audit.heal_log WHERE row_key ? 'step' ORDER BY id";

/// A lost default restored on an existing column is one change, in the summary and in the
/// metrics (it was healed, audited and logged, but counted as none).
#[tokio::test]
async fn a_restored_default_counts_one_change_in_the_summary_and_the_metrics() {
    let url = fixture_db("heal_ddl_count_default", &tenant_a("ALTER COLUMN updated_at DROP DEFAULT")).await;
    let text = format!("database_url = {url:?}\n{HEAL}");
    let (code, stdout, stderr) = heal_cli("heal_ddl_count_default", &text, &["--execute"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, ["add_missing_columns: 1 change(s)", "heal run: 1 change(s), 0 tenant(s) skipped, 0 error(s)"]);
    assert_eq!(rows(&url, STEP_ROWS).await, ["set_default"]);
    assert_eq!(
        column_definitions(&url, "tenant_a", "users_userprofile").await.last().map(String::as_str),
        Some("updated_at timestamp with time zone NOT NULL DEFAULT now()")
    );
    // Lost again: the outcome heal returns to the scheduler, and the counter it records.
    pg::connect(&url)
        .await
        .batch_execute("ALTER TABLE tenant_a.users_userprofile ALTER COLUMN updated_at DROP DEFAULT")
        .await
        .unwrap();
    let cfg = config(&url, HEAL);
    let scanned = tenant_audit::scan::run(
        &cfg,
        &tenant_audit::db::scan_pool(&cfg.database, &cfg.scan),
        &Default::default(),
        None,
    )
    .await
    .unwrap();
    let pool = tenant_audit::db::heal_pool(&cfg.heal, cfg.scan.connect_timeout);
    let outcome =
        heal::execute(&cfg.heal, &pool, &Plan::build(&scanned, &cfg), None, &Default::default()).await.unwrap();
    assert_eq!(outcome.changed, std::collections::BTreeMap::from([("add_missing_columns", 1)]));
    let metrics = tenant_audit::metrics::Metrics::new("default");
    metrics.record_heal(&Ok(outcome));
    let encoded = metrics.encode();
    let healed: Vec<&str> = encoded.lines().filter(|l| l.starts_with("tenant_audit_healed_rows_total{")).collect();
    let sample = |repair: &str, n: u64| {
        format!("tenant_audit_healed_rows_total{{database=\"default\",repair=\"{repair}\"}} {n}")
    };
    assert_eq!(
        healed,
        [
            sample("add_missing_columns", 1),
            sample("advance_sequences", 0),
            sample("backfill_null_timestamps", 0),
            sample("copy_missing_parents", 0),
            sample("undo", 0),
        ]
    );
}

/// An existing column made NOT NULL on its own: its backfilled rows (2, from `modified_at`)
/// and one change for the `SET NOT NULL`; the check added and validated on the way count none.
#[tokio::test]
async fn an_existing_column_made_not_null_counts_its_rows_and_one_change() {
    let sql = format!(
        "{}
        INSERT INTO tenant_a.users_userprofile (user_id, created_at, modified_at, updated_at)
          VALUES (2, '2020-01-01', '2020-01-02', NULL), (3, '2020-01-01', '2020-01-03', NULL);",
        tenant_a("ALTER COLUMN updated_at DROP NOT NULL")
    );
    let url = fixture_db("heal_ddl_count_not_null", &sql).await;
    let text = format!("database_url = {url:?}\n{HEAL}");
    let (code, stdout, stderr) = heal_cli("heal_ddl_count_not_null", &text, &["--execute"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, ["add_missing_columns: 3 change(s)", "heal run: 3 change(s), 0 tenant(s) skipped, 0 error(s)"]);
    assert_eq!(rows(&url, STEP_ROWS).await, ["add_check", "validate_check", "set_not_null"]);
    assert_eq!(
        rows(&url, "SELECT format('%s %s', id, updated_at = modified_at) FROM tenant_a.users_userprofile WHERE id > 1 ORDER BY id")
            .await,
        ["2 t", "3 t"]
    );
    assert_eq!(lines(&scan(&config(&url, HEAL)).await.findings), Vec::<String>::new());
}

/// The staged add of a NOT NULL column ([`STAGED`]) counts as before: one change for the
/// column, whatever steps follow its add, and its 6 backfilled rows (the fixture's and 5 more).
#[tokio::test]
async fn a_staged_add_of_a_not_null_column_counts_the_column_once_and_its_rows() {
    let url = fixture_db("heal_ddl_count_staged", STAGED).await;
    let text = format!("database_url = {url:?}\n{HEAL}");
    let (code, stdout, stderr) = heal_cli("heal_ddl_count_staged", &text, &["--execute"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, ["add_missing_columns: 7 change(s)", "heal run: 7 change(s), 0 tenant(s) skipped, 0 error(s)"]);
    assert_eq!(rows(&url, STEP_ROWS).await, ["add_column", "add_check", "validate_check", "set_not_null"]);
    assert_finished(&url).await;
}
