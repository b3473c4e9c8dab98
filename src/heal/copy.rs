//! `copy_missing_parents`: copies parent rows that exist only in the shared schema into the
//! tenant's own table, together with their own missing parents, in one statement per batch.
//!
//! The statement picks up to `$1` orphaned keys (the scan's predicate, evaluated again inside the
//! statement), selects the shared parent rows for them, walks the tenant's foreign keys up from
//! the parent table to find ancestor rows the tenant lacks, inserts everything with
//! `ON CONFLICT (key) DO NOTHING` (a row that arrived meanwhile is left alone; a clash on any
//! other unique key fails the batch loudly instead of being skipped silently), and writes one
//! audit row per inserted row. Foreign keys are checked
//! at the end of the statement, so ancestors and parents go in together consistently. Only
//! columns both tables have are copied (tenant schemas drift).

use std::collections::BTreeSet;

use super::audit;
use super::plan::Step;
use crate::catalog::{Catalog, Identity, Table};
use crate::checks::orphan_rows::Probe;
use crate::sql;

/// How far up the foreign-key graph ancestors are copied.
const MAX_DEPTH: usize = 8;

/// One table whose missing rows the statement copies: its CTE of rows to copy and its key.
struct Level {
    table: String,
    cte: String,
    key: Vec<String>,
}

/// The steps for one orphan relationship: the batched copy, then, for every table it writes
/// whose key is one integer column, a step that moves the key's sequence past the copied keys
/// (rows copied with their keys do not advance it, and the application's next insert would
/// collide). `None` when nothing can be copied (no shared parent table, or no column in common).
pub fn steps(catalog: &Catalog, shared: &str, tenant: &str, probe: &Probe) -> Option<Vec<Step>> {
    let (sql, levels) = statement(catalog, shared, tenant, probe)?;
    let mut steps = vec![Step::Batched(sql)];
    for level in levels {
        let [key] = level.key.as_slice() else { continue };
        let integer = catalog
            .table(tenant, &level.table)?
            .column(key)
            .is_some_and(|c| matches!(c.data_type.as_str(), "integer" | "bigint" | "smallint"));
        if integer {
            steps.push(Step::once(&level.table, key, "advance_sequence", advance_sequence(tenant, &level.table, key)));
        }
    }
    Some(steps)
}

/// Sets the column's own sequence (serial or identity; none: nothing happens) to the largest
/// key, only when it is behind.
fn advance_sequence(tenant: &str, table: &str, key: &str) -> String {
    let table_name = sql::qualified(tenant, table);
    format!(
        "SELECT pg_catalog.setval(s.seq, s.top) FROM (\n  SELECT pg_catalog.pg_get_serial_sequence({}, {})::regclass AS seq, (SELECT max({}) FROM {table_name}) AS top\n) s\nWHERE s.top > coalesce(pg_catalog.pg_sequence_last_value(s.seq), 0)",
        sql::literal(&table_name),
        sql::literal(key),
        sql::ident(key),
    )
}

fn statement(catalog: &Catalog, shared: &str, tenant: &str, probe: &Probe) -> Option<(String, Vec<Level>)> {
    let shared_parent = probe.shared_parent.as_deref()?;
    let mut ctes = vec![format!(
        "batch AS (\n  SELECT DISTINCT {cols} FROM {child} c\n  WHERE {orphan} AND {in_shared}\n  ORDER BY {cols} LIMIT $1\n)",
        cols = sql::columns("c", &probe.columns),
        child = sql::qualified(tenant, &probe.table),
        orphan = probe.orphan_condition(),
        in_shared = probe.in_shared(),
    )];
    ctes.push(format!(
        "rows_0 AS (\n  SELECT s.* FROM {} s WHERE ({}) IN (SELECT * FROM batch)\n)",
        sql::qualified(shared_parent, &probe.parent_table),
        sql::columns("s", &probe.parent_columns)
    ));
    let mut levels =
        vec![Level { table: probe.parent_table.clone(), cte: "rows_0".into(), key: probe.parent_columns.clone() }];
    ancestors(catalog, shared, tenant, &mut levels, &mut ctes);

    // Inserts are written ancestors first, in foreign-key dependency order; PostgreSQL checks
    // the keys when the whole statement is done either way.
    let mut log_rows = Vec::new();
    for (i, level) in levels.iter().enumerate().rev() {
        let own = catalog.table(tenant, &level.table)?;
        let columns = common_columns(own, catalog.table(shared, &level.table)?);
        if columns.is_empty() {
            return None;
        }
        // A `GENERATED ALWAYS` identity takes a given value only when told so.
        let always = columns.iter().any(|c| own.column(c).is_some_and(|c| c.identity == Some(Identity::Always)));
        let overriding = if always { " OVERRIDING SYSTEM VALUE" } else { "" };
        ctes.push(format!(
            "ins_{i} AS (\n  INSERT INTO {} ({}){overriding}\n  SELECT {} FROM {} r\n  ON CONFLICT ({}) DO NOTHING\n  RETURNING *\n)",
            sql::qualified(tenant, &level.table),
            sql::ident_list(&columns),
            sql::columns("r", &columns),
            level.cte,
            sql::ident_list(&level.key),
        ));
        let key = audit::key_json("i", &level.key);
        log_rows.push(format!(
            "{} FROM ins_{i} i",
            audit::row(tenant, &level.table, "copy_missing_parents", &key, "NULL::jsonb", "to_jsonb(i)")
        ));
    }
    ctes.push(audit::log_and_return(&log_rows.join("\n  UNION ALL\n  ")));
    Some((format!("WITH {}", ctes.join(",\n")), levels))
}

/// Adds, breadth first, a level for every table the copied rows reference through the tenant's
/// own foreign keys, when the shared schema has that table too: its rows referenced by the level
/// below and missing from the tenant.
fn ancestors(catalog: &Catalog, shared: &str, tenant: &str, levels: &mut Vec<Level>, ctes: &mut Vec<String>) {
    let mut visited: BTreeSet<String> = levels.iter().map(|l| l.table.clone()).collect();
    let mut next = 0;
    while next < levels.len() && levels.len() < MAX_DEPTH {
        let (table, below) = (levels[next].table.clone(), levels[next].cte.clone());
        next += 1;
        let (Some(own), Some(shared_table)) = (catalog.table(tenant, &table), catalog.table(shared, &table)) else {
            continue;
        };
        for fk in own.foreign_keys.iter().filter(|fk| fk.target_schema == tenant) {
            let target_shared = catalog.table(shared, &fk.target_table);
            let usable = shared_table.has_columns(&fk.columns)
                && target_shared.is_some_and(|t| t.has_columns(&fk.target_columns))
                && !visited.contains(&fk.target_table);
            if !usable {
                continue;
            }
            visited.insert(fk.target_table.clone());
            let cte = format!("rows_{}", levels.len());
            ctes.push(format!(
                "{cte} AS (\n  SELECT s.* FROM {} s\n  WHERE EXISTS (SELECT 1 FROM {below} r WHERE {})\n    AND NOT EXISTS (SELECT 1 FROM {} t WHERE {})\n)",
                sql::qualified(shared, &fk.target_table),
                sql::key_match("s", &fk.target_columns, "r", &fk.columns),
                sql::qualified(tenant, &fk.target_table),
                sql::key_match("t", &fk.target_columns, "s", &fk.target_columns),
            ));
            levels.push(Level { table: fk.target_table.clone(), cte, key: fk.target_columns.clone() });
        }
    }
}

/// Columns of the tenant table that the shared table has too, in the tenant's order. Generated
/// columns of the tenant are left out: it computes its own.
fn common_columns(own: &Table, shared: &Table) -> Vec<String> {
    own.columns.iter().filter(|c| !c.generated && shared.column(&c.name).is_some()).map(|c| c.name.clone()).collect()
}
