//! `sequence_behind`: tenant sequences whose next value is at or below their column's current
//! maximum, so the application's next `INSERT` with the default key fails with a duplicate key.
//! Whoever caused it (a restore, a clone script, rows copied with their keys by another tool)
//! the symptom is the same.
//!
//! One probe per column that draws from a sequence of the tenant's own schema (a serial's
//! `nextval` default or an identity): a one-row aggregate reading the sequence's state and the
//! column's `max()`, an index lookup when the column leads an index (its primary key, for
//! serials and identities). It is a part of its table's count statement (see
//! [`super::work`]), never a statement of its own unless that statement fails. Descending
//! sequences are not checked.

use super::Context;
use crate::report::{Check, Detail, Finding};
use crate::sql;

/// One column and the sequence it draws from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub table: String,
    pub column: String,
    /// The sequence's name, in the tenant's schema.
    pub sequence: String,
}

pub fn plan(ctx: &Context<'_>, tenant: &str) -> Vec<Probe> {
    let schema = ctx.schema(tenant);
    let mut out = Vec::new();
    for (table_name, table) in schema.tables.iter().filter(|(_, t)| t.readable) {
        for column in &table.columns {
            let Some((seq_schema, seq_name)) = column.sequence_in(tenant) else { continue };
            if seq_schema == tenant {
                out.push(Probe {
                    table: table_name.clone(),
                    column: column.name.clone(),
                    sequence: seq_name.to_string(),
                });
            }
        }
    }
    out
}

impl Probe {
    /// How many columns [`Probe::select`] yields.
    pub const COLUMNS: usize = 2;

    /// A one-row aggregate: (next value, column maximum) when the sequence is behind, two NULLs
    /// otherwise (also for a descending sequence), so it never removes the row of the table's
    /// count statement. `relation` is the table as the count statement names it (`ONLY` unless
    /// partitioned): the maximum is of the rows the other checks count, so the statement reads
    /// no inheritance child the count does not (each child is a table with its own probe).
    pub fn select(&self, tenant: &str, relation: &str) -> String {
        let seq = sql::qualified(tenant, &self.sequence);
        format!(
            "SELECT pg_catalog.max(x.next_value)::text, pg_catalog.max(x.top)::text FROM (\n  \
             SELECT CASE WHEN s.is_called THEN s.last_value::numeric OPERATOR(pg_catalog.+) q.seqincrement ELSE s.last_value::numeric END AS next_value,\n         \
             (SELECT pg_catalog.max(c.{col}) FROM {relation} c)::numeric AS top\n  \
             FROM {seq} s JOIN pg_catalog.pg_sequence q ON q.seqrelid OPERATOR(pg_catalog.=) {seq_literal}::pg_catalog.regclass\n  \
             WHERE q.seqincrement OPERATOR(pg_catalog.>) 0\n) x\nWHERE x.top OPERATOR(pg_catalog.>=) x.next_value",
            col = sql::ident(&self.column),
            seq_literal = sql::literal(&seq),
        )
    }

    /// The finding of the [`Probe::COLUMNS`] values of [`Probe::select`]: one when the sequence
    /// is behind.
    pub fn findings(&self, tenant: &str, values: &[Option<String>]) -> Vec<Finding> {
        let value = |i: usize| values.get(i).cloned().flatten().and_then(|v| v.parse::<i64>().ok());
        let (Some(next_value), Some(column_max)) = (value(0), value(1)) else { return Vec::new() };
        vec![Finding {
            check: Check::SequenceBehind,
            severity: Check::SequenceBehind.severity(),
            schema: tenant.to_string(),
            table: Some(self.table.clone()),
            columns: vec![self.column.clone()],
            // How many of the next values collide at most.
            count: column_max.abs_diff(next_value) + 1,
            sample_keys: Vec::new(),
            detail: Detail::SequenceBehind {
                sequence: sql::display_name(tenant, &self.sequence),
                next_value,
                column_max,
            },
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_row_reads_sequence_and_column() {
        let probe = Probe { table: "users".into(), column: "id".into(), sequence: "users_id_seq".into() };
        assert_eq!(
            probe.select("t", "ONLY \"t\".\"users\""),
            "SELECT pg_catalog.max(x.next_value)::text, pg_catalog.max(x.top)::text FROM (\n  \
             SELECT CASE WHEN s.is_called THEN s.last_value::numeric OPERATOR(pg_catalog.+) q.seqincrement ELSE s.last_value::numeric END AS next_value,\n         \
             (SELECT pg_catalog.max(c.\"id\") FROM ONLY \"t\".\"users\" c)::numeric AS top\n  \
             FROM \"t\".\"users_id_seq\" s JOIN pg_catalog.pg_sequence q ON q.seqrelid OPERATOR(pg_catalog.=) '\"t\".\"users_id_seq\"'::pg_catalog.regclass\n  \
             WHERE q.seqincrement OPERATOR(pg_catalog.>) 0\n) x\nWHERE x.top OPERATOR(pg_catalog.>=) x.next_value"
        );
        let found = probe.findings("t", &[Some("4".into()), Some("10".into())]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].count, 7);
        assert_eq!(
            found[0].detail,
            Detail::SequenceBehind { sequence: "t.users_id_seq".into(), next_value: 4, column_max: 10 }
        );
        // Not behind, or descending: the row holds two NULLs.
        assert!(probe.findings("t", &[None, None]).is_empty());
    }
}
