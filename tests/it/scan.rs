//! Scans of fixture databases: every check, with exact counts, schemas and sample keys.

use tenant_audit::catalog;
use tenant_audit::report::{Detail, ErrorKind, ScanError, TenantCounts};

use crate::support::{
    config, fixture_db, lines, lock_audit_trail, pg, scan, wait_until_scan_blocked, DEMO_SQL, LOCKABLE_SQL,
};

/// Registry plus pattern discovery, as the demo is configured.
const BOTH_WAYS: &str = "[tenants]\ninclude = ['^tenant_']\n";

fn create_tenants(names: &[&str]) -> String {
    let list: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
    format!("SELECT pg_temp.create_tenant(t) FROM unnest(ARRAY[{}]) t;\n", list.join(", "))
}

#[tokio::test]
async fn demo_database_reports_every_postmortem_failure() {
    let url = fixture_db("scan_demo", DEMO_SQL).await;
    let report = scan(&config(&url, BOTH_WAYS)).await;
    let b = |n: &str| format!("b0000000-0000-0000-0000-0000000000{n}");
    assert_eq!(
        lines(&report.findings),
        [
            "cross_schema_fk tenant_c3.users_userprofile(business_id) 1 -> public.business_business ShadowedByTenantTable []".to_string(),
            format!("orphan_rows tenant_c3.users_userprofile(business_id) 2 -> tenant_c3.business_business Shared Constraint [{:?}, {:?}]", b("02"), b("03")),
            format!("orphan_rows tenant_d4.users_businessdetails(business_id) 1 -> tenant_d4.business_business Shared Inferred [{:?}]", b("04")),
            format!("orphan_rows tenant_d4.users_businessdetails(business_id) 1 -> tenant_d4.business_business Missing Inferred [{:?}]", b("99")),
            format!("orphan_rows tenant_e5.users_userprofile(business_id) 1 -> tenant_e5.business_business Missing Constraint [{:?}]", b("98")),
            format!("orphan_rows tenant_f6.users_userprofile(business_id) 2 -> tenant_f6.business_business Missing Constraint [{:?}, {:?}]", b("96"), b("97")),
            "missing_schema tenant_gone 1  []".to_string(),
            "null_timestamps tenant_d4.users_userprofile(updated_at) 3 timestamp with time zone [\"2\", \"3\", \"4\"]".to_string(),
            "schema_drift tenant_c3.users_userprofile(business_id) 1 ForeignKeyTarget Some(\"business_business(id)\") Some(\"public.business_business(id)\") []".to_string(),
            "schema_drift tenant_d4.users_businessdetails(business_id) 1 MissingForeignKey Some(\"business_business(id)\") None []".to_string(),
            "schema_drift tenant_d4.users_userprofile(updated_at) 1 NullabilityMismatch Some(\"NOT NULL\") Some(\"NULL\") []".to_string(),
            "schema_drift tenant_d4.users_userprofile(updated_at) 1 DefaultMismatch Some(\"now()\") None []".to_string(),
            "schema_drift tenant_e5.users_userprofile(updated_at) 1 MissingColumn Some(\"timestamp with time zone NOT NULL DEFAULT now()\") None []".to_string(),
            "unregistered_schema tenant_zz9 1  []".to_string(),
        ]
    );
    assert_eq!(report.tenants, TenantCounts { discovered: 7, scanned: 7, failed: 0 });
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let validated: Vec<(&str, Option<bool>)> = report
        .findings
        .iter()
        .filter_map(|f| match &f.detail {
            Detail::OrphanRows { constraint_validated, .. } => Some((f.schema.as_str(), *constraint_validated)),
            _ => None,
        })
        .collect();
    assert_eq!(
        validated,
        [
            ("tenant_c3", Some(true)),
            ("tenant_d4", None),
            ("tenant_d4", None),
            ("tenant_e5", Some(false)),
            ("tenant_f6", Some(true))
        ]
    );
}

#[tokio::test]
async fn clean_database_has_no_findings() {
    let url = fixture_db("scan_clean", &create_tenants(&["tenant_a", "tenant_b", "tenant_c"])).await;
    let report = scan(&config(&url, BOTH_WAYS)).await;
    assert_eq!(lines(&report.findings), Vec::<String>::new());
    assert_eq!(report.tenants, TenantCounts { discovered: 3, scanned: 3, failed: 0 });
    assert!(report.summary.values().all(|s| s.findings == 0 && s.count == 0));
}

#[tokio::test]
async fn sample_keys_are_capped_by_config() {
    let url = fixture_db("scan_samples", DEMO_SQL).await;
    let report = scan(&config(&url, &format!("{BOTH_WAYS}[report]\nsample_keys = 1\n"))).await;
    let nulls = report.findings.iter().find(|f| f.check.name() == "null_timestamps").unwrap();
    assert_eq!((nulls.count, nulls.sample_keys.clone()), (3, vec!["2".to_string()]));
}

#[tokio::test]
async fn composite_keys_and_partial_nulls() {
    let sql = format!(
        "{}
        DO $$ DECLARE s text; BEGIN
          FOREACH s IN ARRAY ARRAY['tenant_a', 'tenant_b', 'tenant_c'] LOOP
            EXECUTE format('CREATE TABLE %1$I.orders (shop int, no int, PRIMARY KEY (shop, no));
                            CREATE TABLE %1$I.order_lines (id serial PRIMARY KEY, shop int, no int,
                              FOREIGN KEY (shop, no) REFERENCES %1$I.orders (shop, no));
                            INSERT INTO %1$I.orders VALUES (1, 1), (7, 1);', s);
          END LOOP; END $$;
        SET session_replication_role = replica;
        INSERT INTO tenant_b.order_lines (shop, no) VALUES (1, 1), (7, 3), (7, 2), (7, 2), (1, NULL), (NULL, 9);
        RESET session_replication_role;
        -- tenant_c's key is MATCH FULL: a partly NULL key is a violation there.
        ALTER TABLE tenant_c.order_lines DROP CONSTRAINT order_lines_shop_no_fkey,
          ADD FOREIGN KEY (shop, no) REFERENCES tenant_c.orders (shop, no) MATCH FULL;
        SET session_replication_role = replica;
        INSERT INTO tenant_c.order_lines (shop, no) VALUES (1, 1), (1, NULL), (NULL, NULL);
        RESET session_replication_role;",
        create_tenants(&["tenant_a", "tenant_b", "tenant_c"])
    );
    let url = fixture_db("scan_composite", &sql).await;
    let report = scan(&config(&url, BOTH_WAYS)).await;
    assert_eq!(
        lines(&report.findings),
        [
            "orphan_rows tenant_b.order_lines(shop,no) 3 -> tenant_b.orders Missing Constraint [\"(7,2)\", \"(7,3)\"]",
            "orphan_rows tenant_c.order_lines(shop,no) 1 -> tenant_c.orders Missing Constraint [\"(1,)\"]",
        ]
    );
}

#[tokio::test]
async fn tenant_to_tenant_foreign_key_is_an_isolation_breach() {
    let sql = format!(
        "{}
        INSERT INTO tenant_a.business_business (id, name) VALUES ('b0000000-0000-0000-0000-000000000050', 'a only');
        ALTER TABLE tenant_b.users_userprofile DROP CONSTRAINT users_userprofile_business_id_fk,
          ADD CONSTRAINT users_userprofile_business_id_fk FOREIGN KEY (business_id) REFERENCES tenant_a.business_business (id);
        INSERT INTO tenant_b.users_userprofile (user_id, business_id, created_at, modified_at)
          VALUES (2, 'b0000000-0000-0000-0000-000000000050', now(), now());",
        create_tenants(&["tenant_a", "tenant_b", "tenant_c"])
    );
    let url = fixture_db("scan_tenant_to_tenant", &sql).await;
    let report = scan(&config(&url, BOTH_WAYS)).await;
    assert_eq!(
        lines(&report.findings),
        [
            "cross_schema_fk tenant_b.users_userprofile(business_id) 1 -> tenant_a.business_business TenantToTenant []",
            "orphan_rows tenant_b.users_userprofile(business_id) 1 -> tenant_b.business_business Missing Constraint [\"b0000000-0000-0000-0000-000000000050\"]",
            "schema_drift tenant_b.users_userprofile(business_id) 1 ForeignKeyTarget Some(\"business_business(id)\") Some(\"tenant_a.business_business(id)\") []",
        ]
    );
}

#[tokio::test]
async fn hostile_identifiers_are_quoted_everywhere() {
    let sql = r#"
        DO $$ DECLARE s text; BEGIN
          FOREACH s IN ARRAY ARRAY['Tenant "Ä" 1', 'tenant-ü; DROP TABLE x; --', 'tenant_plain'] LOOP
            EXECUTE format('CREATE SCHEMA %1$I;
              CREATE TABLE %1$I."Parent Table" ("Key-Id" int PRIMARY KEY);
              CREATE TABLE %1$I."Child ""Rows""" (id int PRIMARY KEY,
                "Parent Ref" int REFERENCES %1$I."Parent Table" ("Key-Id"),
                "Upd ""At""" timestamptz);
              INSERT INTO %1$I."Parent Table" VALUES (1);
              INSERT INTO %1$I."Child ""Rows""" VALUES (1, 1, now());', s);
          END LOOP; END $$;
        SET session_replication_role = replica;
        INSERT INTO "Tenant ""Ä"" 1"."Child ""Rows""" VALUES (2, 404, now()), (3, 1, NULL);
        RESET session_replication_role;
        ALTER TABLE "tenant-ü; DROP TABLE x; --"."Child ""Rows""" DROP COLUMN "Upd ""At""";
    "#;
    let url = fixture_db("scan_hostile", sql).await;
    let extra =
        "[tenants]\nregistry = false\ninclude = ['(?i)^tenant']\n[checks]\nrequired_timestamps = ['Upd \"At\"']\n";
    let report = scan(&config(&url, extra)).await;
    assert_eq!(
        lines(&report.findings),
        [
            "orphan_rows Tenant \"Ä\" 1.Child \"Rows\"(Parent Ref) 1 -> Tenant \"Ä\" 1.Parent Table Missing Constraint [\"404\"]",
            "null_timestamps Tenant \"Ä\" 1.Child \"Rows\"(Upd \"At\") 1 timestamp with time zone [\"3\"]",
            "schema_drift tenant-ü; DROP TABLE x; --.Child \"Rows\"(Upd \"At\") 1 MissingColumn Some(\"timestamp with time zone\") None []",
        ]
    );
    assert_eq!(report.tenants, TenantCounts { discovered: 3, scanned: 3, failed: 0 });
}

#[tokio::test]
async fn tenant_local_types_and_deferrable_keys_compare_by_shape() {
    // Each tenant has its own enum type: the same shape, not drift. One tenant's key became
    // DEFERRABLE: that is drift.
    let sql = format!(
        "{}
        DO $$ DECLARE s text; BEGIN
          FOREACH s IN ARRAY ARRAY['tenant_a', 'tenant_b', 'tenant_c'] LOOP
            EXECUTE format('CREATE TYPE %1$I.mood AS ENUM (''ok'', ''sad'');
                            ALTER TABLE %1$I.users_userprofile ADD COLUMN mood %1$I.mood;', s);
          END LOOP; END $$;
        ALTER TABLE tenant_c.users_businessdetails ALTER CONSTRAINT users_businessdetails_business_id_fkey DEFERRABLE;",
        create_tenants(&["tenant_a", "tenant_b", "tenant_c"])
    );
    let url = fixture_db("scan_local_types", &sql).await;
    let report = scan(&config(&url, BOTH_WAYS)).await;
    assert_eq!(
        lines(&report.findings),
        ["schema_drift tenant_c.users_businessdetails(business_id) 1 ForeignKeyTarget Some(\"business_business(id)\") Some(\"business_business(id) DEFERRABLE\") []"]
    );
}

#[tokio::test]
async fn declared_relationships_are_checked() {
    let sql = format!(
        "{}
        ALTER TABLE tenant_a.users_userprofile ADD COLUMN referrer_id int;
        ALTER TABLE tenant_a.users_businessdetails ADD COLUMN owner_ref uuid;
        INSERT INTO tenant_a.users_userprofile (user_id, referrer_id, created_at, modified_at) VALUES (2, 1, now(), now()), (3, 999, now(), now());",
        create_tenants(&["tenant_a"])
    );
    let url = fixture_db("scan_declared", &sql).await;
    // The second relationship compares a uuid with an integer: that statement fails, alone.
    let extra = "[tenants]\ninclude = ['^tenant_']\n\
        [[checks.relationships]]\ntable = 'users_businessdetails'\ncolumns = ['owner_ref']\nparent_table = 'users_userprofile'\nparent_columns = ['id']\n\
        [[checks.relationships]]\ntable = 'users_userprofile'\ncolumns = ['referrer_id']\nparent_table = 'users_userprofile'\nparent_columns = ['id']\n";
    let report = scan(&config(&url, extra)).await;
    assert_eq!(
        lines(&report.findings),
        ["orphan_rows tenant_a.users_userprofile(referrer_id) 1 -> tenant_a.users_userprofile Missing Configured [\"999\"]"]
    );
    assert_eq!(
        report.errors,
        [ScanError {
            kind: ErrorKind::Query,
            schema: Some("tenant_a".into()),
            table: Some("users_businessdetails".into()),
            message: "operator does not exist: integer pg_catalog.= uuid".into(),
        }]
    );
    assert_eq!(report.tenants, TenantCounts { discovered: 1, scanned: 0, failed: 1 });
}

#[tokio::test]
async fn reference_schema_defines_the_expected_shape() {
    let sql = format!(
        "{}
        ALTER TABLE tenant_template.users_userprofile ADD COLUMN locale text NOT NULL DEFAULT 'en';",
        create_tenants(&["tenant_template", "tenant_a", "tenant_b"])
    );
    let url = fixture_db("scan_reference", &sql).await;
    let report = scan(&config(&url, "[tenants]\nreference_schema = 'tenant_template'\n")).await;
    assert_eq!(report.reference_schema.as_deref(), Some("tenant_template"));
    assert_eq!(
        lines(&report.findings),
        [
            "schema_drift tenant_a.users_userprofile(locale) 1 MissingColumn Some(\"text NOT NULL DEFAULT 'en'::text\") None []",
            "schema_drift tenant_b.users_userprofile(locale) 1 MissingColumn Some(\"text NOT NULL DEFAULT 'en'::text\") None []",
        ]
    );
    assert_eq!(report.tenants.discovered, 2);
}

#[tokio::test]
async fn tenant_dropped_during_the_scan_is_reported_not_fatal() {
    let url = fixture_db("scan_dropped", LOCKABLE_SQL).await;
    let locker = lock_audit_trail(&url).await;
    let cfg = config(&url, "[scan]\nlock_timeout = '60s'\n");
    let scan = tokio::spawn(async move { scan(&cfg).await });
    wait_until_scan_blocked(&url).await;
    locker.batch_execute("DROP SCHEMA tenant_b CASCADE; COMMIT").await.unwrap();

    let report = scan.await.unwrap();
    assert_eq!(
        report.errors,
        [ScanError {
            kind: ErrorKind::TenantDropped,
            schema: Some("tenant_b".into()),
            table: None,
            message: "schema was dropped during the scan".into(),
        }]
    );
    assert_eq!(report.tenants, TenantCounts { discovered: 3, scanned: 2, failed: 1 });
    assert_eq!(report.failures().count(), 0);
}

#[tokio::test]
async fn catalog_queries_come_in_chunks_of_schemas_not_per_tenant() {
    async fn catalog_calls(name: &str, tenants: usize) -> (i64, i64, usize) {
        let sql = format!(
            "CREATE EXTENSION pg_stat_statements;
             SELECT pg_temp.create_tenant(format('tenant_%s', g)) FROM generate_series(1, {tenants}) g;"
        );
        let url = fixture_db(name, &sql).await;
        let client = pg::connect(&url).await;
        client.batch_execute("SELECT pg_stat_statements_reset()").await.unwrap();
        let report = scan(&config(&url, "")).await;
        let count = |tag: &'static str| {
            let client = &client;
            async move {
                let row = client
                    .query_one(
                        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements
                         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                           AND query LIKE '%' || $1 || '%'",
                        &[&tag],
                    )
                    .await
                    .unwrap();
                row.get::<_, i64>(0)
            }
        };
        (count("tenant-audit:catalog").await, count("tenant-audit:discovery").await, report.tenants.scanned)
    }
    // One query lists the tables, then the shared schema's chunk and one chunk per CHUNK_TABLES
    // tenant tables (whole tenants of 3 tables: 666 tenants, then the other 334).
    assert_eq!((catalog::QUERY_COUNT, catalog::CHUNK_TABLES), (3, 2000));
    let small = catalog_calls("scan_catalog_3", 3).await;
    let large = catalog_calls("scan_catalog_1000", 1000).await;
    assert_eq!(small, (1 + 3 * 2, 3, 3));
    assert_eq!(large, (1 + 3 * 3, 3, 1000));
}
