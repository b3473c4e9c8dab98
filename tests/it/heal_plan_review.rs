//! Plan files and `set_default` under a hostile DBA's review, against real PostgreSQL:
//! `--apply` changes exactly what the plan names, re-checks it when it runs, and reports what it
//! skipped; a bad file is refused whole.

use crate::support::{fixture_db, heal_cli, pg, rows};

async fn run_sql(url: &str, sql: &str) {
    pg::connect(url).await.batch_execute(sql).await.unwrap();
}

/// `heal --config <name>.toml ARGS` with `config` after the database URL: (exit code, stdout
/// with the run id cut from its total line, stderr).
fn heal(url: &str, name: &str, config: &str, args: &[&str]) -> (Option<i32>, Vec<String>, String) {
    heal_cli(name, &format!("database_url = {url:?}\n{config}"), args)
}

fn plan_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("tenant-audit-it-{}-{name}.json", std::process::id()))
}

const DEFAULTS: &str = "[tenants]\nreference_schema = 'tmpl'\n[heal]\nadd_missing_columns = true\n";

/// The reference `tmpl` (not a registered tenant) defaults `business_type` to 'retail';
/// `tenant_a` has no default.
const TEMPLATE: &str = "SELECT pg_temp.create_tenant('tmpl'); SELECT pg_temp.create_tenant('tenant_a');
    DELETE FROM public.customers_client WHERE schema_name = 'tmpl';
    ALTER TABLE tmpl.users_businessdetails ALTER COLUMN business_type SET DEFAULT 'retail';";

const DEFAULT_OF: &str = "SELECT coalesce(pg_get_expr(d.adbin, d.adrelid), 'none') FROM pg_attribute a
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attrelid = 'tenant_a.users_businessdetails'::regclass AND a.attname = 'business_type'";

const SET_DEFAULT_SKIPPED: &str =
    "skipped tenant_a.users_businessdetails key {\"column\": \"business_type\", \"step\": \"set_default\"}: changed since the plan";

/// Item 4: a migration rolls out a new default (to the reference and the tenant) after the plan:
/// `--apply` must not put the old one back. And when only the tenant's default changed, the
/// step (checked under the table's lock) is skipped and reported, nothing audited.
#[tokio::test]
async fn set_default_never_reverts_a_default_changed_since_the_plan() {
    let url = fixture_db("plan_review_default", TEMPLATE).await;
    let file = plan_path("default");
    let (code, _, stderr) = heal(&url, "plan_review_default", DEFAULTS, &["--plan-out", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("\"expect_default\": {\n"), "{text}");

    // Only the tenant's default changed: the derived step is the same, the seen default not.
    run_sql(&url, "ALTER TABLE tenant_a.users_businessdetails ALTER COLUMN business_type SET DEFAULT 'x'").await;
    let (code, stdout, stderr) =
        heal(&url, "plan_review_default", DEFAULTS, &["--apply", file.to_str().unwrap(), "--execute"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stdout, [SET_DEFAULT_SKIPPED, "heal run: 0 change(s), 0 tenant(s) skipped, 0 error(s)"]);
    assert_eq!(rows(&url, DEFAULT_OF).await, ["'x'::text"]);
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_audit.heal_log").await, ["0"]);

    // The migration: both get 'wholesale'.
    run_sql(
        &url,
        "ALTER TABLE tmpl.users_businessdetails ALTER COLUMN business_type SET DEFAULT 'wholesale';
         ALTER TABLE tenant_a.users_businessdetails ALTER COLUMN business_type SET DEFAULT 'wholesale';",
    )
    .await;
    let (code, stdout, stderr) =
        heal(&url, "plan_review_default", DEFAULTS, &["--apply", file.to_str().unwrap(), "--execute"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stdout, [SET_DEFAULT_SKIPPED, "heal run: 0 change(s), 0 tenant(s) skipped, 0 error(s)"]);
    assert_eq!(rows(&url, DEFAULT_OF).await, ["'wholesale'::text"]);
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_audit.heal_log").await, ["0"]);
    let _ = std::fs::remove_file(&file);
}

/// Item 17: a lost `nextval` default is set back; the sequence it draws from is moved only
/// forward and audited: `tenant_a`'s, restarted at 1,000,000 (`is_called` false) above the
/// column's 10 rows, is left alone; `tenant_b`'s, behind its 10 rows, is moved to 10.
#[tokio::test]
async fn set_default_moves_its_sequence_only_forward_and_audited() {
    let sql = "SELECT pg_temp.create_tenant(t) FROM unnest(ARRAY['tmpl', 'tenant_a', 'tenant_b']) t;
        DELETE FROM public.customers_client WHERE schema_name = 'tmpl';
        CREATE TABLE tmpl.doc (id bigserial PRIMARY KEY, title text);
        CREATE TABLE tenant_a.doc (id bigserial PRIMARY KEY, title text);
        CREATE TABLE tenant_b.doc (id bigserial PRIMARY KEY, title text);
        INSERT INTO tenant_a.doc (title) SELECT 'd' || g FROM generate_series(1, 10) g;
        INSERT INTO tenant_b.doc (title) SELECT 'd' || g FROM generate_series(1, 10) g;
        ALTER SEQUENCE tenant_a.doc_id_seq RESTART WITH 1000000;
        SELECT setval('tenant_b.doc_id_seq', 3);
        ALTER TABLE tenant_a.doc ALTER COLUMN id DROP DEFAULT;
        ALTER TABLE tenant_b.doc ALTER COLUMN id DROP DEFAULT;";
    let url = fixture_db("plan_review_nextval", sql).await;
    let (code, stdout, stderr) = heal(&url, "plan_review_nextval", DEFAULTS, &["--execute"]);
    assert_eq!(code, Some(0), "{stderr}");
    // Two defaults restored, one sequence moved.
    assert_eq!(stdout, ["add_missing_columns: 3 change(s)", "heal run: 3 change(s), 0 tenant(s) skipped, 0 error(s)"]);
    assert_eq!(
        rows(&url, "SELECT format('%s %s', last_value, is_called) FROM tenant_a.doc_id_seq").await,
        ["1000000 f"]
    );
    assert_eq!(rows(&url, "SELECT format('%s %s', last_value, is_called) FROM tenant_b.doc_id_seq").await, ["10 t"]);
    assert_eq!(
        rows(
            &url,
            "SELECT format('%s %s %s %s', schema_name, row_key, old_value, new_value) FROM tenant_audit.heal_log
             WHERE row_key ? 'sequence' ORDER BY id"
        )
        .await,
        ["tenant_b {\"column\": \"id\", \"sequence\": \"doc_id_seq\"} {\"next_value\": 4} {\"next_value\": 11}"]
    );
    assert_eq!(
        rows(&url, "SELECT schema_name || ' ' || (row_key->>'step') FROM tenant_audit.heal_log WHERE row_key ? 'step' ORDER BY 1")
            .await,
        ["tenant_a set_default", "tenant_b set_default"]
    );
    assert_eq!(rows(&url, "INSERT INTO tenant_a.doc (title) VALUES ('next') RETURNING id::text").await, ["1000000"]);
    assert_eq!(rows(&url, "INSERT INTO tenant_b.doc (title) VALUES ('next') RETURNING id::text").await, ["11"]);
}

/// Item 3: a backfill of a table without a primary key is left out of the plan file (its rows
/// have no stable name), so a row inserted into a reused `ctid` slot after the plan is never
/// changed by `--apply`.
#[tokio::test]
async fn a_table_without_a_primary_key_is_left_out_of_plan_files() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE tenant_a.eventlog (body text, created_at timestamptz NOT NULL, updated_at timestamptz);
        INSERT INTO tenant_a.eventlog VALUES ('row A', '2026-01-01 00:00+00', NULL);";
    let url = fixture_db("plan_review_no_pk", sql).await;
    let config = "[tenants]\ninclude = ['^tenant_']\n[heal]\nbackfill_null_timestamps = true\n";
    let file = plan_path("no_pk");
    let (code, stdout, stderr) = heal(&url, "plan_review_no_pk", config, &["--plan-out", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stdout,
        [
            format!("wrote the plan for 0 tenant(s) to {}", file.display()),
            "left out of the plan: backfill_null_timestamps on tenant_a.eventlog: the table has no primary key: a plan file cannot name its rows (a ctid names a slot that VACUUM lets another row reuse); heal --execute without a plan file heals it".to_string(),
        ]
    );
    run_sql(&url, "DELETE FROM tenant_a.eventlog").await;
    run_sql(&url, "VACUUM tenant_a.eventlog").await;
    run_sql(
        &url,
        "INSERT INTO tenant_a.eventlog VALUES ('row B, inserted after the plan', '2025-06-01 00:00+00', NULL)",
    )
    .await;
    let (code, stdout, stderr) =
        heal(&url, "plan_review_no_pk", config, &["--apply", file.to_str().unwrap(), "--execute"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, ["heal run: 0 change(s), 0 tenant(s) skipped, 0 error(s)"]);
    assert_eq!(
        rows(&url, "SELECT format('%s %s %s', ctid, body, coalesce(updated_at::text, 'NULL')) FROM tenant_a.eventlog")
            .await,
        ["(0,1) row B, inserted after the plan NULL"]
    );
    let _ = std::fs::remove_file(&file);
}

/// Item 18: a corrupted or hand-edited plan file is refused whole with a one-line error and exit
/// 2, before the lease and before any write; the file's SQL is never run.
#[tokio::test]
async fn a_hand_edited_plan_file_is_refused_and_its_sql_never_runs() {
    let url = fixture_db("plan_review_edited", TEMPLATE).await;
    let file = plan_path("edited");
    let (code, _, stderr) = heal(&url, "plan_review_edited", DEFAULTS, &["--plan-out", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    let good: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(good["version"], 4);
    let once = "/plan/tenants/0/actions/0/steps/0/Once";
    assert_eq!(
        good.pointer(&format!("{once}/sql")).unwrap(),
        "ALTER TABLE \"tenant_a\".\"users_businessdetails\" ALTER COLUMN \"business_type\" SET DEFAULT 'retail'::text"
    );
    let apply = |name: &str, text: String| {
        let path = plan_path(name);
        std::fs::write(&path, text).unwrap();
        let out = heal(&url, "plan_review_edited", DEFAULTS, &["--apply", path.to_str().unwrap(), "--execute"]);
        let _ = std::fs::remove_file(&path);
        (out.0, out.1, out.2.lines().last().unwrap_or_default().to_string(), path)
    };
    let mut edited = good.clone();
    *edited.pointer_mut(&format!("{once}/sql")).unwrap() = serde_json::json!(
        "ALTER TABLE \"tenant_a\".\"users_businessdetails\" ALTER COLUMN \"business_type\" SET DEFAULT 'retail'::text; DROP TABLE tenant_a.users_userprofile"
    );
    let (code, stdout, last, path) = apply("edited_sql", edited.to_string());
    assert_eq!((code, stdout), (Some(2), Vec::<String>::new()));
    assert_eq!(
        last,
        format!("tenant-audit: error: plan file {} refused: step 1 of add_missing_columns on tenant_a.users_businessdetails is not what heal derives from the database now (the file was edited, or the schema changed since the plan): make a new plan with --plan-out", path.display())
    );
    let mut old = good.clone();
    old["version"] = serde_json::json!(1);
    let (code, _, last, path) = apply("old_version", old.to_string());
    assert_eq!(code, Some(2));
    assert_eq!(
        last,
        format!("tenant-audit: error: plan file {} has version 1; this heal reads version 4", path.display())
    );
    // A version 3 file (its one-off steps said `adds_column`) is refused by its version, not
    // as a file that is not a plan.
    let mut v3 = good.clone();
    v3["version"] = serde_json::json!(3);
    let step = v3.pointer_mut(once).unwrap().as_object_mut().unwrap();
    let completes = step.remove("completes_repair").unwrap();
    assert_eq!(completes, serde_json::json!(true));
    step.insert("adds_column".to_string(), serde_json::json!(false));
    let (code, _, last, path) = apply("version_3", v3.to_string());
    assert_eq!(code, Some(2));
    assert_eq!(
        last,
        format!("tenant-audit: error: plan file {} has version 3; this heal reads version 4", path.display())
    );
    let (code, _, last, path) = apply("corrupt", "{\"version\": 2, \"plan\": [".to_string());
    assert_eq!(code, Some(2));
    assert!(
        last.starts_with(&format!("tenant-audit: error: plan file {} is not a heal plan: ", path.display())),
        "{last}"
    );
    // Nothing ran: the table is there, the default unchanged, no lease or audit table created.
    assert_eq!(
        rows(&url, "SELECT to_regclass('tenant_a.users_userprofile')::text").await,
        ["tenant_a.users_userprofile"]
    );
    assert_eq!(rows(&url, DEFAULT_OF).await, ["none"]);
    assert_eq!(rows(&url, "SELECT count(*)::text FROM pg_namespace WHERE nspname = 'tenant_audit'").await, ["0"]);
    // The untouched file applies.
    let (code, stdout, _, _) = apply("good", good.to_string());
    assert_eq!(code, Some(0));
    assert_eq!(stdout, ["add_missing_columns: 1 change(s)", "heal run: 1 change(s), 0 tenant(s) skipped, 0 error(s)"]);
    assert_eq!(rows(&url, DEFAULT_OF).await, ["'retail'::text"]);
    let _ = std::fs::remove_file(&file);
}
