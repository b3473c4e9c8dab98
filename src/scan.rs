//! One scan: discovery -> catalog -> checks -> report.
//!
//! Invariants: discovery and the catalog come from one read-only snapshot (catalog tables only:
//! no tenant relation is locked). The data checks run one table at a time, each table's
//! [`TableWork`] as one statement in a short read-only transaction of its own, so a session
//! holds locks only on the relations of the statement it is running, and a relationship's child
//! and parent are read in one snapshot. At most `scan.concurrency` tenants are scanned at a time.
//! A failing table or tenant is recorded in the report and never fails the scan: a locked table
//! is that table's `timeout`, a terminated session fails the tenant it was serving, a statement
//! cancelled by a recovery conflict is retried [`CONFLICT_RETRIES`] times. Only failures that
//! leave nothing to scan (no connection, no discovery, no catalog of the shared schema) do.
//!
//! Sharding (`[shard]`): every shard reads the whole catalog and builds the reference shape from
//! all tenants (so drift verdicts agree), checks and reports only the tenants it owns
//! ([`crate::shard::Shard::owns`]), and only shard 0 reports the registry's findings and the
//! shared schema's errors: summed over the shards, every finding counts once.
//!
//! With an incremental state ([`run_with`]) the change signals are read in the catalog
//! snapshot, before any data, and a table's data checks (orphans, NULL timestamps, its sequences)
//! are left out when its stored findings are still valid (see [`incremental`]); each tenant is planned only when
//! its turn comes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use chrono::Utc;
use futures::stream::{self, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::catalog::{self, Catalog, ChunkFailure};
use crate::checks::work::{self, Item};
use crate::checks::{self, Context, Shape, TableWork};
use crate::config::{Config, ScanConfig};
use crate::db::{self, DbError, Pool, Session};
use crate::incremental::{self, Signals};
use crate::report::{
    Check, Detail, ErrorKind, Finding, Report, ScanError, ScanKind, ScanSummary, TenantCounts, REPORT_VERSION,
};
use crate::sql;
use crate::tenants::{self, Discovery, DiscoveryError};

/// How many times a statement cancelled by a recovery conflict (on a standby) is tried again
/// before its table is reported as a `conflict` error.
pub const CONFLICT_RETRIES: usize = 3;

/// Failures that stop a scan before any tenant is looked at.
#[derive(Debug, thiserror::Error)]
pub enum ScanFailure {
    #[error(transparent)]
    Connect(DbError),
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error("cannot read the catalog: {0}")]
    Catalog(DbError),
    #[error("reference schema {0:?} (tenants.reference_schema) does not exist or has no tables")]
    NoReference(String),
    #[error("lost the database connection during the scan ({tenants} tenants affected): {message}")]
    ConnectionLost { tenants: usize, message: String },
    #[error("the scan was cancelled")]
    Cancelled,
    #[error("the scan did not finish within scan.max_duration ({}); its statements were cancelled", humantime::format_duration(*.0))]
    Deadline(std::time::Duration),
}

impl ScanFailure {
    /// The database error behind it, if there is one.
    fn db_error(&self) -> Option<&DbError> {
        match self {
            ScanFailure::Connect(e) | ScanFailure::Catalog(e) => Some(e),
            ScanFailure::Discovery(e) => e.db_error(),
            _ => None,
        }
    }

    /// Whether the scan failed because the database went away (or was never reached).
    pub fn is_connection(&self) -> bool {
        matches!(self, ScanFailure::Connect(_) | ScanFailure::ConnectionLost { .. })
    }

    /// The `kind` label of `tenant_audit_scan_errors_total` for this failure.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ScanFailure::Connect(_) | ScanFailure::ConnectionLost { .. } => ErrorKind::Connection.name(),
            ScanFailure::Discovery(_) => "discovery",
            ScanFailure::Catalog(_) => "catalog",
            ScanFailure::NoReference(_) => "config",
            ScanFailure::Cancelled => "cancelled",
            ScanFailure::Deadline(_) => "deadline",
        }
    }
}

/// A finished scan: the report, plus the catalog and reference shape it was computed from
/// (which heal plans its repairs with).
pub struct Scanned {
    pub report: Report,
    pub catalog: Catalog,
    pub shape: Shape,
}

/// Called after each tenant with (tenants done, tenants in all).
pub type Progress<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// Runs one full scan of the database behind `pool`. Cancelling `cancel` stops it: running queries
/// are cancelled on the server and the scan returns [`ScanFailure::Cancelled`]. After
/// `scan.max_duration` the same happens and the scan fails with [`ScanFailure::Deadline`]:
/// running statements get a cancel request each, the scan `scan.connect_timeout` more to wind
/// down (a frozen server answers neither), then it is dropped with its sessions.
pub async fn run(
    config: &Config,
    pool: &Pool,
    cancel: &CancellationToken,
    progress: Option<Progress<'_>>,
) -> Result<Scanned, ScanFailure> {
    run_with(config, pool, cancel, progress, None).await
}

/// Like [`run`], keeping `state` between scans: the orphan and NULL-timestamp checks of a table
/// run only when it or a table they read may have changed since `state` was updated (see
/// [`incremental`]); the others' findings are carried forward. Without a state every scan is
/// full.
pub async fn run_with(
    config: &Config,
    pool: &Pool,
    cancel: &CancellationToken,
    progress: Option<Progress<'_>>,
    state: Option<&mut incremental::State>,
) -> Result<Scanned, ScanFailure> {
    let stop = cancel.child_token();
    // Boxed so that it can be dropped (with its sessions) before the idle ones are closed.
    let mut scan = Box::pin(run_until(config, pool, &stop, progress, state));
    tokio::select! {
        result = &mut scan => return result,
        _ = tokio::time::sleep(config.scan.max_duration) => {}
    }
    tracing::warn!(
        max_duration_seconds = config.scan.max_duration.as_secs_f64(),
        "scan deadline reached; cancelling it"
    );
    stop.cancel();
    let _ = tokio::time::timeout(config.scan.connect_timeout, &mut scan).await;
    drop(scan);
    // Sessions that went back to the pool while their statement still ran must not be reused.
    db::drop_idle_sessions(pool);
    Err(ScanFailure::Deadline(config.scan.max_duration))
}

async fn run_until(
    config: &Config,
    pool: &Pool,
    cancel: &CancellationToken,
    progress: Option<Progress<'_>>,
    mut state: Option<&mut incremental::State>,
) -> Result<Scanned, ScanFailure> {
    let started_at = Utc::now();
    let clock = Instant::now();
    let target = &config.database.target;
    let Snapshot { discovery, catalog, present, chunk_failures, standby, mut signals, kind } = tokio::select! {
        snapshot = read_snapshot(config, pool, state.as_deref_mut(), started_at) => snapshot?,
        _ = cancel.cancelled() => return Err(ScanFailure::Cancelled),
    };
    let mut errors = Vec::new();
    let mut tenants = BTreeSet::new();
    // Every present tenant shapes the reference and the checks' view of the database; only
    // this shard's own tenants are checked and reported (see [`crate::shard`]).
    let shard = config.shard;
    for tenant in &discovery.tenants {
        let owned = shard.owns(tenant);
        if let Some(failure) = chunk_failures.iter().find(|f| f.schemas.contains(tenant)) {
            if owned {
                errors.push(ScanError {
                    kind: classify(&failure.error),
                    schema: Some(tenant.clone()),
                    table: None,
                    message: format!("cannot read the catalog: {}", failure.error),
                });
            }
        } else if present.contains(tenant) {
            tenants.insert(tenant.clone());
        } else if owned {
            errors.push(dropped(tenant));
        }
    }
    let reference_schema = config.tenants.reference_schema.as_deref();
    if let Some(name) = reference_schema {
        if !catalog.schemas.contains_key(name) {
            return Err(ScanFailure::NoReference(name.to_string()));
        }
    }
    let shape = Shape::build(&catalog, &tenants, &config.tenants.shared_schema, reference_schema);
    let ctx = Context {
        catalog: &catalog,
        tenants: &tenants,
        shared_schema: &config.tenants.shared_schema,
        reference: &shape,
        config: &config.checks,
        same_entity_keys: &config.heal.same_entity_keys,
    };

    let owned: BTreeSet<String> = tenants.iter().filter(|t| shard.owns(t)).cloned().collect();
    let database_wide = shard.reports_database_findings();
    let findings = if database_wide { registry_findings(&discovery) } else { Vec::new() };
    errors.extend(unreadable_tables(&catalog, &owned, database_wide.then_some(config.tenants.shared_schema.as_str())));
    // The sequences' states are signals too: read after the catalog, before any tenant's data.
    if let Some(signals) = signals.as_mut() {
        let sequences = tenant_sequences(&catalog, &owned);
        tokio::select! {
            read = incremental::read_sequences(pool, target, &config.scan, &sequences, signals) => {
                read.map_err(ScanFailure::Connect)?
            }
            _ = cancel.cancelled() => return Err(ScanFailure::Cancelled),
        }
    }
    let context = signals.as_ref().map(|signals| {
        let schemas: Vec<&str> =
            [Some(config.tenants.shared_schema.as_str()), reference_schema].into_iter().flatten().collect();
        incremental::context(signals, &shape, &tenants, &schemas)
    });

    let total = owned.len();
    let discovered = discovery.tenants.iter().filter(|t| shard.owns(t)).count();
    let samples = config.report.sample_keys;
    if let Some(state) = state.as_deref_mut() {
        state.retain_tenants(&owned);
    }
    // Each tenant is planned (and its carried-forward findings taken) only when its turn comes,
    // so that at most `scan.concurrency` plans exist at a time. The plan and the tenant's name
    // are owned values, so the stream's closure borrows nothing per item (which keeps the
    // whole scan future `Send` for callers that spawn it). The closure and the loop below take
    // turns on the shared part, never at once.
    let shared = std::sync::Mutex::new(Progressive {
        state,
        shared: Default::default(),
        tally: Tally::default(),
        findings,
        errors,
    });
    let mut done = 0;
    {
        let lock = || shared.lock().unwrap_or_else(|e| e.into_inner());
        let outcomes = stream::iter(owned.iter().cloned())
            .map(|tenant: String| {
                let turn = Turn { kind, signals: signals.as_ref(), context, standby, started_at };
                let (plan, unit) = prepare(&ctx, &tenant, &turn, &mut lock());
                async move {
                    let outcome = scan_tenant(pool, target, &config.scan, &tenant, plan, samples, cancel).await;
                    (tenant, unit, outcome)
                }
            })
            .buffer_unordered(config.scan.concurrency);
        let mut outcomes = std::pin::pin!(outcomes);
        while let Some((tenant, unit, (tenant_findings, tenant_errors))) = outcomes.next().await {
            let mut progressive = lock();
            if let Some(state) = progressive.state.as_deref_mut() {
                remember(state, &tenant, &unit, &tenant_findings, &tenant_errors, started_at);
            }
            progressive.findings.extend(unit.known);
            progressive.findings.extend(tenant_findings);
            progressive.errors.extend(tenant_errors);
            drop(progressive);
            done += 1;
            if let Some(report_progress) = progress {
                report_progress(done, total);
            }
        }
    }
    let Progressive { state, tally, mut findings, mut errors, .. } =
        shared.into_inner().unwrap_or_else(|e| e.into_inner());
    if cancel.is_cancelled() {
        return Err(ScanFailure::Cancelled);
    }
    // Without a connection the results are partial: fail the scan rather than report tenants
    // as clean that were never read.
    let lost: Vec<&ScanError> = errors.iter().filter(|e| e.kind == ErrorKind::Connection).collect();
    if let Some(first) = lost.first() {
        return Err(ScanFailure::ConnectionLost { tenants: lost.len(), message: first.message.clone() });
    }

    findings
        .sort_by(|a, b| (a.check, &a.schema, &a.table, &a.columns).cmp(&(b.check, &b.schema, &b.table, &b.columns)));
    errors.sort_by(|a, b| (&a.schema, &a.table, a.kind).cmp(&(&b.schema, &b.table, b.kind)));
    let failed: BTreeSet<&String> = errors
        .iter()
        .filter(|e| e.kind != ErrorKind::Skipped)
        .filter_map(|e| e.schema.as_ref())
        .filter(|s| discovery.tenants.contains(*s))
        .collect();
    let report = Report {
        version: REPORT_VERSION,
        database: target.clone(),
        started_at,
        finished_at: Utc::now(),
        duration_seconds: clock.elapsed().as_secs_f64(),
        reference_schema: reference_schema.map(str::to_string),
        tenants: TenantCounts { discovered, scanned: discovered - failed.len(), failed: failed.len() },
        scan: ScanSummary {
            kind,
            tables_checked: tally.checked,
            tables_carried_forward: tally.carried,
            oldest_carried_forward_at: tally.oldest,
        },
        summary: Report::summarize(&findings),
        findings,
        errors,
    };
    if let (ScanKind::Full, Some(state)) = (kind, state) {
        state.full_scan_completed(started_at);
    }
    tracing::info!(
        database = %report.database,
        scan_kind = kind.name(),
        tables_checked = tally.checked,
        tables_carried_forward = tally.carried,
        tenants = report.tenants.discovered,
        failed = report.tenants.failed,
        findings = report.findings.len(),
        errors = report.errors.len(),
        duration_seconds = report.duration_seconds,
        "scan finished"
    );
    Ok(Scanned { report, catalog, shape })
}

/// What the scan learns before any data check: discovery and the catalog (from one read-only
/// snapshot), the catalog chunks that failed, which tenants still exist once the catalog has
/// been read (a tenant dropped meanwhile has tables missing from the catalog), and whether the
/// server is a standby.
struct Snapshot {
    discovery: Discovery,
    catalog: Catalog,
    present: BTreeSet<String>,
    chunk_failures: Vec<ChunkFailure>,
    standby: bool,
    /// The change signals, read before the catalog (only for incremental scans).
    signals: Option<Signals>,
    /// What the incremental state made of the signals (full without a state).
    kind: ScanKind,
}

async fn read_snapshot(
    config: &Config,
    pool: &Pool,
    state: Option<&mut incremental::State>,
    started_at: chrono::DateTime<Utc>,
) -> Result<Snapshot, ScanFailure> {
    let mut session = db::session(pool, &config.database.target).await.map_err(ScanFailure::Connect)?;
    let client: &mut tokio_postgres::Client = &mut session;
    let result = snapshot(client, config, state, started_at).await;
    // Whatever failed, a dead connection (or a server shutting down) means the database went
    // away: a connection failure, not a discovery or catalog one.
    match result {
        Err(e) if client.is_closed() || e.db_error().is_some_and(DbError::is_connection) => {
            Err(ScanFailure::Connect(DbError::Connect {
                target: config.database.target.clone(),
                reason: e.to_string(),
            }))
        }
        other => other,
    }
}

async fn snapshot(
    client: &mut tokio_postgres::Client,
    config: &Config,
    mut state: Option<&mut incremental::State>,
    started_at: chrono::DateTime<Utc>,
) -> Result<Snapshot, ScanFailure> {
    let catalog_error = |e: tokio_postgres::Error| ScanFailure::Catalog(e.into());
    let mut tx = db::begin_scan(client, &config.scan).await.map_err(ScanFailure::Catalog)?;
    let discovery = tenants::discover(&tx, &config.tenants).await?;
    let mut required = vec![config.tenants.shared_schema.clone()];
    required.extend(config.tenants.reference_schema.clone());
    // The signals are read before the catalog and before any tenant's data: a change that
    // lands after this point is counted in the next scan's signals. The catalog fingerprints
    // are read with them, in the same snapshot as the catalog itself.
    let signals = match state.as_deref() {
        Some(state) => {
            let mut schemas = discovery.tenants.clone();
            schemas.extend(required.iter().cloned());
            let mentioned = state.mentioned(&schemas);
            Some(incremental::read(&tx, &schemas, &mentioned).await.map_err(ScanFailure::Catalog)?)
        }
        None => None,
    };
    let kind = match (state.as_deref_mut(), &signals) {
        (Some(state), Some(signals)) => state.begin(signals, started_at, config.scan.full_every),
        _ => ScanKind::Full,
    };
    // Only the tenants whose catalog may have changed are read (all of them without a state
    // or in a full scan); the shared and reference schemas always are.
    let mut scratch = catalog::Interner::default();
    let plan = match (state.as_deref(), &signals) {
        (Some(state), Some(signals)) => {
            state.catalog_plan(signals, kind, &discovery.tenants, &config.tenants.shared_schema)
        }
        _ => incremental::CatalogPlan { reuse: Default::default(), read: discovery.tenants.clone() },
    };
    let interner = match state.as_deref_mut() {
        Some(state) => state.interner(),
        None => &mut scratch,
    };
    let (mut catalog, chunk_failures) =
        catalog::read(&mut tx, &required, &plan.read, interner).await.map_err(ScanFailure::Catalog)?;
    for (name, schema) in plan.reuse {
        catalog.schemas.entry(name).or_insert(schema);
    }
    if let (Some(state), Some(signals)) = (state, &signals) {
        state.store_catalog(signals, &catalog);
    }
    let standby: bool =
        tx.query_typed_one("SELECT pg_catalog.pg_is_in_recovery()", &[]).await.map_err(catalog_error)?.get(0);
    tx.commit().await.map_err(catalog_error)?;
    // A transaction of its own (a fresh snapshot) that sees the drops committed meanwhile.
    let tx = db::begin_scan(client, &config.scan).await.map_err(ScanFailure::Catalog)?;
    let present = tenants::still_present(&tx, &discovery.tenants).await.map_err(ScanFailure::Catalog)?;
    tx.commit().await.map_err(catalog_error)?;
    Ok(Snapshot { discovery, catalog, present, chunk_failures, standby, signals, kind })
}

/// What the tenants' turns add up as the scan goes: the incremental state, the hashes of the
/// shared tables, the tally, the findings and the errors.
struct Progressive<'s> {
    state: Option<&'s mut incremental::State>,
    shared: incremental::SharedTables,
    tally: Tally,
    findings: Vec<Finding>,
    errors: Vec<ScanError>,
}

/// What every tenant's turn of one scan shares.
struct Turn<'a> {
    kind: ScanKind,
    signals: Option<&'a Signals>,
    /// The hash of what all tenants depend on (see [`incremental::context`]).
    context: Option<u64>,
    standby: bool,
    started_at: chrono::DateTime<Utc>,
}

/// One tenant's turn before its statements: in an incremental scan, a tenant whose inputs did
/// not change at all is not even planned (its whole last result is carried forward, catalog
/// checks included); any other tenant gets its catalog checks and a plan without the checks
/// whose stored findings are carried forward (those findings go with the unit).
fn prepare(
    ctx: &Context<'_>,
    tenant: &str,
    turn: &Turn<'_>,
    progressive: &mut Progressive<'_>,
) -> (checks::Plan, Unit) {
    let incremental = match (turn.kind, turn.signals, turn.context) {
        (ScanKind::Incremental, Some(signals), Some(context)) => Some((signals, context)),
        _ => None,
    };
    if let (Some((signals, context)), Some(state)) = (incremental, progressive.state.as_deref()) {
        if let Some((found, tables, oldest)) = state.carried_tenant(context, tenant, ctx.catalog, signals) {
            progressive.tally.carry(tables, oldest);
            let unit = Unit { known: found.to_vec(), whole: true, ..Unit::default() };
            return (checks::Plan { tables: Vec::new() }, unit);
        }
    }
    let mut known = checks::catalog_findings(ctx, tenant);
    let mut plan = checks::plan(ctx, tenant);
    if turn.standby {
        let skipped = skip_unlogged(ctx.catalog, tenant, &mut plan);
        progressive.errors.extend(skipped);
    }
    let reads = incremental::Reads::of(&plan, tenant);
    let inputs = match turn.signals {
        Some(signals) => incremental::unit_inputs(&plan, tenant, ctx.catalog, signals, &mut progressive.shared),
        None => BTreeMap::new(),
    };
    let memo_inputs = match (turn.signals, turn.context) {
        (Some(signals), Some(context)) => incremental::tenant_inputs(context, tenant, ctx.catalog, &reads, signals),
        _ => None,
    };
    let tables = inputs.len();
    let mut oldest = None;
    if let (ScanKind::Incremental, Some(state)) = (turn.kind, progressive.state.as_deref()) {
        let (carried, at) = carry_forward(state, tenant, &mut plan, &inputs, &mut progressive.tally);
        known.extend(carried);
        oldest = at;
    }
    let checked = plan_tables(&plan);
    progressive.tally.checked += checked.len();
    if !checked.is_empty() {
        oldest = Some(oldest.map_or(turn.started_at, |o: chrono::DateTime<Utc>| o.min(turn.started_at)));
    }
    let memo = memo_inputs.map(|hash| (hash, reads, tables, oldest.unwrap_or(turn.started_at)));
    (plan, Unit { inputs, checked, known, memo, whole: false })
}

/// Tables checked and carried forward so far, and the oldest carried-forward result.
#[derive(Default)]
struct Tally {
    checked: usize,
    carried: usize,
    oldest: Option<chrono::DateTime<Utc>>,
}

impl Tally {
    /// Counts `tables` carried forward, the oldest of them computed at `at`.
    fn carry(&mut self, tables: usize, at: chrono::DateTime<Utc>) {
        if tables > 0 {
            self.carried += tables;
            self.oldest = Some(self.oldest.map_or(at, |o| o.min(at)));
        }
    }
}

/// One tenant's units: the inputs of every table with data checks, the tables whose checks run
/// in this scan, the findings known before they run (catalog checks', carried-forward ones),
/// and what its whole result is stored with (its inputs hash, its reads, its tables with data
/// checks, the time its oldest result was computed).
#[derive(Default)]
struct Unit {
    inputs: BTreeMap<String, Option<u64>>,
    checked: BTreeSet<String>,
    known: Vec<Finding>,
    memo: Option<(u64, incremental::Reads, usize, chrono::DateTime<Utc>)>,
    /// The tenant's whole last result was carried forward (nothing was planned).
    whole: bool,
}

/// The tables of `plan` with data checks.
fn plan_tables(plan: &checks::Plan) -> BTreeSet<String> {
    plan.tables.iter().filter(|u| u.has_checks()).map(|u| u.table.clone()).collect()
}

/// Takes out of `plan` the checks of the tables whose stored findings are still valid, and
/// returns those findings and when the oldest of them was computed.
fn carry_forward(
    state: &incremental::State,
    tenant: &str,
    plan: &mut checks::Plan,
    inputs: &BTreeMap<String, Option<u64>>,
    tally: &mut Tally,
) -> (Vec<Finding>, Option<chrono::DateTime<Utc>>) {
    let mut out = Vec::new();
    let mut oldest: Option<chrono::DateTime<Utc>> = None;
    for unit in &mut plan.tables {
        let Some(Some(hash)) = inputs.get(&unit.table) else { continue };
        let Some((found, computed_at)) = state.carried(tenant, &unit.table, *hash) else { continue };
        out.extend_from_slice(found);
        unit.orphans.clear();
        unit.nulls = None;
        unit.sequences.clear();
        tally.carry(1, computed_at);
        oldest = Some(oldest.map_or(computed_at, |o| o.min(computed_at)));
    }
    plan.tables.retain(|u| u.has_checks());
    (out, oldest)
}

/// Updates `state` with one tenant's outcome: the findings of every table checked without error
/// are stored with their inputs, and the tenant's whole result when it had no error at all; a
/// tenant-level error forgets the tenant. A tenant carried forward whole keeps what it had.
fn remember(
    state: &mut incremental::State,
    tenant: &str,
    unit: &Unit,
    findings: &[Finding],
    errors: &[ScanError],
    started_at: chrono::DateTime<Utc>,
) {
    if unit.whole {
        return;
    }
    if errors.iter().any(|e| e.table.is_none()) {
        state.forget_tenant(tenant);
        return;
    }
    match &unit.memo {
        Some((inputs, reads, tables, oldest)) if errors.is_empty() => {
            let all = unit.known.iter().chain(findings).cloned().collect();
            state.store_tenant(tenant, *inputs, reads.clone(), all, *tables, *oldest);
        }
        _ => state.forget_memo(tenant),
    }
    state.retain_tables(tenant, |table| unit.inputs.get(table).is_some_and(Option::is_some));
    for table in &unit.checked {
        let Some(Some(inputs)) = unit.inputs.get(table) else { continue };
        if errors.iter().any(|e| e.table.as_deref() == Some(table)) {
            state.forget_table(tenant, table);
            continue;
        }
        // Only what the unit's inputs decide is stored (its data checks' findings).
        let mine = findings
            .iter()
            .filter(|f| matches!(f.check, Check::OrphanRows | Check::NullTimestamps | Check::SequenceBehind))
            .filter(|f| f.table.as_deref() == Some(table))
            .cloned()
            .collect();
        state.store(tenant, table, *inputs, started_at, mine);
    }
}

/// On a standby, unlogged tables cannot be read: leaves out of `plan` every table that is one
/// and every relationship whose parent is one, and reports each such table once as `skipped`.
fn skip_unlogged(catalog: &Catalog, tenant: &str, plan: &mut checks::Plan) -> Vec<ScanError> {
    let unlogged = |schema: &str, table: &str| catalog.table(schema, table).is_some_and(|t| t.unlogged);
    let mut skipped: BTreeSet<(String, String)> = BTreeSet::new();
    for unit in &mut plan.tables {
        if unlogged(tenant, &unit.table) {
            skipped.insert((tenant.to_string(), unit.table.clone()));
            continue;
        }
        unit.orphans.retain(|p| {
            let parents = [Some(&p.parent_schema), p.shared_parent.as_ref()];
            let cold: Vec<&String> = parents.into_iter().flatten().filter(|s| unlogged(s, &p.parent_table)).collect();
            for schema in &cold {
                skipped.insert((schema.to_string(), p.parent_table.clone()));
            }
            cold.is_empty()
        });
    }
    plan.tables.retain(|u| {
        !unlogged(tenant, &u.table) && (!u.orphans.is_empty() || u.nulls.is_some() || !u.sequences.is_empty())
    });
    skipped
        .into_iter()
        .map(|(schema, table)| ScanError {
            kind: ErrorKind::Skipped,
            schema: Some(if schema == tenant { schema } else { tenant.to_string() }),
            table: Some(table),
            message: "unlogged table: its rows cannot be read on a standby".into(),
        })
        .collect()
}

/// The sequences of `tenants`' own schemas that their readable tables' columns draw from.
fn tenant_sequences(catalog: &Catalog, tenants: &BTreeSet<String>) -> Vec<(String, String)> {
    let mut out = BTreeSet::new();
    for tenant in tenants {
        let Some(schema) = catalog.schemas.get(tenant) else { continue };
        for table in schema.tables.values().filter(|t| t.readable) {
            for column in &table.columns {
                if let Some((seq_schema, name)) = column.sequence_in(tenant) {
                    if seq_schema == tenant {
                        out.insert((tenant.clone(), name.to_string()));
                    }
                }
            }
        }
    }
    out.into_iter().collect()
}

fn registry_findings(discovery: &Discovery) -> Vec<Finding> {
    let finding = |check: Check, schema: &String| Finding {
        check,
        severity: check.severity(),
        schema: schema.clone(),
        table: None,
        columns: Vec::new(),
        count: 1,
        sample_keys: Vec::new(),
        detail: Detail::None,
    };
    let missing = discovery.missing.iter().map(|s| finding(Check::MissingSchema, s));
    let unregistered = discovery.unregistered.iter().map(|s| finding(Check::UnregisteredSchema, s));
    missing.chain(unregistered).collect()
}

/// Tables of the tenants and of the shared schema (when given: on the shard that reports the
/// database-wide findings) that the scanning role cannot read.
fn unreadable_tables(catalog: &Catalog, tenants: &BTreeSet<String>, shared: Option<&str>) -> Vec<ScanError> {
    let schemas = tenants.iter().map(String::as_str).chain(shared);
    let mut out = Vec::new();
    for schema in schemas {
        let Some(s) = catalog.schemas.get(schema) else { continue };
        for (table, _) in s.tables.iter().filter(|(_, t)| !t.readable) {
            out.push(ScanError {
                kind: ErrorKind::Permission,
                schema: Some(schema.to_string()),
                table: Some(table.clone()),
                message: "permission denied: the scanning role needs USAGE on the schema and SELECT on the table"
                    .into(),
            });
        }
    }
    out
}

/// Runs the work units of one tenant, one table at a time, each in a short transaction of its
/// own. A session that dies (terminated, lost) is not reused: a terminated one ends the tenant.
#[allow(clippy::too_many_arguments)]
async fn scan_tenant(
    pool: &Pool,
    target: &str,
    scan: &ScanConfig,
    tenant: &str,
    plan: checks::Plan,
    samples: usize,
    cancel: &CancellationToken,
) -> (Vec<Finding>, Vec<ScanError>) {
    let mut findings = Vec::new();
    let mut errors = Vec::new();
    let error = |kind, table: Option<&str>, message: String| ScanError {
        kind,
        schema: Some(tenant.to_string()),
        table: table.map(str::to_string),
        message,
    };
    let mut session: Option<Session> = None;
    let mut units = plan.tables.iter();
    let mut unit = units.next();
    let mut conflicts = 0;
    while let Some(current) = unit {
        if cancel.is_cancelled() {
            break;
        }
        if !session.as_ref().is_some_and(|s| !s.is_closed()) {
            // Give the dead session back first: the pool may have no other slot.
            drop(session.take());
            session = match db::session(pool, target).await {
                Ok(s) => Some(s),
                Err(e) => {
                    errors.push(error(ErrorKind::Connection, None, e.to_string()));
                    break;
                }
            };
        }
        let Some(live) = session.as_ref() else { break };
        let server_cancel = live.canceller();
        let client: &tokio_postgres::Client = live;
        let result = tokio::select! {
            result = run_unit(client, scan, tenant, current, samples) => result,
            _ = cancel.cancelled() => {
                // Stop the query on the server before letting go of the session, so that
                // nothing of ours keeps running (or waiting on a lock) after shutdown.
                server_cancel.cancel().await;
                // Not rolled back here (a frozen server would not answer): closing the session
                // ends its transaction.
                if let Some(s) = session.take() {
                    db::discard(s);
                }
                return (findings, errors);
            }
        };
        match result {
            Ok((found, failed)) => {
                findings.extend(found);
                errors.extend(failed.into_iter().map(|(kind, message)| error(kind, Some(&current.table), message)));
            }
            Err(e) if classify(&e) == ErrorKind::Conflict && conflicts < CONFLICT_RETRIES => {
                // A conflict can also end the session (the standby terminates a session that
                // still conflicts once idle): try again on a fresh one.
                if let Some(s) = session.take() {
                    db::discard(s);
                }
                conflicts += 1;
                tracing::info!(tenant = %crate::sql::escape_controls(tenant), table = %crate::sql::escape_controls(&current.table), attempt = conflicts, "recovery conflict; trying again");
                continue;
            }
            Err(e)
                if matches!(e.code(), Some("42P01" | "3F000"))
                    && !schema_exists(client, scan, tenant).await.unwrap_or(true) =>
            {
                // The whole schema is gone: report that once, and nothing of a half-read tenant.
                findings.clear();
                errors.retain(|e| e.kind != ErrorKind::Query);
                errors.push(dropped(tenant));
                break;
            }
            Err(e) => {
                let kind = classify(&e);
                errors.push(error(kind, Some(&current.table), e.to_string()));
                if matches!(kind, ErrorKind::Connection | ErrorKind::Terminated) {
                    break;
                }
            }
        }
        conflicts = 0;
        unit = units.next();
    }
    (findings, errors)
}

/// Runs one table's work: its count statement (every check of the table, its sequence probes
/// included), then (for nonzero orphan or NULL counts) its sample statement, each in a
/// transaction of its own. When the count statement fails as a query or for want of a privilege
/// and holds sequence probes besides other checks, the table's statements are run again as they
/// were before the probes were folded in (see [`TableWork::unfolded`]), so each error is
/// attributed as before: a sequence the role may not read or that was dropped meanwhile costs
/// only its probe, never the table's other findings. A statement of the relationships and the
/// NULL pass that fails as a query is run again check by check, so one bad check costs only
/// itself. Those failures come back with the findings; any other failure is the unit's. A
/// failing sample statement leaves the samples empty and never the counts.
async fn run_unit(
    client: &tokio_postgres::Client,
    scan: &ScanConfig,
    tenant: &str,
    unit: &TableWork,
    samples: usize,
) -> Result<(Vec<Finding>, Vec<(ErrorKind, String)>), DbError> {
    let items = unit.items();
    let mut findings = Vec::new();
    let mut failed = Vec::new();
    let folded = items.len() > 1 && items.iter().any(|item| matches!(item, Item::Sequence(_)));
    let statements = if folded {
        match count(client, scan, tenant, unit, &items).await {
            Ok(found) => {
                findings = found;
                Vec::new()
            }
            Err(e) if matches!(classify(&e), ErrorKind::Query | ErrorKind::Permission) => {
                tracing::debug!(tenant = %crate::sql::escape_controls(tenant), table = %crate::sql::escape_controls(&unit.table), error = %crate::sql::escape_controls(&e.to_string()), "count statement failed; running its checks apart");
                TableWork::unfolded(&items)
            }
            Err(e) => return Err(e),
        }
    } else {
        TableWork::unfolded(&items)
    };
    for items in statements {
        match count(client, scan, tenant, unit, &items).await {
            Ok(found) => findings.extend(found),
            // A sequence probe's failure is its own, as when it was a statement of its own.
            Err(e)
                if matches!(items.as_slice(), [Item::Sequence(_)])
                    && matches!(classify(&e), ErrorKind::Query | ErrorKind::Permission) =>
            {
                failed.push((classify(&e), e.to_string()))
            }
            Err(e) if items.len() > 1 && classify(&e) == ErrorKind::Query => {
                for item in items {
                    match count(client, scan, tenant, unit, &[item]).await {
                        Ok(found) => findings.extend(found),
                        Err(e) if classify(&e) == ErrorKind::Query => failed.push((ErrorKind::Query, e.to_string())),
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    if let Some(sql) = unit.sample_sql(&findings, samples) {
        match db::read_only(client, scan, &sql, db::Parallel::Serial).await {
            Ok(rows) => work::attach_samples(&mut findings, rows.first().map(Vec::as_slice).unwrap_or_default()),
            Err(e) => {
                tracing::warn!(tenant = %crate::sql::escape_controls(tenant), table = %crate::sql::escape_controls(&unit.table), error = %crate::sql::escape_controls(&e.to_string()), "sample keys left out")
            }
        }
    }
    Ok((findings, failed))
}

/// The findings of `items` of `unit`, counted by one statement.
async fn count(
    client: &tokio_postgres::Client,
    scan: &ScanConfig,
    tenant: &str,
    unit: &TableWork,
    items: &[Item],
) -> Result<Vec<Finding>, DbError> {
    let sql = unit.count_sql(tenant, items);
    let row = db::one_row(db::read_only(client, scan, &sql, db::Parallel::Allowed).await?)?;
    Ok(unit.findings(tenant, items, &row))
}

fn dropped(tenant: &str) -> ScanError {
    ScanError {
        kind: ErrorKind::TenantDropped,
        schema: Some(tenant.to_string()),
        table: None,
        message: "schema was dropped during the scan".into(),
    }
}

/// Whether `schema` exists now (a transaction of its own: it sees every committed drop).
async fn schema_exists(client: &tokio_postgres::Client, scan: &ScanConfig, schema: &str) -> Result<bool, DbError> {
    let sql =
        format!("SELECT pg_catalog.to_regnamespace(pg_catalog.quote_ident({})) IS NOT NULL", sql::literal(schema));
    let rows = db::read_only(client, scan, &sql, db::Parallel::Allowed).await?;
    Ok(rows.first().and_then(|r| r.first()).is_some_and(|v| v.as_deref() == Some("t")))
}

/// Maps a database error to the error kind of the report (and of the metrics). A terminated
/// session (57P01) is the tenant's failure, not the scan's: the server is still there.
fn classify(e: &DbError) -> ErrorKind {
    match e.code() {
        Some("57P01") => ErrorKind::Terminated,
        _ if e.is_connection() => ErrorKind::Connection,
        Some("42501") => ErrorKind::Permission,
        Some("57014" | "55P03") => ErrorKind::Timeout,
        Some("40001" | "40P01") => ErrorKind::Conflict,
        Some(code) if code.starts_with("53") => ErrorKind::Resources,
        _ => ErrorKind::Query,
    }
}
