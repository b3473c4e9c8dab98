//! `schema_drift`: how a tenant's tables differ from the reference shape: missing tables and
//! columns, type, nullability and default differences, and foreign keys that are missing or
//! point at another table than the reference's.
//!
//! A catalog check: it costs no query. Columns and tables the tenant has beyond the reference
//! are not findings.

use super::reference::{FkShape, TableShape};
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
            Some(act) => out.extend(column_differences(exp, act)),
        }
    }
    for (cols, exp) in &expected.foreign_keys {
        let act = actual.foreign_keys.iter().find(|fk| &fk.columns == cols).map(|fk| FkShape::of(fk, tenant, shared));
        match act {
            None => out.push((DriftKind::MissingForeignKey, cols.clone(), Some(exp.describe(shared)), None)),
            Some(act) if act != *exp => {
                out.push((DriftKind::ForeignKeyTarget, cols.clone(), Some(exp.describe(shared)), Some(act.describe(shared))))
            }
            Some(_) => {}
        }
    }
    out
}

fn column_differences(exp: &Column, act: &Column) -> Vec<Difference> {
    let col = || vec![exp.name.clone()];
    let mut out = Vec::new();
    if exp.data_type != act.data_type {
        out.push((DriftKind::TypeMismatch, col(), Some(exp.data_type.clone()), Some(act.data_type.clone())));
    }
    if exp.not_null != act.not_null {
        out.push((DriftKind::NullabilityMismatch, col(), Some(nullability(exp).into()), Some(nullability(act).into())));
    }
    if exp.default != act.default {
        out.push((DriftKind::DefaultMismatch, col(), exp.default.clone(), act.default.clone()));
    }
    out
}

fn nullability(c: &Column) -> &'static str {
    if c.not_null {
        "NOT NULL"
    } else {
        "NULL"
    }
}

/// `type [NOT NULL] [DEFAULT expr]`, as a column definition would read.
fn column_text(c: &Column) -> String {
    let mut s = c.data_type.clone();
    if c.not_null {
        s.push_str(" NOT NULL");
    }
    if let Some(d) = &c.default {
        s.push_str(" DEFAULT ");
        s.push_str(d);
    }
    s
}
