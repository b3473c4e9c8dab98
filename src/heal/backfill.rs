//! `backfill_null_timestamps` (and the backfill of an added column): sets NULLs from a fallback
//! chain of other columns (`heal.fallbacks`, default `updated_at <- modified_at, created_at,
//! now()`).
//!
//! Invariants: the table is read about once whatever the number of NULLs. Batches page through
//! each relation that holds the table's rows (the table itself and, for an inheritance parent or
//! a partitioned table, every descendant with storage, each read `ONLY`) by ranges of blocks
//! (`ctid` ranges: a TID range scan reads just those blocks), so a row is identified by
//! (relation, `ctid`) and is changed exactly once. Its audit key names its relation whenever the
//! table has descendants (`{"relation": ..., <primary key>}`): a primary key is unique within one
//! relation only, and undo updates `ONLY` the relation the key names. Per batch, one statement locks the rows of the
//! range that are still NULL and have a non-NULL fallback (rows the application holds locked are
//! skipped, left for the next run), updates them re-checking `IS NULL`, and writes one audit row
//! per row the update filled. A row a trigger kept NULL is no change: the table is reported and
//! left. Rows appended after the run started are left for the next run.
//!
//! A batch picks at most its limit (`heal.batch_size`, or less of `heal.max_rows_per_run`) in
//! `ctid` order; the next one starts after the last row picked. A batch that fails on a row of
//! its own (a data exception, a constraint, a trigger's `RAISE`: [`row_specific`]) is split in
//! halves, each its own transaction (no savepoints), down to the single rows that fail: those are
//! set aside with the error, the others written. The backfill of an added nullable column
//! (`pending`) fills only rows whose version predates the transaction that added the column.

use super::audit;
use crate::catalog::Table;
use crate::sql;

/// How many rows a block range of one batch is sized for: `heal.batch_size` rows is about
/// `heal.batch_size / ROWS_PER_BLOCK` blocks (at least one).
pub const ROWS_PER_BLOCK: usize = 100;

/// The fallback expression for `column`, cast to its type: `COALESCE(c."a"::T, ..., now()::T)`
/// from the chain entries the table has (`now()` always qualifies), or `None` when none does.
pub fn fallback(chain: &[String], table: Option<&Table>, data_type: &str, extra: Option<&str>) -> Option<String> {
    let mut parts: Vec<String> = chain
        .iter()
        .filter_map(|entry| match entry.as_str() {
            "now()" => Some(format!("pg_catalog.now()::{data_type}")),
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

/// (source, target) type of each cast `fallback` (made by [`fallback`] for a column of
/// `data_type` of `table`) makes: `timestamptz` for `pg_catalog.now()`, the column's own type
/// for `c."a"`. The default's `(default)::T` is left out: a default is stored coerced to its
/// column's type, so that cast is to the type it has.
pub fn casts(fallback: &str, table: &Table, data_type: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if fallback.contains(&format!("pg_catalog.now()::{data_type}")) {
        out.push(("timestamptz".to_string(), data_type.to_string()));
    }
    for column in &table.columns {
        if fallback.contains(&format!("c.{}::{data_type}", sql::ident(&column.name))) {
            out.push((column.data_type.clone(), data_type.to_string()));
        }
    }
    out
}

/// The fallback that sets each row to the column's default as an insert would (`SET c =
/// DEFAULT`): a column without a default of its own whose type (a domain) has a volatile one,
/// evaluated per row. Every row it picks is NULL; a default that yields NULL leaves it NULL.
pub const COLUMN_DEFAULT: &str = "DEFAULT";

/// What [`fallback`] of the same arguments fills from, for people: the chain's entries it uses
/// (`now()`, the table's columns) then `DEFAULT <extra>` unless `now()` came first, one of them
/// or `the first non-NULL of a, b`.
pub fn describe_fallback(chain: &[String], table: Option<&Table>, extra: Option<&str>) -> String {
    let mut parts: Vec<String> =
        chain.iter().filter(|e| *e == "now()" || table.is_some_and(|t| t.column(e).is_some())).cloned().collect();
    if !chain.iter().any(|e| e == "now()") {
        parts.extend(extra.map(|e| format!("DEFAULT {e}")));
    }
    match parts.as_slice() {
        [one] => one.clone(),
        _ => format!("the first non-NULL of {}", parts.join(", ")),
    }
}

/// A backfill of one column, planned.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BackfillSpec {
    pub tenant: String,
    pub table: String,
    pub column: String,
    /// The fallback expression (rows aliased `c`), or [`COLUMN_DEFAULT`].
    pub fallback: String,
    /// The primary key; rows are audited by it, or by (relation, `ctid`) without one.
    pub key: Vec<String>,
    /// The repair the audit rows name.
    pub repair: super::Repair,
    /// In a plan file: the audit keys (JSON text) of the rows the backfill may change, and no
    /// other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only: Option<Vec<String>>,
    /// Finishes an added nullable column: fills only the rows whose version is older than the
    /// transaction that added the column (recorded in the audit table, see
    /// [`super::columns::pending_record`]): a row the application inserted or updated since is
    /// its own, NULL included.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
    /// (source, target) type of every cast the fallback makes ([`casts`]): checked for a
    /// tenant's cast function before the backfill runs (see [`super::casts`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub casts: Vec<(String, String)>,
}

/// Whether a batch's error belongs to one of its rows rather than to the batch: a data exception
/// (class 22, a fallback that does not fit), an integrity constraint (class 23, a `CHECK`), a
/// view's check option (44) or a PL/pgSQL `RAISE` (P0, a trigger). Such a batch is split until
/// the failing rows are found and set aside.
pub fn row_specific(error: &crate::db::DbError) -> bool {
    error.code().is_some_and(|code| ["22", "23", "44", "P0"].iter().any(|class| code.starts_with(class)))
}

/// `$1` the table: every relation with storage that holds its rows (itself, its inheritance
/// children and partitions, recursively), quoted and qualified, and whether it is a descendant
/// (not the table itself). Reads only the catalog: no lock on the relations (a table with
/// thousands of partitions must not fill the lock table).
pub const RELATIONS: &str = "WITH RECURSIVE r(oid) AS (
  SELECT $1::pg_catalog.regclass::pg_catalog.oid
  UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN r ON i.inhparent = r.oid
)
SELECT pg_catalog.format('%I.%I', n.nspname, c.relname), c.oid <> $1::pg_catalog.regclass::pg_catalog.oid
FROM r JOIN pg_catalog.pg_class c ON c.oid = r.oid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
ORDER BY 1";

/// The relations of [`RELATIONS`]' rows, and whether the table has descendants (its audit keys
/// then name the relation).
pub fn relations(rows: &[tokio_postgres::Row]) -> (Vec<String>, bool) {
    let tree = rows.iter().any(|r| r.get::<_, bool>(1));
    (rows.iter().map(|r| r.get(0)).collect(), tree)
}

/// `$1` a table's qualified name, `$2` a column name: whether the table has that column.
pub const COLUMN_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
  WHERE a.attrelid OPERATOR(pg_catalog.=) pg_catalog.to_regclass($1) AND a.attname OPERATOR(pg_catalog.=) $2 AND NOT a.attisdropped)";

/// `$1` one relation: its size in blocks, read in a transaction of its own (one lock at a time).
pub const BLOCKS: &str =
    "SELECT (pg_catalog.pg_relation_size($1::pg_catalog.regclass) / pg_catalog.current_setting('block_size')::bigint)::bigint";

/// The end of the last range: past any block a relation can have, so rows appended during the
/// run are covered too.
pub const LAST_TID: &str = "(4294967294,0)";

/// Where the first range of a relation starts after: no row has offset 0.
pub const FIRST_TID: &str = "(0,0)";

impl BackfillSpec {
    /// The table's qualified name, the parameter of [`RELATIONS`].
    pub fn table_name(&self) -> String {
        sql::qualified(&self.tenant, &self.table)
    }

    /// A row's audit key (JSON) on `relation` (of a table with descendants when `tree`), rows
    /// aliased `alias`: its primary key, or (relation, `ctid`) without one.
    fn key_expr(&self, relation: &str, tree: bool, alias: &str) -> String {
        if self.key.is_empty() {
            format!(
                "pg_catalog.jsonb_build_object('relation', {}::text, 'ctid', {alias}.ctid::text)",
                sql::literal(relation)
            )
        } else if tree {
            format!(
                "(pg_catalog.jsonb_build_object('relation', {}::text) || {})",
                sql::literal(relation),
                audit::key_json(alias, &self.key)
            )
        } else {
            audit::key_json(alias, &self.key)
        }
    }

    /// `c.col IS NULL AND <fallback> IS NOT NULL`: a row the backfill fills (any NULL row for
    /// [`COLUMN_DEFAULT`], which is not an expression).
    fn fillable(&self) -> String {
        let col = sql::ident(&self.column);
        if self.fallback == COLUMN_DEFAULT {
            format!("c.{col} IS NULL")
        } else {
            format!("c.{col} IS NULL AND {} IS NOT NULL", self.fallback)
        }
    }

    /// The audit keys (JSON text) of the rows of `relation` (see [`Self::batch_sql`]) the
    /// backfill would change now; when the column is not there yet (`exists` false: the
    /// action's `add_column` step adds it first, NULL in every row), every row its fallback
    /// can fill.
    pub fn rows_sql(&self, relation: &str, tree: bool, exists: bool) -> String {
        let null = if exists { format!("c.{} IS NULL AND ", sql::ident(&self.column)) } else { String::new() };
        format!(
            "SELECT ({})::text FROM ONLY {relation} c WHERE {null}{}",
            self.key_expr(relation, tree, "c"),
            if self.fallback == COLUMN_DEFAULT { "TRUE".to_string() } else { format!("{} IS NOT NULL", self.fallback) }
        )
    }

    /// The rows a batch picks, on `relation`, rows aliased `c`, with the parameters of
    /// [`Self::batch_sql`].
    fn picks(&self, relation: &str, tree: bool) -> String {
        let only = match &self.only {
            Some(_) => format!(" AND ({})::text = ANY($5::text[])", self.key_expr(relation, tree, "c")),
            None => String::new(),
        };
        let pending = if self.pending { " AND pg_catalog.age(c.xmin) > pg_catalog.age($7::text::xid)" } else { "" };
        format!(
            "c.ctid > $1::tid AND c.ctid < $2::tid AND {}{only}{pending}\n    AND ($6::text[] IS NULL OR c.ctid = ANY($6::text[]::tid[]))",
            self.fillable()
        )
    }

    /// The `ctid` and audit key (text) of the rows the batch of the same parameters would pick,
    /// in order: read when that batch failed on one of its rows, to split it.
    pub fn candidates_sql(&self, relation: &str, tree: bool) -> String {
        format!(
            "SELECT c.ctid::text, ({})::text FROM ONLY {relation} c\n  WHERE {}\n  ORDER BY c.ctid LIMIT $4",
            self.key_expr(relation, tree, "c"),
            self.picks(relation, tree)
        )
    }

    /// The statement of one batch on `relation` (a quoted, qualified name from [`RELATIONS`], of
    /// a table with descendants when `tree`): `$1` the `ctid` the batch starts after, `$2` the
    /// `ctid` its block range ends before, `$3` the run id, `$4` how many rows it may pick (at most
    /// `heal.batch_size` and what is left of `heal.max_rows_per_run`), `$5` with `only` the audit
    /// keys of the rows it may change, `$6` NULL or the `ctid`s it may pick (a split batch), `$7`
    /// when `pending` the transaction id that added the column. The rows are picked in `ctid`
    /// order. Returns (table, key, NULL) per row changed and audited, (NULL, key, NULL) per row
    /// still NULL after its update (a `BEFORE UPDATE` trigger put the old value back: no change,
    /// not audited), and, when it picked `$4` rows, (NULL, NULL, the last `ctid` picked): the next
    /// batch of the range starts after it.
    pub fn batch_sql(&self, relation: &str, tree: bool) -> String {
        let col = sql::ident(&self.column);
        let fallback = &self.fallback;
        let (returning_key, key_json) = if self.key.is_empty() {
            (
                format!("{}::text AS relation, c.ctid::text AS row_id", sql::literal(relation)),
                "pg_catalog.jsonb_build_object('relation', u.relation, 'ctid', u.row_id)".to_string(),
            )
        } else {
            (sql::columns("c", &self.key), self.key_expr(relation, tree, "u"))
        };
        let old = format!("pg_catalog.jsonb_build_object({}, NULL)", sql::literal(&self.column));
        let new = format!("pg_catalog.jsonb_build_object({}, u.{col})", sql::literal(&self.column));
        let log = format!(
            "{} FROM changed u WHERE u.{col} IS NOT NULL",
            audit::row("$3", &self.tenant, &self.table, self.repair.name(), &key_json, &old, &new)
        );
        format!(
            "WITH batch AS (\n  SELECT c.ctid AS row_id FROM ONLY {relation} c\n  WHERE {picks}\n  ORDER BY c.ctid LIMIT $4\n  FOR UPDATE OF c SKIP LOCKED\n),\n\
             changed AS (\n  UPDATE ONLY {relation} c SET {col} = {fallback}\n  FROM batch b WHERE c.ctid = b.row_id AND c.{col} IS NULL\n  RETURNING {returning_key}, c.{col}\n),\n\
             log AS (\n  INSERT INTO {} (run_id, schema_name, table_name, repair, row_key, old_value, new_value)\n  {log}\n  RETURNING table_name, row_key::text\n)\n\
             SELECT table_name, row_key, NULL::text FROM log\n\
             UNION ALL SELECT NULL, {key_json}::text, NULL FROM changed u WHERE u.{col} IS NULL\n\
             UNION ALL SELECT NULL, NULL, (SELECT b.row_id FROM batch b ORDER BY b.row_id DESC LIMIT 1)::text\n  WHERE (SELECT pg_catalog.count(*) FROM batch) = $4",
            audit::table(),
            picks = self.picks(relation, tree),
        )
    }
}
