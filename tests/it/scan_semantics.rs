//! The scan counts what the database's own foreign keys mean: their equality operators and
//! collations, cross-type keys, domains and enums; each row once under inheritance and
//! partitioning; views, materialized views and foreign tables never audited.

use tenant_audit::report::TenantCounts;

use crate::support::{config, fixture_db, lines, scan};

/// Pattern discovery only: these fixtures build their own tenants.
const TENANTS: &str = "[tenants]\nregistry = false\ninclude = ['^tenant_']\n";

#[tokio::test]
async fn keys_compare_with_the_constraints_operators_and_collations() {
    let sql = "
        CREATE EXTENSION citext;
        CREATE SCHEMA tenant_a;
        -- citext: the key matches whatever the case.
        CREATE TABLE tenant_a.tag (name citext PRIMARY KEY);
        CREATE TABLE tenant_a.post_tag (id int PRIMARY KEY, tag citext REFERENCES tenant_a.tag);
        INSERT INTO tenant_a.tag VALUES ('Rust'), ('Postgres');
        -- Mixed collations: the parent's \"C\", the child's \"POSIX\".
        CREATE TABLE tenant_a.code (code text COLLATE \"C\" PRIMARY KEY);
        CREATE TABLE tenant_a.usage (id int PRIMARY KEY, code text COLLATE \"POSIX\" REFERENCES tenant_a.code);
        INSERT INTO tenant_a.code VALUES ('a'), ('b');
        -- int child, bigint parent.
        CREATE TABLE tenant_a.big_parent (id bigint PRIMARY KEY);
        CREATE TABLE tenant_a.small_child (id int PRIMARY KEY, parent_id int REFERENCES tenant_a.big_parent);
        INSERT INTO tenant_a.big_parent SELECT g FROM generate_series(1, 100) g;
        -- A domain over int as the child's key type, an enum key.
        CREATE DOMAIN tenant_a.positive AS int CHECK (VALUE > 0);
        CREATE TABLE tenant_a.domain_child (id int PRIMARY KEY, parent_id tenant_a.positive REFERENCES tenant_a.big_parent);
        CREATE TYPE tenant_a.colour AS ENUM ('red', 'green', 'blue');
        CREATE TABLE tenant_a.palette (colour tenant_a.colour PRIMARY KEY);
        CREATE TABLE tenant_a.paint (id int PRIMARY KEY, colour tenant_a.colour REFERENCES tenant_a.palette);
        INSERT INTO tenant_a.palette VALUES ('red'), ('green');
        SET session_replication_role = replica;
        INSERT INTO tenant_a.post_tag VALUES (1, 'rust'), (2, 'POSTGRES'), (3, 'Go');
        INSERT INTO tenant_a.usage VALUES (1, 'a'), (2, 'c');
        INSERT INTO tenant_a.small_child SELECT g, g FROM generate_series(1, 130) g;
        INSERT INTO tenant_a.domain_child VALUES (1, 5), (2, 500), (3, 501);
        INSERT INTO tenant_a.paint VALUES (1, 'red'), (2, 'blue'), (3, 'blue');
        RESET session_replication_role;";
    let url = fixture_db("semantics_equality", sql).await;
    let report = scan(&config(&url, &format!("{TENANTS}[report]\nsample_keys = 2\n"))).await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        lines(&report.findings),
        [
            "orphan_rows tenant_a.domain_child(parent_id) 2 -> tenant_a.big_parent Missing Constraint [\"500\", \"501\"]",
            "orphan_rows tenant_a.paint(colour) 2 -> tenant_a.palette Missing Constraint [\"blue\"]",
            "orphan_rows tenant_a.post_tag(tag) 1 -> tenant_a.tag Missing Constraint [\"Go\"]",
            "orphan_rows tenant_a.small_child(parent_id) 30 -> tenant_a.big_parent Missing Constraint [\"101\", \"102\"]",
            "orphan_rows tenant_a.usage(code) 1 -> tenant_a.code Missing Constraint [\"c\"]",
        ]
    );
    assert_eq!(report.tenants, TenantCounts { discovered: 1, scanned: 1, failed: 0 });
}

#[tokio::test]
async fn inferred_relationships_use_the_template_constraints_operator() {
    // tenant_b lacks the constraint tenant_a and tenant_c have; its citext keys are compared
    // with citext's operator all the same.
    let sql = "
        CREATE EXTENSION citext;
        DO $$ DECLARE s text; BEGIN
          FOREACH s IN ARRAY ARRAY['tenant_a', 'tenant_b', 'tenant_c'] LOOP
            EXECUTE format('CREATE SCHEMA %1$I;
              CREATE TABLE %1$I.tag (name citext PRIMARY KEY);
              CREATE TABLE %1$I.post_tag (id int PRIMARY KEY, tag citext CONSTRAINT post_tag_tag_fk REFERENCES %1$I.tag);
              INSERT INTO %1$I.tag VALUES (''Rust'');', s);
          END LOOP; END $$;
        ALTER TABLE tenant_b.post_tag DROP CONSTRAINT post_tag_tag_fk;
        INSERT INTO tenant_b.post_tag VALUES (1, 'RUST'), (2, 'rust'), (3, 'Go');";
    let url = fixture_db("semantics_inferred", sql).await;
    let report = scan(&config(&url, TENANTS)).await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        lines(&report.findings),
        [
            "orphan_rows tenant_b.post_tag(tag) 1 -> tenant_b.tag Missing Inferred [\"Go\"]",
            "schema_drift tenant_b.post_tag(tag) 1 MissingForeignKey Some(\"tag(name)\") None []",
        ]
    );
}

#[tokio::test]
async fn each_row_is_counted_once_under_inheritance_and_partitioning() {
    let sql = "
        CREATE SCHEMA tenant_a;
        -- Inheritance: the NULL is the child's row, read through the parent only without ONLY.
        CREATE TABLE tenant_a.event (id int PRIMARY KEY, created_at timestamptz);
        CREATE TABLE tenant_a.special_event (note text) INHERITS (tenant_a.event);
        INSERT INTO tenant_a.special_event (id, created_at, note) VALUES (1, NULL, 'x');
        INSERT INTO tenant_a.event VALUES (2, now());
        -- Partitioning: NULLs in two partitions (one of them itself partitioned), counted under the
        -- partitioned table's name only.
        CREATE TABLE tenant_a.measurement (id int, day int, created_at timestamptz, PRIMARY KEY (id, day))
          PARTITION BY RANGE (day);
        CREATE TABLE tenant_a.measurement_1 PARTITION OF tenant_a.measurement FOR VALUES FROM (0) TO (10);
        CREATE TABLE tenant_a.measurement_2 PARTITION OF tenant_a.measurement FOR VALUES FROM (10) TO (20)
          PARTITION BY RANGE (day);
        CREATE TABLE tenant_a.measurement_2a PARTITION OF tenant_a.measurement_2 FOR VALUES FROM (10) TO (20);
        INSERT INTO tenant_a.measurement VALUES (1, 1, NULL), (2, 15, NULL), (3, 16, now());
        -- Partitioned parent of a foreign key, and an orphan in a partitioned child.
        CREATE TABLE tenant_a.account (id int PRIMARY KEY) PARTITION BY HASH (id);
        CREATE TABLE tenant_a.account_0 PARTITION OF tenant_a.account FOR VALUES WITH (MODULUS 2, REMAINDER 0);
        CREATE TABLE tenant_a.account_1 PARTITION OF tenant_a.account FOR VALUES WITH (MODULUS 2, REMAINDER 1);
        INSERT INTO tenant_a.account SELECT g FROM generate_series(1, 10) g;
        CREATE TABLE tenant_a.invoice (id int, account_id int REFERENCES tenant_a.account, PRIMARY KEY (id, account_id))
          PARTITION BY HASH (id);
        CREATE TABLE tenant_a.invoice_0 PARTITION OF tenant_a.invoice FOR VALUES WITH (MODULUS 2, REMAINDER 0);
        CREATE TABLE tenant_a.invoice_1 PARTITION OF tenant_a.invoice FOR VALUES WITH (MODULUS 2, REMAINDER 1);
        SET session_replication_role = replica;
        INSERT INTO tenant_a.invoice VALUES (1, 1), (2, 11), (3, 12), (4, 2);
        RESET session_replication_role;
        -- Never audited: a view, a materialized view and a foreign table with NULL timestamps.
        CREATE VIEW tenant_a.event_view AS SELECT id, NULL::timestamptz AS created_at FROM tenant_a.event;
        CREATE MATERIALIZED VIEW tenant_a.event_matview AS SELECT id, NULL::timestamptz AS created_at FROM tenant_a.event;
        CREATE FOREIGN DATA WRAPPER dummy;
        CREATE SERVER nowhere FOREIGN DATA WRAPPER dummy;
        CREATE FOREIGN TABLE tenant_a.remote_event (id int, created_at timestamptz) SERVER nowhere;";
    let url = fixture_db("semantics_once", sql).await;
    let report = scan(&config(&url, TENANTS)).await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        lines(&report.findings),
        [
            "orphan_rows tenant_a.invoice(account_id) 2 -> tenant_a.account Missing Constraint [\"11\", \"12\"]",
            "null_timestamps tenant_a.measurement(created_at) 2 timestamp with time zone [\"(1,1)\", \"(2,15)\"]",
            "null_timestamps tenant_a.special_event(created_at) 1 timestamp with time zone [\"(0,1)\"]",
        ]
    );
}
