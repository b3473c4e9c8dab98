//! Defaults heal writes, against real PostgreSQL, on a hostile DBA's review: the default a column
//! really gets (its own, or its domain's) and the function a default really calls in the tenant
//! decide whether the one-statement `ADD COLUMN` is safe; otherwise the staged path never
//! rewrites the table (its `relfilenode` stays the same).

use crate::support::{column_definitions, config, fixture_db, heal_cli, lines, rows, scan};

const HEAL: &str = "[tenants]\ninclude = ['^tenant_']\nreference_schema = 'tenant_template'\n\
    [heal]\nadd_missing_columns = true\n";

const FILENODE: &str = "SELECT pg_relation_filenode('tenant_a.item')::text";

/// The `ALTER TABLE` statements of the dry run's plan, and the exit code of `--execute`.
fn plan_and_heal(url: &str, name: &str) -> (Vec<String>, Option<i32>, String) {
    let text = format!("database_url = {url:?}\n{HEAL}");
    let (_, plan, _) = heal_cli(&format!("{name}_plan"), &text, &[]);
    let statements = plan.into_iter().filter(|l| l.starts_with("ALTER TABLE")).collect();
    let (code, stdout, stderr) = heal_cli(name, &text, &["--execute"]);
    (statements, code, format!("{}\n{stderr}", stdout.join("\n")))
}

/// A domain with a volatile default: the reference's columns have no default of their own, so
/// PostgreSQL gives every row the domain's `gen_random_uuid()`.
const DOMAIN_DEFAULT: &str = "SELECT pg_temp.create_tenant(t) FROM unnest(ARRAY['tenant_template', 'tenant_a']) t;
    CREATE DOMAIN public.rid AS uuid DEFAULT gen_random_uuid();
    CREATE TABLE tenant_template.item (id int PRIMARY KEY, ref public.rid, tag public.rid NOT NULL);
    CREATE TABLE tenant_a.item (id int PRIMARY KEY);
    INSERT INTO tenant_a.item SELECT generate_series(1, 10);";

/// `ADD COLUMN ref public.rid` would rewrite the table (the domain's default is volatile). Heal
/// adds it with `DEFAULT NULL` (metadata only), drops that default (new rows get the domain's),
/// and fills each existing row with the domain's default, evaluated per row.
#[tokio::test]
async fn a_column_of_a_domain_with_a_volatile_default_is_staged_and_never_rewrites_the_table() {
    let url = fixture_db("heal_defaults_domain", DOMAIN_DEFAULT).await;
    let before = rows(&url, FILENODE).await;
    let (statements, code, out) = plan_and_heal(&url, "heal_defaults_domain");
    assert_eq!(
        statements,
        [
            "ALTER TABLE \"tenant_a\".\"item\" ADD COLUMN IF NOT EXISTS \"ref\" public.rid DEFAULT NULL; ALTER TABLE \"tenant_a\".\"item\" ALTER COLUMN \"ref\" DROP DEFAULT;",
            "ALTER TABLE \"tenant_a\".\"item\" ADD COLUMN IF NOT EXISTS \"tag\" public.rid DEFAULT NULL; ALTER TABLE \"tenant_a\".\"item\" ALTER COLUMN \"tag\" DROP DEFAULT;",
            "ALTER TABLE \"tenant_a\".\"item\" DROP CONSTRAINT IF EXISTS \"tenant_audit_tag_not_null\", ADD CONSTRAINT \"tenant_audit_tag_not_null\" CHECK (\"tag\" IS NOT NULL) NOT VALID;",
            "ALTER TABLE \"tenant_a\".\"item\" VALIDATE CONSTRAINT \"tenant_audit_tag_not_null\";",
            "ALTER TABLE \"tenant_a\".\"item\" ALTER COLUMN \"tag\" SET NOT NULL; ALTER TABLE \"tenant_a\".\"item\" DROP CONSTRAINT \"tenant_audit_tag_not_null\";",
        ]
    );
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(rows(&url, FILENODE).await, before, "no statement rewrote the table");
    let reference = column_definitions(&url, "tenant_template", "item").await;
    assert_eq!(reference, ["id integer NOT NULL", "ref rid", "tag rid NOT NULL"]);
    assert_eq!(column_definitions(&url, "tenant_a", "item").await, reference);
    // Every existing row got its own uuid in each column, none is NULL; a new row gets the
    // domain's default too.
    let counts = "SELECT format('%s %s %s %s %s', count(*), count(ref), count(DISTINCT ref), count(tag), count(DISTINCT tag)) FROM tenant_a.item";
    assert_eq!(rows(&url, counts).await, ["10 10 10 10 10"]);
    rows(&url, "INSERT INTO tenant_a.item (id) VALUES (11) RETURNING ''").await;
    assert_eq!(rows(&url, counts).await, ["11 11 11 11 11"]);
    assert_eq!(lines(&scan(&config(&url, HEAL)).await.findings), Vec::<String>::new());
}

/// The reference's `mkcode()` is immutable, the tenant's own `mkcode()` is volatile: the
/// default's text resolves to the tenant's in the tenant, so a default calling a function outside
/// `pg_catalog` is never judged by the reference's function. The staged path runs the tenant's.
const SHADOWED_FUNCTION: &str = "SELECT pg_temp.create_tenant(t) FROM unnest(ARRAY['tenant_template', 'tenant_a']) t;
    CREATE FUNCTION tenant_template.mkcode() RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT 'ref' $$;
    CREATE FUNCTION tenant_a.mkcode() RETURNS text LANGUAGE sql VOLATILE AS $$ SELECT 'tenant' $$;
    CREATE TABLE tenant_template.item (id int PRIMARY KEY, code text DEFAULT tenant_template.mkcode());
    CREATE TABLE tenant_a.item (id int PRIMARY KEY);
    INSERT INTO tenant_a.item SELECT generate_series(1, 10);";

#[tokio::test]
async fn a_default_calling_a_function_outside_pg_catalog_is_staged_and_never_rewrites_the_table() {
    let url = fixture_db("heal_defaults_shadowed", SHADOWED_FUNCTION).await;
    let before = rows(&url, FILENODE).await;
    let (statements, code, out) = plan_and_heal(&url, "heal_defaults_shadowed");
    assert_eq!(
        statements,
        [
            "ALTER TABLE \"tenant_a\".\"item\" ADD COLUMN IF NOT EXISTS \"code\" text, ALTER COLUMN \"code\" SET DEFAULT mkcode();"
        ]
    );
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(rows(&url, FILENODE).await, before, "no statement rewrote the table");
    assert_eq!(
        column_definitions(&url, "tenant_a", "item").await,
        ["id integer NOT NULL", "code text DEFAULT tenant_a.mkcode()"]
    );
    let values = "SELECT format('%s %s', code, count(*)) FROM tenant_a.item GROUP BY code ORDER BY code";
    assert_eq!(rows(&url, values).await, ["tenant 10"]);
}
