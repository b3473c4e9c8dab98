//! Casts to a tenant's types, against real PostgreSQL: a tenant's `CREATE CAST ... WITH FUNCTION`
//! from a type heal casts from (text for a copy's or an undo's keys, a fallback column's type for a backfill)
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

/// Parents keyed by the shared enum `public.color` and the shared composite `public.t` (a key of
/// the tenant's own type is never copied), copied by a run; casts from text to both are added
/// afterwards, whose functions (outside pg_catalog) write to `public.pwned`.
const UNDO_SQL: &str = "SELECT pg_temp.create_tenant('tenant_a');
    CREATE TABLE public.pwned (who text);
    CREATE TYPE public.color AS ENUM ('red', 'blue');
    CREATE TYPE public.t AS (x text);
    CREATE TABLE public.paint (id public.color PRIMARY KEY, name text);
    CREATE TABLE tenant_a.paint (id public.color PRIMARY KEY, name text);
    CREATE TABLE public.shop (id public.t PRIMARY KEY, name text);
    CREATE TABLE tenant_a.shop (id public.t PRIMARY KEY, name text);
    INSERT INTO public.paint VALUES ('red', 'paint red');
    INSERT INTO public.shop VALUES (ROW('s1'), 'shop 1');
    CREATE TABLE tenant_a.refs (id serial PRIMARY KEY, paint_id public.color REFERENCES tenant_a.paint (id),
      shop_id public.t REFERENCES tenant_a.shop (id));
    SET session_replication_role = replica;
    INSERT INTO tenant_a.refs (paint_id, shop_id) VALUES ('red', ROW('s1'));
    RESET session_replication_role;";

const UNDO_CASTS: &str = "CREATE FUNCTION public.c(text) RETURNS public.color LANGUAGE plpgsql AS $$ BEGIN INSERT INTO public.pwned VALUES (current_user); RETURN (SELECT e FROM pg_catalog.unnest(pg_catalog.enum_range(NULL::public.color)) e WHERE e::pg_catalog.text = $1); END $$;
    CREATE CAST (text AS public.color) WITH FUNCTION public.c(text);
    CREATE FUNCTION public.f(text) RETURNS public.t LANGUAGE plpgsql AS $$ BEGIN INSERT INTO public.pwned VALUES (current_user); RETURN ROW($1); END $$;
    CREATE CAST (text AS public.t) WITH FUNCTION public.f(text);
    DELETE FROM tenant_a.refs;";

/// The undo of the enum's copy would cast the audited key from text to `public.color`: it is
/// set aside naming the cast, and the function never runs. The composite's audited key is read
/// back with `jsonb_populate_record` (no cast from text): that copy is undone, and the function
/// does not run either.
#[tokio::test]
async fn an_undo_whose_key_cast_runs_a_function_outside_pg_catalog_is_set_aside_and_it_never_runs() {
    let url = fixture_db("heal_casts_undo", UNDO_SQL).await;
    let path = config_file(
        "heal_casts_undo",
        &format!("database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\n[heal]\ncopy_missing_parents = true\nsame_entity_keys = [{{ table = 'paint', columns = ['id'] }}, {{ table = 'shop', columns = ['id'] }}]\n"),
    );
    let out = cli(&["heal", "--config", path.to_str().unwrap(), "--execute"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(summary(&out)[0], "copy_missing_parents: 2 change(s)");
    let run = rows(&url, "SELECT DISTINCT run_id FROM tenant_audit.heal_log").await;
    assert_eq!(run.len(), 1);
    crate::support::pg::connect(&url).await.batch_execute(UNDO_CASTS).await.unwrap();
    let out = cli(&["heal", "--config", path.to_str().unwrap(), "--undo", &run[0], "--execute"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        summary(&out),
        [
            "undo: 1 change(s)",
            "set aside tenant_a.paint: undo: a cast from text to public.color runs function public.c(text): heal does not run tenant functions; undo these rows by hand",
            "heal run: 1 change(s), 0 tenant(s) skipped, 0 error(s)",
        ]
    );
    assert_eq!(rows(&url, PWNED).await, ["0"]);
    assert_eq!(rows(&url, "SELECT format('%s %s', id, name) FROM tenant_a.paint").await, ["red paint red"]);
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_a.shop").await, ["0"]);
}
