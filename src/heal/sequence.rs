//! Sequences moved past the keys in their column: after rows were copied with their keys (in
//! the same transaction as the rows), and as the `advance_sequences` repair of `sequence_behind`
//! findings.
//!
//! Invariant: a sequence is only ever moved forward, to its column's maximum, and only when its
//! next value is at or below it; each move writes its audit row in the same statement.
//! (`setval` is not transactional: a rolled-back batch leaves the sequence moved, which only
//! skips values.)

use super::audit;
use crate::sql;

/// The statement that moves `tenant.seq` to `max(table.column)` when behind, with its audit
/// row (run id parameter `run`); returns one (table, key) row when it moved the sequence.
pub fn advance_sql(run: &str, tenant: &str, table: &str, column: &str, seq: &str, repair: &str) -> String {
    let seq_name = sql::qualified(tenant, seq);
    let seq_literal = sql::literal(&seq_name);
    let key =
        format!("pg_catalog.jsonb_build_object('sequence', {}, 'column', {})", sql::literal(seq), sql::literal(column));
    let log = format!(
        "{} FROM moved m",
        audit::row(
            run,
            tenant,
            table,
            repair,
            &key,
            "pg_catalog.jsonb_build_object('next_value', m.next_value)",
            "pg_catalog.jsonb_build_object('next_value', m.last_value OPERATOR(pg_catalog.+) 1)"
        )
    );
    format!(
        "WITH moved AS (\n  SELECT pg_catalog.setval({seq_literal}::pg_catalog.regclass, x.top) AS last_value, x.next_value FROM (\n    \
         SELECT (SELECT pg_catalog.max(c.{col}) FROM {tbl} c)::bigint AS top,\n           \
         CASE WHEN s.is_called THEN s.last_value::numeric OPERATOR(pg_catalog.+) q.seqincrement ELSE s.last_value::numeric END AS next_value\n    \
         FROM {seq_name} s JOIN pg_catalog.pg_sequence q ON q.seqrelid OPERATOR(pg_catalog.=) {seq_literal}::pg_catalog.regclass\n    \
         WHERE q.seqincrement OPERATOR(pg_catalog.>) 0\n  ) x\n  WHERE x.top OPERATOR(pg_catalog.>=) x.next_value\n),\n{}",
        audit::log_and_return(&log),
        col = sql::ident(column),
        tbl = sql::qualified(tenant, table),
    )
}
