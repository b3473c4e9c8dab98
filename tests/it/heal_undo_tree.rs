//! `heal --undo RUN_ID` of a copied self-referencing chain against real PostgreSQL: every copied
//! row of a three-level tree is deleted in one undo run, whatever order the shared table holds the
//! rows in and whatever `heal.batch_size`; a row the application hung under the middle node since
//! keeps the middle node and the root, and only the leaf is deleted.

use crate::support::{cli, config_file, fixture_db, pg};

const TENANTS: [&str; 3] = ["tenant_a", "tenant_b", "tenant_c"];

/// Root, branch and leaf: keys 1, 2, 3.
fn node(n: u32) -> String {
    format!("a0000000-0000-0000-0000-{n:012}")
}

/// The shared tree (inserted leaf first when `leaf_first`: its physical order, the order a copy
/// reads it in) and three tenants, each with a node of its own (key 9) and one `refs` row whose
/// leaf (key 3) it lacks.
fn tree_sql(leaf_first: bool) -> String {
    let mut shared = [
        format!("('{}', NULL, 'root')", node(1)),
        format!("('{}', '{}', 'branch')", node(2), node(1)),
        format!("('{}', '{}', 'leaf')", node(3), node(2)),
    ];
    if leaf_first {
        shared.reverse();
    }
    // No index on the shared table: the copy reads it in its physical order.
    let mut sql = String::from("CREATE TABLE public.node (id uuid, parent_id uuid, name text);\n");
    sql.push_str(&format!("INSERT INTO public.node VALUES {};\n", shared.join(", ")));
    for t in TENANTS {
        sql.push_str(&format!(
            "SELECT pg_temp.create_tenant('{t}');
            CREATE TABLE {t}.node (id uuid PRIMARY KEY, parent_id uuid REFERENCES {t}.node (id), name text);
            CREATE TABLE {t}.refs (id serial PRIMARY KEY, node_id uuid REFERENCES {t}.node (id));
            INSERT INTO {t}.node VALUES ('{own}', NULL, 'own');
            SET session_replication_role = replica;
            INSERT INTO {t}.refs (node_id) VALUES ('{leaf}');
            RESET session_replication_role;\n",
            own = node(9),
            leaf = node(3),
        ));
    }
    sql
}

/// Runs `heal` with `toml` (after the URL line) and `args`: (exit code, stdout).
fn heal(url: &str, name: &str, toml: &str, args: &[&str]) -> (Option<i32>, String) {
    let path = config_file(
        name,
        &format!(
            "database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\n[heal]\ncopy_missing_parents = true\n{toml}"
        ),
    );
    let mut all = vec!["heal", "--config", path.to_str().unwrap()];
    all.extend(args);
    let out = cli(&all, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.code() != Some(2), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    (out.status.code(), stdout)
}

async fn rows(url: &str, sql: &str) -> Vec<String> {
    let client = pg::connect(url).await;
    client.query(sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

/// Every tenant's nodes, one line per tenant.
async fn nodes(url: &str) -> Vec<String> {
    let mut out = Vec::new();
    for t in TENANTS {
        let sql = format!(
            "SELECT '{t} ' || string_agg(format('%s/%s', name, coalesce(parent_id::text, '-')), ' ' ORDER BY name) FROM {t}.node"
        );
        out.extend(rows(url, &sql).await);
    }
    out
}

/// Copies the tree into the three tenants; returns the run id.
fn heal_tree(url: &str, name: &str) -> String {
    let (code, stdout) = heal(url, name, "", &["--execute"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.starts_with("copy_missing_parents: 9 change(s)\n"), "{stdout}");
    let last = stdout.lines().last().unwrap();
    last.strip_prefix("heal run ").unwrap().split(':').next().unwrap().to_string()
}

const AUDIT: &str =
    "SELECT format('%s %s', repair, count(*)) FROM tenant_audit.heal_log GROUP BY repair ORDER BY repair";

/// Heals, lets the application drop the orphans the leaves were copied for, and undoes with
/// `toml`: every copied row is deleted by the one undo run.
async fn undo_whole_tree(name: &str, leaf_first: bool, toml: &str) {
    let url = fixture_db(name, &tree_sql(leaf_first)).await;
    let before = nodes(&url).await;
    assert_eq!(before, ["tenant_a own/-", "tenant_b own/-", "tenant_c own/-"]);
    let run = heal_tree(&url, name);
    assert_eq!(
        nodes(&url).await[0],
        format!("tenant_a branch/{} leaf/{} own/- root/-", node(1), node(2)),
        "the leaf with its ancestors"
    );
    // The copy audits the rows in the order the shared table holds them.
    let order = if leaf_first { "leaf branch root" } else { "root branch leaf" };
    assert_eq!(
        rows(&url, "SELECT string_agg(new_value->>'name', ' ' ORDER BY id) FROM tenant_audit.heal_log WHERE schema_name = 'tenant_a'").await,
        [order]
    );
    let orphans: String = TENANTS.iter().map(|t| format!("DELETE FROM {t}.refs;\n")).collect();
    pg::connect(&url).await.batch_execute(&orphans).await.unwrap();

    let (code, stdout) = heal(&url, &format!("{name}_undo"), toml, &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(0), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert_eq!(lines[0], "undo: 9 change(s)");
    assert!(lines[1].starts_with("heal run "), "{stdout}");
    assert_eq!(nodes(&url).await, before);
    assert_eq!(rows(&url, AUDIT).await, ["copy_missing_parents 9", "undo 9"]);
    // Each copied row undone once.
    assert_eq!(
        rows(
            &url,
            "SELECT count(DISTINCT old_value->>'undoes')::text FROM tenant_audit.heal_log WHERE repair = 'undo'"
        )
        .await,
        ["9"]
    );
}

#[tokio::test]
async fn undo_deletes_a_whole_copied_tree_in_one_run() {
    undo_whole_tree("heal_undo_tree", false, "").await;
}

#[tokio::test]
async fn undo_deletes_a_whole_copied_tree_in_one_run_one_row_per_batch() {
    undo_whole_tree("heal_undo_tree_one", false, "batch_size = 1\n").await;
}

#[tokio::test]
async fn undo_deletes_a_whole_copied_tree_the_shared_table_holds_leaf_first() {
    undo_whole_tree("heal_undo_tree_leaf_first", true, "").await;
}

#[tokio::test]
async fn undo_deletes_a_whole_copied_tree_the_shared_table_holds_leaf_first_one_row_per_batch() {
    undo_whole_tree("heal_undo_tree_leaf_first_one", true, "batch_size = 1\n").await;
}

/// The application hung a row under tenant_b's copied branch since the heal: there only the leaf
/// is deleted, the branch and the root are listed as still referenced (exit 1); the other
/// tenants' trees are deleted.
async fn undo_tree_under_use(name: &str, toml: &str) {
    let url = fixture_db(name, &tree_sql(true)).await;
    let run = heal_tree(&url, name);
    let orphans: String = TENANTS.iter().map(|t| format!("DELETE FROM {t}.refs;\n")).collect();
    let app = format!("INSERT INTO tenant_b.node VALUES ('{}', '{}', 'app');", node(8), node(2));
    pg::connect(&url).await.batch_execute(&format!("{orphans}{app}")).await.unwrap();

    let (code, stdout) = heal(&url, &format!("{name}_undo"), toml, &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(1), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert_eq!(lines[0], "undo: 7 change(s)");
    assert!(lines[1].starts_with("heal run "), "{stdout}");
    assert_eq!(
        lines[2..],
        [
            format!("left (still referenced): tenant_b.node {{\"id\": \"{}\"}}", node(1)),
            format!("left (still referenced): tenant_b.node {{\"id\": \"{}\"}}", node(2)),
        ]
    );
    assert_eq!(
        nodes(&url).await,
        [
            "tenant_a own/-".to_string(),
            format!("tenant_b app/{} branch/{} own/- root/-", node(2), node(1)),
            "tenant_c own/-".to_string(),
        ]
    );
    assert_eq!(rows(&url, AUDIT).await, ["copy_missing_parents 9", "undo 7"]);
}

#[tokio::test]
async fn undo_of_a_tree_keeps_the_nodes_an_application_row_hangs_under() {
    undo_tree_under_use("heal_undo_tree_used", "").await;
}

#[tokio::test]
async fn undo_of_a_tree_keeps_the_nodes_an_application_row_hangs_under_one_row_per_batch() {
    undo_tree_under_use("heal_undo_tree_used_one", "batch_size = 1\n").await;
}
