//! `sequence_behind` as a part of its table's count statement: one statement per table, the
//! same verdicts (`is_called`, descending sequences left out), and a sequence the scanning role
//! may not read costs only its own probe.

use tenant_audit::report::{ErrorKind, ScanError};

use crate::support::{config, lines, pg, scan, BASE_SQL};

const TENANTS: &str = "[tenants]\ninclude = ['^tenant_']\n";

/// Two tenants with a `ticket` table whose `id` draws from a descending sequence and whose `n`
/// is a serial; tenant_a's was set back (next 2, max 3). tenant_a's details sequence was set back
/// with `is_called = false` (next 5, max 5); tenant_b's profile sequence with `is_called = true`
/// (next 3, max 4), and its profiles hold NULL `updated_at`s (the column lost its NOT NULL) and
/// two users that exist nowhere.
const SQL: &str = "SELECT pg_temp.create_tenant(t) FROM unnest(ARRAY['tenant_a', 'tenant_b']) t;
    DO $$ DECLARE t text; BEGIN
      FOREACH t IN ARRAY ARRAY['tenant_a', 'tenant_b'] LOOP
        EXECUTE format('CREATE SEQUENCE %1$I.ticket_id_seq INCREMENT BY -1 MINVALUE -1000 MAXVALUE -1 START -1;
                        CREATE TABLE %1$I.ticket (id int PRIMARY KEY DEFAULT nextval(%2$L), n serial, title text);
                        ALTER SEQUENCE %1$I.ticket_id_seq OWNED BY %1$I.ticket.id;
                        INSERT INTO %1$I.ticket (title) SELECT ''t'' || g FROM generate_series(1, 3) g', t, t || '.ticket_id_seq');
      END LOOP; END $$;
    INSERT INTO tenant_a.users_businessdetails (business_id)
      SELECT 'b0000000-0000-0000-0000-000000000001' FROM generate_series(2, 5);
    SELECT setval('tenant_a.users_businessdetails_id_seq', 5, false);
    SELECT setval('tenant_a.ticket_n_seq', 1);
    ALTER TABLE tenant_b.users_userprofile ALTER COLUMN updated_at DROP NOT NULL;
    SET session_replication_role = replica;
    INSERT INTO tenant_b.users_userprofile (user_id, created_at, modified_at, updated_at) VALUES
      (98, now(), now(), NULL), (99, now(), now(), now()), (2, now(), now(), NULL);
    RESET session_replication_role;
    SELECT setval('tenant_b.users_userprofile_id_seq', 2);";

fn expected() -> Vec<String> {
    [
        "orphan_rows tenant_b.users_userprofile(user_id) 2 -> public.auth_user Missing Constraint [\"98\", \"99\"]",
        "sequence_behind tenant_a.ticket(n) 2 tenant_a.ticket_n_seq next 2 max 3 []",
        "sequence_behind tenant_a.users_businessdetails(id) 1 tenant_a.users_businessdetails_id_seq next 5 max 5 []",
        "sequence_behind tenant_b.users_userprofile(id) 2 tenant_b.users_userprofile_id_seq next 3 max 4 []",
        "null_timestamps tenant_b.users_userprofile(updated_at) 2 timestamp with time zone [\"2\", \"4\"]",
    ]
    .map(str::to_string)
    .into()
}

/// A private cluster logging every statement, with the fixture in its database `app`: its log
/// shows each of the scan's statements, failed ones included, and no other test's.
async fn logged_fixture() -> (pg::Cluster, String) {
    let cluster = pg::Cluster::start_with("-c log_statement=all");
    pg::connect(&cluster.url("postgres")).await.batch_execute("CREATE DATABASE app").await.unwrap();
    let url = cluster.url("app");
    pg::connect(&url).await.batch_execute(&format!("{BASE_SQL}\n{SQL}")).await.unwrap();
    (cluster, url)
}

/// The scan's data statements in `cluster`'s log: each is one simple-query message `BEGIN READ
/// ONLY; SET LOCAL ...; statement; COMMIT` (the sample statements and the signals left out).
fn data_statements(cluster: &pg::Cluster) -> usize {
    let log = std::fs::read_to_string(cluster.log()).unwrap();
    // An entry ends where the next log line (which starts with its timestamp) begins.
    log.split("LOG:  statement: ")
        .skip(1)
        .map(|entry| entry.split("\n20").next().unwrap_or(entry))
        .filter(|s| s.starts_with("BEGIN READ ONLY;") && !s.contains("json_agg") && !s.contains("tenant-audit:"))
        .count()
}

#[tokio::test]
async fn sequence_behind_is_read_by_its_tables_one_statement() {
    let (cluster, url) = logged_fixture().await;
    let report = scan(&config(&url, TENANTS)).await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(lines(&report.findings), expected());
    // Per tenant: the details and profile tables (relationships and a serial) and the ticket
    // table (two sequences, no other check): 3 tables, 3 statements, none apart for a sequence.
    assert_eq!(report.scan.tables_checked, 6);
    assert_eq!(data_statements(&cluster), 6);
}

#[tokio::test]
async fn a_sequence_the_role_cannot_read_costs_only_its_own_probe() {
    let (cluster, url) = logged_fixture().await;
    let admin = pg::connect(&url).await;
    admin
        .batch_execute(
            "DROP ROLE IF EXISTS audit_no_seq; CREATE ROLE audit_no_seq LOGIN;
             GRANT USAGE ON SCHEMA public, tenant_a, tenant_b TO audit_no_seq;
             GRANT SELECT ON ALL TABLES IN SCHEMA public, tenant_a, tenant_b TO audit_no_seq;
             GRANT SELECT ON ALL SEQUENCES IN SCHEMA public, tenant_a, tenant_b TO audit_no_seq;
             REVOKE SELECT ON SEQUENCE tenant_b.users_userprofile_id_seq, tenant_a.ticket_id_seq FROM audit_no_seq;",
        )
        .await
        .unwrap();
    let as_role = url.replacen("postgres://postgres@", "postgres://audit_no_seq@", 1);
    let report = scan(&config(&as_role, TENANTS)).await;
    assert_eq!(
        report.errors,
        [
            ScanError {
                kind: ErrorKind::Permission,
                schema: Some("tenant_a".into()),
                table: Some("ticket".into()),
                message: "permission denied for sequence ticket_id_seq".into(),
            },
            ScanError {
                kind: ErrorKind::Permission,
                schema: Some("tenant_b".into()),
                table: Some("users_userprofile".into()),
                message: "permission denied for sequence users_userprofile_id_seq".into(),
            }
        ]
    );
    // The profile table's orphans and NULLs exactly, and every other finding: the ticket table's
    // readable probe still finds its sequence behind.
    let mut want = expected();
    want.retain(|l| !l.starts_with("sequence_behind tenant_b."));
    assert_eq!(lines(&report.findings), want);
    // Four tables ran one statement each. The other two ran it, it failed, and they ran as before
    // folding: the profile table its counts, then its probe (which failed); the ticket table its
    // two probes apart (the descending one's failed).
    assert_eq!(data_statements(&cluster), 4 + 3 + 3);
}

/// An inheritance child draws from its parent's sequence. Each table's probe reads the maximum of
/// its own rows (`ONLY`, as its other checks count them), so the statement on the parent reads no
/// child (nor locks it), and a sequence behind the child's rows is reported on the child alone,
/// not once more on the parent whose own rows are below it.
#[tokio::test]
async fn an_inheritance_child_behind_its_parents_sequence_is_reported_on_the_child_alone() {
    let url = crate::support::fixture_db(
        "scan_sequences_inheritance",
        "CREATE SCHEMA tenant_a;
         CREATE TABLE tenant_a.event (id serial PRIMARY KEY, title text);
         CREATE TABLE tenant_a.special_event (note text) INHERITS (tenant_a.event);
         INSERT INTO tenant_a.event (title) SELECT 'e' || g FROM generate_series(1, 3) g;
         INSERT INTO tenant_a.special_event (title, note) SELECT 's' || g, 'x' FROM generate_series(4, 6) g;
         SELECT setval('tenant_a.event_id_seq', 4);",
    )
    .await;
    let report = scan(&config(&url, TENANTS)).await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        lines(&report.findings),
        [
            "sequence_behind tenant_a.special_event(id) 2 tenant_a.event_id_seq next 5 max 6 []",
            "unregistered_schema tenant_a 1  []",
        ]
    );
}
