//! One scan: discovery -> catalog -> checks -> report.
//!
//! Invariants: discovery and the catalog come from one read-only snapshot; each tenant's data
//! checks run in one read-only `REPEATABLE READ` transaction of its own (one snapshot per
//! tenant), at most `scan.concurrency` tenants at a time. A failing probe or tenant is recorded
//! in the report and never fails the scan; only failures that leave nothing to scan (no
//! connection, no discovery, no catalog) do.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use chrono::Utc;
use futures::stream::{self, StreamExt};
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;

use crate::catalog::{self, Catalog};
use crate::checks::{self, null_timestamps, orphan_rows, sequence_behind, Context, Shape};
use crate::config::{Config, ScanConfig};
use crate::db::{self, DbError, Pool};
use crate::incremental::{self, Signals};
use crate::report::{
    Check, Detail, ErrorKind, Finding, Report, ScanError, ScanKind, ScanSummary, TenantCounts, REPORT_VERSION,
};
use crate::tenants::{self, Discovery, DiscoveryError};

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

/// Runs one full scan of the database behind `pool`. Cancelling `cancel` stops it: running
/// queries are cancelled on the server and the scan returns [`ScanFailure::Cancelled`]. After
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

/// Like [`run`], keeping `state` between scans: the data checks of a table run only when it
/// or a table its checks read may have changed since `state` was updated (see
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
    let (discovery, catalog, present, signals) = tokio::select! {
        snapshot = read_snapshot(config, pool, state.is_some()) => snapshot?,
        _ = cancel.cancelled() => return Err(ScanFailure::Cancelled),
    };
    let kind = match (state.as_deref_mut(), &signals) {
        (Some(state), Some(signals)) => state.begin(signals, started_at, config.scan.full_every),
        _ => ScanKind::Full,
    };
    let mut errors = Vec::new();
    let mut tenants = BTreeSet::new();
    for tenant in &discovery.tenants {
        if present.contains(tenant) {
            tenants.insert(tenant.clone());
        } else {
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

    let mut findings = registry_findings(&discovery);
    errors.extend(unreadable_tables(&catalog, &tenants, &config.tenants.shared_schema));
    for tenant in &tenants {
        findings.extend(checks::catalog_findings(&ctx, tenant));
    }

    let total = tenants.len();
    let discovered = discovery.tenants.len();
    let samples = config.report.sample_keys;
    if let Some(state) = state.as_deref_mut() {
        state.retain_tenants(&tenants);
    }
    // Each tenant is planned (and its carried-forward findings taken) only when its turn comes,
    // so that at most `scan.concurrency` plans exist at a time. The plan and the tenant's name
    // are owned values, so the stream's closure borrows nothing per item (which keeps the
    // whole scan future `Send` for callers that spawn it). The closure and the loop below take
    // turns on the state, never at once.
    let shared =
        std::sync::Mutex::new(Progressive { state, shared: Default::default(), tally: Tally::default(), findings });
    let mut done = 0;
    {
        let lock = || shared.lock().unwrap_or_else(|e| e.into_inner());
        let outcomes = stream::iter(tenants.iter().cloned())
            .map(|tenant: String| {
                let (plan, unit) = prepare(&ctx, &tenant, kind, signals.as_ref(), &mut lock());
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
            progressive.findings.extend(tenant_findings);
            drop(progressive);
            errors.extend(tenant_errors);
            done += 1;
            if let Some(report_progress) = progress {
                report_progress(done, total);
            }
        }
    }
    let Progressive { state, tally, mut findings, .. } = shared.into_inner().unwrap_or_else(|e| e.into_inner());
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
    let failed: BTreeSet<&String> =
        errors.iter().filter_map(|e| e.schema.as_ref()).filter(|s| discovery.tenants.contains(*s)).collect();
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

/// Discovery, the catalog and, when asked for, the change signals, from one read-only snapshot,
/// and which tenants still exist once the catalog has been read (a tenant dropped meanwhile has
/// tables missing from the catalog).
async fn read_snapshot(config: &Config, pool: &Pool, with_signals: bool) -> Result<ScanInputs, ScanFailure> {
    let mut session = db::session(pool, &config.database.target).await.map_err(ScanFailure::Connect)?;
    let client: &mut tokio_postgres::Client = &mut session;
    let result = snapshot(client, config, with_signals).await;
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

/// Discovery, catalog, tenants still present, change signals.
type ScanInputs = (Discovery, Catalog, BTreeSet<String>, Option<Signals>);

async fn snapshot(
    client: &mut tokio_postgres::Client,
    config: &Config,
    with_signals: bool,
) -> Result<ScanInputs, ScanFailure> {
    let catalog_error = |e: tokio_postgres::Error| ScanFailure::Catalog(e.into());
    let tx = db::begin_scan(client, &config.scan).await.map_err(ScanFailure::Catalog)?;
    let discovery = tenants::discover(&tx, &config.tenants).await?;
    let mut schemas = discovery.tenants.clone();
    schemas.push(config.tenants.shared_schema.clone());
    schemas.extend(config.tenants.reference_schema.clone());
    // The signals are read before the catalog and before any tenant's data: a change that
    // lands after this point is counted in the next scan's signals.
    let signals = match with_signals {
        true => Some(incremental::read(&tx, &schemas).await.map_err(ScanFailure::Catalog)?),
        false => None,
    };
    let catalog = catalog::read(&tx, &schemas).await.map_err(ScanFailure::Catalog)?;
    tx.commit().await.map_err(catalog_error)?;
    // A transaction of its own (a fresh snapshot) that sees the drops committed meanwhile.
    let tx = db::begin_scan(client, &config.scan).await.map_err(ScanFailure::Catalog)?;
    let present = tenants::still_present(&tx, &discovery.tenants).await.map_err(ScanFailure::Catalog)?;
    tx.commit().await.map_err(catalog_error)?;
    Ok((discovery, catalog, present, signals))
}

/// What the tenants' turns add up as the scan goes: the incremental state, the tally and the
/// findings.
struct Progressive<'s> {
    state: Option<&'s mut incremental::State>,
    shared: incremental::SharedTables,
    tally: Tally,
    findings: Vec<Finding>,
}

/// One tenant's plan, without the tables whose stored findings are carried forward (those go
/// to `progressive.findings`), and its units.
fn prepare(
    ctx: &Context<'_>,
    tenant: &str,
    kind: ScanKind,
    signals: Option<&Signals>,
    progressive: &mut Progressive<'_>,
) -> (checks::Plan, Unit) {
    let mut plan = checks::plan(ctx, tenant);
    let inputs = match signals {
        Some(signals) => incremental::unit_inputs(&plan, tenant, ctx.catalog, signals, &mut progressive.shared),
        None => BTreeMap::new(),
    };
    if let (ScanKind::Incremental, Some(state)) = (kind, progressive.state.as_deref()) {
        let carried = carry_forward(state, tenant, &mut plan, &inputs, &mut progressive.tally);
        progressive.findings.extend(carried);
    }
    let checked = plan_tables(&plan);
    progressive.tally.checked += checked.len();
    (plan, Unit { inputs, checked })
}

/// Tables checked and carried forward so far, and the oldest carried-forward result.
#[derive(Default)]
struct Tally {
    checked: usize,
    carried: usize,
    oldest: Option<chrono::DateTime<Utc>>,
}

/// One tenant's units: the inputs of every table with data checks, and the tables whose checks
/// run in this scan.
struct Unit {
    inputs: BTreeMap<String, Option<u64>>,
    checked: BTreeSet<String>,
}

/// The tables with data checks in `plan`.
fn plan_tables(plan: &checks::Plan) -> BTreeSet<String> {
    let orphans = plan.orphans.iter().map(|p| &p.table);
    orphans.chain(plan.nulls.iter().map(|p| &p.table)).cloned().collect()
}

/// Takes out of `plan` the tables whose stored findings are still valid, and returns those
/// findings.
fn carry_forward(
    state: &incremental::State,
    tenant: &str,
    plan: &mut checks::Plan,
    inputs: &BTreeMap<String, Option<u64>>,
    tally: &mut Tally,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut carried = BTreeSet::new();
    for (table, hash) in inputs {
        let Some((found, computed_at)) = hash.and_then(|h| state.carried(tenant, table, h)) else { continue };
        out.extend_from_slice(found);
        carried.insert(table.as_str());
        tally.carried += 1;
        tally.oldest = Some(tally.oldest.map_or(computed_at, |o| o.min(computed_at)));
    }
    plan.orphans.retain(|p| !carried.contains(p.table.as_str()));
    plan.nulls.retain(|p| !carried.contains(p.table.as_str()));
    out
}

/// Updates `state` with one tenant's outcome: the findings of every table checked without error
/// are stored with their inputs; a tenant-level error forgets the tenant.
fn remember(
    state: &mut incremental::State,
    tenant: &str,
    unit: &Unit,
    findings: &[Finding],
    errors: &[ScanError],
    started_at: chrono::DateTime<Utc>,
) {
    if errors.iter().any(|e| e.table.is_none()) {
        state.forget_tenant(tenant);
        return;
    }
    state.retain_tables(tenant, |table| unit.inputs.get(table).is_some_and(Option::is_some));
    for table in &unit.checked {
        let Some(Some(inputs)) = unit.inputs.get(table) else { continue };
        if errors.iter().any(|e| e.table.as_deref() == Some(table)) {
            state.forget_table(tenant, table);
            continue;
        }
        // Only what the unit's inputs decide is stored: `sequence_behind` also depends on the
        // sequence's state, which no counter tracks, so it runs in every scan.
        let mine = findings
            .iter()
            .filter(|f| matches!(f.check, Check::OrphanRows | Check::NullTimestamps))
            .filter(|f| f.table.as_deref() == Some(table))
            .cloned()
            .collect();
        state.store(tenant, table, *inputs, started_at, mine);
    }
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

/// Tables of the tenants and the shared schema the scanning role cannot read.
fn unreadable_tables(catalog: &Catalog, tenants: &BTreeSet<String>, shared: &str) -> Vec<ScanError> {
    let schemas = tenants.iter().map(String::as_str).chain([shared]);
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

/// Runs one tenant's probes in its own snapshot, each under a savepoint so that one failing
/// probe (a timeout, a type mismatch in a declared relationship) does not hide the others.
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
    if cancel.is_cancelled() {
        return (findings, errors);
    }
    let mut session = match db::session(pool, target).await {
        Ok(c) => c,
        Err(e) => return (findings, vec![error(ErrorKind::Connection, None, e.to_string())]),
    };
    let server_cancel = session.canceller();
    let client: &mut tokio_postgres::Client = &mut session;
    let tx = match db::begin_scan(client, scan).await {
        Ok(tx) => tx,
        Err(e) => return (findings, vec![error(classify(&e), None, "cannot start transaction".into())]),
    };
    let snapshot = db::Snapshot::new(&tx);
    let probes = plan
        .orphans
        .iter()
        .map(Probe::Orphans)
        .chain(plan.nulls.iter().map(Probe::Nulls))
        .chain(plan.sequences.iter().map(Probe::Sequences));
    for probe in probes {
        let result = tokio::select! {
            result = run_probe(&snapshot, tenant, &probe, samples) => result,
            _ = cancel.cancelled() => {
                // Stop the query on the server before letting go of the session, so that
                // nothing of ours keeps running (or waiting on a lock) after shutdown.
                server_cancel.cancel().await;
                // Not rolled back here (a frozen server would not answer): dropping the
                // transaction and the session closes them.
                drop(tx);
                db::discard(session);
                return (findings, errors);
            }
        };
        match result {
            Ok(found) => findings.extend(found),
            Err(e)
                if matches!(e.code(), Some("42P01" | "3F000")) && !schema_exists(&tx, tenant).await.unwrap_or(true) =>
            {
                // The whole schema is gone: report that once, and nothing of a half-read tenant.
                findings.clear();
                errors.retain(|e| e.kind != ErrorKind::Query);
                errors.push(dropped(tenant));
                break;
            }
            Err(e) => {
                let kind = classify(&e);
                errors.push(error(kind, Some(probe.table()), e.to_string()));
                if kind == ErrorKind::Connection {
                    break;
                }
            }
        }
    }
    let _ = tx.rollback().await;
    (findings, errors)
}

/// Runs one probe in the tenant's snapshot (each statement under its own savepoint).
async fn run_probe(
    snapshot: &db::Snapshot<'_>,
    tenant: &str,
    probe: &Probe<'_>,
    samples: usize,
) -> Result<Vec<Finding>, DbError> {
    match probe {
        Probe::Orphans(p) => orphan_rows::run(snapshot, tenant, p, samples).await,
        Probe::Nulls(p) => null_timestamps::run(snapshot, tenant, p, samples).await,
        Probe::Sequences(p) => sequence_behind::run(snapshot, tenant, p).await,
    }
}

fn dropped(tenant: &str) -> ScanError {
    ScanError {
        kind: ErrorKind::TenantDropped,
        schema: Some(tenant.to_string()),
        table: None,
        message: "schema was dropped during the scan".into(),
    }
}

enum Probe<'a> {
    Orphans(&'a orphan_rows::Probe),
    Nulls(&'a null_timestamps::Probe),
    Sequences(&'a sequence_behind::Probe),
}

impl Probe<'_> {
    fn table(&self) -> &str {
        match self {
            Probe::Orphans(p) => &p.table,
            Probe::Nulls(p) => &p.table,
            Probe::Sequences(p) => &p.table,
        }
    }
}

/// Whether `schema` exists now. `to_regnamespace` reads the system cache, which sees committed
/// drops, where a query of `pg_namespace` would see the transaction's older snapshot.
async fn schema_exists(tx: &tokio_postgres::Transaction<'_>, schema: &str) -> Result<bool, DbError> {
    const EXISTS: &str = "SELECT pg_catalog.to_regnamespace(pg_catalog.quote_ident($1)) IS NOT NULL";
    let row = tx.query_typed_one(EXISTS, &[(&schema, Type::TEXT)]).await?;
    Ok(row.get(0))
}

/// Maps a database error to the error kind of the report (and of the metrics).
fn classify(e: &DbError) -> ErrorKind {
    if e.is_connection() {
        return ErrorKind::Connection;
    }
    match e.code() {
        Some("42501") => ErrorKind::Permission,
        Some("57014" | "55P03") => ErrorKind::Timeout,
        _ => ErrorKind::Query,
    }
}
