//! `heal --undo RUN_ID`: reverts a run from its audit rows in `tenant_audit.heal_log`.
//!
//! Invariants:
//! - a copied row is deleted, and a backfilled value set back to NULL, only if the row still
//!   holds exactly what heal wrote (the copied row as audited, the value as audited, matched by
//!   its typed key columns in the one relation the audit key names, `ONLY`); every other row is
//!   left alone and listed with why;
//! - a copied row that any row references is never deleted: every foreign key that references
//!   the table (whatever its `ON DELETE` action, `NOT VALID` ones included) and every relationship
//!   the checks know by table name (`checks.relationships`, and the foreign keys any schema
//!   declares between tables of these names) is checked in the `DELETE` itself, after the rows
//!   were locked in an earlier statement of the same transaction (an application insert that
//!   references one waits, or is seen): so no `ON DELETE CASCADE`, `SET NULL` or `SET DEFAULT`
//!   ever fires;
//! - undo pages like heal: `heal.batch_size` audit rows of the run at a time (by audit id, the
//!   newest first), one short transaction each, within `heal.max_rows_per_run`; each change writes
//!   its own audit row (`repair = 'undo'`, `old_value = {"undoes": <audit row id>}`) in the same
//!   statement, and an audit row already undone is never picked again, so one audit row is undone
//!   at most once;
//! - a copied row referenced only by other copied rows (a self-referencing chain) is freed as
//!   they go: a batch re-runs its undo statement while a pass undoes a row and leaves one (each
//!   pass sees the rows the previous one deleted; the picked rows are fixed, so it ends), and the
//!   group's batches are swept again while a sweep undid a row and left one still referenced
//!   (one copy batch writes a table's rows in the shared table's order, not the tree's);
//! - added columns, constraints and defaults are not dropped, sequence moves are not reversed
//!   (either could break the application), rows audited without their value (`heal.audit_values
//!   = "keys"`) or without a primary key, and backfills audited by earlier versions on a table
//!   with inheritance children (their key does not say which relation's row it was) are not
//!   undone: all of these are listed;
//! - a group that a change since the run keeps from being undone (its table, a key column or
//!   the column gone, a backfilled column NOT NULL now) is listed as blocked ([`NotUndone`]),
//!   never attempted, and the other groups are undone.

use tokio_postgres::types::Type;
use tokio_postgres::{GenericClient, Transaction};

use super::audit;
use super::plan::{Action, Plan, Step, TenantPlan};
use super::{HealError, Repair};
use crate::config::DeclaredRelationship;
use crate::db::DbError;
use crate::sql;

/// The audit rows of a run, grouped by what can be undone and how (and, for a backfill of a
/// table with descendants, by the relation its key names).
const GROUPS: &str = "SELECT l.schema_name, l.table_name, l.repair, g.kind,
       CASE WHEN g.kind = 'backfill' THEN (SELECT k FROM pg_catalog.jsonb_object_keys(l.new_value) k LIMIT 1) END,
       l.row_key->>'relation',
       (SELECT pg_catalog.array_agg(k ORDER BY k) FROM pg_catalog.jsonb_object_keys(l.row_key - 'relation') k) AS key_columns,
       pg_catalog.count(*)::bigint
FROM tenant_audit.heal_log l,
LATERAL (SELECT CASE
    WHEN l.row_key ? 'sequence' THEN 'sequence'
    WHEN l.row_key ? 'step' THEN 'ddl'
    WHEN l.row_key ? 'ctid' THEN 'no_key'
    WHEN l.repair = 'copy_missing_parents' AND l.new_value IS NULL THEN 'keys_only'
    WHEN l.repair = 'copy_missing_parents' THEN 'copy'
    WHEN l.old_value IS NOT NULL THEN 'backfill'
    ELSE 'other' END AS kind) g
WHERE l.run_id = $1 AND l.repair <> 'undo'
GROUP BY 1, 2, 3, 4, 5, 6, 7
ORDER BY 1, 2, 3, 4, 5, 6, 7";

/// `$1` schema, `$2` table: its `relkind` and whether it has inheritance children or partitions.
const TABLE_KIND: &str =
    "SELECT c.relkind::text, EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i WHERE i.inhparent = c.oid)
FROM pg_catalog.pg_class c
WHERE c.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(pg_catalog.quote_ident($1) || '.' || pg_catalog.quote_ident($2))";

/// `$1` schema, `$2` table, `$3` a relation as an audit key names it (`%I.%I`): that relation's
/// schema and name if it is the table or one of its descendants with storage.
const RELATION_IN_TREE: &str = "WITH RECURSIVE r(oid) AS (
  SELECT pg_catalog.to_regclass(pg_catalog.quote_ident($1) || '.' || pg_catalog.quote_ident($2))::pg_catalog.oid
  UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN r ON i.inhparent = r.oid
)
SELECT n.nspname::text, c.relname::text
FROM r JOIN pg_catalog.pg_class c ON c.oid = r.oid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND pg_catalog.format('%I.%I', n.nspname, c.relname) = $3";

/// The type of a column, qualified where it is not built in, and whether it is NOT NULL.
const COLUMN_TYPE: &str = "SELECT pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull,
  COALESCE(b.typtype, t.typtype) OPERATOR(pg_catalog.=) 'c' AS composite
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_catalog.pg_type b ON b.oid = t.typbasetype
WHERE a.attrelid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(pg_catalog.quote_ident($1) || '.' || pg_catalog.quote_ident($2))
  AND a.attname = $3 AND NOT a.attisdropped";

/// `$1` schema, `$2` table: every foreign key that references the table itself (any schema, any
/// `ON DELETE` action, validated or not): the referencing relation, its columns, the table's
/// columns and the constraint's equality operators (schema, name); then, by name, every foreign
/// key any schema declares from a table of some name to a table named `$2`, as a relationship
/// of the tenant's tables of these names (the checks infer relationships this way), operators
/// NULL.
const REFERENCES: &str = "WITH t AS (
  SELECT pg_catalog.to_regclass(pg_catalog.quote_ident($1) || '.' || pg_catalog.quote_ident($2))::pg_catalog.oid AS oid
), fk AS (
  SELECT k.oid, k.conrelid, k.confrelid, k.conpfeqop,
    ARRAY(SELECT a.attname::text FROM pg_catalog.unnest(k.conkey) WITH ORDINALITY u(n, i)
          JOIN pg_catalog.pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n ORDER BY u.i) AS child_columns,
    ARRAY(SELECT a.attname::text FROM pg_catalog.unnest(k.confkey) WITH ORDINALITY u(n, i)
          JOIN pg_catalog.pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = u.n ORDER BY u.i) AS parent_columns
  FROM pg_catalog.pg_constraint k
  WHERE k.contype = 'f' AND k.conparentid = 0
)
SELECT n.nspname::text, c.relname::text, fk.child_columns, fk.parent_columns,
  ARRAY(SELECT s.nspname::text FROM pg_catalog.unnest(fk.conpfeqop) WITH ORDINALITY u(op, i)
        JOIN pg_catalog.pg_operator o ON o.oid = u.op JOIN pg_catalog.pg_namespace s ON s.oid = o.oprnamespace ORDER BY u.i),
  ARRAY(SELECT o.oprname::text FROM pg_catalog.unnest(fk.conpfeqop) WITH ORDINALITY u(op, i)
        JOIN pg_catalog.pg_operator o ON o.oid = u.op ORDER BY u.i)
FROM fk JOIN t ON fk.confrelid = t.oid
JOIN pg_catalog.pg_class c ON c.oid = fk.conrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
UNION
SELECT $1::text, c.relname::text, fk.child_columns, fk.parent_columns, NULL::text[], NULL::text[]
FROM fk JOIN pg_catalog.pg_class p ON p.oid = fk.confrelid AND p.relname = $2
JOIN pg_catalog.pg_class c ON c.oid = fk.conrelid
ORDER BY 1, 2, 3, 4";

/// `$1` schema, `$2` table, `$3` columns: whether the table has every one of them.
const HAS_COLUMNS: &str =
    "SELECT pg_catalog.count(*) = pg_catalog.cardinality($3::text[]) FROM pg_catalog.pg_attribute a
WHERE a.attrelid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(pg_catalog.quote_ident($1) || '.' || pg_catalog.quote_ident($2))
  AND a.attname = ANY($3::text[]) AND a.attnum > 0 AND NOT a.attisdropped";

/// The equality undo compares tenant columns with, where no constraint names its own: the
/// built-in one. A plain `=` would resolve, under `search_path = pg_catalog, <tenant>`, to an
/// operator the tenant defined for its own type (a domain key) or for a pair of types
/// `pg_catalog` has none for (`uuid = text`): it could match other rows than heal's, and would
/// run the tenant's function with the heal role's privileges.
const EQ: &str = "OPERATOR(pg_catalog.=)";

/// One group of audit rows (a table's copies, or a column's backfill in one relation), undone
/// batch by batch.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UndoSpec {
    pub schema: String,
    pub table: String,
    /// `$1` limit, `$2` the smallest audit id of the previous batch ([`FIRST_CURSOR`] first):
    /// the group's next audit rows (of the run undone) not undone yet, newest first, with their
    /// rows locked. Returns one row: the picked audit ids, in descending order (NULL when none is
    /// left), and how many rows it locked.
    pub pick_sql: String,
    /// `$1` the undo's own run id, `$2` the picked audit ids: undoes the rows that still hold what heal wrote,
    /// with their audit rows, and returns (`undone` or why the row was left, key) per picked row
    /// not undone before the statement.
    pub undo_sql: String,
    /// The relation the undo changes, qualified and quoted (a partition or child a backfill's
    /// audit keys name, or the table).
    pub relation: String,
    /// A copy's undo deletes rows (`DELETE`, after `FOR UPDATE`); a backfill's updates them.
    pub deletes: bool,
    /// The relations, qualified and quoted, whose rows the `DELETE` checks for references.
    pub reads: Vec<String>,
    /// (source, target) type of every cast the statements make: `text` to each key column's
    /// type, and to the column's type for a backfill's undo. Checked for a tenant's cast function
    /// before the undo runs (see [`super::casts`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub casts: Vec<(String, String)>,
}

impl UndoSpec {
    /// (relation, privilege) of everything the undo reads or changes: SELECT and UPDATE on its
    /// relation (the rows are locked first), DELETE too for a copy's undo, SELECT on every
    /// relation whose rows are checked for references.
    pub fn privileges(&self) -> Vec<(String, &'static str)> {
        let own: &[&'static str] = if self.deletes { &["SELECT", "UPDATE", "DELETE"] } else { &["SELECT", "UPDATE"] };
        let mut out: Vec<(String, &'static str)> = own.iter().map(|p| (self.relation.clone(), *p)).collect();
        out.extend(self.reads.iter().map(|r| (r.clone(), "SELECT")));
        out
    }

    /// The `tgtype` bit of the row event the undo fires ([`super::triggers`]).
    pub fn event(&self) -> i32 {
        if self.deletes {
            super::triggers::DELETE
        } else {
            super::triggers::UPDATE
        }
    }
}

/// What one batch of an undo did.
#[derive(Debug, Default)]
pub struct UndoBatch {
    /// Audit rows picked; 0 when the group is done.
    pub picked: usize,
    /// The smallest audit id picked: where the next batch starts.
    pub cursor: i64,
    /// Keys undone.
    pub undone: Vec<String>,
    /// (key, why) of the rows left alone by the last pass.
    pub left: Vec<(String, String)>,
}

/// Why a copied row some row references was left: a later sweep of the group may free it.
pub const STILL_REFERENCED: &str = "still referenced";

/// The cursor of a group's first batch: audit ids are paged downwards from here.
pub const FIRST_CURSOR: i64 = i64::MAX;

/// Runs one batch of `spec` in `tx`: picks up to `limit` audit rows below `cursor`, locks their
/// rows, then undoes what still holds heal's value (a new statement: it sees every row committed
/// before the locks were had). The undo statement runs again while a pass undoes a row and
/// leaves one: a copied row referenced only by a row the previous pass deleted is free now (each
/// pass re-checks the references under the locks), and the picked rows are fixed, so it ends.
pub async fn batch(
    tx: &Transaction<'_>,
    spec: &UndoSpec,
    limit: i64,
    cursor: i64,
    run_id: &str,
) -> Result<UndoBatch, tokio_postgres::Error> {
    let run_id = run_id.to_string();
    let row = tx.query_typed_one(&spec.pick_sql, &[(&limit, Type::INT8), (&cursor, Type::INT8)]).await?;
    let ids: Vec<i64> = row.get::<_, Option<Vec<i64>>>(0).unwrap_or_default();
    let Some(last) = ids.last().copied() else { return Ok(UndoBatch::default()) };
    let mut out = UndoBatch { picked: ids.len(), cursor: last, ..UndoBatch::default() };
    loop {
        let before = out.undone.len();
        out.left.clear();
        for row in tx.query_typed(&spec.undo_sql, &[(&run_id, Type::TEXT), (&ids, Type::INT8_ARRAY)]).await? {
            let (status, key): (String, String) = (row.get(0), row.get(1));
            if status == "undone" {
                out.undone.push(key);
            } else {
                out.left.push((key, status));
            }
        }
        if out.undone.len() == before || out.left.is_empty() {
            return Ok(out);
        }
    }
}

/// A group of audit rows the undo leaves as they are, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotUndone {
    pub text: String,
    /// Whether undo could have reverted them but for what changed since the run (the table or
    /// a column is gone, the column is NOT NULL now): the undo is incomplete (exit 1). `false`
    /// for what undo never reverts (sequence moves, DDL, rows audited without their value).
    pub blocked: bool,
}

/// The plan that undoes `run_id`, and one entry per group of audit rows it cannot undo.
/// `relationships` are the configured ones (`checks.relationships`): a copied row any of them
/// references is left. Reads only (it runs on a standby too); an audit table that is missing or
/// that the role may not read is an error saying so.
pub async fn plan(
    client: &impl GenericClient,
    run_id: &str,
    relationships: &[DeclaredRelationship],
) -> Result<(Plan, Vec<NotUndone>), HealError> {
    let row = client.query_typed_one(audit::READABLE, &[]).await.map_err(DbError::from)?;
    let (exists, usage, select): (bool, bool, bool) = (row.get(0), row.get(1), row.get(2));
    if !exists {
        return Err(HealError::NoAuditTable);
    }
    if !usage {
        return Err(HealError::Privileges(format!("no USAGE on schema {}", sql::ident(crate::tenants::AUDIT_SCHEMA))));
    }
    if !select {
        return Err(HealError::Privileges(format!("no SELECT on {}", audit::table())));
    }
    let mut tenants: Vec<(String, Vec<Ordered>)> = Vec::new();
    let mut notes = Vec::new();
    let rows = client.query_typed(GROUPS, &[(&run_id, Type::TEXT)]).await.map_err(DbError::from)?;
    for row in rows {
        let group = Group {
            run_id: run_id.to_string(),
            copy: row.get::<_, String>(3) == "copy",
            schema: row.get(0),
            table: row.get(1),
            repair: row.get(2),
            column: row.get(4),
            relation: row.get(5),
            key: row.get::<_, Option<Vec<String>>>(6).unwrap_or_default(),
        };
        let (kind, count): (String, i64) = (row.get(3), row.get(7));
        let place = sql::escape_controls(&sql::display_name(&group.schema, &group.table));
        let repair = &group.repair;
        let planned = match kind.as_str() {
            "copy" => copy_step(client, &group, relationships, count).await?,
            "backfill" => backfill_step(client, &group, count).await?,
            "sequence" => Err(by_design(format!(
                "{count} sequence move(s) not undone (moving a sequence back would make inserts fail)"
            ))),
            "ddl" => Err(by_design(format!(
                "{count} column change(s) not undone: added columns, constraints and defaults are not dropped"
            ))),
            "keys_only" => Err(by_design(format!(
                "{count} copied row(s) not undone: heal.audit_values = \"keys\" kept no row to compare"
            ))),
            "no_key" => Err(by_design(format!("{count} {repair} change(s) not undone: the table has no primary key"))),
            _ => Err(by_design(format!("{count} {repair} change(s) not undone"))),
        };
        let (summary, spec, references) = match planned {
            Ok(step) => step,
            Err(note) => {
                notes.push(NotUndone { text: format!("{place}: {}", note.text), ..note });
                continue;
            }
        };
        let action = Action {
            repair: Repair::Undo,
            table: group.table.clone(),
            summary,
            steps: vec![Step::Undo(Box::new(spec))],
            triggers: Vec::new(),
        };
        match tenants.iter_mut().find(|(schema, _)| *schema == group.schema) {
            Some((_, actions)) => actions.push((action, references)),
            None => tenants.push((group.schema.clone(), vec![(action, references)])),
        }
    }
    let tenants = tenants
        .into_iter()
        .map(|(schema, actions)| TenantPlan { schema, actions: referencing_first(actions) })
        .collect();
    Ok((Plan { tenants }, notes))
}

/// One group of [`GROUPS`].
struct Group {
    run_id: String,
    copy: bool,
    schema: String,
    table: String,
    repair: String,
    column: Option<String>,
    relation: Option<String>,
    key: Vec<String>,
}

/// (summary, spec, for a copy the tenant's tables whose rows' references are checked) of a
/// planned undo, or why the group is not undone (without its place).
type Planned = Result<(String, UndoSpec, Option<Vec<String>>), NotUndone>;

/// Not undone because of what changed since the run.
fn blocked(text: String) -> NotUndone {
    NotUndone { text, blocked: true }
}

/// Not undone by design.
fn by_design(text: String) -> NotUndone {
    NotUndone { text, blocked: false }
}

/// An undo action, with the tenant's tables whose rows may reference its rows for a copy.
type Ordered = (Action, Option<Vec<String>>);

/// Orders the undos of one tenant (each copy with the tenant's tables whose rows may reference
/// its rows, `None` for a backfill) so that a table whose rows reference another copied table's rows is undone first: the
/// referenced rows are free by then. Cycles keep their order.
fn referencing_first(mut rest: Vec<Ordered>) -> Vec<Action> {
    let mut out = Vec::new();
    while !rest.is_empty() {
        let next = rest
            .iter()
            .position(|(a, referencing)| {
                let referencing = referencing.as_deref().unwrap_or_default();
                !rest
                    .iter()
                    .any(|(other, copy)| copy.is_some() && other.table != a.table && referencing.contains(&other.table))
            })
            .unwrap_or(0);
        out.push(rest.remove(next).0);
    }
    out
}

/// The undo of a table's copied rows: `DELETE` (`ONLY` the table, the partitioned table itself
/// when it is one: its key holds the partition key) of rows equal to the copied row and
/// referenced by none.
async fn copy_step(
    client: &impl GenericClient,
    group: &Group,
    relationships: &[DeclaredRelationship],
    count: i64,
) -> Result<Planned, DbError> {
    let (schema, table) = (&group.schema, &group.table);
    let kind = client.query_typed_opt(TABLE_KIND, &[(schema, Type::TEXT), (table, Type::TEXT)]).await?;
    let Some(kind) = kind else {
        return Ok(Err(blocked(format!("{count} copied row(s) not undone: the table no longer exists"))));
    };
    let only = kind.get::<_, String>(0) != "p";
    let target = Target { schema: schema.clone(), relation: table.clone(), only, key: Vec::new() };
    let Some(target) = target.typed(client, &group.key).await? else {
        return Ok(Err(blocked(format!("{count} copied row(s) not undone: a key column no longer exists"))));
    };
    let references = references(client, schema, table, relationships).await?;
    let checked: Vec<String> = references.iter().filter(|r| r.schema == *schema).map(|r| r.table.clone()).collect();
    let summary = format!(
        "delete the copied rows ({count} audited) that still hold what heal wrote and that no row references ({} relationship(s) checked)",
        references.len()
    );
    let mut reads: Vec<String> = references.iter().map(|r| sql::qualified(&r.schema, &r.table)).collect();
    reads.sort();
    reads.dedup();
    let spec = target.spec(group, "FOR UPDATE", &delete_copied(&target, group, &references), reads);
    Ok(Ok((summary, spec, Some(checked))))
}

/// The undo of a column's backfill in one relation: `UPDATE ONLY` the relation the audit keys
/// name (keys of earlier versions name none: the table itself, or a partitioned table whose key
/// holds the partition key; a table with inheritance children is refused).
async fn backfill_step(client: &impl GenericClient, group: &Group, count: i64) -> Result<Planned, DbError> {
    let (schema, table, repair) = (&group.schema, &group.table, &group.repair);
    let Some(column) = &group.column else {
        return Ok(Err(by_design(format!("{count} {repair} change(s) not undone"))));
    };
    let target = match &group.relation {
        Some(relation) => {
            let found = client
                .query_typed_opt(RELATION_IN_TREE, &[(schema, Type::TEXT), (table, Type::TEXT), (relation, Type::TEXT)])
                .await?;
            let Some(found) = found else {
                return Ok(Err(blocked(format!(
                    "{count} {repair} change(s) not undone: relation {} no longer holds the table's rows",
                    sql::escape_controls(relation)
                ))));
            };
            Target { schema: found.get(0), relation: found.get(1), only: true, key: Vec::new() }
        }
        None => {
            let kind = client.query_typed_opt(TABLE_KIND, &[(schema, Type::TEXT), (table, Type::TEXT)]).await?;
            let Some(kind) = kind else {
                return Ok(Err(blocked(format!("{count} {repair} change(s) not undone: the table no longer exists"))));
            };
            let (relkind, children): (String, bool) = (kind.get(0), kind.get(1));
            if relkind != "p" && children {
                return Ok(Err(by_design(format!(
                    "{count} {repair} change(s) not undone: audited by an earlier version, whose key does not name the relation, and the table has inheritance children whose rows can share its primary key values"
                ))));
            }
            Target { schema: schema.clone(), relation: table.clone(), only: relkind != "p", key: Vec::new() }
        }
    };
    let types = client
        .query_typed(COLUMN_TYPE, &[(&target.schema, Type::TEXT), (&target.relation, Type::TEXT), (column, Type::TEXT)])
        .await?;
    let Some((data_type, not_null)) = types.first().map(|t| (t.get::<_, String>(0), t.get::<_, bool>(1))) else {
        return Ok(Err(blocked(format!(
            "{count} {repair} change(s) not undone: column {} no longer exists",
            sql::escape_controls(column)
        ))));
    };
    if not_null {
        return Ok(Err(blocked(format!(
            "{count} {repair} change(s) not undone: column {} is NOT NULL now",
            sql::escape_controls(column)
        ))));
    }
    let Some(target) = target.typed(client, &group.key).await? else {
        return Ok(Err(blocked(format!("{count} {repair} change(s) not undone: a key column no longer exists"))));
    };
    let summary = format!("set {count} {column} value(s) back to NULL where they still hold what heal wrote");
    let mut spec =
        target.spec(group, "FOR NO KEY UPDATE", &reset_backfilled(&target, group, column, &data_type), Vec::new());
    spec.casts.push(("text".to_string(), data_type));
    Ok(Ok((summary, spec, None)))
}

/// The relation an undo writes, and its key columns with their types.
struct Target {
    schema: String,
    relation: String,
    /// Written `ONLY` (not a partitioned table).
    only: bool,
    /// The audit key's columns.
    key: Vec<KeyColumn>,
}

/// A key column of an undo's relation.
struct KeyColumn {
    name: String,
    data_type: String,
    /// A composite type (or a domain over one): its audited value is a JSON object, not text.
    composite: bool,
}

impl KeyColumn {
    /// The audited value of the column as its own type: `(x.row_key->>'k')::T`, or for a
    /// composite `jsonb_populate_record(NULL::T, x.row_key->'k')` (the object `to_jsonb` wrote;
    /// its text is no record literal).
    fn audited(&self) -> String {
        let k = sql::literal(&self.name);
        if self.composite {
            format!("pg_catalog.jsonb_populate_record(NULL::{}, x.row_key->{k})", self.data_type)
        } else {
            format!("(x.row_key->>{k})::{}", self.data_type)
        }
    }
}

impl Target {
    /// With the types of `key`, or `None` when a key column is gone.
    async fn typed(mut self, client: &impl GenericClient, key: &[String]) -> Result<Option<Target>, DbError> {
        for column in key {
            let types = client
                .query_typed(
                    COLUMN_TYPE,
                    &[(&self.schema, Type::TEXT), (&self.relation, Type::TEXT), (column, Type::TEXT)],
                )
                .await?;
            let Some(t) = types.first() else { return Ok(None) };
            self.key.push(KeyColumn { name: column.clone(), data_type: t.get(0), composite: t.get(2) });
        }
        Ok(Some(self))
    }

    /// `[ONLY] "schema"."relation"`.
    fn name(&self) -> String {
        format!("{}{}", if self.only { "ONLY " } else { "" }, sql::qualified(&self.schema, &self.relation))
    }

    /// `c."k" OPERATOR(pg_catalog.=) (x.row_key->>'k')::T AND ...`: the row of the audited key,
    /// by typed columns (an index on the key serves it), with the built-in equality (see [`EQ`]).
    fn key_match(&self) -> String {
        self.key
            .iter()
            .map(|k| format!("c.{} {EQ} {}", sql::ident(&k.name), k.audited()))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    fn spec(&self, group: &Group, lock: &str, undo_sql: &str, reads: Vec<String>) -> UndoSpec {
        UndoSpec {
            schema: group.schema.clone(),
            table: group.table.clone(),
            pick_sql: format!(
                "WITH x AS (\n  {}\n  ORDER BY l.id DESC LIMIT $1\n),\nlocked AS (\n  SELECT 1 FROM {} c, x WHERE {}\n  {lock} OF c\n)\nSELECT pg_catalog.array_agg(x.id ORDER BY x.id DESC), (SELECT pg_catalog.count(*) FROM locked) FROM x",
                pick(group),
                self.name(),
                self.key_match()
            ),
            undo_sql: undo_sql.to_string(),
            relation: sql::qualified(&self.schema, &self.relation),
            deletes: group.copy,
            reads,
            casts: self.key.iter().filter(|k| !k.composite).map(|k| ("text".to_string(), k.data_type.clone())).collect(),
        }
    }
}

/// The audit rows of the group below `$2`, not undone yet. An index on (run_id,
/// schema_name, table_name, id) serves it, and one on `old_value->>'undoes'` the check.
fn pick(group: &Group) -> String {
    let kind = match (&group.column, &group.relation) {
        (_, _) if group.copy => "l.new_value IS NOT NULL".to_string(),
        (None, _) => "FALSE".to_string(),
        (Some(column), relation) => format!(
            "l.old_value = pg_catalog.jsonb_build_object({}, NULL) AND {}",
            sql::literal(column),
            match relation {
                Some(r) => format!("l.row_key->>'relation' = {}", sql::literal(r)),
                None => "NOT l.row_key ? 'relation'".to_string(),
            }
        ),
    };
    let key: Vec<String> = group.key.iter().map(|k| sql::literal(k)).collect();
    format!(
        "SELECT l.id, l.row_key FROM {log} l\n  WHERE l.run_id = {run} AND l.schema_name = {schema} AND l.table_name = {table} AND l.id < $2\n    AND l.repair = {repair} AND NOT l.row_key ?| ARRAY['sequence', 'step', 'ctid'] AND {kind}\n    AND (SELECT pg_catalog.array_agg(k ORDER BY k) FROM pg_catalog.jsonb_object_keys(l.row_key - 'relation') k) = ARRAY[{key}]::text[]\n    AND {not_undone}",
        log = audit::table(),
        run = sql::literal(&group.run_id),
        schema = sql::literal(&group.schema),
        table = sql::literal(&group.table),
        repair = sql::literal(&group.repair),
        key = key.join(", "),
        not_undone = not_undone("l"),
    )
}

/// The audit row `alias` has no undo row yet.
fn not_undone(alias: &str) -> String {
    format!(
        "NOT EXISTS (SELECT 1 FROM {} u WHERE u.repair = 'undo' AND (u.old_value->>'undoes') = {alias}.id::text)",
        audit::table()
    )
}

/// The undo statement's frame: the picked audit rows as `x` (`$2`, not undone meanwhile), the
/// change as `done` (returning x.id, x.row_key), its audit rows, then one row per picked audit
/// row: `undone`, or `left` the reason.
fn undo_statement(target: &Target, group: &Group, change: &str, left: &str) -> String {
    format!(
        "WITH x AS (\n  SELECT l.id, l.row_key, l.new_value FROM {log} l WHERE l.id = ANY($2::bigint[]) AND {not_undone}\n),\n\
         done AS (\n  {change}\n  RETURNING x.id, x.row_key\n),\n\
         log AS (\n  INSERT INTO {log} (run_id, schema_name, table_name, repair, row_key, old_value, new_value)\n  {row} FROM done d\n  RETURNING row_key\n)\n\
         SELECT 'undone', g.row_key::text FROM log g\n\
         UNION ALL\n\
         SELECT {left}, x.row_key::text FROM x LEFT JOIN {name} c ON {key}\n  WHERE x.id NOT IN (SELECT d.id FROM done d)",
        log = audit::table(),
        not_undone = not_undone("l"),
        row = audit::row("$1", &group.schema, &group.table, "undo", "d.row_key", "pg_catalog.jsonb_build_object('undoes', d.id)", "NULL::jsonb"),
        name = target.name(),
        key = target.key_match(),
    )
}

/// Deletes the copied rows that still equal the copied row and that no row references.
fn delete_copied(target: &Target, group: &Group, references: &[Reference]) -> String {
    let unreferenced: String = references.iter().map(|r| format!("\n    AND NOT EXISTS ({})", r.exists())).collect();
    let change = format!(
        "DELETE FROM {} c USING x\n  WHERE {} AND pg_catalog.to_jsonb(c.*) = x.new_value{unreferenced}",
        target.name(),
        target.key_match()
    );
    let left = format!(
        "CASE WHEN c.ctid IS NULL THEN 'no longer exists' WHEN pg_catalog.to_jsonb(c.*) <> x.new_value THEN 'changed since the run' ELSE {} END",
        sql::literal(STILL_REFERENCED)
    );
    undo_statement(target, group, &change, &left)
}

/// Sets back to NULL the backfilled values the rows still hold.
fn reset_backfilled(target: &Target, group: &Group, column: &str, data_type: &str) -> String {
    let col = sql::ident(column);
    let change = format!(
        "UPDATE {} c SET {col} = NULL FROM x\n  WHERE {} AND c.{col} {EQ} (x.new_value->>{})::{data_type}",
        target.name(),
        target.key_match(),
        sql::literal(column)
    );
    let left = "CASE WHEN c.ctid IS NULL THEN 'no longer exists' ELSE 'changed since the run' END";
    undo_statement(target, group, &change, left)
}

/// A relationship whose rows may reference the copied table's rows.
struct Reference {
    schema: String,
    table: String,
    columns: Vec<String>,
    parent_columns: Vec<String>,
    /// (schema, name) of the constraint's equality operator per column, or `None` (then the built-in `=`, [`EQ`]).
    operators: Option<Vec<(String, String)>>,
}

impl Reference {
    /// `SELECT 1 FROM referencing r WHERE c.<parent> = r.<child> ...`, the row itself excepted (a
    /// row referencing itself does not keep itself).
    fn exists(&self) -> String {
        let pairs: Vec<String> = self
            .parent_columns
            .iter()
            .zip(&self.columns)
            .enumerate()
            .map(|(i, (p, ch))| {
                let op = match &self.operators {
                    Some(ops) => ops.get(i).map_or_else(|| EQ.to_string(), |(s, n)| sql::operator(s, n)),
                    None => EQ.to_string(),
                };
                format!("c.{} {op} r.{}", sql::ident(p), sql::ident(ch))
            })
            .collect();
        format!(
            "SELECT 1 FROM {} r WHERE {} AND (r.tableoid, r.ctid) <> (c.tableoid, c.ctid)",
            sql::qualified(&self.schema, &self.table),
            pairs.join(" AND ")
        )
    }
}

/// Every relationship whose rows may reference rows of `schema.table`: the foreign keys that
/// reference it, then by name (the foreign keys any schema declares, `relationships`) those
/// whose tables and columns the tenant has.
async fn references(
    client: &impl GenericClient,
    schema: &str,
    table: &str,
    relationships: &[DeclaredRelationship],
) -> Result<Vec<Reference>, DbError> {
    let mut out: Vec<Reference> = Vec::new();
    let mut by_name = Vec::new();
    for row in client.query_typed(REFERENCES, &[(&schema, Type::TEXT), (&table, Type::TEXT)]).await? {
        let (s, t, columns, parent_columns): (String, String, Vec<String>, Vec<String>) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let schemas: Option<Vec<String>> = row.get(4);
        let names: Option<Vec<String>> = row.get(5);
        match schemas.zip(names) {
            Some((schemas, names)) => out.push(Reference {
                schema: s,
                table: t,
                columns,
                parent_columns,
                operators: Some(schemas.into_iter().zip(names).collect()),
            }),
            None => by_name.push((t, columns, parent_columns)),
        }
    }
    let configured = relationships
        .iter()
        .filter(|r| r.parent_table == table)
        .map(|r| (r.table.clone(), r.columns.clone(), r.parent_columns.clone()));
    for (t, columns, parent_columns) in by_name.into_iter().chain(configured) {
        let known = out
            .iter()
            .any(|r| r.schema == schema && r.table == t && r.columns == columns && r.parent_columns == parent_columns);
        if known
            || !has_columns(client, schema, &t, &columns).await?
            || !has_columns(client, schema, table, &parent_columns).await?
        {
            continue;
        }
        out.push(Reference { schema: schema.to_string(), table: t, columns, parent_columns, operators: None });
    }
    Ok(out)
}

async fn has_columns(
    client: &impl GenericClient,
    schema: &str,
    table: &str,
    columns: &[String],
) -> Result<bool, DbError> {
    let columns = columns.to_vec();
    let row = client
        .query_typed_one(HAS_COLUMNS, &[(&schema, Type::TEXT), (&table, Type::TEXT), (&columns, Type::TEXT_ARRAY)])
        .await?;
    Ok(row.get::<_, Option<bool>>(0).unwrap_or(false))
}
