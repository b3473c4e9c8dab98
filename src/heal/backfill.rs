//! `backfill_null_timestamps`: sets NULL required timestamps from a fallback chain of other
//! columns (`heal.fallbacks`, default `updated_at <- modified_at, created_at, now()`).
//!
//! One statement per batch: it locks up to `$1` rows that are still NULL and have a non-NULL
//! fallback (skipping rows the application holds locked), updates them re-checking `IS NULL`,
//! and writes one audit row per update.

use super::audit;
use crate::catalog::Table;
use crate::sql;

/// The fallback expression for `column`, cast to its type: `COALESCE(c."a"::T, ..., now()::T)`
/// from the chain entries the table has (`now()` always qualifies), or `None` when none does.
pub fn fallback(chain: &[String], table: Option<&Table>, data_type: &str, extra: Option<&str>) -> Option<String> {
    let mut parts: Vec<String> = chain
        .iter()
        .filter_map(|entry| match entry.as_str() {
            "now()" => Some(format!("now()::{data_type}")),
            name if table.is_some_and(|t| t.column(name).is_some()) => {
                Some(format!("c.{}::{data_type}", sql::ident(name)))
            }
            _ => None,
        })
        .collect();
    // `now()` never yields NULL: anything after it would never be used.
    if !chain.iter().any(|e| e == "now()") {
        parts.extend(extra.map(|e| format!("({e})::{data_type}")));
    }
    (!parts.is_empty()).then(|| format!("COALESCE({})", parts.join(", ")))
}

/// The batched statement that sets `column` from `fallback` where it is NULL, audited under
/// `repair`. Rows are keyed by the primary key, or by `ctid` when there is none.
pub fn statement(tenant: &str, table: &str, key: &[String], column: &str, fallback: &str, repair: &str) -> String {
    let col = sql::ident(column);
    let (returning_key, key_json) = if key.is_empty() {
        ("b.row_id::text AS row_id".to_string(), "jsonb_build_object('ctid', u.row_id)".to_string())
    } else {
        (sql::columns("c", key), audit::key_json("u", key))
    };
    let old = format!("jsonb_build_object({}, NULL)", sql::literal(column));
    let new = format!("jsonb_build_object({}, u.{col})", sql::literal(column));
    let log = format!("{} FROM changed u", audit::row("$2", tenant, table, repair, &key_json, &old, &new));
    format!(
        "WITH batch AS (\n  SELECT c.ctid AS row_id FROM {tbl} c\n  WHERE c.{col} IS NULL AND {fallback} IS NOT NULL\n  LIMIT $1 FOR UPDATE OF c SKIP LOCKED\n),\n\
         changed AS (\n  UPDATE {tbl} c SET {col} = {fallback}\n  FROM batch b WHERE c.ctid = b.row_id AND c.{col} IS NULL\n  RETURNING {returning_key}, c.{col}\n),\n{}",
        audit::log_and_return(&log),
        tbl = sql::qualified(tenant, table),
    )
}
