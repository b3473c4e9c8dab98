//! Catalog introspection: tables, columns, primary keys and foreign keys of the tenant, shared
//! and reference schemas, as plain data.
//!
//! Invariants: read-only; one query lists the tables of every requested schema (the schema list
//! is one array parameter), then [`QUERY_COUNT`] queries per chunk of whole schemas of at most
//! [`CHUNK_TABLES`] tables look them up by OID (index scans), never one query per tenant, and
//! each chunk under a savepoint of its own, so that a chunk that fails costs its schemas, not
//! the scan. Rows are streamed into the catalog, never buffered whole.
//! Every query carries the [`QUERY_TAG`] comment so its executions can be counted in
//! `pg_stat_statements`. Nothing here opens a user relation: only `pg_catalog` tables are read
//! (no `::regclass` casts, no deparsing with a relation), so a migration holding `ACCESS
//! EXCLUSIVE` on a tenant table never delays the catalog.
//!
//! A schema's catalog names its own schema as [`SchemaRef::Own`] (foreign-key targets,
//! sequences; types are [`TypeSchema::Own`]), so tenants of one shape have equal catalogs, and
//! [`read`] stores each distinct one once ([`Interner`]).
//!
//! Only ordinary and partitioned tables are tables here: views, materialized views and foreign
//! tables are never audited, and partitions are read through their partitioned table.
//!
//! Every name in the queries is qualified with `pg_catalog`: the columns query changes the
//! transaction's `search_path` for the rows whose text depends on it (see [`RELATIVE`]).
//!
//! Types and defaults are never edited as text. PostgreSQL deparses each one relative to the
//! column's own schema (`search_path = pg_catalog, <schema>`, transaction-local): an object of the
//! column's own schema or of `pg_catalog` prints unqualified, any other schema's object prints
//! with its schema. So `nextval('seq'::regclass)` reads the same in every tenant that has its own
//! `seq`, a shared type reads `public.mood` everywhere, and a string literal that happens to hold
//! a schema name (`'template.html'`) is left exactly as written. Heal writes such a definition
//! back under the same `search_path` relative to the tenant, so it means there what it meant in
//! the reference.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use futures::{pin_mut, TryStreamExt};
use tokio_postgres::types::Type;
use tokio_postgres::GenericClient;

use crate::db::DbError;
use crate::sql;

/// The comment that opens every catalog query.
pub const QUERY_TAG: &str = "/* tenant-audit:catalog */";
/// How many queries [`read`] issues per chunk (plus one that lists the tables).
pub const QUERY_COUNT: usize = 3;
/// The most tables one chunk of catalog queries covers, unless one schema alone has more.
pub const CHUNK_TABLES: usize = 2000;

/// The catalog of every requested schema that exists, by schema name. A schema's catalog is
/// written relative to the schema itself (see [`SchemaRef`]), so tenants of one shape hold the
/// same [`Schema`], stored once (see [`Interner`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Catalog {
    pub schemas: BTreeMap<String, Arc<Schema>>,
}

/// The tables of one schema, by table name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Schema {
    pub tables: BTreeMap<String, Table>,
}

/// A schema named by a catalog entry, relative to the schema the entry belongs to: its own
/// schema is [`SchemaRef::Own`], so that identical tenants have identical catalogs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SchemaRef {
    Own,
    Other(String),
}

impl SchemaRef {
    /// `name` relative to `own`.
    pub fn of(name: String, own: &str) -> SchemaRef {
        if name == own {
            SchemaRef::Own
        } else {
            SchemaRef::Other(name)
        }
    }

    /// The schema's name, given the name of the schema the entry belongs to.
    pub fn name<'a>(&'a self, own: &'a str) -> &'a str {
        match self {
            SchemaRef::Own => own,
            SchemaRef::Other(name) => name,
        }
    }
}

/// Distinct schema catalogs, each stored once: interning a schema equal to one already stored
/// gives back the stored one.
#[derive(Debug, Default)]
pub struct Interner(HashSet<Arc<Schema>>);

impl Interner {
    pub fn intern(&mut self, schema: Schema) -> Arc<Schema> {
        if let Some(stored) = self.0.get(&schema) {
            return Arc::clone(stored);
        }
        let stored = Arc::new(schema);
        self.0.insert(Arc::clone(&stored));
        stored
    }

    /// Forgets the schemas nobody else holds any more.
    pub fn release_unused(&mut self) {
        self.0.retain(|s| Arc::strong_count(s) > 1);
    }
}

/// An ordinary or partitioned table (partitions are covered by their parent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Table {
    /// In column order.
    pub columns: Vec<Column>,
    /// Primary key columns in key order; empty when the table has none.
    pub primary_key: Vec<String>,
    pub foreign_keys: Vec<ForeignKey>,
    /// Whether the scanning role may read the table (schema `USAGE` and table `SELECT`).
    pub readable: bool,
    /// A partitioned table: its rows are those of its partitions, so it is read without `ONLY`.
    /// Any other table is read with `ONLY`, so that an inheritance parent never counts the rows
    /// of its children (which are tables of their own).
    pub partitioned: bool,
    /// `UNLOGGED`: its rows cannot be read on a standby.
    pub unlogged: bool,
    /// The collation of each collatable column, by column name.
    pub collations: BTreeMap<String, QualifiedName>,
    /// The table's enabled user triggers that fire on `INSERT` or `UPDATE` (heal's writes).
    pub triggers: Vec<Trigger>,
    /// Columns with the `NOT VALID` check `tenant_audit_<column>_not_null` (`CHECK (c IS NOT
    /// NULL)`, checked structurally) that a staged add-column stopped before its `VALIDATE` left.
    pub unvalidated_not_null: Vec<String>,
    /// Columns of a unique index other than the primary key's.
    pub unique_columns: BTreeSet<String>,
    /// Columns whose type is `uuid` or a domain over it (at any depth).
    pub uuid_columns: BTreeSet<String>,
}

/// A schema-qualified catalog object name (a collation, an operator's schema and name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QualifiedName {
    pub schema: String,
    pub name: String,
}

impl QualifiedName {
    /// `"schema"."name"`, both parts quoted (for collations).
    pub fn quoted(&self) -> String {
        sql::qualified(&self.schema, &self.name)
    }
}

/// A user trigger of a table, enabled for ordinary sessions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Trigger {
    pub name: String,
    pub on_insert: bool,
    pub on_update: bool,
    /// `BEFORE ... FOR EACH ROW`: it can change or suppress the row being written.
    pub before_row: bool,
}

/// A column as the schema declares it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Column {
    pub name: String,
    /// `format_type` relative to the column's own schema, e.g. `timestamp with time zone`,
    /// `character varying(20)`, `mood` (the schema's own enum), `public.mood` (the shared one).
    pub data_type: String,
    /// Where the type (an array's element type) is defined.
    pub type_schema: TypeSchema,
    pub not_null: bool,
    /// The default expression deparsed relative to the column's own schema (so that every
    /// tenant's `nextval('seq'::regclass)` reads the same); `None` for generated columns, whose
    /// expression is not a default.
    pub default: Option<String>,
    /// Whether the default is volatile (`nextval`, `random()`, `gen_random_uuid()`,
    /// `clock_timestamp()`, or anything the catalog query cannot classify): such a default gives
    /// every row its own value, so adding the column with it rewrites the table. A stable
    /// default (`now()`) is not: `ADD COLUMN` evaluates it once.
    pub default_volatile: bool,
    /// The sequence the column draws its values from, (schema, name): an identity column's own,
    /// or the one its default calls `nextval` on (serial columns).
    pub sequence: Option<(SchemaRef, String)>,
    /// `GENERATED ... AS IDENTITY`.
    pub identity: Option<Identity>,
    /// `GENERATED ALWAYS AS (...) STORED`: computed by PostgreSQL, never written.
    pub generated: bool,
}

/// The schema of a column's type, relative to the column's own schema.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TypeSchema {
    /// A built-in type.
    Catalog,
    /// A type of the column's own schema (a tenant's own enum or domain).
    Own,
    /// A type of another schema, by name (the shared schema's, an extension's).
    Other(String),
}

/// The kind of an identity column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Identity {
    /// `GENERATED ALWAYS`: inserting a value needs `OVERRIDING SYSTEM VALUE`.
    Always,
    /// `GENERATED BY DEFAULT`.
    ByDefault,
}

/// A foreign-key constraint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ForeignKey {
    pub name: String,
    pub columns: Vec<String>,
    pub target_schema: SchemaRef,
    pub target_table: String,
    pub target_columns: Vec<String>,
    /// False for a constraint added `NOT VALID` and never validated.
    pub validated: bool,
    pub deferrable: bool,
    /// `MATCH FULL`: a key with some NULL columns (but not all) is a violation too.
    pub match_full: bool,
    /// The constraint's equality operator per key column (`conpfeqop`): `parent = child`.
    pub equality: Vec<QualifiedName>,
}

impl Table {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    pub fn has_columns(&self, names: &[String]) -> bool {
        names.iter().all(|n| self.column(n).is_some())
    }
}

impl Column {
    /// The column's sequence as (schema, name), given the column's own schema.
    pub fn sequence_in<'a>(&'a self, own: &'a str) -> Option<(&'a str, &'a str)> {
        self.sequence.as_ref().map(|(schema, name)| (schema.name(own), name.as_str()))
    }
}

impl Catalog {
    pub fn table(&self, schema: &str, table: &str) -> Option<&Table> {
        self.schemas.get(schema)?.tables.get(table)
    }
}

/// How a relation is named in a data statement: `ONLY "s"."t"`, or `"s"."t"` for a partitioned
/// table (`ONLY` would leave out every row of its partitions) and for a relation the catalog
/// does not know.
pub fn relation(catalog: &Catalog, schema: &str, table: &str) -> String {
    let partitioned = catalog.table(schema, table).is_some_and(|t| t.partitioned);
    if partitioned {
        sql::qualified(schema, table)
    } else {
        format!("ONLY {}", sql::qualified(schema, table))
    }
}

/// `CASE WHEN <search_path := pg_catalog, n.nspname> IS NOT NULL THEN {expr} END`: `{expr}`
/// deparsed relative to the column's schema. The `CASE` orders the two calls within one
/// expression, whatever plan the query gets; the setting is transaction-local (safe behind a
/// transaction pooler) and every other name in the catalog queries is qualified.
const RELATIVE: &str = "CASE WHEN pg_catalog.set_config('search_path', 'pg_catalog, ' || pg_catalog.quote_ident(n.nspname), true) IS NOT NULL THEN {expr} END";

/// Whether the column's effective default is volatile, as PostgreSQL itself would judge it for
/// `ADD COLUMN` (which then rewrites the table): its own default `d`, or without one its type's
/// default (a domain's `DEFAULT`, `ty.typdefaultbin`: PostgreSQL takes the column's own type's
/// only, and `CREATE DOMAIN` copies a base domain's default into it). Read from the stored node
/// tree, never from the text. Volatile when the tree calls a function (`:funcid`, or an
/// operator's `:opfuncid`) whose `pg_proc.provolatile` is `v`, that cannot be found, or that lives
/// outside `pg_catalog` (the default's text resolves through the tenant's `search_path`, so a
/// tenant's own volatile function of that name may run there instead), or when it holds a node
/// outside a short list of node types whose only calls are those (constants, function and
/// operator calls, `CASE`, `COALESCE`, arrays, `CURRENT_TIMESTAMP` and its kin, casts without a
/// function): anything heal cannot classify counts as volatile. (`pg_depend` cannot tell: it
/// records no dependency on built-in functions such as `random()` or `gen_random_uuid()`.)
const DEFAULT_VOLATILE: &str = "EXISTS (
         SELECT 1 FROM (SELECT CASE WHEN a.attgenerated = '' THEN COALESCE(d.adbin, ty.typdefaultbin)::text END) e(bin)
         WHERE e.bin IS NOT NULL AND (
           e.bin ~ '\\{(?!(CONST|FUNCEXPR|OPEXPR|DISTINCTEXPR|NULLIFEXPR|SCALARARRAYOPEXPR|SQLVALUEFUNCTION|ARRAYEXPR|COALESCEEXPR|RELABELTYPE|CASEEXPR|CASEWHEN|BOOLEXPR|NULLTEST|COERCETODOMAIN|COLLATEEXPR)[ }])'
           OR EXISTS (
             SELECT 1 FROM pg_catalog.regexp_matches(e.bin, ':(?:funcid|opfuncid) (\\d+)', 'g') AS m(f)
             LEFT JOIN pg_catalog.pg_proc p ON p.oid = m.f[1]::pg_catalog.oid
             WHERE p.oid IS NULL OR p.provolatile = 'v' OR p.pronamespace <> 'pg_catalog'::pg_catalog.regnamespace)))";

/// `[schema, name]` of the column's sequence: the identity's (a dependency of the sequence on the
/// column) or the one the default references (a dependency of the default on a sequence).
const SEQUENCE: &str = "CASE WHEN a.attidentity <> '' THEN (
         SELECT ARRAY[sn.nspname::text, s.relname::text] FROM pg_catalog.pg_depend dep
         JOIN pg_catalog.pg_class s ON s.oid = dep.objid AND s.relkind = 'S'
         JOIN pg_catalog.pg_namespace sn ON sn.oid = s.relnamespace
         WHERE dep.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND dep.refobjid = c.oid
           AND dep.refobjsubid = a.attnum AND dep.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
           AND dep.deptype = 'i' LIMIT 1)
       WHEN d.oid IS NOT NULL THEN (
         SELECT ARRAY[sn.nspname::text, s.relname::text] FROM pg_catalog.pg_depend dep
         JOIN pg_catalog.pg_class s ON s.oid = dep.refobjid AND s.relkind = 'S'
         JOIN pg_catalog.pg_namespace sn ON sn.oid = s.relnamespace
         WHERE dep.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass AND dep.objid = d.oid
           AND dep.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
         ORDER BY 1 LIMIT 1) END";

/// The columns with heal's `NOT VALID` check `tenant_audit_<column>_not_null`: a check constraint
/// of that name on exactly that column whose expression is `column IS NOT NULL` (a `NULLTEST` of
/// type `IS_NOT_NULL` on the column), never validated.
const UNVALIDATED_NOT_NULL: &str = "ARRAY(
         SELECT a.attname::text FROM pg_catalog.pg_constraint k
         JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND k.conkey = ARRAY[a.attnum]
         WHERE k.conrelid = c.oid AND k.contype = 'c' AND NOT k.convalidated
           AND k.conname = 'tenant_audit_' || a.attname || '_not_null'
           AND k.conbin::text ~ '^\\{NULLTEST :arg \\{VAR :varno 1 :varattno [0-9]+ [^{}]*\\} :nulltesttype 1 '
         ORDER BY a.attnum)";

/// The enabled user triggers of the table that fire on `INSERT` (`tgtype` bit 4) or `UPDATE`
/// (bit 16), in name order: the `FROM` of four arrays (name, on insert, on update, and
/// `BEFORE ... FOR EACH ROW`: bits 1 and 2).
const TRIGGERS: &str = "FROM pg_catalog.pg_trigger t
             WHERE t.tgrelid = c.oid AND NOT t.tgisinternal AND t.tgenabled IN ('O', 'A') AND t.tgtype & 20 <> 0
             ORDER BY t.tgname";

/// The ordinary and partitioned tables of the requested schemas (partitions are left out: their
/// rows are read through the parent), in schema order: the one query of [`read`] that names
/// schemas, and the only one that scans `pg_class` (it has no index on `relnamespace`); every
/// other query looks tables up by OID.
const TABLES: &str = "/* tenant-audit:catalog */
SELECT n.nspname::text, c.oid
FROM pg_catalog.pg_namespace n
JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid
WHERE n.nspname = ANY($1) AND c.relkind IN ('r', 'p') AND NOT c.relispartition
ORDER BY 1, 2";

/// Per table of `$1` (OIDs): its schema and name, whether it is partitioned and unlogged, whether
/// the scanning role may read it (NULL for a table dropped since the snapshot: left out), its
/// primary-key columns in key order, the columns of its unique indexes other than the primary
/// key, its triggers (four arrays, see [`TRIGGERS`]) and its unvalidated heal checks.
fn relations_sql() -> String {
    format!(
        "/* tenant-audit:catalog */
SELECT c.oid, n.nspname::text, c.relname::text, c.relkind = 'p', c.relpersistence = 'u',
       pg_catalog.has_schema_privilege(n.oid, 'USAGE') AND pg_catalog.has_table_privilege(c.oid, 'SELECT'),
       ARRAY(SELECT a.attname::text FROM pg_catalog.unnest(i.indkey::pg_catalog.int2[]) WITH ORDINALITY k(num, ord)
             JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.num
             ORDER BY k.ord),
       ARRAY(SELECT DISTINCT a.attname::text FROM pg_catalog.pg_index u
             JOIN pg_catalog.pg_attribute a ON a.attrelid = u.indrelid AND a.attnum = ANY (u.indkey::pg_catalog.int2[])
             WHERE u.indrelid = c.oid AND u.indisunique AND NOT u.indisprimary),
       {triggers},
       {unvalidated}
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_catalog.pg_index i ON i.indrelid = c.oid AND i.indisprimary
WHERE c.oid = ANY($1::pg_catalog.oid[])",
        unvalidated = UNVALIDATED_NOT_NULL,
        triggers = ["t.tgname::text", "t.tgtype & 4 <> 0", "t.tgtype & 16 <> 0", "t.tgtype & 3 = 3"]
            .map(|field| format!("ARRAY(SELECT {field} {TRIGGERS})"))
            .join(",\n       "),
    )
}

/// The columns of the tables of `$1` (OIDs) in column order, with type, default, identity,
/// generation, volatility, sequence, collation and whether the type is `uuid` (oid 2950) or a
/// domain over it (following `typbasetype` through domains of domains). The `search_path` is set
/// only where it changes what is printed: for a type outside `pg_catalog` and for a default
/// (a `pg_catalog` type prints the same under every path heal or the scan uses, which all begin
/// with `pg_catalog`). Defaults are deparsed without their relation (`pg_get_expr(adbin, 0)`: a
/// default cannot reference columns), which takes no lock on the table.
fn columns_sql() -> String {
    let relative = |expr: &str| RELATIVE.replace("{expr}", expr);
    format!(
        "/* tenant-audit:catalog */
SELECT a.attrelid, a.attname::text,
       CASE WHEN tn.nspname = 'pg_catalog' THEN pg_catalog.format_type(a.atttypid, a.atttypmod) ELSE {data_type} END,
       a.attnotnull,
       CASE WHEN d.oid IS NOT NULL THEN {default} END,
       CASE WHEN tn.nspname = 'pg_catalog' THEN NULL WHEN tn.oid = n.oid THEN '' ELSE tn.nspname::text END,
       a.attidentity::text, a.attgenerated <> '',
       {volatile},
       {sequence},
       cn.nspname::text, co.collname::text,
       CASE WHEN a.atttypid = 2950 THEN true WHEN ty.typtype <> 'd' THEN false ELSE 2950 IN (
         WITH RECURSIVE base(oid) AS (
           SELECT ty.typbasetype
           UNION ALL
           SELECT t.typbasetype FROM pg_catalog.pg_type t JOIN base ON t.oid = base.oid WHERE t.typtype = 'd')
         SELECT base.oid FROM base) END
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_catalog.pg_type ty ON ty.oid = a.atttypid
LEFT JOIN pg_catalog.pg_type el ON el.oid = ty.typelem AND ty.typlen = -1
JOIN pg_catalog.pg_namespace tn ON tn.oid = coalesce(el.typnamespace, ty.typnamespace)
LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum AND a.attgenerated = ''
LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation
LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace
WHERE c.oid = ANY($1::pg_catalog.oid[])
ORDER BY a.attrelid, a.attnum",
        data_type = relative("pg_catalog.format_type(a.atttypid, a.atttypmod)"),
        default = relative("pg_catalog.pg_get_expr(d.adbin, 0)"),
        volatile = DEFAULT_VOLATILE,
        sequence = SEQUENCE,
    )
}

/// Foreign keys declared on the tables of `$1` (OIDs), with column lists in key order.
/// Constraints cloned onto partitions (`conparentid <> 0`) are left out.
const FOREIGN_KEYS: &str = "/* tenant-audit:catalog */
SELECT con.conrelid, con.conname::text,
       ARRAY(SELECT a.attname::text FROM pg_catalog.unnest(con.conkey) WITH ORDINALITY k(num, ord)
             JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.num
             ORDER BY k.ord),
       rn.nspname::text, rc.relname::text,
       ARRAY(SELECT a.attname::text FROM pg_catalog.unnest(con.confkey) WITH ORDINALITY k(num, ord)
             JOIN pg_catalog.pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.num
             ORDER BY k.ord),
       con.convalidated, con.condeferrable, con.confmatchtype = 'f',
       ARRAY(SELECT opn.nspname::text FROM pg_catalog.unnest(con.conpfeqop) WITH ORDINALITY k(op, ord)
             JOIN pg_catalog.pg_operator o ON o.oid = k.op
             JOIN pg_catalog.pg_namespace opn ON opn.oid = o.oprnamespace
             ORDER BY k.ord),
       ARRAY(SELECT o.oprname::text FROM pg_catalog.unnest(con.conpfeqop) WITH ORDINALITY k(op, ord)
             JOIN pg_catalog.pg_operator o ON o.oid = k.op
             ORDER BY k.ord)
FROM pg_catalog.pg_constraint con
JOIN pg_catalog.pg_class rc ON rc.oid = con.confrelid
JOIN pg_catalog.pg_namespace rn ON rn.oid = rc.relnamespace
WHERE con.conrelid = ANY($1::pg_catalog.oid[]) AND con.contype = 'f' AND con.conparentid = 0
ORDER BY 1, 2";

/// A chunk of schemas whose catalog could not be read.
#[derive(Debug)]
pub struct ChunkFailure {
    pub schemas: Vec<String>,
    pub error: DbError,
}

/// The tables of one schema, by OID, as [`TABLES`] lists them.
#[derive(Debug)]
struct Listed {
    schema: String,
    tables: Vec<u32>,
}

/// Reads the catalog of `required` (all in one chunk: a failure there is the caller's failure)
/// and of `schemas` in chunks of whole schemas of at most [`CHUNK_TABLES`] tables (see
/// [`chunks`]), each chunk under its own savepoint of `tx`: a failing chunk is returned with its
/// schemas, and the other chunks are read all the same. Names that do not exist, and schemas
/// without tables, are simply absent from the result. Each schema read is interned.
pub async fn read(
    tx: &mut tokio_postgres::Transaction<'_>,
    required: &[String],
    schemas: &[String],
    interner: &mut Interner,
) -> Result<(Catalog, Vec<ChunkFailure>), DbError> {
    let mut names: Vec<&String> = required.iter().chain(schemas).collect();
    names.sort();
    names.dedup();
    let mut listed = list(&*tx, &names).await?;
    let (required, tenants): (Vec<Listed>, Vec<Listed>) = listed.drain(..).partition(|l| required.contains(&l.schema));
    let mut catalog = read_chunk(&*tx, &required, interner).await?;
    let mut failures = Vec::new();
    for chunk in chunks(&tenants, CHUNK_TABLES) {
        let savepoint = tx.savepoint("catalog_chunk").await?;
        match read_chunk(&savepoint, chunk, interner).await {
            Ok(part) => {
                savepoint.commit().await?;
                catalog.schemas.extend(part.schemas);
            }
            Err(error) => {
                savepoint.rollback().await?;
                failures.push(ChunkFailure { schemas: chunk.iter().map(|l| l.schema.clone()).collect(), error });
            }
        }
    }
    Ok((catalog, failures))
}

/// The tables of `names` in one query, grouped by schema in schema order.
async fn list(client: &impl GenericClient, names: &[&String]) -> Result<Vec<Listed>, DbError> {
    let mut listed: Vec<Listed> = Vec::new();
    for row in client.query_typed(TABLES, &[(&names, Type::TEXT_ARRAY)]).await? {
        let schema: String = row.get(0);
        match listed.last_mut() {
            Some(last) if last.schema == schema => last.tables.push(row.get(1)),
            _ => listed.push(Listed { schema, tables: vec![row.get(1)] }),
        }
    }
    Ok(listed)
}

/// `listed` cut into runs of whole schemas: a run ends before the schema that would take it past
/// `budget` tables, so every run holds at most `budget` tables, except a run of one schema that
/// alone has more.
fn chunks(listed: &[Listed], budget: usize) -> Vec<&[Listed]> {
    let mut runs = Vec::new();
    let (mut start, mut tables) = (0, 0);
    for (i, l) in listed.iter().enumerate() {
        if i > start && tables + l.tables.len() > budget {
            runs.push(&listed[start..i]);
            (start, tables) = (i, 0);
        }
        tables += l.tables.len();
    }
    if start < listed.len() {
        runs.push(&listed[start..]);
    }
    runs
}

/// The catalog of the tables in `listed` in [`QUERY_COUNT`] queries, each schema interned.
/// Rows are streamed, not buffered: the client holds the chunk's catalog, not the server's
/// answer as well.
async fn read_chunk(
    client: &impl GenericClient,
    listed: &[Listed],
    interner: &mut Interner,
) -> Result<Catalog, DbError> {
    let oids: Vec<u32> = listed.iter().flat_map(|l| l.tables.iter().copied()).collect();
    let param = || [(&oids as &(dyn tokio_postgres::types::ToSql + Sync), Type::OID_ARRAY)];
    let mut tables: HashMap<u32, (String, String, Table)> = HashMap::with_capacity(oids.len());
    let rows = client.query_typed_raw(&relations_sql(), param()).await?;
    pin_mut!(rows);
    while let Some(row) = rows.try_next().await? {
        // A table dropped since the snapshot has NULL privileges: left out.
        let Some(readable) = row.get::<_, Option<bool>>(5) else { continue };
        let (names, inserts, updates, befores): (Vec<String>, Vec<bool>, Vec<bool>, Vec<bool>) =
            (row.get(8), row.get(9), row.get(10), row.get(11));
        let table = Table {
            partitioned: row.get(3),
            unlogged: row.get(4),
            readable,
            primary_key: row.get(6),
            unique_columns: row.get::<_, Vec<String>>(7).into_iter().collect(),
            triggers: names
                .into_iter()
                .zip(inserts.into_iter().zip(updates).zip(befores))
                .map(|(name, ((on_insert, on_update), before_row))| Trigger { name, on_insert, on_update, before_row })
                .collect(),
            unvalidated_not_null: row.get(12),
            ..Table::default()
        };
        tables.insert(row.get(0), (row.get(1), row.get(2), table));
    }
    let rows = client.query_typed_raw(&columns_sql(), param()).await?;
    pin_mut!(rows);
    while let Some(row) = rows.try_next().await? {
        let Some((schema, _, table)) = tables.get_mut(&row.get::<_, u32>(0)) else { continue };
        add_column(table, schema, &row);
    }
    let rows = client.query_typed_raw(FOREIGN_KEYS, param()).await?;
    pin_mut!(rows);
    while let Some(row) = rows.try_next().await? {
        let Some((schema, _, table)) = tables.get_mut(&row.get::<_, u32>(0)) else { continue };
        let target_schema = SchemaRef::of(row.get(3), schema);
        table.foreign_keys.push(ForeignKey {
            name: row.get(1),
            columns: row.get(2),
            target_schema,
            target_table: row.get(4),
            target_columns: row.get(5),
            validated: row.get(6),
            deferrable: row.get(7),
            match_full: row.get(8),
            equality: row
                .get::<_, Vec<String>>(9)
                .into_iter()
                .zip(row.get::<_, Vec<String>>(10))
                .map(|(schema, name)| QualifiedName { schema, name })
                .collect(),
        });
    }
    let mut schemas: BTreeMap<String, Schema> = BTreeMap::new();
    for (schema, name, table) in tables.into_values() {
        schemas.entry(schema).or_default().tables.insert(name, table);
    }
    Ok(Catalog { schemas: schemas.into_iter().map(|(name, s)| (name, interner.intern(s))).collect() })
}

/// Adds the column of a [`columns_sql`] row to `table` of schema `own`.
fn add_column(table: &mut Table, own: &str, row: &tokio_postgres::Row) {
    let name: String = row.get(1);
    let type_schema = match row.get::<_, Option<String>>(5) {
        None => TypeSchema::Catalog,
        Some(s) if s.is_empty() => TypeSchema::Own,
        Some(s) => TypeSchema::Other(s),
    };
    let identity = match row.get::<_, String>(6).as_str() {
        "a" => Some(Identity::Always),
        "d" => Some(Identity::ByDefault),
        _ => None,
    };
    if let (Some(schema), Some(collation)) = (row.get::<_, Option<String>>(10), row.get::<_, Option<String>>(11)) {
        table.collations.insert(name.clone(), QualifiedName { schema, name: collation });
    }
    if row.get::<_, bool>(12) {
        table.uuid_columns.insert(name.clone());
    }
    table.columns.push(Column {
        name,
        data_type: row.get(2),
        type_schema,
        not_null: row.get(3),
        default: row.get(4),
        default_volatile: row.get(8),
        sequence: row.get::<_, Option<Vec<String>>>(9).and_then(|v| match <[String; 2]>::try_from(v) {
            Ok([seq_schema, name]) => Some((SchemaRef::of(seq_schema, own), name)),
            Err(_) => None,
        }),
        identity,
        generated: row.get(7),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(sizes: &[usize]) -> Vec<Listed> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Listed { schema: format!("s{i}"), tables: (0..n as u32).collect() })
            .collect()
    }

    fn sizes(runs: Vec<&[Listed]>) -> Vec<Vec<usize>> {
        runs.into_iter().map(|run| run.iter().map(|l| l.tables.len()).collect()).collect()
    }

    #[test]
    fn chunks_hold_whole_schemas_within_the_budget() {
        assert_eq!(sizes(chunks(&listed(&[3, 3, 3, 3, 3]), 6)), vec![vec![3, 3], vec![3, 3], vec![3]]);
        assert_eq!(sizes(chunks(&listed(&[2, 9, 1, 5]), 6)), vec![vec![2], vec![9], vec![1, 5]]);
        assert_eq!(sizes(chunks(&listed(&[6]), 6)), vec![vec![6]]);
        assert_eq!(sizes(chunks(&listed(&[]), 6)), Vec::<Vec<usize>>::new());
    }
}
