//! Plan files against real PostgreSQL: `heal --plan-out` then `heal --apply` changes exactly
//! what the plan lists; rows the application changed in between are skipped and reported, and
//! rows that need healing but are not in the plan are left alone.

use crate::support::{checksum, cli, config_file, fixture_db, heal_summary, pg, DEMO_SQL};

const COPY_AND_BACKFILL: &str =
    "[tenants]\ninclude = ['^tenant_']\n[heal]\ncopy_missing_parents = true\nbackfill_null_timestamps = true\n";

async fn rows(url: &str, sql: &str) -> Vec<String> {
    let client = pg::connect(url).await;
    client.query(sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

fn heal(url: &str, name: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let path = config_file(name, &format!("database_url = {url:?}\n{COPY_AND_BACKFILL}"));
    let mut all = vec!["heal", "--config", path.to_str().unwrap()];
    all.extend(args);
    let out = cli(&all, &[]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn b(n: &str) -> String {
    format!("b0000000-0000-0000-0000-0000000000{n}")
}

/// Every user table outside heal's own schema: (`table id` of each row a transaction after
/// `mark`, a `txid_current()`, inserted or updated; `table count` of each table). The test
/// cluster's transaction ids never wrap, so `xmin` compares with `mark` as a number.
async fn written_since(url: &str, mark: i64) -> (Vec<String>, Vec<String>) {
    let tables = rows(
        url,
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables
         WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'tenant_audit') ORDER BY 1",
    )
    .await;
    let (mut written, mut counts) = (Vec::new(), Vec::new());
    for t in tables {
        let sql = format!("SELECT format('{t} %s', id) FROM {t} WHERE xmin::text::bigint > {mark} ORDER BY id::text");
        written.extend(rows(url, &sql).await);
        counts.extend(rows(url, &format!("SELECT format('{t} %s', count(*)) FROM {t}")).await);
    }
    (written, counts)
}

#[tokio::test]
async fn apply_changes_exactly_what_the_plan_lists_and_reports_what_changed_in_between() {
    let url = fixture_db("heal_plan_round_trip", DEMO_SQL).await;
    let file = std::env::temp_dir().join(format!("tenant-audit-it-{}-plan.json", std::process::id()));
    let before = checksum(&url).await;
    let (code, stdout, stderr) = heal(&url, "heal_plan_out", &["--plan-out", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, format!("wrote the plan for 2 tenant(s) to {}\n", file.display()));
    assert_eq!(checksum(&url).await, before, "--plan-out writes nothing to the database");
    let plan: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(plan["version"], 4);
    let tenants = plan["plan"]["tenants"].as_array().unwrap();
    assert_eq!(tenants[0]["schema"], "tenant_c3");
    assert_eq!(tenants[0]["actions"][0]["steps"][0]["Copy"]["only"], serde_json::json!([[b("02")], [b("03")]]));
    assert_eq!(
        tenants[0]["actions"][0]["steps"][0]["Copy"]["rows"],
        serde_json::json!([
            { "table": "business_business", "key": [b("02")] },
            { "table": "business_business", "key": [b("03")] }
        ])
    );
    assert_eq!(tenants[1]["schema"], "tenant_d4");
    let d4: Vec<&serde_json::Value> = tenants[1]["actions"].as_array().unwrap().iter().collect();
    assert_eq!(d4[0]["steps"][0]["Copy"]["only"], serde_json::json!([[b("04")]]));
    assert_eq!(d4[1]["steps"][0]["Backfill"]["only"], serde_json::json!(["{\"id\": 2}", "{\"id\": 3}", "{\"id\": 4}"]));

    // Meanwhile the application fixes one orphan and one NULL itself, and makes a new orphan
    // and a new NULL that the plan does not name.
    pg::connect(&url)
        .await
        .batch_execute(&format!(
            "INSERT INTO tenant_c3.business_business (id, name) VALUES ('{b03}', 'made by the application');
             UPDATE tenant_d4.users_userprofile SET updated_at = '2001-01-01' WHERE id = 3;
             INSERT INTO tenant_c3.users_userprofile (user_id, business_id, created_at, modified_at) VALUES (11, '{b05}', now(), now());
             INSERT INTO tenant_d4.users_userprofile (id, user_id, created_at, modified_at) VALUES (100, 12, now(), now());",
            b03 = b("03"),
            b05 = b("05"),
        ))
        .await
        .unwrap();
    let mark: i64 = pg::connect(&url).await.query_one("SELECT txid_current()", &[]).await.unwrap().get(0);
    let (_, counts_before) = written_since(&url, mark).await;

    let (code, stdout, stderr) = heal(&url, "heal_plan_apply", &["--apply", file.to_str().unwrap(), "--execute"]);
    assert_eq!(code, Some(1), "{stderr}");
    // Exactly the plan's rows that still needed it were written, and no row anywhere else was
    // inserted, updated or deleted.
    let (written, counts) = written_since(&url, mark).await;
    assert_eq!(
        written,
        [
            format!("tenant_c3.business_business {}", b("02")),
            format!("tenant_d4.business_business {}", b("04")),
            "tenant_d4.users_userprofile 2".to_string(),
            "tenant_d4.users_userprofile 4".to_string(),
        ]
    );
    let grown: Vec<String> = counts_before
        .iter()
        .map(|line| {
            let (t, n) = line.rsplit_once(' ').unwrap();
            let copied = ["tenant_c3.business_business", "tenant_d4.business_business"].contains(&t);
            format!("{t} {}", n.parse::<i64>().unwrap() + i64::from(copied))
        })
        .collect();
    assert_eq!(counts, grown, "two copies added, nothing deleted");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[..4],
        [
            "backfill_null_timestamps: 2 change(s)",
            "copy_missing_parents: 2 change(s)",
            &format!("skipped tenant_c3.users_userprofile key {}: changed since the plan", b("03")),
            "skipped tenant_d4.users_userprofile key {\"id\": 3}: changed since the plan",
        ]
    );
    assert_eq!(
        rows(&url, "SELECT format('%s %s %s', schema_name, table_name, row_key) FROM tenant_audit.heal_log ORDER BY 1")
            .await,
        [
            format!("tenant_c3 business_business {{\"id\": \"{}\"}}", b("02")),
            format!("tenant_d4 business_business {{\"id\": \"{}\"}}", b("04")),
            "tenant_d4 users_userprofile {\"id\": 2}".to_string(),
            "tenant_d4 users_userprofile {\"id\": 4}".to_string(),
        ]
    );
    // Not in the plan: left alone.
    assert_eq!(
        rows(&url, "SELECT count(*)::text FROM tenant_c3.business_business WHERE name LIKE 'shared%'").await,
        ["1"]
    );
    assert_eq!(
        rows(&url, "SELECT coalesce(updated_at::text, 'NULL') FROM tenant_d4.users_userprofile WHERE id = 100").await,
        ["NULL"]
    );
    assert_eq!(
        rows(&url, "SELECT updated_at::text FROM tenant_d4.users_userprofile WHERE id = 3").await,
        ["2001-01-01 00:00:00+00"]
    );
    let _ = std::fs::remove_file(&file);
}

/// A plan's backfill stopped by `heal.max_rows_per_run` (1, three NULL rows listed): applying the
/// same file again fills the listed rows left, one per run, and never row 100, which the
/// application added with a NULL after the plan. Once the listed rows are filled, another apply
/// changes nothing and says they were filled by an earlier run (exit 0); a row whose fill was
/// undone is filled again.
#[tokio::test]
async fn reapplying_a_plan_file_finishes_a_backfill_the_row_budget_stopped() {
    let url = fixture_db("heal_plan_resume", DEMO_SQL).await;
    let file = std::env::temp_dir().join(format!("tenant-audit-it-{}-resume.json", std::process::id()));
    let text = format!("database_url = {url:?}\n[tenants]\ninclude = ['^tenant_d4$']\n[heal]\nbackfill_null_timestamps = true\nmax_rows_per_run = 1\n");
    let path = config_file("heal_plan_resume", &text);
    let run = |args: &[&str]| {
        let mut all = vec!["heal", "--config", path.to_str().unwrap()];
        all.extend(args);
        let out = cli(&all, &[]);
        (out.status.code(), heal_summary(&out))
    };
    let (code, _) = run(&["--plan-out", file.to_str().unwrap()]);
    assert_eq!(code, Some(0));
    let nulls =
        "SELECT string_agg(id::text, ',' ORDER BY id) FROM tenant_d4.users_userprofile WHERE updated_at IS NULL";
    pg::connect(&url).await.batch_execute("INSERT INTO tenant_d4.users_userprofile (id, user_id, created_at, modified_at) VALUES (100, 12, now(), now())").await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let (code, lines) = run(&["--apply", file.to_str().unwrap(), "--execute"]);
        seen.push(format!("{code:?} {}", lines.join(" | ")));
        seen.push(rows(&url, nulls).await.join(""));
    }
    let stopped = "Some(1) backfill_null_timestamps: 1 change(s) | skipped tenant_d4: max_rows_per_run | heal run: 1 change(s), 1 tenant(s) skipped, 0 error(s)";
    assert_eq!(
        seen,
        [
            stopped,
            "3,4,100",
            stopped,
            "4,100",
            stopped,
            "100",
            // Row 100 is not in the file: the action is still derived, restricted to rows 2..4,
            // which the earlier runs filled: done, not changed since the plan.
            "Some(0) backfill_null_timestamps: 0 change(s) | backfill_null_timestamps: 3 row(s) of the plan filled by an earlier run | heal run: 0 change(s), 0 tenant(s) skipped, 0 error(s)",
            "100",
        ]
    );
    // Once the application filled row 100 the scan finds nothing: the file's rows are still done.
    pg::connect(&url)
        .await
        .batch_execute("UPDATE tenant_d4.users_userprofile SET updated_at = now() WHERE id = 100")
        .await
        .unwrap();
    let filled = |n: u8| format!("backfill_null_timestamps: {n} row(s) of the plan filled by an earlier run");
    let total = "heal run: 0 change(s), 0 tenant(s) skipped, 0 error(s)";
    let (code, lines) = run(&["--apply", file.to_str().unwrap(), "--execute"]);
    assert_eq!((code, lines), (Some(0), vec![filled(3), total.to_string()]));
    // The first run undone, row 2 is NULL again and no longer counts as filled: the plan fills it.
    let first = rows(&url, "SELECT run_id FROM tenant_audit.heal_log ORDER BY id LIMIT 1").await.join("");
    let (code, lines) = run(&["--undo", &first, "--execute"]);
    // The undo's row budget is the same one (1), spent by its one row.
    assert_eq!(
        (code, lines),
        (
            Some(1),
            vec![
                "undo: 1 change(s)".to_string(),
                "skipped tenant_d4: max_rows_per_run".to_string(),
                "heal run: 1 change(s), 1 tenant(s) skipped, 0 error(s)".to_string()
            ]
        )
    );
    assert_eq!(rows(&url, nulls).await.join(""), "2");
    let (code, lines) = run(&["--apply", file.to_str().unwrap(), "--execute"]);
    assert_eq!(format!("{code:?} {}", lines.join(" | ")), stopped);
    let none = "SELECT count(*)::text FROM tenant_d4.users_userprofile WHERE updated_at IS NULL";
    assert_eq!(rows(&url, none).await, ["0"]);
    let (code, lines) = run(&["--apply", file.to_str().unwrap(), "--execute"]);
    assert_eq!((code, lines), (Some(0), vec![filled(3), total.to_string()]));
    assert_eq!(rows(&url, none).await, ["0"]);
    let _ = std::fs::remove_file(&file);
}
