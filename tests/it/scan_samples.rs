//! Samples cost no more than counts: a bounded query, never a sort over the whole table.

use std::collections::BTreeSet;
use std::time::Instant;

use tenant_audit::checks::{self, Context, Shape};
use tenant_audit::{catalog, db};

use crate::support::{config, fixture_db, lines, pg, scan};

#[tokio::test]
async fn samples_of_a_five_million_row_table_need_no_sort() {
    let sql = "
        CREATE SCHEMA tenant_a;
        CREATE TABLE tenant_a.huge (id int PRIMARY KEY, created_at timestamptz);
        INSERT INTO tenant_a.huge SELECT g, CASE WHEN g % 100000 = 0 THEN NULL ELSE now() END
          FROM generate_series(1, 5000000) g;";
    let url = fixture_db("samples_huge", sql).await;
    pg::connect(&url).await.batch_execute("VACUUM ANALYZE tenant_a.huge").await.unwrap();
    let cfg = config(&url, "[tenants]\nregistry = false\ninclude = ['^tenant_']\n");
    let report = scan(&cfg).await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let keys: Vec<String> = (1..=10).map(|i| format!("{:?}", (i * 100000).to_string())).collect();
    assert_eq!(
        lines(&report.findings),
        [format!("null_timestamps tenant_a.huge(created_at) 50 timestamp with time zone [{}]", keys.join(", "))]
    );

    // The very statements the scan runs, planned the way the scan plans them.
    let mut client = pg::connect(&url).await;
    let mut tx = client.transaction().await.unwrap();
    let tenants: BTreeSet<String> = ["tenant_a".to_string()].into();
    let (catalog, failed) =
        catalog::read(&mut tx, &["public".to_string()], &["tenant_a".to_string()], &mut Default::default())
            .await
            .unwrap();
    tx.commit().await.unwrap();
    assert!(failed.is_empty());
    let shape = Shape::build(&catalog, &tenants, "public", None);
    let ctx = Context {
        catalog: &catalog,
        tenants: &tenants,
        shared_schema: "public",
        reference: &shape,
        config: &cfg.checks,
        same_entity_keys: &cfg.heal.same_entity_keys,
    };
    let plan = checks::plan(&ctx, "tenant_a");
    let [unit] = plan.tables.as_slice() else { panic!("one table to scan: {plan:?}") };
    let items = unit.items();
    let count_sql = unit.count_sql("tenant_a", &items);

    let started = Instant::now();
    let row = db::one_row(db::read_only(&client, &cfg.scan, &count_sql, db::Parallel::Allowed).await.unwrap()).unwrap();
    let count_time = started.elapsed();
    let findings = unit.findings("tenant_a", &items, &row);
    let sample_sql = unit.sample_sql(&findings, cfg.report.sample_keys).unwrap();
    let started = Instant::now();
    db::read_only(&client, &cfg.scan, &sample_sql, db::Parallel::Serial).await.unwrap();
    let sample_time = started.elapsed();
    println!("5M rows: count {count_time:?}, samples {sample_time:?}");

    // Planned as the scan runs it: without parallel workers.
    client.batch_execute("SET max_parallel_workers_per_gather = 0").await.unwrap();
    let plan: Vec<String> =
        client.query(&format!("EXPLAIN {sample_sql}"), &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    let plan = plan.join("\n");
    println!("sample plan:\n{plan}");
    assert!(plan.contains("Limit"), "{plan}");
    assert!(!plan.contains("Sort"), "the sample plan sorts: {plan}");
}
