//! Heal's statements against a tenant that shadows built-in functions and operators, against
//! real PostgreSQL: a tenant's `to_jsonb(record)` or `unnest(uuid[])` (a better match than
//! `pg_catalog`'s polymorphic ones, whatever the `search_path`), or its operator for a pair of
//! types `pg_catalog` has none for, never runs as the heal role, because every function heal
//! emits is schema-qualified, and so is every such operator.

use crate::support::{fixture_db, heal_cli, pg, rows};

/// `heal --execute` with `copy_missing_parents`: (exit code, stdout with the run id cut, stderr).
fn heal(url: &str, name: &str) -> (Option<i32>, Vec<String>, String) {
    let config =
        format!("database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\n[heal]\ncopy_missing_parents = true\n");
    heal_cli(name, &config, &["--execute"])
}

/// The shared `tag` holds tags 1, 2, 3 and 10; the tenant's post names tag 1 (an orphan). The
/// tenant defines `to_jsonb(record)` (records who ran it, returns a forged audit value) and a
/// stateful `unnest(uuid[])` (honest once, then every shared tag): heal copies tag 1 only, audits
/// the real row, and neither function ran. Then a dishonest `unnest(uuid[])` (every shared tag,
/// always) and an orphan of tag 10: heal copies tag 10 only, exit 0, no panic.
#[tokio::test]
async fn tenant_functions_named_like_built_ins_never_run_in_heal() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE public.tag (id uuid PRIMARY KEY, name text);
        INSERT INTO public.tag VALUES ('00000000-0000-0000-0000-000000000001', 'one'),
          ('00000000-0000-0000-0000-000000000002', 'two'), ('00000000-0000-0000-0000-000000000003', 'three'),
          ('00000000-0000-0000-0000-000000000010', 'ten');
        CREATE TABLE tenant_a.tag (id uuid PRIMARY KEY, name text);
        CREATE TABLE tenant_a.post (id serial PRIMARY KEY, tag_id uuid);
        INSERT INTO tenant_a.post (tag_id) VALUES ('00000000-0000-0000-0000-000000000001');
        ALTER TABLE tenant_a.post ADD CONSTRAINT post_tag_fk FOREIGN KEY (tag_id) REFERENCES tenant_a.tag (id) NOT VALID;
        CREATE TABLE tenant_a.pwned (who text);
        CREATE FUNCTION tenant_a.to_jsonb(r record) RETURNS jsonb LANGUAGE plpgsql AS $$
        BEGIN
          INSERT INTO tenant_a.pwned VALUES ('to_jsonb ' || current_user);
          RETURN '{\"forged\": true}'::jsonb;
        END $$;
        CREATE FUNCTION tenant_a.unnest(a uuid[]) RETURNS SETOF uuid LANGUAGE plpgsql AS $$
        BEGIN
          INSERT INTO tenant_a.pwned VALUES ('unnest ' || current_user);
          IF coalesce(current_setting('pw.n', true), '') = '' THEN
            PERFORM set_config('pw.n', '1', true);
            RETURN QUERY SELECT x FROM pg_catalog.unnest(a) x;
          ELSE
            RETURN QUERY SELECT id FROM public.tag;
          END IF;
        END $$;";
    let url = fixture_db("heal_shadowing", sql).await;
    let (code, stdout, stderr) = heal(&url, "heal_shadowing");
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, ["copy_missing_parents: 1 change(s)", "heal run: 1 change(s), 0 tenant(s) skipped, 0 error(s)"]);
    assert_eq!(rows(&url, "SELECT name FROM tenant_a.tag ORDER BY id").await, ["one"]);
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_a.pwned").await, ["0"]);
    assert_eq!(
        rows(&url, "SELECT new_value::text FROM tenant_audit.heal_log ORDER BY id").await,
        ["{\"id\": \"00000000-0000-0000-0000-000000000001\", \"name\": \"one\"}"]
    );

    let dishonest = "CREATE OR REPLACE FUNCTION tenant_a.unnest(a uuid[]) RETURNS SETOF uuid LANGUAGE sql AS $$
          INSERT INTO tenant_a.pwned VALUES ('dishonest unnest ' || current_user);
          SELECT id FROM public.tag;
        $$;
        SET session_replication_role = replica;
        INSERT INTO tenant_a.post (tag_id) VALUES ('00000000-0000-0000-0000-000000000010');
        RESET session_replication_role;";
    pg::connect(&url).await.batch_execute(dishonest).await.unwrap();
    let (code, stdout, stderr) = heal(&url, "heal_shadowing");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stdout, ["copy_missing_parents: 1 change(s)", "heal run: 1 change(s), 0 tenant(s) skipped, 0 error(s)"]);
    assert_eq!(rows(&url, "SELECT name FROM tenant_a.tag ORDER BY id").await, ["one", "ten"]);
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_a.pwned").await, ["0"]);
    assert_eq!(
        rows(&url, "SELECT new_value::text FROM tenant_audit.heal_log ORDER BY id").await,
        [
            "{\"id\": \"00000000-0000-0000-0000-000000000001\", \"name\": \"one\"}",
            "{\"id\": \"00000000-0000-0000-0000-000000000010\", \"name\": \"ten\"}"
        ]
    );
}

/// A configured relationship (no constraint) whose child key is a tenant domain over `uuid`,
/// and a tenant operator `=(uuid, domain)` (an exact match for the pair, so a bare `=` would
/// pick it over the built-in one) that records who ran it and matches every row: the scan and
/// heal compare with `OPERATOR(pg_catalog.=)`, so heal copies exactly the one missing tag and
/// the operator never ran.
#[tokio::test]
async fn a_tenant_operator_never_decides_a_configured_relationship() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE public.tag (id uuid PRIMARY KEY, name text);
        INSERT INTO public.tag VALUES ('00000000-0000-0000-0000-000000000001', 'one'),
          ('00000000-0000-0000-0000-000000000002', 'two'), ('00000000-0000-0000-0000-000000000003', 'three');
        CREATE DOMAIN tenant_a.tag_ref AS uuid;
        CREATE TABLE tenant_a.tag (id uuid PRIMARY KEY, name text);
        INSERT INTO tenant_a.tag VALUES ('00000000-0000-0000-0000-000000000003', 'own three');
        CREATE TABLE tenant_a.post (id serial PRIMARY KEY, tag_id tenant_a.tag_ref);
        INSERT INTO tenant_a.post (tag_id) VALUES ('00000000-0000-0000-0000-000000000001'),
          ('00000000-0000-0000-0000-000000000003');
        CREATE TABLE tenant_a.pwned (who text);
        CREATE FUNCTION tenant_a.eq(a uuid, b tenant_a.tag_ref) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN
          INSERT INTO tenant_a.pwned VALUES (current_user);
          RETURN true;
        END $$;
        CREATE OPERATOR tenant_a.= (LEFTARG = uuid, RIGHTARG = tenant_a.tag_ref, FUNCTION = tenant_a.eq);";
    let url = fixture_db("heal_shadowing_operator", sql).await;
    let config = format!(
        "database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\n[heal]\ncopy_missing_parents = true\n\
         [[checks.relationships]]\ntable = 'post'\ncolumns = ['tag_id']\nparent_table = 'tag'\nparent_columns = ['id']\n"
    );
    let (code, stdout, stderr) = heal_cli("heal_shadowing_operator", &config, &["--execute"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, ["copy_missing_parents: 1 change(s)", "heal run: 1 change(s), 0 tenant(s) skipped, 0 error(s)"]);
    assert_eq!(rows(&url, "SELECT name FROM tenant_a.tag ORDER BY id").await, ["one", "own three"]);
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_a.pwned").await, ["0"]);
}

/// Tenant operators for the pairs of types heal's catalog and sequence statements compare that
/// `pg_catalog` has no operator for (`oid = regclass`, `numeric + bigint`, `bigint >= numeric`):
/// an exact match, so under heal's `search_path = pg_catalog, <tenant>` a bare operator would
/// pick the tenant's. Each records who ran it. Heal moves a sequence set back
/// (`advance_sequences`), gives a column its lost default (`add_missing_columns`) and copies a
/// parent, then the run is undone: none of the operators ever runs (before the sequence move
/// and `add_missing_columns`'s default lookup qualified them, `+` ran 2 times, `>=` 2 and `=` 17,
/// as the heal role).
#[tokio::test]
async fn tenant_operators_for_catalog_and_sequence_types_never_run_in_heal_or_undo() {
    let sql = "SELECT pg_temp.create_tenant(t) FROM unnest(ARRAY['tenant_template', 'tenant_a']) t;
        INSERT INTO tenant_a.users_businessdetails (business_id)
          SELECT 'b0000000-0000-0000-0000-000000000001' FROM generate_series(2, 10);
        SELECT setval('tenant_a.users_businessdetails_id_seq', 3);
        SET session_replication_role = replica;
        INSERT INTO tenant_a.users_userprofile (user_id, business_id, created_at, modified_at)
          VALUES (2, 'b0000000-0000-0000-0000-000000000002', now(), now());
        RESET session_replication_role;
        ALTER TABLE tenant_a.users_userprofile ALTER COLUMN updated_at DROP DEFAULT;
        CREATE TABLE tenant_a.pwned (who text, op text);
        CREATE FUNCTION tenant_a.eq(a oid, b regclass) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO tenant_a.pwned VALUES (current_user, '='); RETURN a OPERATOR(pg_catalog.=) b::oid; END $$;
        CREATE OPERATOR tenant_a.= (LEFTARG = oid, RIGHTARG = regclass, FUNCTION = tenant_a.eq);
        CREATE FUNCTION tenant_a.plus(a numeric, b bigint) RETURNS numeric LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO tenant_a.pwned VALUES (current_user, '+'); RETURN a OPERATOR(pg_catalog.+) b; END $$;
        CREATE OPERATOR tenant_a.+ (LEFTARG = numeric, RIGHTARG = bigint, FUNCTION = tenant_a.plus);
        CREATE FUNCTION tenant_a.ge(a bigint, b numeric) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO tenant_a.pwned VALUES (current_user, '>='); RETURN a OPERATOR(pg_catalog.>=) b; END $$;
        CREATE OPERATOR tenant_a.>= (LEFTARG = bigint, RIGHTARG = numeric, FUNCTION = tenant_a.ge);";
    let url = fixture_db("heal_shadowing_catalog_operators", sql).await;
    let config = format!(
        "database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\nreference_schema = 'tenant_template'\n\
         [heal]\nadvance_sequences = true\nadd_missing_columns = true\ncopy_missing_parents = true\n"
    );
    let pwned = "SELECT format('%s %s %s', who, op, count(*)) FROM tenant_a.pwned GROUP BY who, op ORDER BY op";
    let (code, stdout, stderr) = heal_cli("heal_shadowing_catalog_operators", &config, &["--execute"]);
    assert_eq!(code, Some(0), "{stdout:?} {stderr}");
    assert_eq!(
        rows(&url, "SELECT format('%s %s %s', repair, table_name, row_key) FROM tenant_audit.heal_log ORDER BY id").await,
        [
            "copy_missing_parents business_business {\"id\": \"b0000000-0000-0000-0000-000000000002\"}",
            "add_missing_columns users_userprofile {\"step\": \"set_default\", \"column\": \"updated_at\"}",
            "advance_sequences users_businessdetails {\"column\": \"id\", \"sequence\": \"users_businessdetails_id_seq\"}",
        ]
    );
    assert_eq!(rows(&url, pwned).await, Vec::<String>::new());
    assert_eq!(
        rows(
            &url,
            "SELECT format('%s %s', nextval('tenant_a.users_businessdetails_id_seq'),
               pg_get_expr(adbin, adrelid)) FROM pg_attrdef
             WHERE adrelid = 'tenant_a.users_userprofile'::regclass AND adnum = 6"
        )
        .await,
        ["11 now()"]
    );
    let run = rows(&url, "SELECT DISTINCT run_id FROM tenant_audit.heal_log").await.remove(0);
    let (code, stdout, stderr) = heal_cli("heal_shadowing_catalog_operators", &config, &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stdout,
        [
            "undo: 0 change(s)",
            "heal run: 0 change(s), 0 tenant(s) skipped, 0 error(s)",
            "not undone: tenant_a.users_businessdetails: 1 sequence move(s) not undone (moving a sequence back would make inserts fail)",
            "not undone: tenant_a.users_userprofile: 1 column change(s) not undone: added columns, constraints and defaults are not dropped",
            "left (still referenced): tenant_a.business_business {\"id\": \"b0000000-0000-0000-0000-000000000002\"}",
        ]
    );
    assert_eq!(rows(&url, pwned).await, Vec::<String>::new());
}
