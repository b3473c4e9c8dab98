//! Casts to a tenant's types, against real PostgreSQL: a tenant's `CREATE CAST ... WITH FUNCTION`
//! from a type heal casts from (text for a copy's keys, a fallback column's type for a backfill)
//! would run the tenant's function as the heal role. Heal finds it before the step runs, sets the
//! step aside naming the cast (exit 1, the function never runs: `public.pwned` stays empty) and
//! heals the tenant's other tables in the same run.

use crate::support::{cli, config_file, fixture_db, heal_summary as summary, rows};

/// `heal` (the dry run) and `heal --execute` on `url` with `heal`'s lines in `[heal]`.
fn plan_and_heal(url: &str, name: &str, extra: &str) -> (String, std::process::Output) {
    let path = config_file(name, &format!("database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\n{extra}"));
    let plan = cli(&["heal", "--config", path.to_str().unwrap()], &[]);
    let out = cli(&["heal", "--config", path.to_str().unwrap(), "--execute"], &[]);
    (String::from_utf8_lossy(&plan.stdout).into_owned(), out)
}

const PWNED: &str = "SELECT count(*)::text FROM public.pwned";

/// The reproduction: a composite type of the tenant's, a cast from text to it whose function
/// writes to `public.pwned`, and orphans whose key is of that type; beside them orphans of
/// another table whose keys are integers (both keys listed in `heal.same_entity_keys`).
const COPY_SQL: &str = "SELECT pg_temp.create_tenant('tenant_a');
    CREATE TABLE public.pwned (who text);
    CREATE TYPE tenant_a.t AS (x text);
    CREATE FUNCTION tenant_a.f(text) RETURNS tenant_a.t LANGUAGE plpgsql AS $$ BEGIN INSERT INTO public.pwned VALUES (current_user); RETURN ROW($1); END $$;
    CREATE CAST (text AS tenant_a.t) WITH FUNCTION tenant_a.f(text);
    CREATE TABLE public.shop (id tenant_a.t PRIMARY KEY, name text);
    CREATE TABLE tenant_a.shop (id tenant_a.t PRIMARY KEY, name text);
    CREATE TABLE tenant_a.refs (id serial PRIMARY KEY, shop_id tenant_a.t REFERENCES tenant_a.shop (id));
    CREATE TABLE public.brand (id int PRIMARY KEY, name text);
    CREATE TABLE tenant_a.brand (id int PRIMARY KEY, name text);
    CREATE TABLE tenant_a.items (id serial PRIMARY KEY, brand_id int REFERENCES tenant_a.brand (id));
    INSERT INTO public.shop VALUES (ROW('s1'), 'shop 1');
    INSERT INTO public.brand VALUES (7, 'brand 7');
    SET session_replication_role = replica;
    INSERT INTO tenant_a.refs (shop_id) VALUES (ROW('s1'));
    INSERT INTO tenant_a.items (brand_id) VALUES (7);
    RESET session_replication_role;";

#[tokio::test]
async fn a_copy_whose_key_cast_runs_a_tenant_function_is_set_aside_and_the_function_never_runs() {
    let url = fixture_db("heal_casts_copy", COPY_SQL).await;
    assert_eq!(rows(&url, PWNED).await, ["0"]);
    let (plan, out) = plan_and_heal(&url, "heal_casts_copy", "[heal]\ncopy_missing_parents = true\nsame_entity_keys = [{ table = 'shop', columns = ['id'] }, { table = 'brand', columns = ['id'] }]\n");
    assert!(plan.contains("if a cast it makes runs a function outside pg_catalog"), "{plan}");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        summary(&out),
        [
            "copy_missing_parents: 1 change(s)",
            "set aside tenant_a.refs: a cast from text to tenant_a.t runs function tenant_a.f(text): heal does not run tenant functions; copy these rows by hand",
            "heal run: 1 change(s), 0 tenant(s) skipped, 0 error(s)",
        ]
    );
    assert_eq!(rows(&url, PWNED).await, ["0"]);
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_a.shop").await, ["0"]);
    assert_eq!(rows(&url, "SELECT format('%s %s', id, name) FROM tenant_a.brand").await, ["7 brand 7"]);
}

/// A backfill from a column of the tenant's composite type whose cast to `timestamptz` writes to
/// `public.pwned`; another table of the tenant backfills from a `timestamptz` column.
const BACKFILL_SQL: &str = "SELECT pg_temp.create_tenant('tenant_a');
    CREATE TABLE public.pwned (who text);
    CREATE TYPE tenant_a.stamp AS (at timestamptz);
    CREATE FUNCTION tenant_a.g(tenant_a.stamp) RETURNS timestamptz LANGUAGE plpgsql AS $$ BEGIN INSERT INTO public.pwned VALUES (current_user); RETURN $1.at; END $$;
    CREATE CAST (tenant_a.stamp AS timestamptz) WITH FUNCTION tenant_a.g(tenant_a.stamp);
    CREATE TABLE tenant_a.events (id int PRIMARY KEY, modified_at tenant_a.stamp, updated_at timestamptz);
    CREATE TABLE tenant_a.notes (id int PRIMARY KEY, modified_at timestamptz, updated_at timestamptz);
    INSERT INTO tenant_a.events VALUES (1, ROW('2026-01-01 00:00:00+00'), NULL);
    INSERT INTO tenant_a.notes VALUES (1, '2026-01-02 00:00:00+00', NULL);";

#[tokio::test]
async fn a_backfill_whose_fallback_cast_runs_a_tenant_function_is_set_aside_and_the_function_never_runs() {
    let url = fixture_db("heal_casts_backfill", BACKFILL_SQL).await;
    assert_eq!(rows(&url, PWNED).await, ["0"]);
    let (plan, out) = plan_and_heal(
        &url,
        "heal_casts_backfill",
        "[checks]\nrequired_timestamps = ['updated_at']\n[heal]\nbackfill_null_timestamps = true\n[heal.fallbacks]\nupdated_at = ['modified_at']\n",
    );
    assert!(plan.contains("if a cast it makes runs a function outside pg_catalog"), "{plan}");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        summary(&out),
        [
            "backfill_null_timestamps: 1 change(s)",
            "set aside tenant_a.events: backfill of updated_at: a cast from tenant_a.stamp to timestamp with time zone runs function tenant_a.g(tenant_a.stamp): heal does not run tenant functions; set these values by hand",
            "heal run: 1 change(s), 0 tenant(s) skipped, 0 error(s)",
        ]
    );
    assert_eq!(rows(&url, PWNED).await, ["0"]);
    assert_eq!(rows(&url, "SELECT count(updated_at)::text FROM tenant_a.events").await, ["0"]);
    assert_eq!(rows(&url, "SELECT (updated_at = '2026-01-02 00:00:00+00')::text FROM tenant_a.notes").await, ["true"]);
}
