//! The hostile DBA review of heal (docs/heal.md), item by item against real PostgreSQL: each
//! test builds the reviewer's trap and asserts what heal writes (rows, keys, sequence values),
//! what it sets aside and why, and its exit code.

use crate::support::{cli, config_file, fixture_db, heal_summary as summary, pg, BORROWED_SEQUENCE_SQL};

async fn rows(url: &str, sql: &str) -> Vec<String> {
    let client = pg::connect(url).await;
    client.query(sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

/// `heal --execute` with `[tenants] include = ['^tenant_']` and the `[heal]` keys `heal`.
fn heal(url: &str, name: &str, heal: &str) -> std::process::Output {
    let path = config_file(name, &format!("database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\n[heal]\n{heal}"));
    cli(&["heal", "--config", path.to_str().unwrap(), "--execute"], &[])
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const LOGGED: &str = "SELECT count(*)::text FROM tenant_audit.heal_log";

/// Item 1: a row looked up by its uuid `ext_id` also carries a serial `id` the tenant's other
/// rows reference: copying it would write the shared schema's id 5, and the tenant's orphaned
/// `product_old` row (pointing at its own deleted category 5) would join to the shared row.
#[tokio::test]
async fn a_copy_never_writes_a_key_that_is_not_the_same_entity() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE public.category (id serial PRIMARY KEY, ext_id uuid UNIQUE NOT NULL, name text);
        CREATE TABLE tenant_a.category (id serial PRIMARY KEY, ext_id uuid UNIQUE NOT NULL, name text);
        CREATE TABLE tenant_a.product_old (id serial PRIMARY KEY, category_id int REFERENCES tenant_a.category (id));
        CREATE TABLE tenant_a.product (id serial PRIMARY KEY,
          category_ext uuid REFERENCES tenant_a.category (ext_id));
        INSERT INTO public.category (id, ext_id, name)
          SELECT g, ('00000000-0000-0000-0000-00000000000' || g)::uuid, 'SHARED cat ' || g FROM generate_series(1, 9) g;
        INSERT INTO tenant_a.category (id, ext_id, name)
          SELECT g, ('10000000-0000-0000-0000-00000000000' || g)::uuid, 'own cat ' || g FROM generate_series(1, 4) g;
        SELECT setval('tenant_a.category_id_seq', 5);
        SET session_replication_role = replica;
        INSERT INTO tenant_a.product_old (category_id) VALUES (5);
        INSERT INTO tenant_a.product (category_ext) VALUES ('00000000-0000-0000-0000-000000000005');
        RESET session_replication_role;";
    let url = fixture_db("heal_review_key_columns", sql).await;
    let out = heal(&url, "heal_review_key_columns", "copy_missing_parents = true\n");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        summary(&out),
        [
            "copy_missing_parents: 0 change(s)",
            "set aside tenant_a.product key (00000000-0000-0000-0000-000000000005): category(ext_id) = (00000000-0000-0000-0000-000000000005) cannot be copied: its column(s) id are a key the tenant's rows reference or draw from the tenant's own sequence, and not a same-entity key (not a uuid, not in heal.same_entity_keys): the shared row's value names another entity in the tenant",
            "heal run: 0 change(s), 0 tenant(s) skipped, 0 error(s)",
        ]
    );
    assert_eq!(
        rows(&url, "SELECT format('%s %s', id, name) FROM tenant_a.category ORDER BY id").await,
        ["1 own cat 1", "2 own cat 2", "3 own cat 3", "4 own cat 4"]
    );
    assert_eq!(rows(&url, LOGGED).await, ["0"]);
}

/// Item 3: the shared table's columns have other types than the tenant's: an insert would cast
/// 9.49 to 9 and read a `timestamp` as of heal's session time zone.
#[tokio::test]
async fn a_copy_between_columns_of_different_types_is_set_aside() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE public.item (id uuid PRIMARY KEY, price numeric(10,2), sold_at timestamp);
        CREATE TABLE tenant_a.item (id uuid PRIMARY KEY, price integer, sold_at timestamptz);
        CREATE TABLE public.tag (id uuid PRIMARY KEY, label varchar(20), at timestamptz);
        CREATE TABLE tenant_a.tag (id uuid PRIMARY KEY, label varchar(20), at timestamptz);
        CREATE TABLE tenant_a.line (id serial PRIMARY KEY, item_id uuid REFERENCES tenant_a.item (id),
          tag_id uuid REFERENCES tenant_a.tag (id));
        INSERT INTO public.item VALUES ('00000000-0000-0000-0000-000000000001', 9.49, '2020-01-01 12:00');
        INSERT INTO public.tag VALUES ('00000000-0000-0000-0000-000000000002', 'red', '2020-01-01 12:00+00');
        SET session_replication_role = replica;
        INSERT INTO tenant_a.line (item_id, tag_id) VALUES ('00000000-0000-0000-0000-000000000001', NULL),
          (NULL, '00000000-0000-0000-0000-000000000002');
        RESET session_replication_role;";
    let url = fixture_db("heal_review_types", sql).await;
    let path = config_file(
        "heal_review_types",
        &format!("database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\n[heal]\ncopy_missing_parents = true\n"),
    );
    let out = cli(&["heal", "--config", path.to_str().unwrap(), "--execute"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        summary(&out),
        [
            "copy_missing_parents: 1 change(s)",
            "set aside tenant_a.line key (00000000-0000-0000-0000-000000000001): item(id) = (00000000-0000-0000-0000-000000000001) cannot be copied: column price is numeric(10,2) in public and integer in tenant_a; column sold_at is timestamp without time zone in public and timestamp with time zone in tenant_a",
            "heal run: 1 change(s), 0 tenant(s) skipped, 0 error(s)",
        ]
    );
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_a.item").await, ["0"]);
    assert_eq!(
        rows(&url, "SELECT format('%s %s %s', id, label, at AT TIME ZONE 'UTC') FROM tenant_a.tag").await,
        ["00000000-0000-0000-0000-000000000002 red 2020-01-01 12:00:00"]
    );
}

/// Item 6: `SET DEFAULT nextval('doc_id_seq')` points the column at the tenant's own sequence,
/// still at 1 while the column holds 1..10: it is moved past them (before and after the step).
#[tokio::test]
async fn a_default_that_draws_from_a_sequence_leaves_the_sequence_past_the_column() {
    let sql = BORROWED_SEQUENCE_SQL;
    let url = fixture_db("heal_review_set_default", sql).await;
    let path = config_file(
        "heal_review_set_default",
        &format!(
            "database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\nreference_schema = 'tenant_a'\n[heal]\nadd_missing_columns = true\n"
        ),
    );
    let plan = stdout(&cli(&["heal", "--config", path.to_str().unwrap()], &[]));
    assert!(
        plan.contains("SET DEFAULT nextval('doc_id_seq'::regclass);\n-- before and after it, each time in a transaction of its own ($1 = run id):\nWITH moved AS ("),
        "{plan}"
    );
    let out = cli(&["heal", "--config", path.to_str().unwrap(), "--execute"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        rows(&url, "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = 'tenant_b.doc'::regclass").await,
        ["nextval('tenant_b.doc_id_seq'::regclass)"]
    );
    assert_eq!(
        rows(&url, "INSERT INTO tenant_b.doc (title) VALUES ('next') RETURNING id::text").await,
        ["11"],
        "the application's next insert succeeds"
    );
    assert_eq!(rows(&url, "SELECT last_value::text FROM tenant_a.doc_id_seq").await, ["10"]);
}

/// Item 8: another session holds a SHARE lock on the parent table: the copy's insert waits
/// `heal.lock_timeout` once, and the tenant is skipped, never key by key (ten waits in one
/// transaction, each reported as a set-aside key).
#[tokio::test]
async fn a_lock_timeout_in_a_copy_skips_the_tenant_instead_of_retrying_each_key() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE public.category (id uuid PRIMARY KEY, name text);
        CREATE TABLE tenant_a.category (id uuid PRIMARY KEY, name text);
        CREATE TABLE tenant_a.product (id serial PRIMARY KEY, category_id uuid REFERENCES tenant_a.category (id));
        INSERT INTO public.category SELECT ('00000000-0000-0000-0000-0000000000' || (10 + g))::uuid, 'cat ' || g
          FROM generate_series(1, 10) g;
        SET session_replication_role = replica;
        INSERT INTO tenant_a.product (category_id) SELECT id FROM public.category;
        RESET session_replication_role;";
    let url = fixture_db("heal_review_lock_timeout", sql).await;
    let holder = pg::connect(&url).await;
    holder.batch_execute("BEGIN; LOCK TABLE tenant_a.category IN SHARE MODE").await.unwrap();
    let out = heal(&url, "heal_review_lock_timeout", "copy_missing_parents = true\nlock_timeout = '200ms'\n");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        summary(&out),
        ["skipped tenant_a: lock_timeout", "heal run: 0 change(s), 1 tenant(s) skipped, 0 error(s)"]
    );
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_a.category").await, ["0"]);
    // Nothing in the way: the next run copies all ten.
    let out = heal(&url, "heal_review_lock_timeout", "copy_missing_parents = true\nlock_timeout = '200ms'\n");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_a.category").await, ["10"]);
}

/// Item 10: a clash with a DEFERRABLE INITIALLY DEFERRED unique constraint would only fail at
/// COMMIT, losing the whole batch on every run; it is checked inside the key's savepoint.
#[tokio::test]
async fn a_clash_with_a_deferred_unique_constraint_sets_one_key_aside() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE public.category (id uuid PRIMARY KEY, name text);
        CREATE TABLE tenant_a.category (id uuid PRIMARY KEY,
          name text UNIQUE DEFERRABLE INITIALLY DEFERRED);
        CREATE TABLE tenant_a.product (id serial PRIMARY KEY, category_id uuid REFERENCES tenant_a.category (id));
        INSERT INTO public.category VALUES ('00000000-0000-0000-0000-000000000001', 'books'),
          ('00000000-0000-0000-0000-000000000002', 'tools'), ('00000000-0000-0000-0000-000000000003', 'toys');
        INSERT INTO tenant_a.category VALUES ('10000000-0000-0000-0000-000000000001', 'tools');
        SET session_replication_role = replica;
        INSERT INTO tenant_a.product (category_id) SELECT id FROM public.category;
        RESET session_replication_role;";
    let url = fixture_db("heal_review_deferred_unique", sql).await;
    let out = heal(&url, "heal_review_deferred_unique", "copy_missing_parents = true\n");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        summary(&out),
        [
            "copy_missing_parents: 2 change(s)",
            "set aside tenant_a.product key (00000000-0000-0000-0000-000000000002): duplicate key value violates unique constraint \"category_name_key\"",
            "heal run: 2 change(s), 0 tenant(s) skipped, 0 error(s)",
        ]
    );
    assert_eq!(rows(&url, "SELECT name FROM tenant_a.category ORDER BY name").await, ["books", "tools", "toys"]);
    assert_eq!(rows(&url, LOGGED).await, ["2"]);
}

/// Item 11: a BEFORE UPDATE trigger (allowed) keeps the old (NULL) value: those rows are not
/// changes, not audited; the table is reported and left.
#[tokio::test]
async fn a_backfill_a_trigger_undoes_is_reported_not_counted() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE tenant_a.note (id int PRIMARY KEY, created_at timestamptz, modified_at timestamptz);
        INSERT INTO tenant_a.note VALUES (1, '2020-01-01', NULL), (2, '2020-01-02', NULL), (3, '2020-01-03', '2021-01-01');
        CREATE FUNCTION tenant_a.keep_modified() RETURNS trigger LANGUAGE plpgsql AS
          $$ BEGIN NEW.modified_at := OLD.modified_at; RETURN NEW; END $$;
        CREATE TRIGGER keep BEFORE UPDATE ON tenant_a.note FOR EACH ROW EXECUTE FUNCTION tenant_a.keep_modified();";
    let url = fixture_db("heal_review_neutralised", sql).await;
    let out = heal(
        &url,
        "heal_review_neutralised",
        "backfill_null_timestamps = true\nmax_rows_per_run = 3000\nallow_triggers = [{ table = 'note', trigger = 'keep' }]\n",
    );
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        summary(&out),
        ["backfill_null_timestamps: 0 change(s)", "heal run: 0 change(s), 0 tenant(s) skipped, 1 error(s)",]
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("2 row(s) of tenant_a.note kept modified_at NULL after the update (a trigger undoes it): the backfill of this table stopped"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(rows(&url, LOGGED).await, ["0"]);
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_a.note WHERE modified_at IS NULL").await, ["2"]);
}

/// Item 16: the tenant has another row under the shared row's primary key (looked up by its
/// uuid `ext_id`): `ON CONFLICT DO NOTHING` would report nothing, every run.
#[tokio::test]
async fn a_copy_whose_primary_key_the_tenant_has_is_set_aside_with_its_reason() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE public.category (id uuid PRIMARY KEY, ext_id uuid UNIQUE NOT NULL, name text);
        CREATE TABLE tenant_a.category (id uuid PRIMARY KEY, ext_id uuid UNIQUE NOT NULL, name text);
        CREATE TABLE tenant_a.product (id serial PRIMARY KEY, category_ext uuid REFERENCES tenant_a.category (ext_id));
        INSERT INTO public.category VALUES ('00000000-0000-0000-0000-000000000001', '00000000-0000-0000-0000-0000000000e1', 'shared');
        INSERT INTO tenant_a.category VALUES ('00000000-0000-0000-0000-000000000001', '10000000-0000-0000-0000-0000000000e1', 'own');
        SET session_replication_role = replica;
        INSERT INTO tenant_a.product (category_ext) VALUES ('00000000-0000-0000-0000-0000000000e1');
        RESET session_replication_role;";
    let url = fixture_db("heal_review_pk_taken", sql).await;
    let out = heal(&url, "heal_review_pk_taken", "copy_missing_parents = true\n");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        summary(&out),
        [
            "copy_missing_parents: 0 change(s)",
            "set aside tenant_a.product key (00000000-0000-0000-0000-0000000000e1): category(ext_id) = (00000000-0000-0000-0000-0000000000e1) cannot be copied: the tenant already has a row with this primary key (id) = (00000000-0000-0000-0000-000000000001)",
            "heal run: 0 change(s), 0 tenant(s) skipped, 0 error(s)",
        ]
    );
    assert_eq!(rows(&url, "SELECT name FROM tenant_a.category").await, ["own"]);
}

/// Item 13: a role with the grants of docs/heal.md except SELECT on the audit table: the write
/// statements read their audit rows back (`RETURNING`), so heal stops before writing with the
/// one-line privilege error (exit 2), not with each key set aside or a failed repair; so does
/// `--apply` of a plan file.
#[tokio::test]
async fn heal_without_select_on_the_audit_table_is_the_privilege_error() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE public.category (id uuid PRIMARY KEY, name text);
        CREATE TABLE tenant_a.category (id uuid PRIMARY KEY, name text);
        CREATE TABLE tenant_a.product (id serial PRIMARY KEY, category_id uuid REFERENCES tenant_a.category (id));
        INSERT INTO public.category VALUES ('00000000-0000-0000-0000-000000000001', 'books');
        SET session_replication_role = replica;
        INSERT INTO tenant_a.product (category_id) VALUES ('00000000-0000-0000-0000-000000000001');
        RESET session_replication_role;";
    let url = fixture_db("heal_review_audit_select", sql).await;
    // A run with nothing to do creates the audit and lease tables, as an administrator would.
    let out = heal(&url, "heal_review_audit_select_setup", "advance_sequences = true\n");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    pg::connect(&url)
        .await
        .batch_execute(
            "DROP ROLE IF EXISTS heal_no_select; CREATE ROLE heal_no_select LOGIN;
             GRANT USAGE ON SCHEMA public, tenant_a, tenant_audit TO heal_no_select;
             GRANT SELECT ON ALL TABLES IN SCHEMA public, tenant_a TO heal_no_select;
             GRANT SELECT ON ALL SEQUENCES IN SCHEMA public, tenant_a TO heal_no_select;
             GRANT INSERT ON tenant_a.category TO heal_no_select;
             GRANT INSERT ON tenant_audit.heal_log TO heal_no_select;
             GRANT USAGE ON SEQUENCE tenant_audit.heal_log_id_seq TO heal_no_select;
             GRANT SELECT, INSERT, UPDATE, DELETE ON tenant_audit.heal_lease TO heal_no_select;",
        )
        .await
        .unwrap();
    let role = url.replacen("postgres://postgres@", "postgres://heal_no_select@", 1);
    let out = heal(&role, "heal_review_audit_select", "copy_missing_parents = true\n");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).lines().last(),
        Some("tenant-audit: error: the heal role lacks a privilege it needs: no SELECT on \"tenant_audit\".\"heal_log\" (see docs/heal.md)")
    );
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_a.category").await, ["0"]);
    assert_eq!(rows(&url, LOGGED).await, ["0"]);
    // Applying a plan file an administrator made, with a backfill (its listed rows are looked up
    // in the audit table, for earlier fills): `--apply` does not read the audit table it may not
    // read, and stops with the same privilege error.
    pg::connect(&url)
        .await
        .batch_execute(
            "CREATE TABLE tenant_a.note (id int PRIMARY KEY, created_at timestamptz DEFAULT now(), updated_at timestamptz);
             INSERT INTO tenant_a.note (id, updated_at) VALUES (1, NULL);
             GRANT SELECT, UPDATE ON tenant_a.note TO heal_no_select;",
        )
        .await
        .unwrap();
    let file = std::env::temp_dir().join(format!("tenant-audit-it-{}-audit-select.json", std::process::id()));
    let admin = config_file(
        "heal_review_audit_select_plan",
        &format!("database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\n[heal]\ncopy_missing_parents = true\nbackfill_null_timestamps = true\n"),
    );
    let out = cli(&["heal", "--config", admin.to_str().unwrap(), "--plan-out", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let plan = std::fs::read_to_string(&file).unwrap();
    let plan: serde_json::Value = serde_json::from_str(&plan).unwrap();
    let backfill = &plan["plan"]["tenants"][0]["actions"][1]["steps"][0]["Backfill"];
    assert_eq!(backfill["only"], serde_json::json!(["{\"id\": 1}"]), "{plan}");
    let config = config_file(
        "heal_review_audit_select_apply",
        &format!("database_url = {role:?}\n[tenants]\ninclude = ['^tenant_']\n"),
    );
    let out = cli(&["heal", "--config", config.to_str().unwrap(), "--apply", file.to_str().unwrap(), "--execute"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).lines().last(),
        Some("tenant-audit: error: the heal role lacks a privilege it needs: no SELECT on \"tenant_audit\".\"heal_log\" (see docs/heal.md)")
    );
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_a.category").await, ["0"]);
    assert_eq!(rows(&url, "SELECT count(updated_at)::text FROM tenant_a.note").await, ["0"]);
    assert_eq!(rows(&url, LOGGED).await, ["0"]);
    let _ = std::fs::remove_file(&file);
}

/// Item 15: a schema name holding a newline would end the plan's `--` comment lines, and
/// `psql -f plan.sql` would run what follows it; every control character is printed escaped.
#[tokio::test]
async fn control_characters_in_names_cannot_escape_the_plan_comments() {
    let sql = "CREATE SCHEMA \"tenant_x\nDROP TABLE public.victim; --\";
        CREATE TABLE public.victim (id int);
        CREATE TABLE \"tenant_x\nDROP TABLE public.victim; --\".note (id int PRIMARY KEY, created_at timestamptz,
          updated_at timestamptz);
        INSERT INTO \"tenant_x\nDROP TABLE public.victim; --\".note VALUES (1, '2020-01-01', NULL);";
    let url = fixture_db("heal_review_control_chars", sql).await;
    let path = config_file(
        "heal_review_control_chars",
        &format!("database_url = {url:?}\n[tenants]\nregistry = false\ninclude = ['^tenant_']\n[heal]\nbackfill_null_timestamps = true\n"),
    );
    let out = cli(&["heal", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let plan = stdout(&out);
    assert!(plan.contains("-- tenant tenant_x\\u{a}DROP TABLE public.victim; --\n"), "{plan}");
    assert!(
        plan.contains("-- backfill_null_timestamps on \"tenant_x\\u{a}DROP TABLE public.victim; --\".note: 1 NULL updated_at value(s)"),
        "{plan}"
    );
    // Inside the statements the name stays a quoted identifier (newline and all): no comment line
    // of the plan holds it raw.
    assert!(!plan.contains("-- tenant tenant_x\nDROP"), "{plan}");
}

/// A schema whose name holds a newline and an ANSI escape cannot forge or colour a log line: heal
/// writes names escaped in its text log fields, one line per event.
#[tokio::test]
async fn names_in_log_lines_are_escaped() {
    let sql = "SELECT pg_temp.create_tenant(E'tenant_x\\n2026-01-01T00:00:00Z  INFO forged\\x1b[31m');
        CREATE TABLE \"tenant_x\n2026-01-01T00:00:00Z  INFO forged\x1b[31m\".note (id int PRIMARY KEY, created_at timestamptz, modified_at timestamptz);
        INSERT INTO \"tenant_x\n2026-01-01T00:00:00Z  INFO forged\x1b[31m\".note VALUES (1, '2020-01-01 00:00:00+00', NULL);";
    let url = fixture_db("heal_review_log_escape", sql).await;
    let out = heal(&url, "heal_review_log_escape", "backfill_null_timestamps = true\n");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains('\x1b'), "{stderr}");
    assert!(!stderr.lines().any(|l| l.starts_with("2026-01-01T00:00:00Z")), "{stderr}");
    let healed: Vec<&str> = stderr.lines().filter(|l| l.contains(" healed ")).collect();
    assert_eq!(healed.len(), 1, "{stderr}");
    assert!(
        healed[0].ends_with(" schema=tenant_x\\u{a}2026-01-01T00:00:00Z  INFO forged\\u{1b}[31m table=note repair=\"backfill_null_timestamps\" key={\"id\": 1}"),
        "{stderr}"
    );
}
