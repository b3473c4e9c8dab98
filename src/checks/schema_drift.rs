//! `schema_drift`: how a tenant's tables differ from the reference shape: missing tables and
//! columns, type, nullability, default and collation differences, and foreign keys that are missing or
//! point at another table than the reference's.
//!
//! A catalog check: it costs no query. Columns and tables the tenant has beyond the reference
//! are not findings.

use super::reference::{ColumnShape, FkShape, TableShape};
use super::Context;
use crate::catalog::{Column, Table};
use crate::report::{Check, Detail, DriftKind, Finding};

pub fn check(ctx: &Context<'_>, tenant: &str) -> Vec<Finding> {
    let schema = ctx.schema(tenant);
    let mut out = Vec::new();
    for (table_name, expected) in &ctx.reference.tables {
        let finding = |columns: Vec<String>, difference, expected: Option<String>, actual: Option<String>| Finding {
            check: Check::SchemaDrift,
            severity: Check::SchemaDrift.severity(),
            schema: tenant.to_string(),
            table: Some(table_name.clone()),
            columns,
            count: 1,
            sample_keys: Vec::new(),
            detail: Detail::SchemaDrift { difference, expected, actual },
        };
        match schema.tables.get(table_name) {
            None => out.push(finding(Vec::new(), DriftKind::MissingTable, Some(table_name.clone()), None)),
            Some(actual) => {
                for (kind, cols, exp, act) in table_differences(expected, actual, tenant, ctx.shared_schema) {
                    out.push(finding(cols, kind, exp, act));
                }
            }
        }
    }
    out
}

type Difference = (DriftKind, Vec<String>, Option<String>, Option<String>);

fn table_differences(expected: &TableShape, actual: &Table, tenant: &str, shared: &str) -> Vec<Difference> {
    let mut out = Vec::new();
    for (name, exp) in &expected.columns {
        match actual.column(name) {
            None => out.push((DriftKind::MissingColumn, vec![name.clone()], Some(column_text(exp)), None)),
            Some(act) => out.extend(column_differences(exp, act, actual, tenant)),
        }
    }
    for (cols, exp) in &expected.foreign_keys {
        let act = actual.foreign_keys.iter().find(|fk| &fk.columns == cols).map(|fk| FkShape::of(fk, tenant, shared));
        match act {
            None => out.push((DriftKind::MissingForeignKey, cols.clone(), Some(exp.describe(shared)), None)),
            Some(act) if act != *exp => out.push((
                DriftKind::ForeignKeyTarget,
                cols.clone(),
                Some(exp.describe(shared)),
                Some(act.describe(shared)),
            )),
            Some(_) => {}
        }
    }
    out
}

/// Differences in the attributes the reference agrees on (`act` a column of `table`, of schema
/// `tenant`).
fn column_differences(exp: &ColumnShape, act: &Column, table: &Table, tenant: &str) -> Vec<Difference> {
    let col = || vec![act.name.clone()];
    let mut out = Vec::new();
    if let Some(data_type) = exp.data_type.as_ref().filter(|t| **t != act.data_type) {
        out.push((DriftKind::TypeMismatch, col(), Some(data_type.clone()), Some(act.data_type.clone())));
    }
    if let Some(not_null) = exp.not_null.filter(|n| *n != act.not_null) {
        out.push((
            DriftKind::NullabilityMismatch,
            col(),
            Some(nullability(not_null).into()),
            Some(nullability(act.not_null).into()),
        ));
    }
    if let Some(default) = exp.default.as_ref().filter(|d| **d != act.default) {
        out.push((DriftKind::DefaultMismatch, col(), default.clone(), act.default.clone()));
    }
    let collation = super::reference::collation(table, &act.name, tenant);
    if let Some(expected) = exp.collation.as_ref().filter(|c| **c != collation) {
        out.push((
            DriftKind::CollationMismatch,
            col(),
            Some(collation_text(expected)),
            Some(collation_text(&collation)),
        ));
    }
    out
}

/// A collation as a difference names it: `default` for the database's.
fn collation_text(collation: &Option<String>) -> String {
    collation.clone().unwrap_or_else(|| "default".into())
}

fn nullability(not_null: bool) -> &'static str {
    if not_null {
        "NOT NULL"
    } else {
        "NULL"
    }
}

/// `type [NOT NULL] [DEFAULT expr]`, as a column definition would read (what the reference agrees on).
fn column_text(c: &ColumnShape) -> String {
    let mut s = c.data_type.clone().unwrap_or_else(|| "(type varies)".into());
    if c.not_null == Some(true) {
        s.push_str(" NOT NULL");
    }
    if let Some(Some(d)) = &c.default {
        s.push_str(" DEFAULT ");
        s.push_str(d);
    }
    s
}
