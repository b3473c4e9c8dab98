//! `add_missing_columns`: adds a column the reference has and the tenant lacks, the way the
//! post-mortem's per-tenant migration did, made safe: add it nullable, set its default, backfill
//! existing rows in batches, and only then make it NOT NULL through a `NOT VALID` check that is
//! validated without blocking writes (so `SET NOT NULL` needs no table scan under its lock).
//! A column the reference has NOT NULL and the tenant has nullable (a run stopped early, or a
//! drifted tenant) gets the same backfill and NOT NULL steps, so a later run finishes the job.

use super::backfill;
use super::plan::Step;
use crate::catalog::{Column, Table};
use crate::sql;

/// The steps that add `column` to `tenant.table`. A default that draws from a sequence is left
/// out (it would resolve to a sequence the tenant may not have); without a default or a
/// fallback the existing rows cannot be filled, and NOT NULL is not applied.
pub fn add(tenant: &str, table: &str, own: &Table, column: &Column, chain: &[String]) -> Vec<Step> {
    let tbl = sql::qualified(tenant, table);
    let col = sql::ident(&column.name);
    let default = usable_default(column);
    let mut steps = vec![Step::once(
        table,
        &column.name,
        "add_column",
        format!("ALTER TABLE {tbl} ADD COLUMN IF NOT EXISTS {col} {}", column.data_type),
    )];
    if let Some(default) = default {
        steps.push(Step::once(
            table,
            &column.name,
            "set_default",
            format!("ALTER TABLE {tbl} ALTER COLUMN {col} SET DEFAULT {default}"),
        ));
    }
    if column.not_null {
        steps.extend(not_null(tenant, table, own, column, chain));
    } else if let Some(fallback) = backfill::fallback(chain, Some(own), &column.data_type, default) {
        steps.push(backfill_step(tenant, table, own, column, &fallback));
    }
    steps
}

/// The batched backfill of `column` from `fallback`, audited under this repair.
fn backfill_step(tenant: &str, table: &str, own: &Table, column: &Column, fallback: &str) -> Step {
    Step::Batched(backfill::statement(tenant, table, &own.primary_key, &column.name, fallback, "add_missing_columns"))
}

/// Backfills `column` and makes it NOT NULL; nothing when its NULLs cannot be filled.
pub fn not_null(tenant: &str, table: &str, own: &Table, column: &Column, chain: &[String]) -> Vec<Step> {
    let Some(fallback) = backfill::fallback(chain, Some(own), &column.data_type, usable_default(column)) else {
        return Vec::new();
    };
    let tbl = sql::qualified(tenant, table);
    let col = sql::ident(&column.name);
    let check = sql::ident(&format!("tenant_audit_{}_not_null", column.name));
    vec![
        backfill_step(tenant, table, own, column, &fallback),
        // A check left by an interrupted run is replaced.
        Step::once(
            table,
            &column.name,
            "drop_stale_check",
            format!("ALTER TABLE {tbl} DROP CONSTRAINT IF EXISTS {check}"),
        ),
        Step::once(
            table,
            &column.name,
            "add_check",
            format!("ALTER TABLE {tbl} ADD CONSTRAINT {check} CHECK ({col} IS NOT NULL) NOT VALID"),
        ),
        Step::once(table, &column.name, "validate_check", format!("ALTER TABLE {tbl} VALIDATE CONSTRAINT {check}")),
        Step::once(table, &column.name, "set_not_null", format!("ALTER TABLE {tbl} ALTER COLUMN {col} SET NOT NULL")),
        Step::once(table, &column.name, "drop_check", format!("ALTER TABLE {tbl} DROP CONSTRAINT {check}")),
    ]
}

fn usable_default(column: &Column) -> Option<&str> {
    column.default.as_deref().filter(|d| !d.contains("nextval("))
}
