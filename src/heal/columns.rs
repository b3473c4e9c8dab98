//! `add_missing_columns`: gives a tenant a column the reference has, with the reference's exact
//! type, default and nullability, the way an expert would by hand:
//!
//! - a column whose existing rows all get the reference's non-volatile default (no fallback
//!   column to fill them from): one metadata-only statement, `ADD COLUMN c T [NOT NULL] DEFAULT d`
//!   (PostgreSQL 11+ stores the value once, no rewrite, no scan);
//! - otherwise the staged path, with as few `ACCESS EXCLUSIVE` transactions as there can be:
//!   `ADD COLUMN c T, ALTER COLUMN c SET DEFAULT d` in one statement (nullable, no rewrite, new
//!   rows get the default), the batched backfill, then for a NOT NULL column a `NOT VALID` check
//!   replacing any left by an interrupted run (one statement), `VALIDATE` (which blocks no reads or
//!   writes) under `heal.validate_timeout`, and `SET NOT NULL` with the check dropped in the same
//!   transaction (`SET NOT NULL` uses the validated check instead of scanning under its lock).
//! - a column without a default of its own whose domain has a volatile one: added with `DEFAULT
//!   NULL` (metadata only) and that default dropped, then backfilled with `SET c = DEFAULT`.
//!
//! Every state an interruption leaves is one the next run finishes: a column without its
//! NOT NULL is a `nullability_mismatch` (backfill and NOT NULL steps again), a column without its
//! default a `default_mismatch` ([`set_default`]). A nullable column shows no drift once added,
//! so its add records its backfill as pending in the audit table, in the add's transaction
//! ([`pending_record`]); every run resumes the pending backfills ([`pending_sql`]) until a pass finds
//! nothing left to fill ([`done_record`]). Types and defaults are the reference's text relative
//! to its schema; heal runs them under the tenant's `search_path` (see [`super::search_path`]).

use super::plan::{ExpectDefault, Step};
use super::{audit, backfill, sequence, Repair};
use crate::catalog::{Column, Table};
use crate::sql;

/// `$1` a type's text, resolved under the transaction's `search_path` (the tenant's): whether
/// it is a domain with constraints (`CHECK` or `NOT NULL`, on it or a domain it is based on).
/// PostgreSQL 15 rewrites the whole table under `ACCESS EXCLUSIVE` for `ADD COLUMN` of such a
/// type, with or without a default, NULL or NOT NULL (it checks the constraints on every row), and
/// for `ALTER COLUMN ... TYPE` to it: no staged path avoids the rewrite. A domain without
/// constraints is added like its base type.
pub const CONSTRAINED_DOMAIN: &str = "WITH RECURSIVE d(oid) AS (
  SELECT pg_catalog.to_regtype($1)::pg_catalog.oid
  UNION ALL SELECT t.typbasetype FROM pg_catalog.pg_type t JOIN d ON t.oid = d.oid WHERE t.typtype = 'd'
)
SELECT EXISTS (SELECT 1 FROM d JOIN pg_catalog.pg_type t ON t.oid = d.oid WHERE t.typtype = 'd'
  AND (t.typnotnull OR EXISTS (SELECT 1 FROM pg_catalog.pg_constraint c WHERE c.contypid = t.oid)))";

/// Why an added column of a constrained domain is set aside.
pub fn rewrite_reason(column: &str, data_type: &str) -> String {
    format!(
        "add column {column}: its type {data_type} is a domain with constraints, and adding a column of it rewrites the whole table under ACCESS EXCLUSIVE (no staged path avoids it); allow it with heal.allow_table_rewrite = true"
    )
}

/// The `add_column` step: `sql`, refused when `column`'s type is a constrained domain.
fn add_step(table: &str, column: &Column, sql: String) -> Step {
    let mut step = Step::once(table, &column.name, "add_column", sql).completing();
    if let Step::Once(once) = &mut step {
        once.added = Some((column.name.clone(), column.data_type.clone()));
    }
    step
}

/// Whether `column`'s existing rows would get its type's volatile default (a domain's `DEFAULT
/// gen_random_uuid()`, the column having none of its own): adding it as it is would rewrite the
/// table, so it takes the staged path, filled per row with [`backfill::COLUMN_DEFAULT`].
fn type_default(column: &Column) -> bool {
    column.default.is_none() && column.default_volatile
}

/// What fills `column`'s NULLs: its fallback chain, then its default (its own, or its type's
/// when [`type_default`]); `None` when nothing can.
fn fill(chain: &[String], own: &Table, column: &Column) -> Option<String> {
    backfill::fallback(chain, Some(own), &column.data_type, column.default.as_deref())
        .or_else(|| type_default(column).then(|| backfill::COLUMN_DEFAULT.to_string()))
}

/// The steps that add `column` to `tenant.table`, with `collation` (the reference's, as
/// [`crate::checks::reference::collation`] writes it) when it is not the database default.
/// Without a default or a fallback the existing rows cannot be filled, and NOT NULL is not
/// applied.
pub fn add(
    tenant: &str,
    table: &str,
    own: &Table,
    column: &Column,
    collation: Option<&str>,
    chain: &[String],
) -> Vec<Step> {
    let tbl = sql::qualified(tenant, table);
    let col = sql::ident(&column.name);
    let collate = collation.map(|c| format!(" COLLATE {c}")).unwrap_or_default();
    let fills_from_columns = chain.iter().any(|e| e != "now()" && own.column(e).is_some());
    match column.default.as_deref() {
        Some(default) if !column.default_volatile && !fills_from_columns => {
            let not_null = if column.not_null { " NOT NULL" } else { "" };
            vec![add_step(
                table,
                column,
                format!(
                    "ALTER TABLE {tbl} ADD COLUMN IF NOT EXISTS {col} {}{collate}{not_null} DEFAULT {default}",
                    column.data_type
                ),
            )]
        }
        default => {
            let ty = &column.data_type;
            let add = match default {
                Some(d) => format!("ALTER TABLE {tbl} ADD COLUMN IF NOT EXISTS {col} {ty}{collate}, ALTER COLUMN {col} SET DEFAULT {d}"),
                // The explicit `DEFAULT NULL` overrides the type's volatile default, so the add is
                // metadata-only; dropping it then gives new rows the type's default, as in the
                // reference. (One `ALTER TABLE` cannot drop the default of a column it adds.)
                None if type_default(column) => format!(
                    "ALTER TABLE {tbl} ADD COLUMN IF NOT EXISTS {col} {ty}{collate} DEFAULT NULL; ALTER TABLE {tbl} ALTER COLUMN {col} DROP DEFAULT"
                ),
                None => format!("ALTER TABLE {tbl} ADD COLUMN IF NOT EXISTS {col} {ty}{collate}"),
            };
            let mut steps = vec![add_step(table, column, add)];
            if column.not_null {
                // The add is the column's one change: its NOT NULL completes no repair of its own.
                steps.extend(not_null(tenant, table, own, column, chain, false));
            } else if let Some(fallback) = fill(chain, own, column) {
                if let Some(Step::Once(once)) = steps.first_mut() {
                    once.pending = Some(pending_record(tenant, table, &column.name));
                }
                steps.push(pending_backfill(tenant, table, own, column, &fallback));
            }
            steps
        }
    }
}

/// Sets the reference's default on a column that has another one or none (a run stopped
/// between adding a column and setting its default, or a drifted tenant). `None` when the
/// reference has no default: heal does not drop defaults, nor when the default draws from a
/// sequence (`nextval`) and `sequence` (the one it draws from in the reference, by name in the
/// tenant's schema) is unknown.
///
/// The step runs only while the tenant still has `seen`, the default the scan saw (see
/// [`super::plan::OnceStep::expect_default`]): a migration that changed it meanwhile is never reverted. A
/// `nextval` default comes with [`sequence::advance_sql`] on that sequence, run before and after
/// the `ALTER`, each time in a transaction of its own (its `max()` reads the whole table, never
/// under the `ALTER`'s `ACCESS EXCLUSIVE` lock): forward only, past the column's largest value,
/// audited.
pub fn set_default(
    tenant: &str,
    table: &str,
    column: &Column,
    seen: Option<&str>,
    seq_name: Option<&str>,
) -> Option<Vec<Step>> {
    let default = column.default.as_deref()?;
    let tbl = sql::qualified(tenant, table);
    let col = sql::ident(&column.name);
    let advance = match (default.contains("nextval("), seq_name) {
        (false, _) => None,
        (true, Some(seq)) => Some(sequence::advance_sql("$1", tenant, table, &column.name, seq, "add_missing_columns")),
        (true, None) => return None,
    };
    let mut step = Step::once(
        table,
        &column.name,
        "set_default",
        format!("ALTER TABLE {tbl} ALTER COLUMN {col} SET DEFAULT {default}"),
    )
    .completing();
    if let Step::Once(once) = &mut step {
        once.expect_default = Some(ExpectDefault { column: column.name.clone(), default: seen.map(str::to_string) });
        once.advance = advance;
    }
    Some(vec![step])
}

/// `$1` the table (qualified), `$2` the column: the column's default as the catalog deparses it
/// under the transaction's `search_path` (the tenant's, as the scan read it), NULL without one.
/// No row when the column is gone.
pub const CURRENT_DEFAULT: &str = "SELECT pg_catalog.pg_get_expr(d.adbin, 0)
FROM pg_catalog.pg_attribute a
LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid OPERATOR(pg_catalog.=) $1::pg_catalog.regclass AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped";

/// The batched backfill of `column` from `fallback`, audited under this repair.
fn backfill_step(tenant: &str, table: &str, own: &Table, column: &Column, fallback: &str) -> Step {
    Step::Backfill(Box::new(backfill::BackfillSpec {
        tenant: tenant.to_string(),
        table: table.to_string(),
        column: column.name.clone(),
        fallback: fallback.to_string(),
        key: own.primary_key.clone(),
        repair: super::Repair::AddMissingColumns,
        only: None,
        pending: false,
        casts: backfill::casts(fallback, own, &column.data_type),
    }))
}

/// The backfill of an added nullable column: only rows unchanged since its add (see
/// [`backfill::BackfillSpec::pending`]).
fn pending_backfill(tenant: &str, table: &str, own: &Table, column: &Column, fallback: &str) -> Step {
    let mut step = backfill_step(tenant, table, own, column, fallback);
    if let Step::Backfill(spec) = &mut step {
        spec.pending = true;
    }
    step
}

/// The backfill that finishes `column` of `tenant.table`, an added nullable column whose pending
/// backfill the audit table records: from its fallback chain (`chain`, the column's
/// `heal.fallbacks`) then the reference's default. `None` when nothing can fill it.
pub fn resume(tenant: &str, table: &str, own: &Table, column: &Column, chain: &[String]) -> Option<Step> {
    let fallback = fill(chain, own, column)?;
    Some(pending_backfill(tenant, table, own, column, &fallback))
}

/// `$1` the run id: records, in the transaction that adds `column` to `tenant.table` (under its
/// `ACCESS EXCLUSIVE` lock), that the column's backfill is pending, with that transaction's id
/// (32 bits, as `xmin` holds it): the rows whose version is older are the ones it fills. The
/// record also holds what makes that rule meaningful, checked before each pass (see
/// [`PENDING_STATE`]): the column's identity (`relid`, `attnum`: a column dropped and added
/// again under its name is another) and the storage of the table and its descendants (`files`,
/// oid to relfilenode: a rewrite gives every row a new `xmin`).
pub fn pending_record(tenant: &str, table: &str, column: &str) -> String {
    let relation = format!("{}::pg_catalog.regclass", sql::literal(&sql::qualified(tenant, table)));
    progress_record(
        tenant,
        table,
        column,
        "backfill_pending",
        &format!(
            "pg_catalog.jsonb_build_object('xid', (pg_catalog.pg_current_xact_id()::text::bigint % 4294967296)::text, \
             'relid', {relation}::pg_catalog.oid, 'attnum', {}, 'files', {})",
            attnum(&relation, &sql::literal(column)),
            files(&relation)
        ),
    )
}

/// The attnum of the live column named `column` (a SQL text expression) of `relation` (a SQL
/// regclass expression); NULL when there is none.
fn attnum(relation: &str, column: &str) -> String {
    format!(
        "(SELECT a.attnum FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) {relation} \
         AND a.attname OPERATOR(pg_catalog.=) {column} AND NOT a.attisdropped)"
    )
}

/// `relation` (a SQL regclass expression) and every inheritance descendant (partitions
/// included) as a JSON object of oid to relfilenode: what a rewrite (`VACUUM FULL`, `CLUSTER`,
/// `ALTER COLUMN ... TYPE`, pg_repack) or a changed partition set changes.
fn files(relation: &str) -> String {
    format!(
        "(WITH RECURSIVE tree(oid) AS (SELECT {relation}::pg_catalog.oid UNION ALL SELECT i.inhrelid FROM \
         pg_catalog.pg_inherits i JOIN tree t ON i.inhparent OPERATOR(pg_catalog.=) t.oid) \
         SELECT pg_catalog.jsonb_object_agg(c.oid, c.relfilenode) FROM tree t JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.oid)"
    )
}

/// `$1` schema, `$2` table, `$3` column: the latest pending record of that column's backfill
/// (see [`pending_sql`]) and whether it still applies: (xid, same column, same files). Same
/// column is false when the table or the column named so is no longer the one heal added (a
/// migration dropped and added it again); same files is false when the table was rewritten or
/// its partitions changed since. A record written before heal recorded them (no `relid`)
/// counts as both.
pub fn pending_state_sql() -> String {
    let relation = "pg_catalog.to_regclass(pg_catalog.format('%I.%I', $1::pg_catalog.text, $2::pg_catalog.text))";
    format!(
        "SELECT p.xid, coalesce(r.relid IS NULL OR ({relation}::pg_catalog.oid OPERATOR(pg_catalog.=) r.relid AND {attnum} OPERATOR(pg_catalog.=) r.attnum), false),
  coalesce(r.relid IS NULL OR {files} OPERATOR(pg_catalog.=) r.files, false)
FROM ({pending}) p
CROSS JOIN LATERAL (SELECT (p.record->>'relid')::pg_catalog.oid AS relid, (p.record->>'attnum')::pg_catalog.int2 AS attnum,
  p.record->'files' AS files) r
WHERE p.schema_name OPERATOR(pg_catalog.=) $1 AND p.table_name OPERATOR(pg_catalog.=) $2 AND p.column_name OPERATOR(pg_catalog.=) $3
ORDER BY p.id DESC LIMIT 1",
        attnum = attnum(relation, "$3::pg_catalog.text"),
        files = files(relation),
        pending = pending_records(),
    )
}

/// `$1` the run id: records that the pending backfill of `column` of `tenant.table` is done (a
/// whole pass found no row left to fill).
pub fn done_record(tenant: &str, table: &str, column: &str) -> String {
    progress_record(tenant, table, column, "backfill_done", "NULL")
}

/// `$1` the run id, `$2` why: closes the pending backfill of `column` of `tenant.table` without
/// filling it (`new_value` `{"closed": why}`), when the column is no longer the one heal added.
pub fn closed_record(tenant: &str, table: &str, column: &str) -> String {
    progress_record(
        tenant,
        table,
        column,
        "backfill_done",
        "pg_catalog.jsonb_build_object('closed', $2::pg_catalog.text)",
    )
}

fn progress_record(tenant: &str, table: &str, column: &str, step: &str, value: &str) -> String {
    format!(
        "INSERT INTO {} (run_id, schema_name, table_name, repair, row_key, old_value, new_value)\nVALUES ($1, {}, {}, {}, pg_catalog.jsonb_build_object('column', {}, 'step', {}), NULL, {value})",
        audit::table(),
        sql::literal(tenant),
        sql::literal(table),
        sql::literal(Repair::AddMissingColumns.name()),
        sql::literal(column),
        sql::literal(step)
    )
}

/// The pending backfills of added columns: (schema, table, column, transaction id) of every
/// `backfill_pending` audit row without a later `backfill_done` of the same column, oldest
/// first. (It reads the audit table's `add_missing_columns` rows.)
pub fn pending_sql() -> String {
    format!("SELECT p.schema_name, p.table_name, p.column_name, p.xid FROM ({}) p ORDER BY p.id", pending_records())
}

/// The records [`pending_sql`] reads: schema_name, table_name, column_name, xid, `record` (the
/// whole `new_value`) and `id` of each, unordered.
fn pending_records() -> String {
    let log = audit::table();
    format!(
        "SELECT p.schema_name, p.table_name, p.row_key->>'column' AS column_name, p.new_value->>'xid' AS xid, p.new_value AS record, p.id
FROM {log} p
WHERE p.repair = 'add_missing_columns' AND p.row_key ? 'step' AND p.row_key->>'step' = 'backfill_pending'
  AND NOT EXISTS (SELECT 1 FROM {log} d WHERE d.repair = 'add_missing_columns' AND d.schema_name = p.schema_name
    AND d.table_name = p.table_name AND d.row_key ? 'step' AND d.row_key->>'step' = 'backfill_done'
    AND d.row_key->>'column' = p.row_key->>'column' AND d.id > p.id)"
    )
}

/// Backfills `column` and makes it NOT NULL; nothing when its NULLs cannot be filled. With
/// `completes` (the column exists, this is its repair) the `set_not_null` step completes the
/// repair (see [`super::plan::OnceStep::completes_repair`]); without (the action adds the
/// column, whose add is its change) no step here does.
pub fn not_null(
    tenant: &str,
    table: &str,
    own: &Table,
    column: &Column,
    chain: &[String],
    completes: bool,
) -> Vec<Step> {
    let Some(fallback) = fill(chain, own, column) else {
        return Vec::new();
    };
    let tbl = sql::qualified(tenant, table);
    let col = sql::ident(&column.name);
    let check = sql::ident(&format!("tenant_audit_{}_not_null", column.name));
    let mut validate =
        Step::once(table, &column.name, "validate_check", format!("ALTER TABLE {tbl} VALIDATE CONSTRAINT {check}"));
    if let Step::Once(once) = &mut validate {
        once.long = true;
    }
    let mut steps = vec![backfill_step(tenant, table, own, column, &fallback)];
    // The check an interrupted run left (see [`has_unvalidated_check`]) is validated as it is:
    // it already holds new rows to NOT NULL. Any other of that name is replaced.
    if !has_unvalidated_check(own, &column.name) {
        steps.push(Step::once(
            table,
            &column.name,
            "add_check",
            format!(
                "ALTER TABLE {tbl} DROP CONSTRAINT IF EXISTS {check}, ADD CONSTRAINT {check} CHECK ({col} IS NOT NULL) NOT VALID"
            ),
        ));
    }
    // One transaction: the check is gone exactly when the NOT NULL is there.
    let set_not_null = Step::once(
        table,
        &column.name,
        "set_not_null",
        format!("ALTER TABLE {tbl} ALTER COLUMN {col} SET NOT NULL; ALTER TABLE {tbl} DROP CONSTRAINT {check}"),
    );
    steps.extend([validate, if completes { set_not_null.completing() } else { set_not_null }]);
    steps
}

/// Whether `column` of `own` has the `NOT VALID` check `tenant_audit_<column>_not_null` that an
/// add-column stopped before its `VALIDATE` left (as the catalog read it).
pub fn has_unvalidated_check(own: &Table, column: &str) -> bool {
    own.unvalidated_not_null.iter().any(|c| c == column)
}
