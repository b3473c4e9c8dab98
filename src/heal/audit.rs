//! The audit table `tenant_audit.heal_log`: one row per change heal makes, written in the same
//! transaction as the change.

use crate::sql;
use crate::tenants::AUDIT_SCHEMA;

/// The audit table, qualified and quoted.
pub fn table() -> String {
    sql::qualified(AUDIT_SCHEMA, "heal_log")
}

/// Creates the audit schema and table. Run only when the table is missing: `CREATE SCHEMA`
/// needs the database's CREATE privilege even when the schema exists.
pub fn create_sql() -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {table} (
    id bigserial PRIMARY KEY,
    healed_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    run_id text NOT NULL,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    repair text NOT NULL,
    row_key jsonb NOT NULL,
    old_value jsonb,
    new_value jsonb
);",
        schema = sql::ident(AUDIT_SCHEMA),
        table = table()
    )
}

/// `$1` the audit table: (whether an index undo reads by is missing, whether the role owns the
/// table and may create it).
pub const INDEXES_MISSING: &str = "SELECT pg_catalog.to_regclass('tenant_audit.heal_log_run_table') IS NULL
    OR pg_catalog.to_regclass('tenant_audit.heal_log_undoes') IS NULL
    OR pg_catalog.to_regclass('tenant_audit.heal_log_backfill_progress') IS NULL,
  pg_catalog.pg_has_role(c.relowner, 'USAGE')
FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass($1)";

/// The indexes undo reads the audit table by, created on tables of every version (idempotent):
/// a run's rows of one table in id order (undo's batches), and the undo row of an audit row
/// (`old_value->>'undoes'`, the "not undone yet" check); and the pending-backfill records
/// every run reads ([`super::columns::pending_sql`]: `add_missing_columns` rows with a `step`,
/// a small part of the table).
pub fn indexes_sql() -> String {
    format!(
        "CREATE INDEX IF NOT EXISTS heal_log_run_table ON {table} (run_id, schema_name, table_name, id);
CREATE INDEX IF NOT EXISTS heal_log_undoes ON {table} ((old_value->>'undoes')) WHERE repair = 'undo';
CREATE INDEX IF NOT EXISTS heal_log_backfill_progress ON {table} (schema_name, table_name, id)
  WHERE repair = 'add_missing_columns' AND row_key ? 'step';",
        table = table()
    )
}

/// Whether the audit table exists, and whether the role may read it (USAGE on its schema,
/// SELECT on it).
pub const READABLE: &str = "SELECT t.oid IS NOT NULL,
       t.oid IS NOT NULL AND pg_catalog.has_schema_privilege('tenant_audit', 'USAGE'),
       t.oid IS NOT NULL AND pg_catalog.has_table_privilege(t.oid, 'SELECT')
FROM (SELECT pg_catalog.to_regclass('tenant_audit.heal_log')::pg_catalog.oid AS oid) t";

/// `$1` schema, `$2` table, `$3` column, `$4` audit keys (text): the keys whose row a
/// `backfill_null_timestamps` of an earlier run filled in that column, not undone since.
pub fn backfilled_sql() -> String {
    format!(
        "SELECT k FROM pg_catalog.unnest($4::text[]) k
WHERE EXISTS (
  SELECT 1 FROM {table} l
  WHERE l.schema_name = $1 AND l.table_name = $2 AND l.repair = 'backfill_null_timestamps'
    AND l.row_key OPERATOR(pg_catalog.=) k::jsonb AND l.old_value OPERATOR(pg_catalog.?) $3
    AND NOT EXISTS (SELECT 1 FROM {table} u WHERE u.repair = 'undo' AND (u.old_value->>'undoes') = l.id::text)
)",
        table = table()
    )
}

/// `SELECT` list of one audit row: (`run` the run id's parameter, schema, table, repair, key,
/// old, new).
pub fn row(run: &str, schema: &str, table: &str, repair: &str, key: &str, old: &str, new: &str) -> String {
    format!(
        "SELECT {run}, {}, {}, {}, {key}, {old}, {new}",
        sql::literal(schema),
        sql::literal(table),
        sql::literal(repair)
    )
}

/// A data-modifying CTE named `log` that inserts `rows` (a query of [`row`]s) and returns
/// (table, key) of each, followed by the final `SELECT` of a batched heal statement.
pub fn log_and_return(rows: &str) -> String {
    format!(
        "log AS (\n  INSERT INTO {} (run_id, schema_name, table_name, repair, row_key, old_value, new_value)\n  {rows}\n  RETURNING table_name, row_key::text\n)\nSELECT table_name, row_key FROM log",
        table()
    )
}

/// The statement that records a one-off change (DDL): `$1` run id, `$2` the statement run.
pub fn record_once(schema: &str, table: &str, repair: &str, key: &str) -> String {
    format!(
        "INSERT INTO {} (run_id, schema_name, table_name, repair, row_key, old_value, new_value)\nVALUES ($1, {}, {}, {}, {key}, NULL, pg_catalog.jsonb_build_object('sql', $2::text))",
        self::table(),
        sql::literal(schema),
        sql::literal(table),
        sql::literal(repair)
    )
}

/// `jsonb_build_object('a', alias."a", ...)`: a row key as JSON.
pub fn key_json(alias: &str, columns: &[String]) -> String {
    let pairs: Vec<String> =
        columns.iter().map(|c| format!("{}, {alias}.{}", sql::literal(c), sql::ident(c))).collect();
    format!("pg_catalog.jsonb_build_object({})", pairs.join(", "))
}
