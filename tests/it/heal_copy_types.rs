//! `copy_missing_parents` of parents whose key has a type of the shared schema (a composite, an
//! enum), against real PostgreSQL: every statement that looks a key up casts the key's text to
//! the column's own type, so the copy, its plan file, `--apply` and `--undo` find the row.

use crate::support::{fixture_db, heal_cli, rows};

/// `heal ARGS` with `[tenants] include = ['^tenant_']` and `heal` in `[heal]`.
fn heal(url: &str, name: &str, heal: &str, args: &[&str]) -> (Option<i32>, Vec<String>, String) {
    heal_cli(name, &format!("database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\n[heal]\n{heal}"), args)
}

const KEYS: &str = "copy_missing_parents = true\nsame_entity_keys = [{ table = 'shop', columns = ['id'] }, { table = 'paint', columns = ['id'] }]\n";

/// `public.shop` is keyed by the shared composite `public.shop_key`, `public.paint` by the shared
/// enum `public.color`; the tenant's tables use the same types. Two orphaned notes reference
/// shop (1,'a') (one key), one references paint `red`; shop (2,'b') and paint `blue` exist only
/// in the shared schema and nothing references them.
const SQL: &str = "SELECT pg_temp.create_tenant('tenant_a');
    CREATE TYPE public.shop_key AS (org int, code text);
    CREATE TYPE public.color AS ENUM ('red', 'blue');
    CREATE TABLE public.shop (id public.shop_key PRIMARY KEY, name text);
    CREATE TABLE public.paint (id public.color PRIMARY KEY, name text);
    CREATE TABLE tenant_a.shop (id public.shop_key PRIMARY KEY, name text);
    CREATE TABLE tenant_a.paint (id public.color PRIMARY KEY, name text);
    CREATE TABLE tenant_a.note (id serial PRIMARY KEY, shop_id public.shop_key REFERENCES tenant_a.shop (id),
      paint_id public.color REFERENCES tenant_a.paint (id));
    INSERT INTO public.shop VALUES (ROW(1, 'a'), 'shop 1a'), (ROW(2, 'b'), 'shop 2b');
    INSERT INTO public.paint VALUES ('red', 'paint red'), ('blue', 'paint blue');
    SET session_replication_role = replica;
    INSERT INTO tenant_a.note (shop_id, paint_id) VALUES (ROW(1, 'a'), NULL), (ROW(1, 'a'), NULL), (NULL, 'red');
    RESET session_replication_role;";

const COPIED: &str = "SELECT format('%s %s', id, name) FROM tenant_a.shop UNION ALL SELECT format('%s %s', id, name) FROM tenant_a.paint";
const LOG: &str = "SELECT format('%s %s %s', table_name, row_key, new_value) FROM tenant_audit.heal_log ORDER BY id";

fn copied() -> Vec<String> {
    vec!["(1,a) shop 1a".to_string(), "red paint red".to_string()]
}

fn logged() -> Vec<String> {
    vec![
        "paint {\"id\": \"red\"} {\"id\": \"red\", \"name\": \"paint red\"}".to_string(),
        "shop {\"id\": {\"org\": 1, \"code\": \"a\"}} {\"id\": {\"org\": 1, \"code\": \"a\"}, \"name\": \"shop 1a\"}"
            .to_string(),
    ]
}

#[tokio::test]
async fn parents_keyed_by_a_shared_composite_or_enum_are_copied() {
    let url = fixture_db("copy_types_execute", SQL).await;
    let (code, stdout, stderr) = heal(&url, "copy_types_execute", KEYS, &["--execute"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, ["copy_missing_parents: 2 change(s)", "heal run: 2 change(s), 0 tenant(s) skipped, 0 error(s)"]);
    assert_eq!(rows(&url, COPIED).await, copied());
    assert_eq!(rows(&url, LOG).await, logged());
    // Nothing is left to heal: a second run changes nothing.
    let (code, stdout, stderr) = heal(&url, "copy_types_again", KEYS, &["--execute"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, ["heal run: 0 change(s), 0 tenant(s) skipped, 0 error(s)"]);
}

#[tokio::test]
async fn a_plan_file_of_composite_and_enum_keys_lists_and_applies_exactly_those_rows() {
    let url = fixture_db("copy_types_plan", SQL).await;
    let file = std::env::temp_dir().join(format!("tenant-audit-it-{}-copy-types.json", std::process::id()));
    let (code, _, stderr) = heal(&url, "copy_types_plan", KEYS, &["--plan-out", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    let plan: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let steps: Vec<&serde_json::Value> =
        plan["plan"]["tenants"][0]["actions"].as_array().unwrap().iter().map(|a| &a["steps"][0]["Copy"]).collect();
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0]["only"], serde_json::json!([["red"]]));
    assert_eq!(steps[0]["rows"], serde_json::json!([{ "table": "paint", "key": ["red"] }]));
    assert_eq!(steps[1]["only"], serde_json::json!([["(1,a)"]]));
    assert_eq!(steps[1]["rows"], serde_json::json!([{ "table": "shop", "key": ["(1,a)"] }]));
    let (code, stdout, stderr) =
        heal(&url, "copy_types_apply", KEYS, &["--apply", file.to_str().unwrap(), "--execute"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, ["copy_missing_parents: 2 change(s)", "heal run: 2 change(s), 0 tenant(s) skipped, 0 error(s)"]);
    assert_eq!(rows(&url, COPIED).await, copied());
    assert_eq!(rows(&url, LOG).await, logged());
    let _ = std::fs::remove_file(&file);
}

#[tokio::test]
async fn copies_keyed_by_a_shared_composite_or_enum_are_undone() {
    let url = fixture_db("copy_types_undo", SQL).await;
    let (code, _, stderr) = heal(&url, "copy_types_undo", KEYS, &["--execute"]);
    assert_eq!(code, Some(0), "{stderr}");
    let run = rows(&url, "SELECT DISTINCT run_id::text FROM tenant_audit.heal_log").await;
    assert_eq!(run.len(), 1);
    let run = run[0].clone();
    // The notes still reference both copies: both are left, nothing is deleted.
    let (code, stdout, stderr) = heal(&url, "copy_types_undo_referenced", KEYS, &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stdout[0], "undo: 0 change(s)");
    assert_eq!(
        stdout[2..],
        [
            "left (still referenced): tenant_a.paint {\"id\": \"red\"}",
            "left (still referenced): tenant_a.shop {\"id\": {\"org\": 1, \"code\": \"a\"}}",
        ]
    );
    assert_eq!(rows(&url, COPIED).await, copied());
    // Once the application deleted its notes, both copies are undone and audited.
    crate::support::pg::connect(&url).await.batch_execute("DELETE FROM tenant_a.note").await.unwrap();
    let (code, stdout, stderr) = heal(&url, "copy_types_undo_clean", KEYS, &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout[0], "undo: 2 change(s)");
    assert_eq!(rows(&url, COPIED).await, Vec::<String>::new());
    let mut expected = logged();
    expected.push("paint {\"id\": \"red\"} ".to_string());
    expected.push("shop {\"id\": {\"org\": 1, \"code\": \"a\"}} ".to_string());
    assert_eq!(rows(&url, LOG).await, expected);
}
