//! Sequences against real PostgreSQL: `sequence_behind` finds a sequence set back, the
//! `advance_sequences` repair moves it, and a copy of integer keys stopped by
//! `max_rows_per_run`, SIGTERM or SIGKILL never leaves the application's next insert failing.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{cli, config, config_file, fixture_db, lines, pg, scan};

const TENANTS: &str = "[tenants]\ninclude = ['^tenant_']\n";

async fn rows(url: &str, sql: &str) -> Vec<String> {
    let client = pg::connect(url).await;
    client.query(sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

#[tokio::test]
async fn sequence_behind_finds_a_sequence_set_back_by_hand_and_advance_sequences_moves_it() {
    let sql = "SELECT pg_temp.create_tenant(t) FROM unnest(ARRAY['tenant_a', 'tenant_b']) t;
        INSERT INTO tenant_a.users_businessdetails (business_id) SELECT 'b0000000-0000-0000-0000-000000000001' FROM generate_series(2, 10);
        SELECT setval('tenant_a.users_businessdetails_id_seq', 3);";
    let url = fixture_db("heal_seq_behind", sql).await;
    let report = scan(&config(&url, TENANTS)).await;
    assert_eq!(
        lines(&report.findings),
        ["sequence_behind tenant_a.users_businessdetails(id) 7 tenant_a.users_businessdetails_id_seq next 4 max 10 []"]
    );
    assert_eq!(report.findings[0].severity, tenant_audit::report::Severity::Critical);

    let path =
        config_file("heal_seq_behind", &format!("database_url = {url:?}\n{TENANTS}[heal]\nadvance_sequences = true\n"));
    let out = cli(&["heal", "--config", path.to_str().unwrap(), "--execute"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("advance_sequences: 1 change(s)\n"));
    assert_eq!(
        rows(&url, "INSERT INTO tenant_a.users_businessdetails (business_id) VALUES ('b0000000-0000-0000-0000-000000000001') RETURNING id::text").await,
        ["11"]
    );
    assert_eq!(
        rows(&url, "SELECT format('%s %s %s %s', table_name, row_key, old_value, new_value) FROM tenant_audit.heal_log").await,
        ["users_businessdetails {\"column\": \"id\", \"sequence\": \"users_businessdetails_id_seq\"} {\"next_value\": 4} {\"next_value\": 11}"]
    );
    assert_eq!(lines(&scan(&config(&url, TENANTS)).await.findings), Vec::<String>::new());
}

/// `n` products of `tenant_a` pointing at categories that exist only in the shared schema, with
/// integer keys the operator lists as the same entity. The orphans reference even keys only, so
/// that the application's own next key (odd) does not itself become a missing parent.
fn integer_orphans(n: u32) -> String {
    format!(
        "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE public.category (id serial PRIMARY KEY, name text NOT NULL);
        CREATE TABLE tenant_a.category (id serial PRIMARY KEY, name text NOT NULL);
        CREATE TABLE tenant_a.product (id serial PRIMARY KEY, category_id int REFERENCES tenant_a.category (id));
        INSERT INTO public.category (name) SELECT 'shared ' || g FROM generate_series(1, 2 * {n}) g;
        SET session_replication_role = replica;
        INSERT INTO tenant_a.product (category_id) SELECT 2 * g FROM generate_series(1, {n}) g;
        RESET session_replication_role;"
    )
}

const LISTED: &str =
    "[heal]\ncopy_missing_parents = true\nsame_entity_keys = [{ table = 'category', columns = ['id'] }]\n";
const COPIED: &str = "SELECT count(*)::text FROM tenant_a.category";
const NEXT_INSERT: &str = "INSERT INTO tenant_a.category (name) VALUES ('the application') RETURNING id::text";

/// The application's next default-key insert succeeds with a key above every copied one (a batch
/// cancelled after moving its sequence leaves a gap: `setval` is not transactional); the row is
/// removed again so that the next run has the same orphans to copy.
async fn assert_next_insert_succeeds(url: &str) {
    let copied: i64 = rows(url, COPIED).await[0].parse().unwrap();
    assert!(copied > 0, "nothing was copied");
    let max = rows(url, "SELECT max(id)::text FROM tenant_a.category").await;
    let id = rows(url, NEXT_INSERT).await;
    assert!(id[0].parse::<i64>().unwrap() > max[0].parse::<i64>().unwrap(), "{id:?} after {max:?}");
    rows(url, &format!("DELETE FROM tenant_a.category WHERE id = {} RETURNING id::text", id[0])).await;
}

#[tokio::test]
async fn a_copy_stopped_by_max_rows_per_run_leaves_the_sequence_ahead() {
    let url = fixture_db("heal_seq_max_rows", &integer_orphans(50)).await;
    let path =
        config_file("heal_seq_max_rows", &format!("database_url = {url:?}\n{TENANTS}{LISTED}max_rows_per_run = 1\n"));
    let out = cli(&["heal", "--config", path.to_str().unwrap(), "--execute"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("skipped tenant_a: max_rows_per_run\n"));
    assert_eq!(rows(&url, COPIED).await, ["1"]);
    assert_next_insert_succeeds(&url).await;
}

/// Starts `heal --execute` on 6,000 integer orphans in batches of 10, waits until at least 100
/// rows are copied, then sends `signal`; returns the database and how heal ended.
async fn interrupted_copy(name: &str, signal: &str) -> (String, std::process::ExitStatus) {
    let url = fixture_db(name, &integer_orphans(6000)).await;
    let path = config_file(name, &format!("database_url = {url:?}\n{TENANTS}{LISTED}batch_size = 10\n"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_tenant-audit"))
        .args(["heal", "--config", path.to_str().unwrap(), "--execute"])
        .env_remove("TENANT_AUDIT_DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while rows(&url, COPIED).await[0].parse::<i64>().unwrap() < 100 {
        assert!(Instant::now() < deadline, "heal never got going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let ended = child.wait().unwrap();
    assert!(rows(&url, COPIED).await[0].parse::<i64>().unwrap() < 6000, "the run finished before the signal");
    (url, ended)
}

/// SIGTERM stops the run between transactions (exit 1, docs/heal.md "Crash safe"), not by dying.
#[tokio::test]
async fn a_copy_stopped_by_sigterm_leaves_the_sequence_ahead() {
    let (url, ended) = interrupted_copy("heal_seq_sigterm", "-TERM").await;
    assert_eq!(ended.code(), Some(1), "{ended:?}");
    assert_next_insert_succeeds(&url).await;
}

#[tokio::test]
async fn a_copy_stopped_by_sigkill_leaves_the_sequence_ahead_and_a_rerun_finishes() {
    let (url, ended) = interrupted_copy("heal_seq_sigkill", "-KILL").await;
    assert_eq!(ended.code(), None, "{ended:?}");
    assert_next_insert_succeeds(&url).await;
    let path = config_file("heal_seq_sigkill_rerun", &format!("database_url = {url:?}\n{TENANTS}{LISTED}"));
    let out = cli(&["heal", "--config", path.to_str().unwrap(), "--execute"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(rows(&url, COPIED).await, ["6000"]);
    let next: i64 = rows(&url, NEXT_INSERT).await[0].parse().unwrap();
    assert!(next > 12000, "{next}");
}
