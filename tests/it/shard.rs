//! Tenant sharding (`[shard]`): three daemons with `count = 3` on one database of 300 tenants
//! report, summed over their `/metrics` and merged over their reports, exactly what one
//! unsharded daemon reports; every tenant is scanned by exactly one shard; four shards move
//! only the tenants the fourth now owns.

use std::collections::BTreeMap;

use crate::support::{cli, config, config_file, fixture_db, scan, start_daemon, RunningDaemon};

/// Tenants `tenant_0001` to `tenant_0300`, one table each with 1 to 3 NULL `created_at`, all
/// registered; `tenant_0042` lacks the `body` column the others have (drift); `tenant_zz`
/// is not registered and `tenant_gone` is registered without a schema.
const FLEET_SQL: &str = "DO $$ BEGIN FOR i IN 1..300 LOOP
        EXECUTE format('CREATE SCHEMA %1$I; CREATE TABLE %1$I.note (id int PRIMARY KEY, created_at timestamptz, body text);
            INSERT INTO %1$I.note SELECT g, CASE WHEN g <= %2$s THEN NULL ELSE now() END, ''x'' FROM generate_series(1, 3) g',
            'tenant_' || lpad(i::text, 4, '0'), i % 3 + 1);
        INSERT INTO public.customers_client (schema_name, name) VALUES ('tenant_' || lpad(i::text, 4, '0'), 't' || i);
    END LOOP; END $$;
    ALTER TABLE tenant_0042.note DROP COLUMN body;
    CREATE SCHEMA tenant_zz;
    CREATE TABLE tenant_zz.note (id int PRIMARY KEY, created_at timestamptz, body text);
    INSERT INTO tenant_zz.note VALUES (1, NULL, 'x');
    INSERT INTO public.customers_client (schema_name, name) VALUES ('tenant_gone', 'gone');";

const SETTINGS: &str = "[tenants]\ninclude = ['^tenant_']\n[checks]\nrequired_timestamps = ['created_at']\n\
    [scan]\nconcurrency = 2\n[serve]\nschedule = '0 0 0 1 1 *'\n";

/// The families whose sum over shards must equal the unsharded daemon's.
const SUMMED: [&str; 10] = [
    "tenant_audit_findings",
    "tenant_audit_null_timestamps",
    "tenant_audit_schema_drift",
    "tenant_audit_registry_findings",
    "tenant_audit_affected_rows",
    "tenant_audit_affected_tenants",
    "tenant_audit_tenants_discovered",
    "tenant_audit_tenants_scanned",
    "tenant_audit_tenants_failed",
    "tenant_audit_series_dropped",
];

/// Every series of the [`SUMMED`] families, summed over `daemons`.
async fn summed(daemons: &[&RunningDaemon]) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for daemon in daemons {
        for name in SUMMED {
            for line in daemon.samples(name).await {
                let (series, value) = line.rsplit_once(' ').unwrap();
                *out.entry(series.to_string()).or_insert(0) += value.parse::<i64>().unwrap();
            }
        }
    }
    out
}

/// `(check, schema, table, count)` of every finding of `daemon`'s report.
async fn findings(daemon: &RunningDaemon) -> Vec<(String, String, String, u64)> {
    let (status, body) = daemon.get("/report").await;
    assert_eq!(status, 200);
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    let findings = report["findings"].as_array().unwrap().iter();
    findings.map(|f| (text(&f["check"]), text(&f["schema"]), text(&f["table"]), f["count"].as_u64().unwrap())).collect()
}

/// Each tenant with a `null_timestamps` finding, by the shard whose findings hold it.
fn owners(per_shard: &[Vec<(String, String, String, u64)>]) -> BTreeMap<String, Vec<usize>> {
    let mut out: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (shard, findings) in per_shard.iter().enumerate() {
        for (check, schema, _, _) in findings.iter().filter(|f| f.0 == "null_timestamps") {
            assert_eq!(check, "null_timestamps");
            out.entry(schema.clone()).or_default().push(shard);
        }
    }
    out
}

#[tokio::test]
async fn shards_together_report_exactly_what_one_daemon_does() {
    let url = fixture_db("shards", FLEET_SQL).await;
    let sharded = |index: usize| config(&url, &format!("{SETTINGS}[shard]\ncount = 3\nindex = {index}\n"));
    let whole = start_daemon(config(&url, SETTINGS)).await;
    let shards = [start_daemon(sharded(0)).await, start_daemon(sharded(1)).await, start_daemon(sharded(2)).await];
    for daemon in shards.iter().chain([&whole]) {
        daemon.wait_for("tenant_audit_scans_total{database=\"default\",result=\"success\"} 1").await;
    }
    for (index, daemon) in shards.iter().enumerate() {
        assert_eq!(
            daemon.samples("tenant_audit_build_info").await,
            [format!(
                "tenant_audit_build_info{{shard=\"{index}\",shards=\"3\",version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )]
        );
    }

    // The unsharded daemon's figures, and the shards' sums.
    let expected = summed(&[&whole]).await;
    let findings_of =
        |check: &str| expected[&format!("tenant_audit_findings{{check=\"{check}\",database=\"default\"}}")];
    assert_eq!(
        ["null_timestamps", "schema_drift", "missing_schema", "unregistered_schema", "orphan_rows"].map(findings_of),
        [301, 1, 1, 1, 0]
    );
    assert_eq!(expected["tenant_audit_tenants_discovered{database=\"default\"}"], 301);
    assert_eq!(
        expected["tenant_audit_affected_rows{check=\"null_timestamps\",database=\"default\",table=\"note\"}"],
        600 + 1
    );
    assert_eq!(summed(&shards.iter().collect::<Vec<_>>()).await, expected);

    // The merged reports: every finding once, every tenant on exactly one shard (its owner).
    let mut per_shard = Vec::new();
    for daemon in &shards {
        per_shard.push(findings(daemon).await);
    }
    let mut merged: Vec<_> = per_shard.concat();
    merged.sort();
    let mut unsharded = findings(&whole).await;
    unsharded.sort();
    assert_eq!(merged, unsharded);
    let three = owners(&per_shard);
    assert_eq!(three.len(), 301);
    for (schema, shards) in &three {
        assert_eq!(shards, &[tenant_audit::shard::owner(schema, 3) as usize], "{schema}");
    }
    let sizes: Vec<usize> = (0..3).map(|i| three.values().filter(|s| s[0] == i).count()).collect();
    assert_eq!(sizes, [105, 97, 99]);
    assert_eq!(per_shard[0].iter().filter(|f| f.0.ends_with("_schema")).count(), 2, "registry findings on shard 0");
    assert!(per_shard[1..].iter().flatten().all(|f| !f.0.ends_with("_schema")));
    for daemon in [whole].into_iter().chain(shards) {
        daemon.stop().await;
    }

    // Four shards (scanned in-process): only the tenants the fourth shard now owns move.
    let mut per_shard = Vec::new();
    for index in 0..4 {
        let report = scan(&config(&url, &format!("{SETTINGS}[shard]\ncount = 4\nindex = {index}\n"))).await;
        let rows = report.findings.iter();
        per_shard.push(rows.map(|f| (f.check.name().to_string(), f.schema.clone(), String::new(), f.count)).collect());
    }
    let four = owners(&per_shard);
    assert_eq!(four.len(), 301);
    let moved: Vec<&String> = three.keys().filter(|schema| three[*schema] != four[*schema]).collect();
    assert!(moved.iter().all(|schema| four[*schema] == [3]), "a tenant moved between the old shards");
    assert_eq!(moved.len(), 76);
    assert!(moved.len() * 100 <= 30 * 301, "{} of 301 tenants moved", moved.len());
}

#[tokio::test]
async fn each_shard_heals_only_its_own_tenants() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        SELECT pg_temp.create_tenant('tenant_b');
        SELECT pg_temp.create_tenant('tenant_c');
        UPDATE tenant_a.users_userprofile SET modified_at = NULL;
        UPDATE tenant_b.users_userprofile SET modified_at = NULL;
        UPDATE tenant_c.users_userprofile SET modified_at = NULL;";
    let url = fixture_db("shard_heal", sql).await;
    let text = format!(
        "database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\n[checks]\nrequired_timestamps = ['modified_at']\n\
         [heal]\nbackfill_null_timestamps = true\n[shard]\ncount = 2\n"
    );
    let file = config_file("shard_heal", &text);
    let file = file.to_str().unwrap();
    let healed = || async {
        let rows = crate::support::pg::connect(&url)
            .await
            .query("SELECT DISTINCT schema_name FROM tenant_audit.heal_log ORDER BY 1", &[])
            .await
            .unwrap();
        rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>()
    };
    let heal = |index: &str| cli(&["heal", "--config", file, "--execute"], &[("TENANT_AUDIT_SHARD_INDEX", index)]);
    let out = heal("1");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(healed().await, ["tenant_a", "tenant_c"]);
    let out = heal("0");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(healed().await, ["tenant_a", "tenant_b", "tenant_c"]);
}
