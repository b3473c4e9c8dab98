//! `copy_missing_parents`: copies parent rows that exist only in the shared schema into the
//! tenant's own table, with every ancestor row they need, following every relationship the
//! checks know (the tenant's foreign keys, `checks.relationships`, and keys inferred from other
//! tenants) over the whole graph (diamonds, self-references, cycles, composite keys, any depth).
//!
//! Invariants:
//! - only the same entity is copied: a row is looked up by a key that is a `uuid` or listed in
//!   `heal.same_entity_keys`; a row reached through any other key (an integer drawn from each
//!   schema's own sequence) sets its orphan aside, whether or not the tenant has a row of that
//!   key (that row would be another entity). A copied row's value of a relationship without a
//!   constraint is such a reference too: it is never copied verbatim unless it names the same
//!   entity (or is NULL);
//! - one orphaned key that cannot be repaired (its chain is broken, a unique constraint or a
//!   check clashes) is set aside with its reason and never blocks the others: batches page
//!   through the orphaned keys (keyset, in key order), and a batch whose insert fails because of
//!   its rows is retried by bisection under savepoints (at most [`SAVEPOINTS_PER_BATCH`] per
//!   transaction);
//! - each batch is one transaction: pick the keys (the scan's predicate again), lock their
//!   orphans `FOR SHARE` (a key no orphan references any longer once the locks are had is not
//!   copied, and no orphan is re-pointed until the batch commits), compute the
//!   closure with one lookup per table and level, insert everything in one statement (foreign
//!   keys are checked when the statement ends, so the order of rows within it does not matter,
//!   and deferrable ones at commit), write one audit row per inserted row, and move the
//!   sequences of the tables written past the copied keys;
//! - rows are read as foreign keys see them: a plain table `ONLY` (an inheritance child's rows
//!   are none of its parent's), a partitioned one with its partitions, on both sides;
//! - a column outside the primary key that draws from the tenant's own sequence is left out of
//!   the insert (the row takes the tenant's next value); only key columns copied verbatim move
//!   sequences; such a column that is a unique or referenced key makes its table unusable;
//! - a plan file's copy writes only the rows its `rows` lists;
//! - generated columns are left out; a `GENERATED ALWAYS` identity is inserted with
//!   `OVERRIDING SYSTEM VALUE`; a row that arrived meanwhile is left alone (`ON CONFLICT (key)
//!   DO NOTHING`, and such a row is not audited).

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::types::Type;
use tokio_postgres::Transaction;

use super::{audit, sequence, triggers};
use crate::catalog::{self, Catalog, Column, Identity, Schema, Table, TypeSchema};
use crate::checks::orphan_rows::{self, Probe};
use crate::config::{AuditValues, HealConfig, SameEntityKey};
use crate::report::RelationshipSource;
use crate::sql;

/// A relationship the checks know that is not a constraint of the tenant: one of
/// `checks.relationships`, or a foreign key other tenants (or the reference) declare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub table: String,
    pub columns: Vec<String>,
    pub parent_table: String,
    pub parent_columns: Vec<String>,
    pub source: RelationshipSource,
}

/// A copy, planned from the catalog: the orphans it starts from and every table it may reach.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CopySpec {
    pub tenant: String,
    pub shared: String,
    /// The orphans' table.
    pub child: String,
    /// `$1` limit, `$2..` the keyset cursor (text, NULL for the first batch): the next orphaned
    /// keys (as text) whose parent exists in the shared schema, in key order.
    pub pick_sql: String,
    /// How many key columns `pick_sql` pages by.
    pub key_len: usize,
    /// `$1..` the picked keys (text arrays, one per key column): locks the orphans that still
    /// reference them (`FOR SHARE`, so the application cannot re-point one until the batch
    /// commits) and returns their keys (as text); a key no orphan references any longer is not
    /// copied.
    #[serde(default)]
    pub lock_sql: String,
    /// The parent table and the columns the orphans reference.
    pub root: String,
    pub root_columns: Vec<String>,
    /// Every table the copy may write, by name.
    pub tables: BTreeMap<String, CopyTable>,
    /// `heal.audit_values = "full"`: the audit table keeps each copied row.
    pub audit_full: bool,
    /// In a plan file: the orphaned keys (as text) the copy may repair, and no other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only: Option<Vec<Vec<String>>>,
    /// In a plan file: every row the copy may write (the parents and all their ancestors), and no
    /// other; a key whose closure needs another row is set aside.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<Vec<CopyRow>>,
    /// (source, target) type of every cast the copy's statements make: `text` to the type of
    /// each column they look rows up by (the orphans' keys, every table's `types`). Checked for
    /// a tenant's cast function before the copy runs (see [`super::casts`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub casts: Vec<(String, String)>,
}

/// A row a copy writes: its table and primary key (as text, in key order).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct CopyRow {
    pub table: String,
    pub key: Vec<String>,
}

/// One table of the tenant the copy may write.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CopyTable {
    /// The primary key; rows are inserted `ON CONFLICT` on it.
    pub key: Vec<String>,
    /// Column types (relative to the tenant) of every column used to look rows up.
    pub types: BTreeMap<String, String>,
    /// Columns copied: those both tables have, generated ones left out.
    pub columns: Vec<String>,
    /// A `GENERATED ALWAYS` identity is among `columns`.
    pub overriding: bool,
    /// The shared schema has this table.
    pub in_shared: bool,
    /// The tenant's and the shared schema's table as statements name them: `ONLY` unless
    /// partitioned (see [`catalog::relation`]). Foreign keys see a partitioned table's
    /// partitions but never an inheritance child, so a row only a child holds is none of the
    /// table's: it neither satisfies a reference nor is copied.
    #[serde(default)]
    pub relation: String,
    #[serde(default)]
    pub shared_relation: String,
    /// The tenant's foreign keys to tables of its own schema.
    pub edges: Vec<Edge>,
    /// (column, sequence) of the columns copied that draw from a sequence of the tenant's schema
    /// (key columns): moved past the copied values.
    pub sequences: Vec<(String, String)>,
    /// Columns outside the primary key that draw from the tenant's own sequence (serial,
    /// identity): left out of the insert, so a copied row takes the tenant's next value.
    #[serde(default)]
    pub drawn: Vec<String>,
    /// Why no row of this table can be copied, when none can.
    pub unusable: Option<String>,
}

/// A relationship from one copied table to another table of the tenant: a foreign key, a
/// configured or an inferred relationship (the checks' precedence, one per column set).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Edge {
    pub columns: Vec<String>,
    pub target: String,
    pub target_columns: Vec<String>,
    /// The target's columns are a same-entity key (see [`orphan_rows::same_entity`]).
    pub same_entity: bool,
    /// Where the relationship comes from; a set-aside reason names a non-constraint one.
    #[serde(default = "constraint_source")]
    pub source: RelationshipSource,
}

fn constraint_source() -> RelationshipSource {
    RelationshipSource::Constraint
}

/// Every relationship of `tenant` whose parent is a table of the tenant itself, as the checks
/// resolve them: a foreign key (whatever schema it declares: the application writes the
/// tenant's table of that name when there is one), then `links`; the first per (table,
/// columns) wins. A relationship whose parent exists only in another schema (a shared
/// `auth_user`) is none of the tenant's: its values are kept as they are.
fn tenant_relationships(schema: &Schema, links: &[Link]) -> Vec<Link> {
    let mut out: Vec<Link> = Vec::new();
    let declared = schema.tables.iter().flat_map(|(name, t)| {
        t.foreign_keys.iter().map(move |fk| Link {
            table: name.clone(),
            columns: fk.columns.clone(),
            parent_table: fk.target_table.clone(),
            parent_columns: fk.target_columns.clone(),
            source: RelationshipSource::Constraint,
        })
    });
    for link in declared.chain(links.iter().cloned()) {
        let has = |table: &str, columns: &[String]| schema.tables.get(table).is_some_and(|t| t.has_columns(columns));
        if has(&link.table, &link.columns)
            && has(&link.parent_table, &link.parent_columns)
            && !out.iter().any(|l| l.table == link.table && l.columns == link.columns)
        {
            out.push(link);
        }
    }
    out
}

/// Plans the copy for one orphan relationship; `None` when nothing can be copied (no shared
/// parent table, or no column in common).
pub fn spec(
    catalog: &Catalog,
    shared: &str,
    tenant: &str,
    probe: &Probe,
    heal: &HealConfig,
    links: &[Link],
) -> Option<CopySpec> {
    let keys = &heal.same_entity_keys;
    let shared_schema = catalog.schemas.get(shared)?;
    let relationships = tenant_relationships(catalog.schemas.get(tenant)?, links);
    let child = catalog.table(tenant, &probe.table)?;
    let types: Vec<String> =
        probe.columns.iter().map(|c| child.column(c).map(|c| c.data_type.clone())).collect::<Option<_>>()?;
    let cols = sql::columns("c", &probe.columns);
    let cursor_params: Vec<String> = types.iter().enumerate().map(|(i, t)| format!("${}::text::{t}", i + 2)).collect();
    let pick_sql = format!(
        "SELECT {texts} FROM (\n  SELECT DISTINCT {cols} FROM {tbl} c\n  WHERE {orphan} AND {in_shared}\n    AND ($2::text IS NULL OR ({cols}) OPERATOR(pg_catalog.>) ({cursor}))\n  ORDER BY {cols} LIMIT $1\n) c",
        texts = probe.columns.iter().map(|c| format!("c.{}::text", sql::ident(c))).collect::<Vec<_>>().join(", "),
        tbl = catalog::relation(catalog, tenant, &probe.table),
        orphan = probe.orphan_condition(),
        in_shared = probe.in_shared(),
        cursor = cursor_params.join(", "),
    );
    let lock_sql = format!(
        "SELECT {texts} FROM {tbl} c\n  WHERE {orphan}\n    AND ({cols}) OPERATOR(pg_catalog.=) ANY ({keys})\n  FOR SHARE OF c",
        texts = probe.columns.iter().map(|c| format!("c.{}::text", sql::ident(c))).collect::<Vec<_>>().join(", "),
        tbl = catalog::relation(catalog, tenant, &probe.table),
        orphan = probe.orphan_condition(),
        keys = typed_keys(1, &types, false),
    );
    let mut tables = BTreeMap::new();
    let mut queue = vec![probe.parent_table.clone()];
    while let Some(name) = queue.pop() {
        if tables.contains_key(&name) {
            continue;
        }
        let own = catalog.table(tenant, &name)?;
        let theirs = catalog.table(shared, &name);
        let mut table = copy_table(&relationships, &name, own, theirs, tenant, shared, shared_schema, keys);
        table.relation = catalog::relation(catalog, tenant, &name);
        table.shared_relation = catalog::relation(catalog, shared, &name);
        let refused = triggers::refused_in_catalog(&heal.allow_triggers, &name, own, true);
        if table.unusable.is_none() && !refused.is_empty() {
            table.unusable = Some(triggers::reason(&refused, true));
        }
        queue.extend(table.edges.iter().map(|e| e.target.clone()));
        tables.insert(name, table);
    }
    let root = tables.get(&probe.parent_table)?;
    if !root.in_shared || root.columns.is_empty() {
        return None;
    }
    let casts = text_casts(types.iter().chain(tables.values().flat_map(|t| t.types.values())));
    Some(CopySpec {
        tenant: tenant.to_string(),
        shared: shared.to_string(),
        child: probe.table.clone(),
        pick_sql,
        key_len: probe.columns.len(),
        lock_sql,
        root: probe.parent_table.clone(),
        root_columns: probe.parent_columns.clone(),
        tables,
        audit_full: heal.audit_values == AuditValues::Full,
        only: None,
        rows: None,
        casts,
    })
}

/// `SELECT u."k0"::T0, u."k1"::T1 FROM ROWS FROM (pg_catalog.unnest($first::text[]), ...) AS
/// u("k0", "k1")` (with `u.ord` last, `WITH ORDINALITY`, when `ordinality`): keys sent as text
/// arrays, one per column, each value cast to its column's own type. The arrays are unnested as
/// text and cast value by value: `unnest` of an array of a composite type would expand each
/// value into the type's fields (too many columns, or a field compared with the whole key).
fn typed_keys(first: usize, types: &[String], ordinality: bool) -> String {
    let names: Vec<String> = (0..types.len()).map(|i| format!("k{i}")).collect();
    let arrays: Vec<String> = (0..types.len()).map(|i| format!("${}::text[]", first + i)).collect();
    let mut select: Vec<String> = names.iter().zip(types).map(|(n, t)| format!("u.{}::{t}", sql::ident(n))).collect();
    let mut aliases: Vec<String> = names.iter().map(|n| sql::ident(n)).collect();
    if ordinality {
        select.push("u.ord".to_string());
        aliases.push("ord".to_string());
    }
    format!(
        "SELECT {} FROM {}{} AS u({})",
        select.join(", "),
        sql::unnest(&arrays),
        if ordinality { " WITH ORDINALITY" } else { "" },
        aliases.join(", ")
    )
}

/// `(text, T)` for each distinct type `T`, in order.
fn text_casts<'a>(types: impl Iterator<Item = &'a String>) -> Vec<(String, String)> {
    let distinct: BTreeSet<&String> = types.collect();
    distinct.into_iter().map(|t| ("text".to_string(), t.clone())).collect()
}

#[allow(clippy::too_many_arguments)]
fn copy_table(
    relationships: &[Link],
    name: &str,
    own: &Table,
    theirs: Option<&Table>,
    tenant: &str,
    shared_name: &str,
    shared: &Schema,
    keys: &[SameEntityKey],
) -> CopyTable {
    let common: Vec<&Column> = match theirs {
        Some(t) => own.columns.iter().filter(|c| !c.generated && t.column(&c.name).is_some()).collect(),
        None => Vec::new(),
    };
    // A value the shared schema drew from its own sequence is a number of the shared schema's
    // series: written into the tenant it jumps the tenant's sequence or repeats one of its
    // numbers. Outside the primary key such a column takes the tenant's next value (its default,
    // or its identity), unless the operator lists it as a same-entity key.
    let drawn: Vec<String> = common
        .iter()
        .filter(|c| !own.primary_key.contains(&c.name) && draws_from_own_sequence(c, tenant))
        .filter(|c| !orphan_rows::same_entity(keys, shared, name, std::slice::from_ref(&c.name)))
        .map(|c| c.name.clone())
        .collect();
    let columns: Vec<String> = common.iter().filter(|c| !drawn.contains(&c.name)).map(|c| c.name.clone()).collect();
    let overriding = columns.iter().any(|c| own.column(c).is_some_and(|c| c.identity == Some(Identity::Always)));
    // Only the columns copied carry a value over (the others get the tenant's default).
    let edges = relationships
        .iter()
        .filter(|r| r.table == name && r.columns.iter().all(|c| columns.contains(c)))
        .map(|r| Edge {
            columns: r.columns.clone(),
            target: r.parent_table.clone(),
            target_columns: r.parent_columns.clone(),
            same_entity: orphan_rows::same_entity(keys, shared, &r.parent_table, &r.parent_columns),
            source: r.source,
        })
        .collect();
    let types = own.columns.iter().map(|c| (c.name.clone(), c.data_type.clone())).collect();
    let sequences = own
        .columns
        .iter()
        .filter_map(|c| match c.sequence_in(tenant) {
            Some((schema, seq)) if schema == tenant && columns.contains(&c.name) => {
                Some((c.name.clone(), seq.to_string()))
            }
            _ => None,
        })
        .collect();
    let own_type = own.columns.iter().any(|c| c.type_schema == TypeSchema::Own && own.primary_key.contains(&c.name));
    let drift: Vec<String> = match theirs {
        Some(t) => columns
            .iter()
            .filter_map(|c| {
                let (mine, shared_col) = (own.column(c)?, t.column(c)?);
                (!same_type(mine, shared_col, shared_name)).then(|| {
                    format!(
                        "column {c} is {} in {shared_name} and {} in {tenant}",
                        shared_col.data_type, mine.data_type
                    )
                })
            })
            .collect(),
        None => Vec::new(),
    };
    let foreign_keys = foreign_key_columns(relationships, name, own, &columns, shared, keys);
    // A new number for a column other rows (or a unique index) know the row by would change
    // which row they name: heal does not renumber.
    let renumbered: Vec<&String> = drawn
        .iter()
        .filter(|c| {
            own.unique_columns.contains(*c)
                || relationships.iter().any(|r| r.parent_table == name && r.parent_columns.contains(c))
        })
        .collect();
    let unusable = if own.primary_key.is_empty() {
        Some("the table has no primary key".to_string())
    } else if own_type {
        Some("its primary key has a type of the tenant's own schema".to_string())
    } else if !own.primary_key.iter().all(|k| columns.contains(k)) {
        Some("the shared table lacks a primary-key column".to_string())
    } else if !drift.is_empty() {
        Some(drift.join("; "))
    } else if !foreign_keys.is_empty() {
        Some(format!(
            "its column(s) {} are a key the tenant's rows reference or draw from the tenant's own sequence, and not a same-entity key (not a uuid, not in heal.same_entity_keys): the shared row's value names another entity in the tenant",
            foreign_keys.join(", ")
        ))
    } else if !renumbered.is_empty() {
        Some(format!(
            "its column(s) {} draw from the tenant's own sequence, so a copy takes the tenant's next value, but they are a unique key or a key the tenant's rows reference: heal does not renumber them",
            renumbered.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(", ")
        ))
    } else {
        None
    };
    CopyTable {
        key: own.primary_key.clone(),
        types,
        columns,
        overriding,
        in_shared: theirs.is_some(),
        relation: String::new(),
        shared_relation: String::new(),
        edges,
        sequences,
        drawn,
        unusable,
    }
}

/// Whether `column` takes its values from a sequence of the tenant's own schema: an identity, or
/// a default that calls `nextval` on one (serial).
fn draws_from_own_sequence(column: &Column, tenant: &str) -> bool {
    column.identity.is_some() || column.sequence_in(tenant).is_some_and(|(schema, _)| schema == tenant)
}

/// Whether a value of `theirs` (a column of the shared schema `shared`) is stored unchanged in
/// `mine`: the very same type, so that the insert casts nothing (no rounding, no time zone).
fn same_type(mine: &Column, theirs: &Column, shared: &str) -> bool {
    match (&mine.type_schema, &theirs.type_schema) {
        (TypeSchema::Catalog, TypeSchema::Catalog) => mine.data_type == theirs.data_type,
        (TypeSchema::Other(a), TypeSchema::Other(b)) => a == b && mine.data_type == theirs.data_type,
        // The shared schema's own type, which the tenant's column names qualified.
        (TypeSchema::Other(a), TypeSchema::Own) => {
            a == shared
                && mine.data_type.strip_prefix(&format!("{}.", display_schema(shared))) == Some(&theirs.data_type)
        }
        _ => false,
    }
}

/// A schema name as `format_type` qualifies a type with it.
fn display_schema(name: &str) -> String {
    let plain = name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_string()
    } else {
        sql::ident(name)
    }
}

/// The columns a copy of `own` (table `name`) would write that identify a row to the tenant
/// without being the same entity in both schemas: the primary key when it draws from a sequence
/// (serial, identity), and every column set the tenant's relationships reference (constraints,
/// configured, inferred), unless it is a same-entity key. Copying the shared row's value of such
/// a column would make the tenant's rows that hold that value (rows of another entity) point at
/// the copied row.
fn foreign_key_columns(
    relationships: &[Link],
    name: &str,
    own: &Table,
    columns: &[String],
    shared: &Schema,
    keys: &[SameEntityKey],
) -> Vec<String> {
    let mut sets: Vec<Vec<String>> = Vec::new();
    if own.primary_key.iter().any(|k| own.column(k).is_some_and(|c| c.sequence.is_some() || c.identity.is_some())) {
        sets.push(own.primary_key.clone());
    }
    for r in relationships.iter().filter(|r| r.parent_table == name) {
        if !sets.contains(&r.parent_columns) {
            sets.push(r.parent_columns.clone());
        }
    }
    let mut out: Vec<String> = Vec::new();
    for set in sets {
        if set.iter().all(|c| columns.contains(c)) && !orphan_rows::same_entity(keys, shared, name, &set) {
            for c in set {
                if !out.contains(&c) {
                    out.push(c);
                }
            }
        }
    }
    out
}

impl CopySpec {
    /// The statements of one batch as the plan prints them: the pick, then per table the insert
    /// (with its keys as `$n` text arrays) and its sequence moves.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(only) = &self.only {
            out.push_str(&format!("-- the plan file's {} orphaned key(s), and no other:\n", only.len()));
            for key in only {
                out.push_str(&format!("--   ({})\n", sql::escape_controls(&key.join(", "))));
            }
        }
        if let Some(rows) = &self.rows {
            out.push_str(&format!(
                "-- the {} row(s) the copy writes for them, and no other (a key that needs another row is set aside):\n",
                rows.len()
            ));
            for row in rows {
                let key = self.tables.get(&row.table).map(|t| t.key.join(", ")).unwrap_or_default();
                out.push_str(&format!(
                    "--   {}({}) = ({})\n",
                    sql::escape_controls(&row.table),
                    sql::escape_controls(&key),
                    sql::escape_controls(&row.key.join(", "))
                ));
            }
        }
        out.push_str(&format!("-- pick up to $1 orphaned keys after the cursor $2..:\n{};\n", self.pick_sql));
        out.push_str(&format!(
            "-- lock their orphans until the batch commits ($1.. the picked keys as text arrays; a key no orphan references any longer is not copied):\n{};\n",
            self.lock_sql
        ));
        out.push_str("-- then per table of the rows' closure over the tenant's foreign keys (keys as $n text arrays), one statement with the audit rows ($1 run id), then its sequences:\n");
        for (name, table) in &self.tables {
            if table.in_shared && table.unusable.is_none() {
                if !table.drawn.is_empty() {
                    out.push_str(&format!(
                        "-- {}: column(s) {} take the tenant's next value (they draw from its own sequence), not the shared row's\n",
                        sql::escape_controls(name),
                        sql::escape_controls(&table.drawn.join(", "))
                    ));
                }
                out.push_str(&format!("{};\n", self.insert_cte(name, table, 1)));
                for (column, seq) in &table.sequences {
                    let sql = sequence::advance_sql("$1", &self.tenant, name, column, seq, "copy_missing_parents");
                    out.push_str(&format!("{sql};\n"));
                }
            }
        }
        out
    }

    /// `INSERT ... SELECT ... WHERE key = ANY (SELECT u.k0::T, ... FROM ROWS FROM (unnest($first::text[]), ...)) ... RETURNING *`.
    fn insert_cte(&self, name: &str, table: &CopyTable, first: usize) -> String {
        let types: Vec<String> = table.key.iter().map(|k| table.types[k].clone()).collect();
        format!(
            "INSERT INTO {} ({}){}\n  SELECT {} FROM {} s WHERE ({}) OPERATOR(pg_catalog.=) ANY ({})\n  ON CONFLICT ({}) DO NOTHING\n  RETURNING *",
            sql::qualified(&self.tenant, name),
            sql::ident_list(&table.columns),
            if table.overriding { " OVERRIDING SYSTEM VALUE" } else { "" },
            sql::columns("s", &table.columns),
            table.shared_relation,
            sql::columns("s", &table.key),
            typed_keys(first, &types, false),
            sql::ident_list(&table.key),
        )
    }

    /// One lookup of `values` of `columns` in `table`: per value (by ordinality) whether the
    /// tenant has it, and the shared row's key, foreign-key values and whether the tenant has a
    /// row under that key.
    fn lookup_sql(&self, table: &CopyTable, columns: &[String]) -> String {
        let types: Vec<String> =
            columns.iter().map(|c| table.types.get(c).cloned().unwrap_or_else(|| "text".to_string())).collect();
        let vcols: Vec<String> = (0..columns.len()).map(|i| format!("\"k{i}\"")).collect();
        let match_v = |alias: &str| {
            columns
                .iter()
                .zip(&vcols)
                .map(|(c, v)| format!("{alias}.{} OPERATOR(pg_catalog.=) v.{v}", sql::ident(c)))
                .collect::<Vec<_>>()
                .join(" AND ")
        };
        let mut select = vec![
            "v.ord::text".to_string(),
            format!("EXISTS (SELECT 1 FROM {} t WHERE {})::text", table.relation, match_v("t")),
        ];
        let mut from = format!("({}) v", typed_keys(1, &types, true));
        if table.in_shared {
            select.extend(table.key.iter().map(|k| format!("s.{}::text", sql::ident(k))));
            for edge in &table.edges {
                select.extend(edge.columns.iter().map(|c| format!("s.{}::text", sql::ident(c))));
            }
            let same_key = table
                .key
                .iter()
                .map(|k| format!("t.{0} OPERATOR(pg_catalog.=) s.{0}", sql::ident(k)))
                .collect::<Vec<_>>()
                .join(" AND ");
            select.push(format!("EXISTS (SELECT 1 FROM {} t WHERE {same_key})::text", table.relation));
            from.push_str(&format!(" LEFT JOIN {} s ON {}", table.shared_relation, match_v("s")));
        }
        format!("SELECT {} FROM {from}", select.join(", "))
    }
}

/// What one batch did.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Orphaned keys picked; zero when the relationship is done.
    pub picked: usize,
    /// The cursor after this batch.
    pub cursor: Vec<String>,
    /// (table, key) of every row inserted, audited.
    pub inserted: Vec<(String, String)>,
    /// (orphaned key, reason) of the keys set aside.
    pub set_aside: Vec<(String, String)>,
    /// Sequences moved: (table, sequence).
    pub sequences: Vec<(String, String)>,
    /// The keys picked and either copied or set aside (the others were not in `only`).
    pub handled: Vec<Vec<String>>,
    /// The first key to copy needs more rows than the run has left: nothing was done.
    pub budget_short: bool,
}

/// A row the closure needs, or why a key's chain ends.
#[derive(Debug, Clone)]
enum Node {
    /// `fks` holds the row's foreign-key values (per edge of its table) until it is expanded.
    Row {
        table: String,
        key: Vec<String>,
        children: Vec<usize>,
        fks: Vec<Vec<Option<String>>>,
    },
    /// Present in the tenant already (and the same entity).
    Satisfied,
    Broken(String),
}

/// Runs one batch in `tx`: at most `limit` keys after `cursor`, writing at most `rows_left` rows
/// (the keys from the first whose rows would pass it are left to the next batch); a key whose
/// copy needs more rows than `cap` is set aside.
pub async fn batch(
    tx: &Transaction<'_>,
    spec: &CopySpec,
    limit: i64,
    cursor: &[String],
    run_id: &str,
    cap: RowCap,
    rows_left: usize,
) -> Result<BatchOutcome, tokio_postgres::Error> {
    let picked = pick(tx, spec, limit, cursor).await?;
    let mut out =
        BatchOutcome { picked: picked.len(), cursor: picked.last().cloned().unwrap_or_default(), ..Default::default() };
    // A plan file's copy repairs only the keys it lists (they are still orphans: the pick says so).
    let picked: Vec<Vec<String>> = match &spec.only {
        Some(only) => picked.into_iter().filter(|k| only.contains(k)).collect(),
        None => picked,
    };
    if picked.is_empty() {
        out.handled = picked;
        return Ok(out);
    }
    // The orphans of the picked keys, locked until the batch commits: one the application
    // re-pointed since the pick (or since the plan) no longer names its key, and a key no orphan
    // names any longer is not copied (its parent would be a row nothing references).
    let arrays: Vec<Vec<String>> = (0..spec.key_len).map(|i| picked.iter().map(|k| k[i].clone()).collect()).collect();
    let typed: Vec<(&(dyn tokio_postgres::types::ToSql + Sync), Type)> =
        arrays.iter().map(|a| (a as &(dyn tokio_postgres::types::ToSql + Sync), Type::TEXT_ARRAY)).collect();
    let referenced: BTreeSet<Vec<String>> = tx
        .query_typed(&spec.lock_sql, &typed)
        .await?
        .iter()
        .map(|r| (0..spec.key_len).map(|i| r.get::<_, Option<String>>(i).unwrap_or_default()).collect())
        .collect();
    let picked: Vec<Vec<String>> = picked.into_iter().filter(|k| referenced.contains(k)).collect();
    out.handled = picked.clone();
    if picked.is_empty() {
        return Ok(out);
    }
    let Closure { nodes, mut good, mut broken } = closure(tx, spec, &picked, &cap).await?;
    // A plan file's copy writes only the rows it lists: a key that now needs another row (its
    // chain changed since the plan) is set aside.
    if let Some(listed) = &spec.rows {
        let listed: BTreeSet<(&str, &[String])> = listed.iter().map(|r| (r.table.as_str(), r.key.as_slice())).collect();
        good.retain(|(i, rows)| {
            let unlisted = rows.iter().find_map(|id| match &nodes[*id] {
                Node::Row { table, key, .. } if !listed.contains(&(table.as_str(), key.as_slice())) => {
                    Some((table, key))
                }
                _ => None,
            });
            match unlisted {
                Some((table, key)) => {
                    broken.push((*i, unlisted_reason(table, &spec.tables[table].key, key)));
                    false
                }
                None => true,
            }
        });
        broken.sort_by_key(|(i, _)| *i);
    }
    // One transaction writes at most `rows_left` rows; one key's rows are never split (they are
    // within the cap, at most `heal.batch_size`).
    let mut rows: BTreeSet<usize> = BTreeSet::new();
    let mut fit = picked.len();
    for (i, ids) in &good {
        let needed: Vec<usize> =
            ids.iter().copied().filter(|id| matches!(nodes[*id], Node::Row { .. }) && !rows.contains(id)).collect();
        if rows.len() + needed.len() > rows_left {
            fit = *i;
            break;
        }
        rows.extend(needed);
    }
    if fit == 0 {
        return Ok(BatchOutcome { budget_short: true, cursor: cursor.to_vec(), ..out });
    }
    good.retain(|(i, _)| *i < fit);

    // Deferrable constraints are checked at the end of each insert, inside its savepoint: a clash
    // found at COMMIT would lose the whole batch, every run. (All rows of a closure, cycles
    // included, are in the one statement whose end the checks wait for.)
    tx.batch_execute("SET CONSTRAINTS ALL IMMEDIATE").await?;
    let isolated = insert_isolating(tx, spec, &nodes, &good, run_id).await?;
    // Keys from the first one not tried on are left to the next batch, which starts after the
    // last key tried.
    let end = isolated.stopped_at.map_or(fit, |g| good[g].0);
    if end < picked.len() {
        out.cursor = picked[end - 1].clone();
        out.handled.truncate(end);
    }
    out.inserted = isolated.inserted;
    for (i, reason) in broken.into_iter().filter(|(i, _)| *i < end).chain(isolated.set_aside) {
        out.set_aside.push((picked[i].join(", "), reason));
    }

    // The sequences of the tables written, past the copied keys, in this same transaction.
    let written: BTreeSet<&String> = out.inserted.iter().map(|(t, _)| t).collect();
    for name in written {
        for (column, seq) in &spec.tables[name].sequences {
            let sql = sequence::advance_sql("$1", &spec.tenant, name, column, seq, "copy_missing_parents");
            if !tx.query_typed(&sql, &[(&run_id, Type::TEXT)]).await?.is_empty() {
                out.sequences.push((name.clone(), seq.clone()));
            }
        }
    }
    Ok(out)
}

/// The next `limit` orphaned keys (as text) after `cursor`, in key order.
async fn pick(
    tx: &Transaction<'_>,
    spec: &CopySpec,
    limit: i64,
    cursor: &[String],
) -> Result<Vec<Vec<String>>, tokio_postgres::Error> {
    let params: Vec<Option<String>> = (0..spec.key_len).map(|i| cursor.get(i).cloned()).collect();
    let mut typed: Vec<(&(dyn tokio_postgres::types::ToSql + Sync), Type)> = vec![(&limit, Type::INT8)];
    typed.extend(params.iter().map(|v| (v as &(dyn tokio_postgres::types::ToSql + Sync), Type::TEXT)));
    Ok(tx
        .query_typed(&spec.pick_sql, &typed)
        .await?
        .iter()
        .map(|r| (0..spec.key_len).map(|i| r.get::<_, Option<String>>(i).unwrap_or_default()).collect())
        .collect())
}

/// The rows a batch of orphaned keys needs.
struct Closure {
    nodes: Vec<Node>,
    /// (index among the keys, the nodes of its closure) of the keys that can be copied.
    good: Vec<(usize, BTreeSet<usize>)>,
    /// (index among the keys, why) of the keys whose chain is broken, in key order.
    broken: Vec<(usize, String)>,
}

/// The closure of the orphaned keys `picked` over the copy's relationships, with one lookup per
/// table and level; reads only.
async fn closure(
    tx: &Transaction<'_>,
    spec: &CopySpec,
    picked: &[Vec<String>],
    cap: &RowCap,
) -> Result<Closure, tokio_postgres::Error> {
    // The closure: nodes are rows to copy (or chain ends), found level by level.
    let mut nodes: Vec<Node> = Vec::new();
    let mut memo: BTreeMap<(String, Vec<String>, Vec<String>), usize> = BTreeMap::new();
    let mut by_key: BTreeMap<(String, Vec<String>), usize> = BTreeMap::new();
    // (parent node or none for a root, root index, table, columns, values, same entity, and
    // the relationship it is wanted through when that is not a constraint)
    struct Want {
        parent: Option<usize>,
        root: usize,
        table: String,
        columns: Vec<String>,
        values: Vec<String>,
        same_entity: bool,
        via: Option<String>,
    }
    let mut roots: Vec<Option<usize>> = vec![None; picked.len()];
    // Rows whose foreign keys are not looked up yet, and the keys whose closure passed the cap
    // (their rows are looked up no further).
    let mut unexpanded: BTreeSet<usize> = BTreeSet::new();
    let mut over = vec![false; picked.len()];
    let mut wants: Vec<Want> = picked
        .iter()
        .enumerate()
        .map(|(i, v)| Want {
            parent: None,
            root: i,
            table: spec.root.clone(),
            columns: spec.root_columns.clone(),
            values: v.clone(),
            same_entity: true,
            via: None,
        })
        .collect();
    while !wants.is_empty() {
        // Resolve what is known, group the rest by (table, columns) for one lookup each.
        let mut groups: BTreeMap<(String, Vec<String>), Vec<Vec<String>>> = BTreeMap::new();
        for w in &wants {
            let memo_key = (w.table.clone(), w.columns.clone(), w.values.clone());
            if !memo.contains_key(&memo_key) {
                let group = groups.entry((w.table.clone(), w.columns.clone())).or_default();
                if !group.contains(&w.values) {
                    group.push(w.values.clone());
                }
            }
        }
        for ((name, columns), values) in groups {
            let Some(table) = spec.tables.get(&name) else { continue };
            let sql = spec.lookup_sql(table, &columns);
            let arrays: Vec<Vec<String>> =
                (0..columns.len()).map(|i| values.iter().map(|v| v[i].clone()).collect()).collect();
            let typed: Vec<(&(dyn tokio_postgres::types::ToSql + Sync), Type)> =
                arrays.iter().map(|a| (a as &(dyn tokio_postgres::types::ToSql + Sync), Type::TEXT_ARRAY)).collect();
            let first = wants.iter().find(|w| w.table == name && w.columns == columns);
            let same_entity = first.is_some_and(|w| w.same_entity);
            let via = first.and_then(|w| w.via.clone()).map(|v| format!(" ({v})")).unwrap_or_default();
            let describe = |v: &[String]| format!("{}({}) = ({}){via}", name, columns.join(", "), v.join(", "));
            for row in tx.query_typed(&sql, &typed).await? {
                let text = |i: usize| row.get::<_, Option<String>>(i);
                // Only an ordinality of one of the values sent names a value: anything else is
                // ignored, and a key left without its row is set aside.
                let Some(v) = text(0)
                    .and_then(|o| o.parse::<usize>().ok())
                    .and_then(|ord| ord.checked_sub(1))
                    .and_then(|i| values.get(i))
                    .cloned()
                else {
                    continue;
                };
                let in_tenant = text(1).as_deref() == Some("true");
                let key: Option<Vec<String>> =
                    if table.in_shared { (0..table.key.len()).map(|i| text(2 + i)).collect() } else { None };
                let node = if in_tenant && same_entity {
                    Node::Satisfied
                } else if !same_entity {
                    Node::Broken(format!(
                        "{} is not a same-entity key (not a uuid, not in heal.same_entity_keys): the row it names in the shared schema is another entity than the tenant's",
                        describe(&v)
                    ))
                } else if let Some(key) = key {
                    if let Some(reason) = &table.unusable {
                        Node::Broken(format!("{} cannot be copied: {reason}", describe(&v)))
                    } else if let Some(&existing) = by_key.get(&(name.clone(), key.clone())) {
                        memo.insert((name.clone(), columns.clone(), v), existing);
                        continue;
                    } else {
                        // The row's foreign-key values, following its table's edges.
                        let mut at = 2 + table.key.len();
                        let mut fks = Vec::new();
                        for edge in &table.edges {
                            let vals: Vec<Option<String>> = (0..edge.columns.len()).map(|i| text(at + i)).collect();
                            at += edge.columns.len();
                            fks.push(vals);
                        }
                        if text(at).as_deref() == Some("true") {
                            // `ON CONFLICT DO NOTHING` would skip it silently, every run.
                            let reason = format!(
                                "{} cannot be copied: the tenant already has a row with this primary key ({}) = ({})",
                                describe(&v),
                                table.key.join(", "),
                                key.join(", ")
                            );
                            nodes.push(Node::Broken(reason));
                            memo.insert((name.clone(), columns.clone(), v), nodes.len() - 1);
                            continue;
                        }
                        nodes.push(Node::Row { table: name.clone(), key: key.clone(), children: Vec::new(), fks });
                        let id = nodes.len() - 1;
                        by_key.insert((name.clone(), key), id);
                        memo.insert((name.clone(), columns.clone(), v), id);
                        unexpanded.insert(id);
                        continue;
                    }
                } else {
                    Node::Broken(format!("{} exists in neither the tenant nor the shared schema", describe(&v)))
                };
                nodes.push(node);
                memo.insert((name.clone(), columns.clone(), v), nodes.len() - 1);
            }
        }
        // Attach every want to its resolved node.
        for w in &wants {
            let Some(&id) = memo.get(&(w.table.clone(), w.columns.clone(), w.values.clone())) else { continue };
            match w.parent {
                None => roots[w.root] = Some(id),
                Some(p) => {
                    if let Node::Row { children, .. } = &mut nodes[p] {
                        children.push(id);
                    }
                }
            }
        }
        // A key whose closure has more rows than the cap is set aside: its rows are looked up no
        // further (a chain of thousands of rows costs at most `cap` levels), unless another key
        // needs them too.
        let mut live: BTreeSet<usize> = BTreeSet::new();
        for (i, root) in roots.iter().enumerate() {
            let Some(root) = *root else { continue };
            if over[i] {
                continue;
            }
            let (reached, rows) = reachable(&nodes, root, cap.rows);
            if rows > cap.rows {
                over[i] = true;
            } else {
                live.extend(reached);
            }
        }
        // The next level: the foreign keys of the rows the keys within the cap reach.
        let expand: Vec<usize> = unexpanded.intersection(&live).copied().collect();
        let mut next = Vec::new();
        for id in expand {
            unexpanded.remove(&id);
            let Node::Row { table: name, fks, .. } = &mut nodes[id] else { continue };
            let fks = std::mem::take(fks);
            let from = name.clone();
            let table = &spec.tables[name.as_str()];
            for (edge, vals) in table.edges.iter().zip(fks) {
                // MATCH SIMPLE: a key with a NULL column references nothing.
                let Some(values) = vals.into_iter().collect::<Option<Vec<String>>>() else { continue };
                next.push(Want {
                    parent: Some(id),
                    root: 0,
                    table: edge.target.clone(),
                    columns: edge.target_columns.clone(),
                    values,
                    same_entity: edge.same_entity,
                    via: match edge.source {
                        RelationshipSource::Constraint => None,
                        RelationshipSource::Configured => {
                            Some(format!("the configured relationship {from}({})", edge.columns.join(", ")))
                        }
                        RelationshipSource::Inferred => {
                            Some(format!("the relationship {from}({}) other tenants declare", edge.columns.join(", ")))
                        }
                    },
                });
            }
        }
        wants = next;
    }

    // Per orphaned key: the rows it needs, or the first broken link of its chain.
    let mut good: Vec<(usize, BTreeSet<usize>)> = Vec::new();
    let mut broken: Vec<(usize, String)> = Vec::new();
    for (i, root) in roots.iter().enumerate() {
        let Some(root) = *root else {
            broken.push((i, "the parent row disappeared from the shared schema".into()));
            continue;
        };
        let mut seen = BTreeSet::new();
        let mut stack = vec![root];
        let mut reason = None;
        while let Some(id) = stack.pop() {
            if !seen.insert(id) {
                continue;
            }
            match &nodes[id] {
                Node::Row { children, .. } => stack.extend(children.iter().copied()),
                Node::Satisfied => {}
                Node::Broken(why) => {
                    reason = Some(why.clone());
                    break;
                }
            }
        }
        if over[i] && reason.is_none() {
            reason = Some(cap.reason());
        }
        match reason {
            Some(reason) => broken.push((i, reason)),
            None => good.push((i, seen)),
        }
    }

    Ok(Closure { nodes, good, broken })
}

/// The nodes reachable from `from` (itself included) and how many of them are rows, up to the
/// first row past `rows`.
fn reachable(nodes: &[Node], from: usize, rows: usize) -> (BTreeSet<usize>, usize) {
    let (mut seen, mut count) = (BTreeSet::new(), 0);
    let mut stack = vec![from];
    while let Some(id) = stack.pop() {
        if count > rows {
            break;
        }
        if seen.insert(id) {
            if let Node::Row { children, .. } = &nodes[id] {
                count += 1;
                stack.extend(children.iter().copied());
            }
        }
    }
    (seen, count)
}

/// The most rows one orphaned key's copy may write: its parent and all their ancestors are one
/// transaction (a chain or a cycle is only consistent whole), which writes at most
/// `heal.batch_size` rows, and a run at most `heal.max_rows_per_run`. A key that needs more is
/// set aside, and its closure is looked up no further than that.
#[derive(Debug, Clone, Copy)]
pub struct RowCap {
    pub rows: usize,
    /// The configuration key that sets `rows`.
    pub key: &'static str,
}

impl RowCap {
    pub fn new(batch_size: usize, max_rows_per_run: u64) -> RowCap {
        match usize::try_from(max_rows_per_run) {
            Ok(max) if max < batch_size => RowCap { rows: max, key: "heal.max_rows_per_run" },
            _ => RowCap { rows: batch_size, key: "heal.batch_size" },
        }
    }

    fn reason(&self) -> String {
        format!(
            "its copy needs more than {} rows (the parent and all its ancestors, written in one transaction), more than {} = {}: raise it, or copy these rows by hand",
            self.rows, self.key, self.rows
        )
    }
}

/// What a copy would do now, for a plan file: the orphaned keys it would repair or set aside and
/// the rows it would write for them, keys in key order until `max_rows` rows are listed (a key
/// whose rows would pass it is left for a later plan). Reads only; `batch_size` keys per lookup.
pub async fn planned(
    tx: &Transaction<'_>,
    spec: &CopySpec,
    batch_size: i64,
    max_rows: u64,
) -> Result<(Vec<Vec<String>>, Vec<CopyRow>), tokio_postgres::Error> {
    let (mut keys, mut rows) = (Vec::new(), BTreeSet::new());
    let mut cursor: Vec<String> = Vec::new();
    let cap = RowCap::new(usize::try_from(batch_size).unwrap_or(usize::MAX), max_rows);
    loop {
        let picked = pick(tx, spec, batch_size, &cursor).await?;
        let Some(last) = picked.last().cloned() else { break };
        let Closure { nodes, good, .. } = closure(tx, spec, &picked, &cap).await?;
        for (i, key) in picked.iter().enumerate() {
            let needed: BTreeSet<CopyRow> = good
                .iter()
                .filter(|(g, _)| *g == i)
                .flat_map(|(_, ids)| ids.iter())
                .filter_map(|id| match &nodes[*id] {
                    Node::Row { table, key, .. } => Some(CopyRow { table: table.clone(), key: key.clone() }),
                    _ => None,
                })
                .filter(|r| !rows.contains(r))
                .collect();
            if (rows.len() + needed.len()) as u64 > max_rows {
                return Ok((keys, rows.into_iter().collect()));
            }
            keys.push(key.clone());
            rows.extend(needed);
        }
        cursor = last;
    }
    Ok((keys, rows.into_iter().collect()))
}

/// Why a key of a plan file is set aside when its closure needs the row `table(key) = values`
/// that the file does not list.
fn unlisted_reason(table: &str, key: &[String], values: &[String]) -> String {
    format!(
        "the copy now needs {table}({}) = ({}), a row the plan file does not list (the data changed since the plan): make a new plan with --plan-out",
        key.join(", "),
        values.join(", ")
    )
}

/// At most this many savepoints per batch transaction. Each savepoint whose insert succeeded
/// keeps its subtransaction id until the transaction ends; beyond 64 of them (PostgreSQL's
/// per-backend subtransaction cache) every snapshot on the primary and on its replicas has to
/// look subtransactions up in `pg_subtrans`, which slows the whole server down.
pub const SAVEPOINTS_PER_BATCH: usize = 32;

/// What [`insert_isolating`] did.
struct Isolated {
    /// (table, key) of every row inserted.
    inserted: Vec<(String, String)>,
    /// (index of the orphaned key among the picked, the error) of the keys whose rows failed.
    set_aside: Vec<(usize, String)>,
    /// The first entry of `good` not tried, when the savepoints ran out.
    stopped_at: Option<usize>,
}

/// Inserts the rows of every key of `good` ((picked index, rows)), all in one statement first;
/// when that fails because of its rows, by bisection: each half under its own savepoint, down to
/// the single keys that fail, which are set aside with their error. A failure that is not about
/// the rows ends the batch. At most [`SAVEPOINTS_PER_BATCH`] savepoints are used (one key is
/// always finished, so every batch makes progress); the keys left are reported by `stopped_at`.
async fn insert_isolating(
    tx: &Transaction<'_>,
    spec: &CopySpec,
    nodes: &[Node],
    good: &[(usize, BTreeSet<usize>)],
    run_id: &str,
) -> Result<Isolated, tokio_postgres::Error> {
    let mut out = Isolated { inserted: Vec::new(), set_aside: Vec::new(), stopped_at: None };
    // Ranges of `good`, the leftmost on top: keys are finished in key order.
    let mut ranges = vec![(0, good.len())];
    let (mut savepoints, mut finished) = (0, false);
    while let Some((lo, hi)) = ranges.pop() {
        if lo == hi {
            continue;
        }
        if savepoints >= SAVEPOINTS_PER_BATCH && finished {
            out.stopped_at = Some(lo);
            break;
        }
        savepoints += 1;
        let rows: BTreeSet<usize> = good[lo..hi].iter().flat_map(|(_, s)| s.iter().copied()).collect();
        tx.batch_execute("SAVEPOINT copy_rows").await?;
        match insert(tx, spec, nodes, &rows, run_id).await {
            Ok(inserted) => {
                tx.batch_execute("RELEASE SAVEPOINT copy_rows").await?;
                out.inserted.extend(inserted);
                finished = true;
            }
            Err(e) if session_error(&e) => return Err(e),
            Err(e) => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT copy_rows").await?;
                if hi - lo == 1 {
                    let message = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
                    out.set_aside.push((good[lo].0, message));
                    finished = true;
                } else {
                    let mid = lo + (hi - lo) / 2;
                    ranges.push((mid, hi));
                    ranges.push((lo, mid));
                }
            }
        }
    }
    Ok(out)
}

/// Whether a failed insert failed because of the server's or the session's state rather than
/// of its rows: no SQLSTATE (a lost connection), a connection, transaction-state (read-only
/// transaction), rollback (deadlock, serialization, a standby's conflict), resource, lock
/// (`lock_timeout`), operator (`statement_timeout`, a cancel, a shutdown), system or internal
/// error, or a missing privilege. Such a failure ends the batch, so that one transaction never
/// waits `heal.lock_timeout` once per key. Any other error (a unique, check or foreign-key clash,
/// a data error, whatever a trigger raises) is about the rows: their key is set aside.
fn session_error(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => true,
        Some(code) => {
            let code = code.code();
            ["08", "25", "40", "53", "55", "57", "58", "XX"].iter().any(|class| code.starts_with(class))
                || code == "42501"
        }
    }
}

/// Inserts the rows `ids` of `nodes` (grouped by table) in one statement with their audit rows;
/// returns (table, key) of each row inserted.
async fn insert(
    tx: &Transaction<'_>,
    spec: &CopySpec,
    nodes: &[Node],
    ids: &BTreeSet<usize>,
    run_id: &str,
) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
    let mut per_table: BTreeMap<&String, Vec<&Vec<String>>> = BTreeMap::new();
    for id in ids {
        if let Node::Row { table, key, .. } = &nodes[*id] {
            per_table.entry(table).or_default().push(key);
        }
    }
    if per_table.is_empty() {
        return Ok(Vec::new());
    }
    let mut arrays: Vec<Vec<String>> = Vec::new();
    let mut ctes = Vec::new();
    let mut log_rows = Vec::new();
    for (i, (name, keys)) in per_table.iter().enumerate() {
        let table = &spec.tables[*name];
        let first = arrays.len() + 2;
        for k in 0..table.key.len() {
            arrays.push(keys.iter().map(|key| key[k].clone()).collect());
        }
        ctes.push(format!("ins_{i} AS (\n  {}\n)", spec.insert_cte(name, table, first)));
        let new = if spec.audit_full { "pg_catalog.to_jsonb(i.*)" } else { "NULL::jsonb" };
        let key = audit::key_json("i", &table.key);
        log_rows.push(format!(
            "{} FROM ins_{i} i",
            audit::row("$1", &spec.tenant, name, "copy_missing_parents", &key, "NULL::jsonb", new)
        ));
    }
    ctes.push(audit::log_and_return(&log_rows.join("\n  UNION ALL\n  ")));
    let sql = format!("WITH {}", ctes.join(",\n"));
    let run_id = run_id.to_string();
    let mut typed: Vec<(&(dyn tokio_postgres::types::ToSql + Sync), Type)> = vec![(&run_id, Type::TEXT)];
    typed.extend(arrays.iter().map(|a| (a as &(dyn tokio_postgres::types::ToSql + Sync), Type::TEXT_ARRAY)));
    Ok(tx.query_typed(&sql, &typed).await?.iter().map(|r| (r.get(0), r.get(1))).collect())
}
