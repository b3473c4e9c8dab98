//! `null_timestamps`: NULLs in required timestamp columns. A column is required when its name
//! is in `checks.required_timestamps` or it is NOT NULL in the reference shape; columns that
//! are NOT NULL in the tenant itself cannot hold NULL and cost no scan.
//!
//! One pass per table counts every required column (`count(*) FILTER (...)`); samples (the
//! primary key, or `ctid` when there is none) come from a bounded query, only for nonzero
//! counts.

use super::Context;
use crate::catalog::{Column, TypeSchema};
use crate::report::{Check, Detail, Finding};
use crate::sql;

/// The required nullable timestamp columns of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub table: String,
    /// (column, type) pairs.
    pub columns: Vec<(String, String)>,
    /// The primary key, empty when the table has none.
    pub key: Vec<String>,
}

/// A built-in timestamp or date column (a tenant's own type of that name is not one).
fn is_timestamp(c: &Column) -> bool {
    c.type_schema == TypeSchema::Catalog && (c.data_type.starts_with("timestamp") || c.data_type == "date")
}

pub fn plan(ctx: &Context<'_>, tenant: &str) -> Vec<Probe> {
    let schema = ctx.schema(tenant);
    let mut out = Vec::new();
    for (table_name, table) in schema.tables.iter().filter(|(_, t)| t.readable) {
        let reference = ctx.reference.tables.get(table_name);
        let required = |name: &str| {
            ctx.config.required_timestamps.iter().any(|r| r == name)
                || reference.and_then(|r| r.columns.get(name)).is_some_and(|c| c.not_null == Some(true))
        };
        let columns: Vec<(String, String)> = table
            .columns
            .iter()
            .filter(|c| !c.not_null && !c.generated && is_timestamp(c) && required(&c.name))
            .map(|c| (c.name.clone(), c.data_type.clone()))
            .collect();
        if !columns.is_empty() {
            out.push(Probe { table: table_name.clone(), columns, key: table.primary_key.clone() });
        }
    }
    out
}

impl Probe {
    /// One pass over the table (`child`: as statements name it): a NULL count per required
    /// column.
    pub fn count_select(&self, child: &str) -> String {
        let counts: Vec<String> =
            self.columns.iter().map(|(c, _)| format!("count(*) FILTER (WHERE c.{} IS NULL)", sql::ident(c))).collect();
        format!("SELECT {} FROM {child} c", counts.join(", "))
    }

    /// The findings from the counts of [`Probe::count_select`] (samples still empty).
    pub fn findings(&self, tenant: &str, counts: &[u64]) -> Vec<Finding> {
        self.columns
            .iter()
            .zip(counts)
            .filter(|(_, n)| **n > 0)
            .map(|((column, data_type), count)| Finding {
                check: Check::NullTimestamps,
                severity: Check::NullTimestamps.severity(),
                schema: tenant.to_string(),
                table: Some(self.table.clone()),
                columns: vec![column.clone()],
                count: *count,
                sample_keys: Vec::new(),
                detail: Detail::NullTimestamps { data_type: data_type.clone() },
            })
            .collect()
    }

    /// Keys of up to `limit` rows where `column` is NULL, as a JSON array in key order.
    pub fn sample_select(&self, child: &str, column: &str, limit: usize) -> String {
        sql::sample_select(child, &self.key, &format!("c.{} IS NULL", sql::ident(column)), limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pass_counts_every_column_and_samples_are_bounded() {
        let probe = Probe {
            table: "users_userprofile".into(),
            columns: vec![("created_at".into(), "date".into()), ("Updated At".into(), "timestamp".into())],
            key: vec![],
        };
        let child = "ONLY \"t\".\"users_userprofile\"";
        assert_eq!(
            probe.count_select(child),
            "SELECT count(*) FILTER (WHERE c.\"created_at\" IS NULL), count(*) FILTER (WHERE c.\"Updated At\" IS NULL) \
             FROM ONLY \"t\".\"users_userprofile\" c"
        );
        assert_eq!(
            probe.sample_select(child, "created_at", 10),
            "SELECT pg_catalog.json_agg(s.k ORDER BY s.o0) FROM (SELECT c.ctid::text AS k, c.\"ctid\" AS o0 \
             FROM ONLY \"t\".\"users_userprofile\" c WHERE c.\"created_at\" IS NULL LIMIT 10) s"
        );
    }
}
