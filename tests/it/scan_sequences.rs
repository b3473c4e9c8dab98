//! `sequence_behind` as a part of its table's count statement: one statement per table, the
//! same verdicts (`is_called`, descending sequences left out), and a sequence the scanning role
//! may not read costs only its own probe.

use tenant_audit::report::{ErrorKind, ScanError};

use crate::support::{config, fixture_db, lines, pg, scan};

const TENANTS: &str = "[tenants]\ninclude = ['^tenant_']\n";

/// Two tenants with a `ticket` table drawing from a descending sequence. tenant_a's details
/// sequence was set back with `is_called = false` (next 5, max 5); tenant_b's profile sequence
/// with `is_called = true` (next 3, max 4), and its profiles hold NULL `updated_at`s (the column
/// lost its NOT NULL) and two users that exist nowhere.
const SQL: &str = "CREATE EXTENSION pg_stat_statements;
    SELECT pg_temp.create_tenant(t) FROM unnest(ARRAY['tenant_a', 'tenant_b']) t;
    DO $$ DECLARE t text; BEGIN
      FOREACH t IN ARRAY ARRAY['tenant_a', 'tenant_b'] LOOP
        EXECUTE format('CREATE SEQUENCE %1$I.ticket_id_seq INCREMENT BY -1 MINVALUE -1000 MAXVALUE -1 START -1;
                        CREATE TABLE %1$I.ticket (id int PRIMARY KEY DEFAULT nextval(%2$L), title text);
                        ALTER SEQUENCE %1$I.ticket_id_seq OWNED BY %1$I.ticket.id;
                        INSERT INTO %1$I.ticket (title) SELECT ''t'' || g FROM generate_series(1, 3) g', t, t || '.ticket_id_seq');
      END LOOP; END $$;
    INSERT INTO tenant_a.users_businessdetails (business_id)
      SELECT 'b0000000-0000-0000-0000-000000000001' FROM generate_series(2, 5);
    SELECT setval('tenant_a.users_businessdetails_id_seq', 5, false);
    ALTER TABLE tenant_b.users_userprofile ALTER COLUMN updated_at DROP NOT NULL;
    SET session_replication_role = replica;
    INSERT INTO tenant_b.users_userprofile (user_id, created_at, modified_at, updated_at) VALUES
      (98, now(), now(), NULL), (99, now(), now(), now()), (2, now(), now(), NULL);
    RESET session_replication_role;
    SELECT setval('tenant_b.users_userprofile_id_seq', 2);";

fn expected() -> Vec<String> {
    [
        "orphan_rows tenant_b.users_userprofile(user_id) 2 -> public.auth_user Missing Constraint [\"98\", \"99\"]",
        "sequence_behind tenant_a.users_businessdetails(id) 1 tenant_a.users_businessdetails_id_seq next 5 max 5 []",
        "sequence_behind tenant_b.users_userprofile(id) 2 tenant_b.users_userprofile_id_seq next 3 max 4 []",
        "null_timestamps tenant_b.users_userprofile(updated_at) 2 timestamp with time zone [\"2\", \"4\"]",
    ]
    .map(str::to_string)
    .into()
}

/// Calls of the scan's data statements since the last reset: (table statements, sequence
/// statements of their own).
async fn data_statements(client: &tokio_postgres::Client) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT coalesce(sum(calls) FILTER (WHERE query LIKE 'SELECT * FROM (%'), 0)::bigint,
                    coalesce(sum(calls) FILTER (WHERE query NOT LIKE 'SELECT * FROM (%'
                                                 AND query LIKE '%pg_catalog.pg_sequence %'), 0)::bigint
             FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn sequence_behind_is_read_by_its_tables_one_statement() {
    let url = fixture_db("scan_sequences_fold", SQL).await;
    let client = pg::connect(&url).await;
    client.batch_execute("SELECT pg_stat_statements_reset()").await.unwrap();
    let report = scan(&config(&url, TENANTS)).await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(lines(&report.findings), expected());
    // Per tenant: the details and profile tables (relationships and a sequence) and the ticket
    // table (its descending sequence alone): 3 tables, 3 statements, no sequence statement apart.
    assert_eq!(report.scan.tables_checked, 6);
    assert_eq!(data_statements(&client).await, (6, 0));
}

#[tokio::test]
async fn a_sequence_the_role_cannot_read_costs_only_its_own_probe() {
    let url = fixture_db("scan_sequences_privilege", SQL).await;
    let admin = pg::connect(&url).await;
    admin
        .batch_execute(
            "DROP ROLE IF EXISTS audit_no_seq; CREATE ROLE audit_no_seq LOGIN;
             GRANT USAGE ON SCHEMA public, tenant_a, tenant_b TO audit_no_seq;
             GRANT SELECT ON ALL TABLES IN SCHEMA public, tenant_a, tenant_b TO audit_no_seq;
             GRANT SELECT ON ALL SEQUENCES IN SCHEMA public, tenant_a, tenant_b TO audit_no_seq;
             REVOKE SELECT ON SEQUENCE tenant_b.users_userprofile_id_seq FROM audit_no_seq;
             SELECT pg_stat_statements_reset();",
        )
        .await
        .unwrap();
    let as_role = url.replacen("postgres://postgres@", "postgres://audit_no_seq@", 1);
    let report = scan(&config(&as_role, TENANTS)).await;
    assert_eq!(
        report.errors,
        [ScanError {
            kind: ErrorKind::Permission,
            schema: Some("tenant_b".into()),
            table: Some("users_userprofile".into()),
            message: "permission denied for sequence users_userprofile_id_seq".into(),
        }]
    );
    // The table's orphans and NULLs exactly, and every other finding.
    let mut want = expected();
    want.retain(|l| !l.starts_with("sequence_behind tenant_b."));
    assert_eq!(lines(&report.findings), want);
    // The profile table's statement failed and ran as before folding: its counts (a statement
    // that fails is not counted), then its probe alone, which failed.
    assert_eq!(data_statements(&admin).await, (6, 0));
}
