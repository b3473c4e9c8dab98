//! Incremental scans: PostgreSQL's per-table change signals, and the state between scans that
//! lets a table's findings be carried forward when nothing its checks read may have changed.
//!
//! A *unit* is one tenant table with data checks (its orphan probes, its NULL-timestamp probe
//! and its `sequence_behind` probes). Its *inputs* are a hash of what its findings are a
//! function of: the probes themselves (which capture the catalog, the reference shape and the
//! configuration they were planned from), the catalog entries of the table and of every parent
//! table it reads (in the tenant, the shared schema or a declared schema), the change signals
//! of those tables: the OID (a re-created table), the inserted / updated / deleted tuple
//! counters and the storage files (`relfilenode`, which TRUNCATE and rewrites replace) of the
//! table and all its partitions and inheritance children, and the state (`last_value`,
//! `is_called`) of the sequences its columns draw from.
//!
//! A whole tenant is carried forward, without even being planned, when its *tenant inputs*
//! (see [`tenant_inputs`]) are those its whole last result was stored with: the scan's context
//! (reference shape, tenant set, shared and reference fingerprints), its own fingerprint and
//! those of the schemas it names, and the signals of every relation and sequence its last plan
//! read. The plan is a function of the catalogs and the context, so the same inputs give the
//! same plan, and the same plan over the same signals gives the same findings.
//!
//! The catalog is incremental too: every scan reads one *fingerprint* per schema (a count and a
//! digest of the raw `xmin` of the catalog rows that describe it, see [`FINGERPRINTS`]) with the
//! signals, and re-reads the structural catalog only of the tenants whose fingerprint changed,
//! or that name a schema whose fingerprint changed (a foreign key's target, a type's or a
//! sequence's schema), or all of them when the shared schema, the scanning role's memberships
//! or attributes changed, or the scan is full. The others reuse the catalog stored with the
//! fingerprint it was read at (interned: tenants of one shape share one copy).
//!
//! Invariants:
//! - The signals are read before any data is read (in the catalog snapshot, ahead of every
//!   tenant's transaction), so a change that races a scan is seen by the next one, never lost.
//! - A unit is carried forward only when its inputs hash equals the one stored when its findings
//!   were computed, in the same statistics *epoch* (database, statistics resets, crash recovery,
//!   server start). Anything missing or doubtful makes the scan full: no stored state, a new
//!   epoch, `track_counts` off, a hot standby (whose counters do not see the primary's writes),
//!   a counter that went backwards, or `scan.full_every` elapsed since the last full scan.
//! - Only a unit whose table had no error is stored; a tenant-level error stores nothing of the
//!   tenant. A state that a failed scan left half-updated is still correct: every stored unit
//!   holds findings computed from exactly the inputs it records.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::types::Type;
use tokio_postgres::GenericClient;

use crate::catalog::{Catalog, Interner, Schema, SchemaRef, TypeSchema};
use crate::checks::{Plan, Shape};
use crate::config::ScanConfig;
use crate::db::{self, DbError};
use crate::report::{Finding, ScanKind};
use crate::sql;

/// Where the statistics counters come from, and whether they can be trusted at all. Two reads
/// with different epochs cannot be compared: counters were reset or discarded in between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Epoch {
    database_oid: i64,
    /// `pg_stat_database.stats_reset`: set by `pg_stat_reset()` and, in PostgreSQL 15, also by
    /// `pg_stat_reset_single_table_counters()`.
    database_reset: Option<String>,
    /// `pg_stat_bgwriter.stats_reset`: set again when crash recovery discards all statistics
    /// (the database's own timestamp then goes back to NULL, which may look unchanged).
    cluster_reset: Option<String>,
    postmaster_start: String,
}

/// The change signals of one read: the epoch and, per table, its counters and storage.
#[derive(Debug, Clone)]
pub struct Signals {
    pub epoch: Epoch,
    /// `pg_is_in_recovery()`: a hot standby's counters do not count the primary's writes.
    pub in_recovery: bool,
    /// `track_counts`: without it the counters never move.
    pub track_counts: bool,
    /// By schema, then table: one copy of each schema's name, not one per table.
    tables: HashMap<String, HashMap<String, Signal>>,
    /// The catalog fingerprint of every requested schema that exists (see [`FINGERPRINTS`]).
    fingerprints: HashMap<String, Fingerprint>,
    /// What decides the scanning role's privileges besides the schemas' own rows: its role
    /// attributes and every role membership.
    roles: String,
    /// The state of the tenant sequences the data checks read, by schema, then sequence; read
    /// after the catalog, before any tenant's data (see [`read_sequences`]).
    sequences: HashMap<String, HashMap<String, Sequence>>,
}

/// A sequence's `(last_value, is_called)`: every `nextval` and `setval` changes one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Sequence {
    last_value: i64,
    is_called: bool,
}

impl Signals {
    fn table(&self, schema: &str, table: &str) -> Option<&Signal> {
        self.tables.get(schema)?.get(table)
    }

    fn sequence(&self, schema: &str, sequence: &str) -> Option<&Sequence> {
        self.sequences.get(schema)?.get(sequence)
    }

    fn all_tables(&self) -> impl Iterator<Item = &Signal> {
        self.tables.values().flat_map(HashMap::values)
    }
}

/// A schema's catalog fingerprint: how many catalog rows describe it and a digest of their
/// identities and raw `xmin`s.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Fingerprint {
    rows: i64,
    /// A hash of the digest's text (a sum printed as `numeric`): 8 bytes kept per schema.
    digest: u64,
}

/// The change signal of one table (its partitions and inheritance children included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Signal {
    oid: i64,
    counters: Counters,
    /// Hash of every member relation's `(oid, relfilenode)`: TRUNCATE, rewrites, attached and
    /// detached partitions change it.
    storage: u64,
}

/// Tuples inserted, updated and deleted since the statistics were last reset (sums over the
/// table's members).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Counters {
    inserted: i64,
    updated: i64,
    deleted: i64,
}

impl Counters {
    fn went_backwards_from(&self, before: &Counters) -> bool {
        self.inserted < before.inserted || self.updated < before.updated || self.deleted < before.deleted
    }
}

/// The epoch, the standby flag, `track_counts` and the roles digest (the scanning role's
/// attributes and every membership, `pg_auth_members` being readable by everyone), in one row.
const EPOCH: &str = "/* tenant-audit:signals */
SELECT d.datid::bigint, d.stats_reset::text, (SELECT b.stats_reset::text FROM pg_catalog.pg_stat_bgwriter b),
       pg_catalog.pg_postmaster_start_time()::text, pg_catalog.pg_is_in_recovery(),
       pg_catalog.current_setting('track_counts')::bool,
       (SELECT pg_catalog.md5(r.rolsuper::text || r.rolinherit::text || r.rolbypassrls::text || ':' || coalesce(
            (SELECT pg_catalog.string_agg(m.xmin::text || ':' || m.roleid::text || ':' || m.member::text, ','
                                          ORDER BY m.roleid, m.member) FROM pg_catalog.pg_auth_members m), ''))
        FROM pg_catalog.pg_roles r WHERE r.rolname = current_user)
FROM pg_catalog.pg_stat_database d WHERE d.datname = pg_catalog.current_database()";

/// Per requested schema that exists: the number of catalog rows that describe it and the sum
/// of a hash of each row's identity and raw `xmin`. Every DDL that changes what
/// [`crate::catalog`] reads writes a new version of one of these rows (a new `xmin`) or adds or
/// removes one: the schema's own row (its privileges), its relations (`pg_class`: names,
/// privileges, owner, persistence, storage), its tables' columns (`pg_attribute`: name, type,
/// NOT NULL, identity, generation, collation), defaults (`pg_attrdef`), indexes (`pg_index`:
/// the primary key), triggers, inheritance and partitions (`pg_inherits`), constraints, types
/// and functions (`pg_type`, `pg_proc`: names that defaults and columns print). In-place updates
/// (VACUUM's and ANALYZE's `relpages`, `reltuples`, `relfrozenxid`) keep `xmin`, and so does
/// freezing (PostgreSQL 9.4 and later keep the raw `xmin` and set a hint bit): neither moves
/// the fingerprint. Checked on PostgreSQL 15 (docs/performance.md, \"The catalog
/// fingerprint\"). Only catalog tables are read: no relation lock.
///
/// Set-based, each catalog read once: the requested schemas are looked up once (`ns`); the
/// rows of the tables' own catalogs (columns, defaults, indexes, triggers, children) are one
/// list joined to the requested tables by one hash join on the table's OID, instead of one
/// join (an index probe per table) per catalog; and the rows are summed by schema OID (a hash
/// aggregate over the schemas) before the names are joined, instead of sorting every row by
/// schema. The sum does not depend on the order of the rows, so the values are those of the
/// query this replaced (compared for 10,000 schemas, docs/performance.md).
const FINGERPRINTS: &str = "/* tenant-audit:signals */
WITH ns AS (
    SELECT n.oid, n.nspname, n.xmin FROM pg_catalog.pg_namespace n WHERE n.nspname = ANY($1)
), rows(ns, k, x) AS (
    SELECT ns.oid, 0::bigint, ns.xmin FROM ns
  UNION ALL
    SELECT c.relnamespace, c.oid::bigint * 65536, c.xmin FROM pg_catalog.pg_class c JOIN ns ON ns.oid = c.relnamespace
  UNION ALL
    SELECT t.relnamespace, m.k, m.x
    FROM pg_catalog.pg_class t
    JOIN ns ON ns.oid = t.relnamespace
    JOIN (
        SELECT a.attrelid, a.attrelid::bigint * 65536 + a.attnum, a.xmin FROM pg_catalog.pg_attribute a WHERE a.attnum > 0
      UNION ALL
        SELECT d.adrelid, d.oid::bigint * 65536 + 1, d.xmin FROM pg_catalog.pg_attrdef d
      UNION ALL
        SELECT i.indrelid, i.indexrelid::bigint * 65536 + 2, i.xmin FROM pg_catalog.pg_index i
      UNION ALL
        SELECT g.tgrelid, g.oid::bigint * 65536 + 3, g.xmin FROM pg_catalog.pg_trigger g
      UNION ALL
        SELECT h.inhparent, h.inhrelid::bigint * 65536 + 4, h.xmin FROM pg_catalog.pg_inherits h
    ) m(rel, k, x) ON m.rel = t.oid
    WHERE t.relkind IN ('r', 'p')
  UNION ALL
    SELECT con.connamespace, con.oid::bigint * 65536 + 5, con.xmin
    FROM pg_catalog.pg_constraint con JOIN ns ON ns.oid = con.connamespace
  UNION ALL
    SELECT ty.typnamespace, ty.oid::bigint * 65536 + 6, ty.xmin FROM pg_catalog.pg_type ty JOIN ns ON ns.oid = ty.typnamespace
  UNION ALL
    SELECT p.pronamespace, p.oid::bigint * 65536 + 7, p.xmin FROM pg_catalog.pg_proc p JOIN ns ON ns.oid = p.pronamespace
)
SELECT n.nspname::text, f.rows, f.digest::text
FROM (
    SELECT r.ns, count(*)::bigint, pg_catalog.sum(pg_catalog.hashint8extended(r.k, r.x::text::bigint))
    FROM rows r GROUP BY r.ns
) f(ns, rows, digest)
JOIN ns n ON n.oid = f.ns";

/// Per top-level table of the requested schemas: the change counters summed over the table and
/// every partition or inheritance child under it (found through `pg_inherits`, which, unlike
/// `pg_partition_tree`, takes no relation lock), and a digest of their storage files. The
/// `pg_stat_get_*` functions read the shared statistics by OID and take no lock either. The
/// top-level tables are read once (`roots`, with their names and storage), each child's
/// storage as the tree descends, and the sums are taken per table OID before the names are
/// joined back: `pg_class` is scanned once, not once per join, and only the tree is sorted.
const TABLES: &str = "/* tenant-audit:signals */
WITH RECURSIVE roots AS (
    SELECT c.oid, n.nspname, c.relname, c.relfilenode
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND n.nspname = ANY($1)
), tree(root, rel, file) AS (
    SELECT r.oid, r.oid, r.relfilenode FROM roots r
  UNION ALL
    SELECT t.root, i.inhrelid, m.relfilenode
    FROM tree t JOIN pg_catalog.pg_inherits i ON i.inhparent = t.rel JOIN pg_catalog.pg_class m ON m.oid = i.inhrelid
), sums AS (
    SELECT t.root,
           pg_catalog.sum(pg_catalog.pg_stat_get_tuples_inserted(t.rel))::bigint AS inserted,
           pg_catalog.sum(pg_catalog.pg_stat_get_tuples_updated(t.rel))::bigint AS updated,
           pg_catalog.sum(pg_catalog.pg_stat_get_tuples_deleted(t.rel))::bigint AS deleted,
           pg_catalog.md5(pg_catalog.string_agg(t.rel::text || ':' || t.file::text, ',' ORDER BY t.rel)) AS storage
    FROM tree t GROUP BY t.root
)
SELECT r.nspname::text, r.relname::text, r.oid::bigint, s.inserted, s.updated, s.deleted, s.storage
FROM sums s JOIN roots r ON r.oid = s.root";

/// Reads the change signals of the tables of `schemas` and the catalog fingerprints of
/// `schemas` and `mentioned`. Call it before the catalog and any data are read, in the
/// catalog's snapshot.
pub async fn read(client: &impl GenericClient, schemas: &[String], mentioned: &[String]) -> Result<Signals, DbError> {
    let row = client.query_typed(EPOCH, &[]).await?.into_iter().next();
    let (epoch, in_recovery, track_counts, roles) = match row {
        Some(r) => (
            Epoch {
                database_oid: r.get(0),
                database_reset: r.get(1),
                cluster_reset: r.get(2),
                postmaster_start: r.get(3),
            },
            r.get(4),
            r.get(5),
            r.get::<_, Option<String>>(6).unwrap_or_default(),
        ),
        // No statistics row for the database: nothing to compare with.
        None => (
            Epoch { database_oid: 0, database_reset: None, cluster_reset: None, postmaster_start: String::new() },
            false,
            false,
            String::new(),
        ),
    };
    let mut tables: HashMap<String, HashMap<String, Signal>> = HashMap::new();
    for r in client.query_typed(TABLES, &[(&schemas, Type::TEXT_ARRAY)]).await? {
        let digest: String = r.get(6);
        let signal = Signal {
            oid: r.get(2),
            counters: Counters { inserted: r.get(3), updated: r.get(4), deleted: r.get(5) },
            storage: u64::from_str_radix(digest.get(..16).unwrap_or_default(), 16).unwrap_or_default(),
        };
        tables.entry(r.get(0)).or_default().insert(r.get(1), signal);
    }
    let all: Vec<&String> = schemas.iter().chain(mentioned).collect();
    let mut fingerprints = HashMap::new();
    for r in client.query_typed(FINGERPRINTS, &[(&all, Type::TEXT_ARRAY)]).await? {
        let mut digest = DefaultHasher::new();
        r.get::<_, String>(2).hash(&mut digest);
        fingerprints.insert(r.get(0), Fingerprint { rows: r.get(1), digest: digest.finish() });
    }
    Ok(Signals { epoch, in_recovery, track_counts, tables, fingerprints, roles, sequences: HashMap::new() })
}

/// How many sequences one statement of [`read_sequences`] reads: it holds an `AccessShareLock`
/// on each until it ends, so a batch stays within `max_locks_per_transaction`'s default (64).
pub const SEQUENCE_BATCH: usize = 64;

/// Reads the state of `sequences` (schema, name) into `signals`, [`SEQUENCE_BATCH`] per
/// statement, each in a short read-only transaction of its own. No statistics counter moves
/// with a sequence (`nextval` and `setval` write it in place), so its state is read itself:
/// one statement per batch instead of one per sequence-backed column. The batches run on up to
/// `scan.concurrency` sessions of `pool` at once, as tenants are scanned: each session takes the
/// next batch not yet taken, so a session that could not be opened leaves its share to the
/// others. A batch that fails (a sequence dropped meanwhile, no privilege) leaves its sequences
/// without a state: their tables are then checked. Fails only when no session could be opened
/// at all. Call it before any tenant's data is read: it returns when every batch has ended.
pub async fn read_sequences(
    pool: &db::Pool,
    target: &str,
    scan: &ScanConfig,
    sequences: &[(String, String)],
    signals: &mut Signals,
) -> Result<(), DbError> {
    let batches: Vec<&[(String, String)]> = sequences.chunks(SEQUENCE_BATCH).collect();
    let next = AtomicUsize::new(0);
    let worker = || async {
        let session = db::session(pool, target).await?;
        let mut states = Vec::new();
        while let Some(batch) = batches.get(next.fetch_add(1, Ordering::Relaxed)) {
            match read_batch(&session, scan, batch).await {
                Ok(read) => states.extend(read),
                Err(e) => {
                    tracing::debug!(error = %e, "sequence states left out; their tables are checked");
                    // A dead session leaves the remaining batches to the others.
                    if session.is_closed() {
                        break;
                    }
                }
            }
        }
        Ok::<_, DbError>(states)
    };
    let sessions = scan.concurrency.min(batches.len());
    let mut errors = Vec::new();
    let mut opened = false;
    for result in futures::future::join_all((0..sessions).map(|_| worker())).await {
        match result {
            Ok(states) => {
                opened = true;
                for ((schema, name), state) in states {
                    signals.sequences.entry(schema.clone()).or_default().insert(name.clone(), state);
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if !opened {
        return errors.into_iter().next().map_or(Ok(()), Err);
    }
    for e in errors {
        tracing::warn!(error = %e, "a session for the sequence states could not be opened; the others read its batches");
    }
    Ok(())
}

/// One batch of [`read_sequences`]: the states of `batch`'s sequences, in one statement in a
/// short read-only transaction of its own. A state that does not parse is left out.
async fn read_batch<'b>(
    client: &tokio_postgres::Client,
    scan: &ScanConfig,
    batch: &'b [(String, String)],
) -> Result<Vec<(&'b (String, String), Sequence)>, DbError> {
    let sql = batch
        .iter()
        .enumerate()
        .map(|(i, (schema, name))| {
            format!("SELECT {i}, s.last_value, s.is_called FROM {} s", sql::qualified(schema, name))
        })
        .collect::<Vec<_>>()
        .join("\nUNION ALL ");
    let rows = db::read_only(client, scan, &format!("/* tenant-audit:signals */ {sql}"), db::Parallel::Serial).await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            let (Some(Some(i)), Some(Some(last)), Some(Some(called))) = (row.first(), row.get(1), row.get(2)) else {
                return None;
            };
            let sequence = i.parse::<usize>().ok().and_then(|i| batch.get(i))?;
            Some((sequence, Sequence { last_value: last.parse().ok()?, is_called: called == "t" }))
        })
        .collect())
}

/// Which schemas' catalog a scan reads, and the catalogs it takes from the previous scans.
#[derive(Debug, Default)]
pub struct CatalogPlan {
    pub reuse: BTreeMap<String, Arc<Schema>>,
    pub read: Vec<String>,
}

/// A schema's catalog as a scan read it, and the fingerprint it was read at.
#[derive(Debug)]
struct StoredSchema {
    fingerprint: Fingerprint,
    schema: Arc<Schema>,
}

/// The other schemas a schema's catalog names (foreign-key targets, types, sequences): their
/// DDL (a renamed table or type) changes what the catalog reads for this schema.
fn mentioned_by(schema: &Schema) -> BTreeSet<&str> {
    let mut out = BTreeSet::new();
    for table in schema.tables.values() {
        for fk in &table.foreign_keys {
            if let SchemaRef::Other(s) = &fk.target_schema {
                out.insert(s.as_str());
            }
        }
        for c in &table.columns {
            if let TypeSchema::Other(s) = &c.type_schema {
                out.insert(s.as_str());
            }
            if let Some((SchemaRef::Other(s), _)) = &c.sequence {
                out.insert(s.as_str());
            }
        }
    }
    out
}

/// What one tenant table's findings were computed from, and the findings.
#[derive(Debug)]
struct Unit {
    inputs: u64,
    computed_at: DateTime<Utc>,
    findings: Vec<Finding>,
}

/// What one tenant's findings were computed from besides its own catalog and the scan's
/// context: the relations its checks read and the sequences they read. Relative to the tenant
/// (its own tables are [`SchemaRef::Own`]), so that identical tenants have equal reads, which
/// [`State`] stores once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Reads {
    relations: Vec<(SchemaRef, String)>,
    sequences: Vec<String>,
}

impl Reads {
    /// The reads of `plan` (taken before any check is left out of it).
    pub fn of(plan: &Plan, tenant: &str) -> Reads {
        let mut relations: Vec<(SchemaRef, String)> = plan
            .tables
            .iter()
            .flat_map(|u| u.relations(tenant))
            .map(|(schema, table)| {
                let schema = if schema == tenant { SchemaRef::Own } else { SchemaRef::Other(schema.to_string()) };
                (schema, table.to_string())
            })
            .collect();
        relations.sort();
        relations.dedup();
        let sequences = plan.tables.iter().flat_map(|u| u.sequences.iter().map(|p| p.sequence.clone())).collect();
        Reads { relations, sequences }
    }
}

/// A whole tenant's last result: every finding of the tenant (its catalog checks' included),
/// valid while its inputs hash (see [`tenant_inputs`]) stays the same.
#[derive(Debug)]
struct Memo {
    inputs: u64,
    reads: Arc<Reads>,
    findings: Vec<Finding>,
    /// Its tables with data checks, and when the oldest of their results was computed.
    tables: usize,
    oldest: DateTime<Utc>,
}

/// What a tenant carried forward whole: its findings, its tables with data checks and the
/// time its oldest result was computed.
pub type Carried<'a> = (&'a [Finding], usize, DateTime<Utc>);

/// The hash of everything a tenant's findings are a function of, given what its checks read
/// (`reads`): the scan's `context` (reference shape, tenant set, configuration), the tenant's
/// catalog fingerprint and those of the schemas it names, the signals and catalog fingerprints
/// of every relation it reads and the state of every sequence it reads. `None` when one of them
/// is missing (nothing to compare with).
pub fn tenant_inputs(context: u64, tenant: &str, catalog: &Catalog, reads: &Reads, signals: &Signals) -> Option<u64> {
    let mut h = DefaultHasher::new();
    context.hash(&mut h);
    signals.fingerprints.get(tenant)?.hash(&mut h);
    if let Some(schema) = catalog.schemas.get(tenant) {
        for other in mentioned_by(schema) {
            (other, signals.fingerprints.get(other)).hash(&mut h);
        }
    }
    for (schema, table) in &reads.relations {
        let schema = match schema {
            SchemaRef::Own => tenant,
            SchemaRef::Other(other) => other.as_str(),
        };
        (schema, table, signals.fingerprints.get(schema)?).hash(&mut h);
        signals.table(schema, table)?.hash(&mut h);
    }
    for sequence in &reads.sequences {
        signals.sequence(tenant, sequence)?.hash(&mut h);
    }
    Some(h.finish())
}

/// The hash of what every tenant's findings depend on besides its own catalog and data: the
/// reference shape, the set of tenants (a foreign key into another tenant), and the catalog
/// fingerprints of `schemas` (the shared and reference schemas).
pub fn context(signals: &Signals, shape: &Shape, tenants: &BTreeSet<String>, schemas: &[&str]) -> u64 {
    let mut h = DefaultHasher::new();
    format!("{shape:?}").hash(&mut h);
    tenants.hash(&mut h);
    for schema in schemas {
        (schema, signals.fingerprints.get(*schema)).hash(&mut h);
    }
    h.finish()
}

/// The state the daemon keeps between scans: stored findings per unit and the last counters
/// per table OID (to notice counters going backwards).
#[derive(Debug, Default)]
pub struct State {
    epoch: Option<Epoch>,
    last_full: Option<DateTime<Utc>>,
    counters: HashMap<i64, Counters>,
    units: HashMap<String, HashMap<String, Unit>>,
    /// The catalog of every schema the last scan knew, interned, with its fingerprint.
    catalog: HashMap<String, StoredSchema>,
    /// The fingerprints the last scan read (mentioned schemas included) and its roles digest.
    fingerprints: HashMap<String, Fingerprint>,
    roles: Option<String>,
    interner: Interner,
    /// Per tenant, its whole last result (tenants whose inputs did not change are not even
    /// planned).
    memos: HashMap<String, Memo>,
    /// The distinct [`Reads`] of the memos: identical tenants share one.
    reads: HashSet<Arc<Reads>>,
}

impl State {
    /// The schemas besides `requested` whose fingerprints the next scan needs: those the stored
    /// catalogs mention.
    pub fn mentioned(&self, requested: &[String]) -> Vec<String> {
        let requested: BTreeSet<&str> = requested.iter().map(String::as_str).collect();
        let mut out: BTreeSet<&str> = BTreeSet::new();
        for stored in self.catalog.values() {
            out.extend(mentioned_by(&stored.schema).into_iter().filter(|s| !requested.contains(s)));
        }
        out.into_iter().map(str::to_string).collect()
    }

    /// Which of `tenants` must have their catalog read by a scan of `kind` that read `signals`,
    /// and the stored catalogs of the others: a tenant's stored catalog is reused when its
    /// fingerprint is the one it was read at, no schema it mentions changed, and neither the
    /// shared schema nor the roles changed. A full scan reads everything.
    pub fn catalog_plan(&self, signals: &Signals, kind: ScanKind, tenants: &[String], shared: &str) -> CatalogPlan {
        let unchanged = |schema: &str| {
            signals.fingerprints.get(schema).is_some_and(|now| self.fingerprints.get(schema) == Some(now))
        };
        let everything = kind == ScanKind::Full || self.roles.as_ref() != Some(&signals.roles) || !unchanged(shared);
        let mut plan = CatalogPlan::default();
        for tenant in tenants {
            let stored = self.catalog.get(tenant).filter(|stored| {
                !everything
                    && signals.fingerprints.get(tenant) == Some(&stored.fingerprint)
                    && mentioned_by(&stored.schema).into_iter().all(unchanged)
            });
            match stored {
                Some(stored) => {
                    plan.reuse.insert(tenant.clone(), Arc::clone(&stored.schema));
                }
                None => plan.read.push(tenant.clone()),
            }
        }
        plan
    }

    /// The interner the catalog reads of this state go through.
    pub fn interner(&mut self) -> &mut Interner {
        &mut self.interner
    }

    /// Records the catalog a scan that read `signals` ended up with (read or reused; the
    /// schemas whose read failed are absent and so read again next time).
    pub fn store_catalog(&mut self, signals: &Signals, catalog: &Catalog) {
        self.catalog = catalog
            .schemas
            .iter()
            .filter_map(|(name, schema)| {
                let fingerprint = signals.fingerprints.get(name)?.clone();
                Some((name.clone(), StoredSchema { fingerprint, schema: Arc::clone(schema) }))
            })
            .collect();
        self.fingerprints = signals.fingerprints.clone();
        self.roles = Some(signals.roles.clone());
        self.interner.release_unused();
        self.reads.retain(|r| Arc::strong_count(r) > 1);
    }
    /// Decides the kind of the scan that read `signals` at `now`, and records the signals for
    /// the next decision. A full scan forgets every stored unit.
    pub fn begin(&mut self, signals: &Signals, now: DateTime<Utc>, full_every: Duration) -> ScanKind {
        let went_backwards = signals
            .all_tables()
            .any(|s| self.counters.get(&s.oid).is_some_and(|before| s.counters.went_backwards_from(before)));
        let due = self.last_full.map_or(true, |at| (now - at).to_std().unwrap_or_default() >= full_every);
        let kind = if due
            || went_backwards
            || signals.in_recovery
            || !signals.track_counts
            || self.epoch.as_ref() != Some(&signals.epoch)
        {
            ScanKind::Full
        } else {
            ScanKind::Incremental
        };
        if kind == ScanKind::Full {
            self.units.clear();
            self.memos.clear();
        }
        // Untrusted signals also make the next scan full: a standby promoted meanwhile (same
        // epoch) never counted the writes it replayed.
        let trusted = !signals.in_recovery && signals.track_counts;
        self.epoch = trusted.then(|| signals.epoch.clone());
        self.counters = signals.all_tables().map(|s| (s.oid, s.counters)).collect();
        kind
    }

    /// Records that a full scan begun at `started_at` completed.
    pub fn full_scan_completed(&mut self, started_at: DateTime<Utc>) {
        self.last_full = Some(started_at);
    }

    /// Keeps only the tenants in `present` (dropped tenants are forgotten).
    pub fn retain_tenants(&mut self, present: &std::collections::BTreeSet<String>) {
        self.units.retain(|t, _| present.contains(t));
        self.memos.retain(|t, _| present.contains(t));
    }

    /// Forgets everything stored about `tenant` (it failed as a whole).
    pub fn forget_tenant(&mut self, tenant: &str) {
        self.units.remove(tenant);
        self.memos.remove(tenant);
    }

    /// The whole last result of `tenant`, if its inputs are still the ones it was computed from.
    pub fn carried_tenant(
        &self,
        context: u64,
        tenant: &str,
        catalog: &Catalog,
        signals: &Signals,
    ) -> Option<Carried<'_>> {
        let memo = self.memos.get(tenant)?;
        let now = tenant_inputs(context, tenant, catalog, &memo.reads, signals)?;
        (now == memo.inputs).then_some((memo.findings.as_slice(), memo.tables, memo.oldest))
    }

    /// Stores the whole result of `tenant`, computed from `inputs` (see [`tenant_inputs`]).
    pub fn store_tenant(
        &mut self,
        tenant: &str,
        inputs: u64,
        reads: Reads,
        findings: Vec<Finding>,
        tables: usize,
        oldest: DateTime<Utc>,
    ) {
        let reads = match self.reads.get(&reads) {
            Some(stored) => Arc::clone(stored),
            None => {
                let stored = Arc::new(reads);
                self.reads.insert(Arc::clone(&stored));
                stored
            }
        };
        self.memos.insert(tenant.to_string(), Memo { inputs, reads, findings, tables, oldest });
    }

    /// Forgets the whole result of `tenant` (part of it is being recomputed).
    pub fn forget_memo(&mut self, tenant: &str) {
        self.memos.remove(tenant);
    }

    /// Stores the findings of `table` in `tenant`, computed from `inputs` by the scan begun at
    /// `computed_at`.
    pub fn store(
        &mut self,
        tenant: &str,
        table: &str,
        inputs: u64,
        computed_at: DateTime<Utc>,
        findings: Vec<Finding>,
    ) {
        let tenant_units = self.units.entry(tenant.to_string()).or_default();
        tenant_units.insert(table.to_string(), Unit { inputs, computed_at, findings });
    }

    /// The stored findings of `table` in `tenant` and when they were computed, if its inputs
    /// are still `inputs`.
    pub fn carried(&self, tenant: &str, table: &str, inputs: u64) -> Option<(&[Finding], DateTime<Utc>)> {
        let unit = self.units.get(tenant)?.get(table)?;
        (unit.inputs == inputs).then_some((unit.findings.as_slice(), unit.computed_at))
    }

    /// Keeps the stored units of `tenant` whose table satisfies `keep` (the others were dropped,
    /// have no data checks any more or cannot be compared).
    pub fn retain_tables(&mut self, tenant: &str, keep: impl Fn(&str) -> bool) {
        if let Some(units) = self.units.get_mut(tenant) {
            units.retain(|t, _| keep(t));
        }
    }

    /// Forgets the stored findings of one table (its checks failed).
    pub fn forget_table(&mut self, tenant: &str, table: &str) {
        if let Some(units) = self.units.get_mut(tenant) {
            units.remove(table);
        }
    }
}

/// Hashes of the catalog entry and signal of tables outside the tenants (the shared schema's,
/// a declared schema's), which every tenant's units read: computed once per scan.
#[derive(Debug, Default)]
pub struct SharedTables(HashMap<(String, String), Option<u64>>);

/// The hash of one table's catalog entry and change signal; `None` when it has no signal (it
/// appeared after the signals were read).
fn table_hash(catalog: &Catalog, signals: &Signals, schema: &str, name: &str) -> Option<u64> {
    let signal = signals.table(schema, name)?;
    let mut h = DefaultHasher::new();
    (schema, name).hash(&mut h);
    format!("{:?}", catalog.table(schema, name)).hash(&mut h);
    signal.hash(&mut h);
    Some(h.finish())
}

/// The inputs hash of every unit of one tenant's plan, by table; `None` for a table whose
/// inputs cannot be established (a signal is missing: the table or a parent appeared after the
/// signals were read), which is then always checked.
pub fn unit_inputs(
    plan: &Plan,
    tenant: &str,
    catalog: &Catalog,
    signals: &Signals,
    shared: &mut SharedTables,
) -> BTreeMap<String, Option<u64>> {
    let mut own: HashMap<&str, Option<u64>> = HashMap::new();
    plan.tables
        .iter()
        .filter(|unit| unit.has_checks())
        .map(|unit| {
            let mut h = DefaultHasher::new();
            format!("{:?}", (&unit.relation, &unit.orphans, &unit.nulls, &unit.sequences)).hash(&mut h);
            let mut complete = true;
            for probe in &unit.sequences {
                match signals.sequence(tenant, &probe.sequence) {
                    Some(state) => state.hash(&mut h),
                    None => complete = false,
                }
            }
            for (schema, name) in unit.relations(tenant) {
                let hash = if schema == tenant {
                    *own.entry(name).or_insert_with(|| table_hash(catalog, signals, schema, name))
                } else {
                    *shared
                        .0
                        .entry((schema.to_string(), name.to_string()))
                        .or_insert_with(|| table_hash(catalog, signals, schema, name))
                };
                match hash {
                    Some(x) => x.hash(&mut h),
                    None => complete = false,
                }
            }
            (unit.table.clone(), complete.then(|| h.finish()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signals(epoch: &str, counters: &[(i64, i64)]) -> Signals {
        let tables = counters
            .iter()
            .map(|&(oid, inserted)| {
                let s = Signal { oid, counters: Counters { inserted, updated: 0, deleted: 0 }, storage: 1 };
                (oid.to_string(), s)
            })
            .collect();
        let tables = HashMap::from([("t".to_string(), tables)]);
        Signals {
            epoch: Epoch {
                database_oid: 1,
                database_reset: Some(epoch.into()),
                cluster_reset: None,
                postmaster_start: "s".into(),
            },
            in_recovery: false,
            track_counts: true,
            tables,
            fingerprints: HashMap::new(),
            roles: String::new(),
            sequences: HashMap::new(),
        }
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(seconds, 0).expect("valid time")
    }

    #[test]
    fn first_scan_is_full_then_incremental_until_full_every() {
        let hour = Duration::from_secs(3600);
        let mut state = State::default();
        assert_eq!(state.begin(&signals("a", &[(1, 5)]), at(0), hour), ScanKind::Full);
        // A full scan that did not complete leaves the next one full too.
        assert_eq!(state.begin(&signals("a", &[(1, 5)]), at(10), hour), ScanKind::Full);
        state.full_scan_completed(at(10));
        assert_eq!(state.begin(&signals("a", &[(1, 6)]), at(20), hour), ScanKind::Incremental);
        assert_eq!(state.begin(&signals("a", &[(1, 6)]), at(3609), hour), ScanKind::Incremental);
        assert_eq!(state.begin(&signals("a", &[(1, 6)]), at(3610), hour), ScanKind::Full);
    }

    #[test]
    fn doubtful_signals_make_the_scan_full() {
        let hour = Duration::from_secs(3600);
        let mut state = State::default();
        state.begin(&signals("a", &[(1, 5)]), at(0), hour);
        state.full_scan_completed(at(0));
        state.store("t1", "x", 7, at(0), Vec::new());
        // Counters going backwards (a reset the epoch did not show).
        assert_eq!(state.begin(&signals("a", &[(1, 4)]), at(1), hour), ScanKind::Full);
        assert!(state.carried("t1", "x", 7).is_none(), "a full scan forgets stored units");
        state.full_scan_completed(at(1));
        // Another epoch (stats_reset moved).
        assert_eq!(state.begin(&signals("b", &[(1, 4)]), at(2), hour), ScanKind::Full);
        state.full_scan_completed(at(2));
        let mut standby = signals("b", &[(1, 4)]);
        standby.in_recovery = true;
        assert_eq!(state.begin(&standby, at(3), hour), ScanKind::Full);
        // The first scan after a standby's scan is full too (a promotion keeps the epoch).
        assert_eq!(state.begin(&signals("b", &[(1, 4)]), at(4), hour), ScanKind::Full);
        state.full_scan_completed(at(4));
        let mut untracked = signals("b", &[(1, 4)]);
        untracked.track_counts = false;
        assert_eq!(state.begin(&untracked, at(5), hour), ScanKind::Full);
        assert_eq!(state.begin(&signals("b", &[(1, 4)]), at(6), hour), ScanKind::Full);
        state.full_scan_completed(at(6));
        assert_eq!(state.begin(&signals("b", &[(1, 4)]), at(7), hour), ScanKind::Incremental);
    }
}
