//! How much one copy writes, against real PostgreSQL: a key's parent and all its ancestors are
//! one transaction, bounded by `heal.batch_size` and `heal.max_rows_per_run`; a key that needs
//! more is set aside and never blocks the others. And what a copy writes when the application
//! re-points an orphan under it.

use crate::support::{fixture_db, heal_cli, pg, rows, wait_until_scan_blocked};

/// `heal ARGS` with `[tenants] include = ['^tenant_']` and the `[heal]` keys `heal`: (exit code,
/// stdout with the run id cut from its total line, stderr).
fn heal(url: &str, name: &str, heal: &str, args: &[&str]) -> (Option<i32>, Vec<String>, String) {
    heal_cli(name, &format!("database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\n[heal]\n{heal}"), args)
}

/// `uuid` `n` as text: `00000000-0000-0000-0000-00000000000n`.
fn id(n: u32) -> String {
    format!("00000000-0000-0000-0000-{n:012}")
}

/// A shared self-referencing chain of 3,000 nodes (node n's parent is n + 1, node 3000 the top),
/// a chain of two (5001 under 5002) and a single node 5003; the tenant's own `node` table
/// references itself, and three tenant rows are orphans pointing at node 1 (the chain's leaf),
/// 5001 and 5003.
const CHAIN: &str = "SELECT pg_temp.create_tenant('tenant_a');
    CREATE FUNCTION pg_temp.n(integer) RETURNS uuid LANGUAGE sql
      AS $$ SELECT pg_catalog.format('00000000-0000-0000-0000-%s', pg_catalog.lpad($1::text, 12, '0'))::uuid $$;
    CREATE TABLE public.node (id uuid PRIMARY KEY, parent_id uuid REFERENCES public.node (id), name text);
    CREATE TABLE tenant_a.node (id uuid PRIMARY KEY, parent_id uuid REFERENCES tenant_a.node (id), name text);
    INSERT INTO public.node SELECT pg_temp.n(g), CASE WHEN g < 3000 THEN pg_temp.n(g + 1) END, 'chain ' || g
      FROM pg_catalog.generate_series(1, 3000) g;
    INSERT INTO public.node VALUES (pg_temp.n(5002), NULL, 'top 5002'), (pg_temp.n(5001), pg_temp.n(5002), 'under 5002'),
      (pg_temp.n(5003), NULL, 'single 5003');
    SET session_replication_role = replica;
    INSERT INTO tenant_a.node VALUES (pg_temp.n(9001), pg_temp.n(1), 'orphan of the chain'),
      (pg_temp.n(9002), pg_temp.n(5001), 'orphan of 5001'), (pg_temp.n(9003), pg_temp.n(5003), 'orphan of 5003');
    RESET session_replication_role;";

/// With `heal.max_rows_per_run = 100`, the chain's leaf would need 3,000 rows in one
/// transaction: its key is set aside with the reason, its closure is looked up no further, and
/// the two other keys are healed in the same run (three rows). The plan file says the same: the
/// three keys, and only the three rows of the two others.
#[tokio::test]
async fn a_key_whose_closure_passes_max_rows_per_run_is_set_aside_and_the_others_healed() {
    let url = fixture_db("copy_bounds_chain", CHAIN).await;
    let config = "copy_missing_parents = true\nmax_rows_per_run = 100\n";
    let reason = "its copy needs more than 100 rows (the parent and all its ancestors, written in one transaction), more than heal.max_rows_per_run = 100: raise it, or copy these rows by hand";

    let file = std::env::temp_dir().join(format!("tenant-audit-it-{}-copy-bounds.json", std::process::id()));
    let (code, _, stderr) = heal(&url, "copy_bounds_chain", config, &["--plan-out", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    let plan: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let copy = &plan["plan"]["tenants"][0]["actions"][0]["steps"][0]["Copy"];
    assert_eq!(copy["only"], serde_json::json!([[id(1)], [id(5001)], [id(5003)]]));
    assert_eq!(
        copy["rows"],
        serde_json::json!([
            { "table": "node", "key": [id(5001)] },
            { "table": "node", "key": [id(5002)] },
            { "table": "node", "key": [id(5003)] },
        ])
    );

    let expected = [
        "copy_missing_parents: 3 change(s)".to_string(),
        format!("set aside tenant_a.node key ({}): {reason}", id(1)),
        "heal run: 3 change(s), 0 tenant(s) skipped, 0 error(s)".to_string(),
    ];
    let (code, stdout, stderr) = heal(&url, "copy_bounds_chain", config, &["--execute"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stdout, expected);
    assert_eq!(
        rows(&url, "SELECT name FROM tenant_a.node ORDER BY id").await,
        ["under 5002", "top 5002", "single 5003", "orphan of the chain", "orphan of 5001", "orphan of 5003"]
    );
    assert_eq!(
        rows(&url, "SELECT row_key->>'id' FROM tenant_audit.heal_log ORDER BY row_key->>'id'").await,
        [id(5001), id(5002), id(5003)]
    );
}

/// With `heal.batch_size = 2`, one transaction writes at most two rows: the chain's key is set
/// aside naming `heal.batch_size`, 5001 with its parent 5002 is one transaction and 5003 the
/// next (two transactions write the three audit rows).
#[tokio::test]
async fn a_transaction_writes_at_most_batch_size_rows() {
    let url = fixture_db("copy_bounds_batch", CHAIN).await;
    let config = "copy_missing_parents = true\nbatch_size = 2\n";
    let (code, stdout, stderr) = heal(&url, "copy_bounds_batch", config, &["--execute"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stdout,
        [
            "copy_missing_parents: 3 change(s)".to_string(),
            format!("set aside tenant_a.node key ({}): its copy needs more than 2 rows (the parent and all its ancestors, written in one transaction), more than heal.batch_size = 2: raise it, or copy these rows by hand", id(1)),
            "heal run: 3 change(s), 0 tenant(s) skipped, 0 error(s)".to_string(),
        ]
    );
    assert_eq!(
        rows(&url, "SELECT string_agg(row_key->>'id', ' ' ORDER BY row_key->>'id') FROM tenant_audit.heal_log GROUP BY xmin::text ORDER BY 1").await,
        [format!("{} {}", id(5001), id(5002)), id(5003)]
    );
}

/// The application re-points the orphan shop 1 from the shared region 1 to the tenant's own
/// region 3 in a transaction still open while heal picks region 1: the copy waits for the
/// orphan's lock (`FOR SHARE`), sees the committed re-pointing, and copies nothing (region 1
/// would be a row nothing references). Without the lock it copied region 1 without waiting.
#[tokio::test]
async fn an_orphan_re_pointed_under_the_copy_copies_nothing() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE public.region (id uuid PRIMARY KEY, name text);
        CREATE TABLE tenant_a.region (id uuid PRIMARY KEY, name text);
        CREATE TABLE tenant_a.shop (id uuid PRIMARY KEY, region_id uuid REFERENCES tenant_a.region (id), name text);
        INSERT INTO public.region VALUES ('00000000-0000-0000-0000-000000000001', 'shared 1');
        INSERT INTO tenant_a.region VALUES ('00000000-0000-0000-0000-000000000003', 'own 3');
        SET session_replication_role = replica;
        INSERT INTO tenant_a.shop VALUES ('00000000-0000-0000-0000-000000000001', '00000000-0000-0000-0000-000000000001', 'shop 1');
        RESET session_replication_role;";
    let url = fixture_db("copy_bounds_race", sql).await;
    let app = pg::connect(&url).await;
    app.batch_execute(
        "BEGIN; UPDATE tenant_a.shop SET region_id = '00000000-0000-0000-0000-000000000003'
         WHERE id = '00000000-0000-0000-0000-000000000001'",
    )
    .await
    .unwrap();
    let heal_url = url.clone();
    let run = tokio::task::spawn_blocking(move || {
        heal(&heal_url, "copy_bounds_race", "copy_missing_parents = true\nlock_timeout = '60s'\n", &["--execute"])
    });
    wait_until_scan_blocked(&url).await;
    app.batch_execute("COMMIT").await.unwrap();
    let (code, stdout, stderr) = run.await.unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, ["copy_missing_parents: 0 change(s)", "heal run: 0 change(s), 0 tenant(s) skipped, 0 error(s)"]);
    assert_eq!(rows(&url, "SELECT name FROM tenant_a.region ORDER BY id").await, ["own 3"]);
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_audit.heal_log").await, ["0"]);
}
