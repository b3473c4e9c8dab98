//! `null_timestamps`: NULLs in required timestamp columns. A column is required when its name
//! is in `checks.required_timestamps` or it is NOT NULL in the reference shape; columns that
//! are NOT NULL in the tenant itself cannot hold NULL and cost no scan.
//!
//! One pass per table counts every required column (`count(*) FILTER (...)`); samples (the
//! primary key, or `ctid` when there is none) are fetched only for nonzero counts.

use super::Context;
use crate::catalog::{Column, TypeSchema};
use crate::db::{self, DbError, Snapshot};
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
    /// One pass over the table: a NULL count per required column.
    pub fn count_sql(&self, tenant: &str) -> String {
        let counts: Vec<String> =
            self.columns.iter().map(|(c, _)| format!("count(*) FILTER (WHERE c.{} IS NULL)", sql::ident(c))).collect();
        format!("SELECT {} FROM {} c", counts.join(", "), sql::qualified(tenant, &self.table))
    }

    /// Keys of up to `limit` rows where `column` is NULL, in key order.
    pub fn sample_sql(&self, tenant: &str, column: &str, limit: usize) -> String {
        let (key, order) = if self.key.is_empty() {
            ("c.ctid::text".to_string(), "c.ctid".to_string())
        } else {
            (sql::key_text("c", &self.key), sql::columns("c", &self.key))
        };
        format!(
            "SELECT {key} FROM {} c WHERE c.{} IS NULL ORDER BY {order} LIMIT {limit}",
            sql::qualified(tenant, &self.table),
            sql::ident(column)
        )
    }
}

/// Runs one probe in the tenant's snapshot.
pub async fn run(
    snapshot: &Snapshot<'_>,
    tenant: &str,
    probe: &Probe,
    samples: usize,
) -> Result<Vec<Finding>, DbError> {
    let counts = db::counts(&snapshot.rows(&probe.count_sql(tenant)).await?)?;
    let mut out = Vec::new();
    for (i, (column, data_type)) in probe.columns.iter().enumerate() {
        let count = counts.get(i).copied().unwrap_or(0);
        if count == 0 {
            continue;
        }
        let sample_keys = if samples == 0 {
            Vec::new()
        } else {
            let rows = snapshot.rows(&probe.sample_sql(tenant, column, samples)).await?;
            rows.into_iter().filter_map(|mut r| r.swap_remove(0)).collect()
        };
        out.push(Finding {
            check: Check::NullTimestamps,
            severity: Check::NullTimestamps.severity(),
            schema: tenant.to_string(),
            table: Some(probe.table.clone()),
            columns: vec![column.clone()],
            count,
            sample_keys,
            detail: Detail::NullTimestamps { data_type: data_type.clone() },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pass_counts_every_column() {
        let probe = Probe {
            table: "users_userprofile".into(),
            columns: vec![("created_at".into(), "date".into()), ("Updated At".into(), "timestamp".into())],
            key: vec![],
        };
        assert_eq!(
            probe.count_sql("t"),
            "SELECT count(*) FILTER (WHERE c.\"created_at\" IS NULL), count(*) FILTER (WHERE c.\"Updated At\" IS NULL) \
             FROM \"t\".\"users_userprofile\" c"
        );
        assert_eq!(
            probe.sample_sql("t", "created_at", 10),
            "SELECT c.ctid::text FROM \"t\".\"users_userprofile\" c WHERE c.\"created_at\" IS NULL ORDER BY c.ctid LIMIT 10"
        );
    }
}
