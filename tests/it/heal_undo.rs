//! `heal --undo RUN_ID` against real PostgreSQL: a run undone when nothing changed since gives
//! back the pre-heal checksum; rows the application changed since are left and listed.

use std::collections::BTreeMap;

use crate::support::{checksum, cli, config_file, fixture_db, pg, DEMO_SQL};

const COPY_AND_BACKFILL: &str =
    "[tenants]\ninclude = ['^tenant_']\n[heal]\ncopy_missing_parents = true\nbackfill_null_timestamps = true\n";

/// The checksum of everything but heal's own schema (its audit and lease tables).
async fn data_checksum(url: &str) -> BTreeMap<String, String> {
    let mut sum = checksum(url).await;
    sum.retain(|k, _| !k.starts_with("tenant_audit.") && k != "(columns)");
    let columns = "SELECT md5(string_agg(format('%s.%s.%s %s %s %s', table_schema, table_name, column_name,
                     data_type, is_nullable, column_default), '|' ORDER BY table_schema, table_name, column_name))
                   FROM information_schema.columns WHERE table_schema NOT IN ('pg_catalog', 'information_schema', 'tenant_audit')";
    let value: String = pg::connect(url).await.query_one(columns, &[]).await.unwrap().get(0);
    sum.insert("(columns)".into(), value);
    sum
}

/// Runs `heal` with `args` and returns (exit code, stdout).
fn heal(url: &str, name: &str, args: &[&str]) -> (Option<i32>, String) {
    let path = config_file(name, &format!("database_url = {url:?}\n{COPY_AND_BACKFILL}"));
    let mut all = vec!["heal", "--config", path.to_str().unwrap()];
    all.extend(args);
    let out = cli(&all, &[]);
    assert!(out.status.code() != Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Heals the demo's copies and backfills; returns the run id.
fn heal_run(url: &str, name: &str) -> String {
    let (code, stdout) = heal(url, name, &["--execute"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.starts_with("backfill_null_timestamps: 3 change(s)\ncopy_missing_parents: 3 change(s)\n"),
        "{stdout}"
    );
    let last = stdout.lines().last().unwrap();
    last.strip_prefix("heal run ").unwrap().split(':').next().unwrap().to_string()
}

#[tokio::test]
async fn undo_restores_the_pre_heal_checksum_when_nothing_changed_since() {
    let url = fixture_db("heal_undo_clean", DEMO_SQL).await;
    let before = data_checksum(&url).await;
    let run = heal_run(&url, "heal_undo_clean");
    assert_ne!(data_checksum(&url).await, before);

    // Without --execute: the plan, and nothing written.
    let (code, plan) = heal(&url, "heal_undo_clean_plan", &["--undo", &run]);
    assert_eq!(code, Some(0));
    assert!(
        plan.contains(
            "-- undo on tenant_c3.business_business: delete 2 copied row(s) that still hold what heal wrote\n"
        ),
        "{plan}"
    );
    assert!(plan.contains("-- undo on tenant_d4.users_userprofile: set 3 updated_at value(s) back to NULL where they still hold what heal wrote\n"), "{plan}");
    assert_ne!(data_checksum(&url).await, before);

    let (code, stdout) = heal(&url, "heal_undo_clean_execute", &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.starts_with("undo: 6 change(s)\n"), "{stdout}");
    assert_eq!(data_checksum(&url).await, before);
    // Undone once: a second undo changes nothing.
    let (code, stdout) = heal(&url, "heal_undo_clean_again", &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.starts_with("undo: 0 change(s)\n"), "{stdout}");
    assert_eq!(data_checksum(&url).await, before);
}

#[tokio::test]
async fn undo_leaves_and_lists_the_rows_the_application_changed() {
    let url = fixture_db("heal_undo_changed", DEMO_SQL).await;
    let run = heal_run(&url, "heal_undo_changed");
    pg::connect(&url)
        .await
        .batch_execute(
            "UPDATE tenant_c3.business_business SET name = 'renamed by the application' WHERE id = 'b0000000-0000-0000-0000-000000000002';
             UPDATE tenant_d4.users_userprofile SET updated_at = '2000-01-01' WHERE id = 3;",
        )
        .await
        .unwrap();
    let (code, stdout) = heal(&url, "heal_undo_changed_execute", &["--undo", &run, "--execute"]);
    assert_eq!(code, Some(1), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "undo: 4 change(s)");
    assert_eq!(
        lines[2..],
        [
            "left (changed since the run, or still referenced): tenant_c3.business_business {\"id\": \"b0000000-0000-0000-0000-000000000002\"}",
            "left (changed since the run, or still referenced): tenant_d4.users_userprofile {\"id\": 3}",
        ]
    );
    let client = pg::connect(&url).await;
    let names: Vec<String> = client
        .query("SELECT name FROM tenant_c3.business_business ORDER BY name", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, ["own business", "renamed by the application"]);
    let nulls: Vec<String> = client
        .query("SELECT format('%s %s', id, coalesce(updated_at::text, 'NULL')) FROM tenant_d4.users_userprofile WHERE id IN (2, 3, 4) ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(nulls, ["2 NULL", "3 2000-01-01 00:00:00+00", "4 NULL"]);
}

/// A foreign key `ON DELETE CASCADE` references the copied rows (added `NOT VALID` while the
/// orphans were known): deleting them would delete the application's orphan rows, which existed
/// before heal ran. Undo leaves the copies, says why, and exits 1; every profile is still there.
#[tokio::test]
async fn undo_never_deletes_a_copy_a_cascading_foreign_key_references() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        ALTER TABLE tenant_a.users_userprofile DROP CONSTRAINT users_userprofile_business_id_fk;
        INSERT INTO tenant_a.users_userprofile (user_id, business_id, created_at, modified_at) VALUES
          (2, 'b0000000-0000-0000-0000-000000000002', now(), now()),
          (3, 'b0000000-0000-0000-0000-000000000002', now(), now()),
          (4, 'b0000000-0000-0000-0000-000000000003', now(), now());
        ALTER TABLE tenant_a.users_userprofile ADD CONSTRAINT users_userprofile_business_id_fk
          FOREIGN KEY (business_id) REFERENCES tenant_a.business_business (id) ON DELETE CASCADE NOT VALID;";
    let url = fixture_db("heal_undo_cascade", sql).await;
    let (code, stdout) = heal(&url, "heal_undo_cascade", &["--execute"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.starts_with("copy_missing_parents: 2 change(s)\n"), "{stdout}");
    let run_id = stdout.lines().last().unwrap().split(' ').nth(2).unwrap().trim_end_matches(':').to_string();
    let (code, stdout) = heal(&url, "heal_undo_cascade", &["--undo", &run_id, "--execute"]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("not undone: tenant_a.business_business: 2 copied row(s) not undone: foreign key users_userprofile_business_id_fk of tenant_a.users_userprofile references the table ON DELETE CASCADE, so deleting them would change the application's rows\n"),
        "{stdout}"
    );
    let profiles = "SELECT count(*)::text FROM tenant_a.users_userprofile";
    assert_eq!(pg::connect(&url).await.query_one(profiles, &[]).await.unwrap().get::<_, String>(0), "4");
    let businesses = "SELECT count(*)::text FROM tenant_a.business_business";
    assert_eq!(pg::connect(&url).await.query_one(businesses, &[]).await.unwrap().get::<_, String>(0), "3");
}
