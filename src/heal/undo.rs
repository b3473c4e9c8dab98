//! `heal --undo RUN_ID`: reverts a run from its audit rows in `tenant_audit.heal_log`.
//!
//! Invariants: a copied row is deleted, and a backfilled value set back to NULL, only if the row
//! still holds exactly what heal wrote (the copied row as audited, the value as audited, matched
//! by primary key); every other row is left alone and listed. Undo writes its own audit rows
//! (`repair = 'undo'`, `old_value = {"undoes": <audit row id>}`) in the same statement, which
//! also makes it idempotent. Added columns, constraints and defaults are not dropped, sequence
//! moves are not reversed (either could break the application), copied rows of a table a foreign
//! key references `ON DELETE CASCADE`, `SET NULL` or `SET DEFAULT` are not deleted (that would
//! change the application's rows, unaudited), rows audited without their value
//! (`heal.audit_values = "keys"`) or without a primary key are not undone: all of these are
//! listed.

use tokio_postgres::types::Type;
use tokio_postgres::GenericClient;

use super::audit;
use super::plan::{Action, Plan, Step, TenantPlan};
use super::Repair;
use crate::db::DbError;
use crate::sql;

/// The audit rows of a run, grouped by what can be undone and how.
const GROUPS: &str = "SELECT l.schema_name, l.table_name, l.repair, g.kind, g.col,
       (SELECT pg_catalog.array_agg(k ORDER BY k) FROM pg_catalog.jsonb_object_keys(l.row_key) k) AS key_columns,
       pg_catalog.count(*)::bigint
FROM tenant_audit.heal_log l,
LATERAL (SELECT CASE
    WHEN l.row_key ? 'sequence' THEN 'sequence'
    WHEN l.row_key ? 'step' THEN 'ddl'
    WHEN l.row_key ? 'ctid' THEN 'no_key'
    WHEN l.repair = 'copy_missing_parents' AND l.new_value IS NULL THEN 'keys_only'
    WHEN l.repair = 'copy_missing_parents' THEN 'copy'
    WHEN l.old_value IS NOT NULL THEN 'backfill'
    ELSE 'other' END AS kind,
  (SELECT k FROM pg_catalog.jsonb_object_keys(l.new_value) k LIMIT 1) AS col) g
WHERE l.run_id = $1 AND l.repair <> 'undo'
GROUP BY 1, 2, 3, 4, 5, 6
ORDER BY 1, 2, 3, 4, 5, 6";

/// The type of a column, qualified where it is not built in.
const COLUMN_TYPE: &str = "SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a
WHERE a.attrelid = pg_catalog.to_regclass(pg_catalog.quote_ident($1) || '.' || pg_catalog.quote_ident($2))
  AND a.attname = $3 AND NOT a.attisdropped";

/// `$1` schema, `$2` table: the first foreign key referencing the table whose `ON DELETE` action
/// changes the referencing rows (`CASCADE`, `SET NULL`, `SET DEFAULT`): (name, referencing
/// table, action). Deleting a copied row would then delete or change the application's rows
/// (the orphans it was copied for, at least), unaudited; such copies are not undone.
const CASCADES: &str = "SELECT c.conname::text, pg_catalog.format('%I.%I', n.nspname, r.relname),
       CASE c.confdeltype WHEN 'c' THEN 'CASCADE' WHEN 'n' THEN 'SET NULL' ELSE 'SET DEFAULT' END
FROM pg_catalog.pg_constraint c
JOIN pg_catalog.pg_class r ON r.oid = c.conrelid JOIN pg_catalog.pg_namespace n ON n.oid = r.relnamespace
WHERE c.contype = 'f' AND c.confdeltype IN ('c', 'n', 'd')
  AND c.confrelid = pg_catalog.to_regclass(pg_catalog.quote_ident($1) || '.' || pg_catalog.quote_ident($2))
ORDER BY 2, 1 LIMIT 1";

/// The plan that undoes `run_id`, and one line per group of audit rows it cannot undo.
pub async fn plan(client: &impl GenericClient, run_id: &str) -> Result<(Plan, Vec<String>), DbError> {
    let mut plan = Plan { tenants: Vec::new() };
    let mut notes = Vec::new();
    let rows = client.query_typed(GROUPS, &[(&run_id, Type::TEXT)]).await?;
    for row in rows {
        let (schema, table, repair, kind): (String, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let column: Option<String> = row.get(4);
        let key: Vec<String> = row.get::<_, Option<Vec<String>>>(5).unwrap_or_default();
        let count: i64 = row.get(6);
        let place = sql::escape_controls(&sql::display_name(&schema, &table));
        let step = match kind.as_str() {
            "copy" => {
                let cascades = client.query_typed(CASCADES, &[(&schema, Type::TEXT), (&table, Type::TEXT)]).await?;
                match cascades.first() {
                    Some(c) => {
                        let (name, referencing, action): (String, String, String) = (c.get(0), c.get(1), c.get(2));
                        notes.push(format!(
                            "{place}: {count} copied row(s) not undone: foreign key {} of {} references the table ON DELETE {action}, so deleting them would change the application's rows",
                            sql::escape_controls(&name),
                            sql::escape_controls(&referencing)
                        ));
                        None
                    }
                    None => Some((
                        format!("delete {count} copied row(s) that still hold what heal wrote"),
                        delete_copied(&schema, &table, &key, run_id),
                    )),
                }
            }
            "backfill" => {
                let Some(column) = column else { continue };
                let types = client
                    .query_typed(COLUMN_TYPE, &[(&schema, Type::TEXT), (&table, Type::TEXT), (&column, Type::TEXT)])
                    .await?;
                match types.first() {
                    Some(t) => Some((
                        format!("set {count} {column} value(s) back to NULL where they still hold what heal wrote"),
                        reset_backfilled(&schema, &table, &key, &column, &t.get::<_, String>(0), &repair, run_id),
                    )),
                    None => {
                        notes.push(format!(
                            "{place}: {count} {repair} change(s) not undone: column {column} no longer exists"
                        ));
                        None
                    }
                }
            }
            "sequence" => {
                notes.push(format!(
                    "{place}: {count} sequence move(s) not undone (moving a sequence back would make inserts fail)"
                ));
                None
            }
            "ddl" => {
                notes.push(format!("{place}: {count} column change(s) not undone: added columns, constraints and defaults are not dropped"));
                None
            }
            "keys_only" => {
                notes.push(format!(
                    "{place}: {count} copied row(s) not undone: heal.audit_values = \"keys\" kept no row to compare"
                ));
                None
            }
            "no_key" => {
                notes.push(format!("{place}: {count} {repair} change(s) not undone: the table has no primary key"));
                None
            }
            _ => {
                notes.push(format!("{place}: {count} {repair} change(s) not undone"));
                None
            }
        };
        let Some((summary, sql)) = step else { continue };
        let action = Action {
            repair: Repair::Undo,
            table: table.clone(),
            summary,
            steps: vec![Step::Batched(sql)],
            triggers: Vec::new(),
        };
        match plan.tenants.iter_mut().find(|t| t.schema == schema) {
            Some(t) => t.actions.push(action),
            None => plan.tenants.push(TenantPlan { schema, actions: vec![action] }),
        }
    }
    Ok((plan, notes))
}

/// The audit rows of `run_id` for `schema.table` and `repair` not undone yet, as `x`.
fn targets(schema: &str, table: &str, repair: &str, run_id: &str, extra: &str) -> String {
    format!(
        "SELECT l.id, l.row_key, l.old_value, l.new_value FROM {log} l
  WHERE l.run_id = {run} AND l.schema_name = {schema} AND l.table_name = {table} AND l.repair = {repair}{extra}
    AND NOT EXISTS (SELECT 1 FROM {log} u WHERE u.repair = 'undo' AND u.old_value->>'undoes' = l.id::text)",
        log = audit::table(),
        run = sql::literal(run_id),
        schema = sql::literal(schema),
        table = sql::literal(table),
        repair = sql::literal(repair),
    )
}

/// The row of the audited key in `schema.table`'s tree: its primary key, in the relation the
/// audit names (`relation`, a descendant: a primary key is unique within one relation only) or
/// else in the table itself or one of its partitions, never in an inheritance child.
fn key_match(schema: &str, table: &str, key: &[String]) -> String {
    let key: Vec<String> = key.iter().filter(|k| *k != "relation").cloned().collect();
    format!(
        "{} = (x.row_key - 'relation') AND CASE WHEN x.row_key ? 'relation' THEN c.tableoid = (x.row_key->>'relation')::pg_catalog.regclass
    ELSE c.tableoid = {}::pg_catalog.regclass OR (SELECT r.relispartition FROM pg_catalog.pg_class r WHERE r.oid = c.tableoid) END",
        audit::key_json("c", &key),
        sql::literal(&sql::qualified(schema, table)),
    )
}

fn undo_log(schema: &str, table: &str) -> String {
    audit::log_and_return(&format!(
        "{} FROM done d",
        audit::row("$2", schema, table, "undo", "d.row_key", "jsonb_build_object('undoes', d.id)", "NULL::jsonb")
    ))
}

/// Deletes the rows heal copied in `run_id` that still equal the copied row, in one statement
/// per table (`$1`, the batch size, is not used: rows left alone are never picked again).
fn delete_copied(schema: &str, table: &str, key: &[String], run_id: &str) -> String {
    format!(
        "WITH x AS (\n  {}\n),\ndone AS (\n  DELETE FROM {} c USING x WHERE {} AND to_jsonb(c) = x.new_value\n  RETURNING x.id, x.row_key\n),\n{}",
        targets(schema, table, "copy_missing_parents", run_id, " AND NOT l.row_key ? 'sequence'"),
        sql::qualified(schema, table),
        key_match(schema, table, key),
        undo_log(schema, table),
    )
}

/// Sets back to NULL the values heal backfilled in `run_id` that the rows still hold.
fn reset_backfilled(
    schema: &str,
    table: &str,
    key: &[String],
    column: &str,
    data_type: &str,
    repair: &str,
    run_id: &str,
) -> String {
    let col = sql::ident(column);
    let name = sql::literal(column);
    format!(
        "WITH x AS (\n  {}\n),\ndone AS (\n  UPDATE {} c SET {col} = NULL FROM x\n  WHERE {} AND c.{col} = (x.new_value->>{name})::{data_type}\n  RETURNING x.id, x.row_key\n),\n{}",
        targets(schema, table, repair, run_id, &format!(" AND l.old_value = jsonb_build_object({name}, NULL)")),
        sql::qualified(schema, table),
        key_match(schema, table, key),
        undo_log(schema, table),
    )
}

/// The audit rows of `run_id` that undo could have reverted and did not (the row changed since,
/// or is referenced): `schema.table key` each.
pub async fn left(client: &impl GenericClient, run_id: &str) -> Result<Vec<String>, DbError> {
    let sql = format!(
        "SELECT pg_catalog.format('%s.%s %s', l.schema_name, l.table_name, l.row_key::text) FROM {log} l
WHERE l.run_id = $1 AND l.repair <> 'undo' AND NOT l.row_key ? 'sequence' AND NOT l.row_key ? 'step' AND NOT l.row_key ? 'ctid'
  AND (l.repair <> 'copy_missing_parents' OR l.new_value IS NOT NULL) AND (l.repair = 'copy_missing_parents' OR l.old_value IS NOT NULL)
  AND NOT EXISTS (SELECT 1 FROM {log} u WHERE u.repair = 'undo' AND u.old_value->>'undoes' = l.id::text)
ORDER BY l.id",
        log = audit::table()
    );
    Ok(client.query_typed(&sql, &[(&run_id, Type::TEXT)]).await?.iter().map(|r| r.get(0)).collect())
}
