//! Heal: plans and repairs. The ONLY code that writes to a tenant database.
//!
//! Invariants:
//! - nothing is written without an explicit `execute` (the CLI's `--execute`, the daemon's
//!   `heal.enabled`); a plan is built from a finished scan and only reads memory;
//! - one healer per database at a time, through poolers too (the lease of [`lease`], renewed in
//!   every write transaction with a transaction-level advisory lock), never on a server in
//!   recovery;
//! - every write runs in a short transaction with `lock_timeout` and `statement_timeout` (the
//!   heal session's settings), in batches of `heal.batch_size`, re-checking its predicate inside
//!   the writing statement, and records each change in `tenant_audit.heal_log` in the same
//!   transaction and in a log line;
//! - a lock that cannot be had skips the tenant for this run; `heal.max_rows_per_run` stops it.

mod audit;
mod backfill;
mod casts;
mod columns;
mod copy;
mod lease;
mod plan;
pub mod planfile;
mod sequence;
mod triggers;
pub mod undo;

use std::collections::BTreeMap;

use tokio_postgres::types::Type;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

pub use copy::CopySpec;
pub use plan::{Action, OnceStep, Plan, Step, TenantPlan};

use crate::config::HealConfig;
use crate::db::{self, DbError, Pool};
use crate::metrics::Metrics;

/// The advisory lock key that makes heal exclusive per database (`tenant-a` in ASCII): taken at
/// transaction level by every write transaction of a run that holds the lease.
pub const LOCK_KEY: i64 = 0x7465_6e61_6e74_2d61;

/// The repairs, each enabled separately in `[heal]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Repair {
    CopyMissingParents,
    BackfillNullTimestamps,
    AddMissingColumns,
    AdvanceSequences,
    /// `heal --undo`: reverting a run.
    Undo,
}

impl Repair {
    /// The name used in config, metrics and the audit table.
    pub fn name(self) -> &'static str {
        match self {
            Repair::CopyMissingParents => "copy_missing_parents",
            Repair::BackfillNullTimestamps => "backfill_null_timestamps",
            Repair::AddMissingColumns => "add_missing_columns",
            Repair::AdvanceSequences => "advance_sequences",
            Repair::Undo => "undo",
        }
    }
}

/// Failures that stop a heal run before it changes anything.
#[derive(Debug, thiserror::Error)]
pub enum HealError {
    #[error(transparent)]
    Connect(DbError),
    #[error("heal refuses to run against a server in recovery (a replica); point heal.database_url at the primary")]
    Replica,
    #[error("another heal holds the heal lock on this database; this run is skipped")]
    LockedOut,
    #[error("cannot create the audit table tenant_audit.heal_log: {0} (create it as described in docs/heal.md)")]
    AuditTable(DbError),
    #[error(
        "cannot create the lease table tenant_audit.heal_lease: {0} (create it as described in docs/permissions.md)"
    )]
    LeaseTable(DbError),
    #[error("there is no audit table tenant_audit.heal_log in this database: no heal run has written to it, so there is nothing to undo")]
    NoAuditTable,
    #[error("the heal role lacks a privilege it needs: {0} (see docs/heal.md)")]
    Privileges(String),
    #[error("heal failed: {0}")]
    Query(#[from] DbError),
}

impl HealError {
    /// The `result` label of `tenant_audit_heal_runs_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            HealError::LockedOut => "locked_out",
            _ => "failure",
        }
    }
}

/// Why a tenant was left for a later run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    LockTimeout,
    MaxRowsPerRun,
}

impl SkipReason {
    pub fn name(self) -> &'static str {
        match self {
            SkipReason::LockTimeout => "lock_timeout",
            SkipReason::MaxRowsPerRun => "max_rows_per_run",
        }
    }
}

/// What a heal run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub run_id: String,
    /// Changes per repair: rows copied, updated or undone, sequences moved, and one per column
    /// repair completed (added, its default restored, made NOT NULL).
    pub changed: BTreeMap<&'static str, u64>,
    /// Tenants left for a later run.
    pub skipped: Vec<(String, SkipReason)>,
    /// Repairs that failed: (schema, repair, message). The rest of the tenant went on.
    pub errors: Vec<(String, Repair, String)>,
    /// Orphaned keys a copy left alone: (schema, child table, key, reason). The other keys of
    /// their relationship were healed.
    pub set_aside: Vec<(String, String, String, String)>,
    /// Steps not taken because taking them could write what heal cannot vouch for (a `BEFORE`
    /// row trigger that is not allowed, a column whose addition rewrites the table): (schema,
    /// table, reason). The rest of the tenant went on.
    pub refused: Vec<(String, String, String)>,
    /// Rows or keys a plan file named that no longer needed the repair when it was applied (the
    /// application changed them): (schema, table, key). Left alone.
    pub not_applied: Vec<(String, String, String)>,
    /// Backfill rows a plan file named that an earlier heal run filled (a re-applied plan): done.
    pub filled_earlier: u64,
    /// Rows an undo left alone: (schema, table, key, why: changed since the run, still
    /// referenced, no longer exists).
    pub left: Vec<(String, String, String, String)>,
    /// The run was cancelled (shutdown or a signal) before it finished.
    pub interrupted: bool,
}

impl Outcome {
    pub fn total_changed(&self) -> u64 {
        self.changed.values().sum()
    }

    /// What `heal --execute` prints: changes per repair, skipped tenants, then a total line.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for (repair, n) in &self.changed {
            out.push_str(&format!("{repair}: {n} change(s)\n"));
        }
        if self.filled_earlier > 0 {
            out.push_str(&format!(
                "backfill_null_timestamps: {} row(s) of the plan filled by an earlier run\n",
                self.filled_earlier
            ));
        }
        for (schema, reason) in &self.skipped {
            out.push_str(&format!("skipped {}: {}\n", crate::sql::escape_controls(schema), reason.name()));
        }
        for (schema, table, key) in &self.not_applied {
            out.push_str(&format!(
                "skipped {} key {key}: changed since the plan\n",
                crate::sql::escape_controls(&crate::sql::display_name(schema, table))
            ));
        }
        for (schema, table, key, reason) in &self.set_aside {
            out.push_str(&format!(
                "set aside {} key ({}): {}\n",
                crate::sql::escape_controls(&crate::sql::display_name(schema, table)),
                crate::sql::escape_controls(key),
                crate::sql::escape_controls(reason)
            ));
        }
        for (schema, table, reason) in &self.refused {
            out.push_str(&format!(
                "set aside {}: {}\n",
                crate::sql::escape_controls(&crate::sql::display_name(schema, table)),
                crate::sql::escape_controls(reason)
            ));
        }
        out.push_str(&format!(
            "heal run {}: {} change(s), {} tenant(s) skipped, {} error(s)\n",
            self.run_id,
            self.total_changed(),
            self.skipped.len(),
            self.errors.len()
        ));
        out
    }
}

/// Adds to `plan` (of `scanned`), after each tenant's other actions, the pending backfills of
/// added nullable columns that the audit table records (read through `pool`, heal's sessions, in
/// a read-only transaction; no audit table: none), resumed (see [`Plan::resume`]).
pub async fn resume_pending(
    plan: &mut Plan,
    scanned: &crate::scan::Scanned,
    config: &crate::config::Config,
    pool: &Pool,
) -> Result<(), DbError> {
    if config.heal.add_missing_columns {
        let pending = pending_backfills(&config.heal, pool).await?;
        plan.resume(scanned, config, &pending);
    }
    Ok(())
}

/// (schema, table, column) of every pending backfill of an added column, once each.
async fn pending_backfills(heal: &HealConfig, pool: &Pool) -> Result<Vec<(String, String, String)>, DbError> {
    let mut session = db::session(pool, &heal.database.target).await?;
    let tx = db::begin_heal_checks(&mut session, heal).await?;
    let exists: bool = tx
        .query_typed_one("SELECT pg_catalog.to_regclass($1) IS NOT NULL", &[(&audit::table(), Type::TEXT)])
        .await?
        .get(0);
    let rows = if exists { tx.query_typed(&columns::pending_sql(), &[]).await? } else { Vec::new() };
    tx.commit().await?;
    let mut out: Vec<(String, String, String)> = Vec::new();
    for row in &rows {
        let entry = (row.get(0), row.get(1), row.get(2));
        if !out.contains(&entry) {
            out.push(entry);
        }
    }
    Ok(out)
}

/// Applies `plan` through `pool` (heal sessions). Returns what changed; records it in `metrics`.
/// Cancelling `cancel` stops the run between statements, and a running statement is cancelled
/// on the server (its batch rolls back whole).
pub async fn execute(
    heal: &HealConfig,
    pool: &Pool,
    plan: &Plan,
    metrics: Option<&Metrics>,
    cancel: &CancellationToken,
) -> Result<Outcome, HealError> {
    let result = execute_locked(heal, pool, plan, cancel).await;
    if let Some(m) = metrics {
        m.record_heal(&result);
    }
    result
}

async fn execute_locked(
    heal: &HealConfig,
    pool: &Pool,
    plan: &Plan,
    cancel: &CancellationToken,
) -> Result<Outcome, HealError> {
    let target = &heal.database.target;
    let mut guard = db::session(pool, target).await.map_err(HealError::Connect)?;
    let lease = lease::Lease::new(run_id(), heal.statement_timeout);
    // The checks before the run are four short transactions; a frozen server answers none.
    let within = answer_within(heal, false);
    match tokio::time::timeout(within * 4, prepare(&mut guard, heal, plan, &lease)).await {
        Ok(prepared) => prepared?,
        Err(_) => {
            db::discard(guard);
            let reason =
                format!("no answer within {} (the checks before heal)", humantime::format_duration(within * 4));
            return Err(HealError::Connect(DbError::Connect { target: target.clone(), reason }));
        }
    }
    let client: &mut Client = &mut guard;
    let result = run(heal, pool, client, plan, cancel, &lease).await;
    // Released explicitly, so the next run need not wait for the expiry. (Every path of `run`
    // returns here; cancellation is handled inside it, never by dropping it.) Three small
    // statements: `heal.statement_timeout` bounds them (a frozen server leaves the lease to expire).
    let release = async {
        let tx = db::begin_heal(client, heal).await?;
        lease.release(&tx).await?;
        tx.commit().await?;
        Ok::<(), DbError>(())
    };
    if tokio::time::timeout(heal.statement_timeout, release).await.is_err() {
        db::discard(guard);
    }
    result
}

/// Before a run: never on a replica, the privileges there, the lease taken.
async fn prepare(guard: &mut Client, heal: &HealConfig, plan: &Plan, lease: &lease::Lease) -> Result<(), HealError> {
    // In a transaction of ours, like every statement: through a pooler, a statement outside one
    // would run with whatever session state the last client left on the server connection.
    let tx = db::begin_heal_checks(guard, heal).await?;
    if tx.query_typed_one("SELECT pg_catalog.pg_is_in_recovery()", &[]).await.map_err(DbError::from)?.get::<_, bool>(0)
    {
        return Err(HealError::Replica);
    }
    check_privileges(&tx, plan).await?;
    tx.commit().await.map_err(DbError::from)?;
    ensure_lease_table(guard, heal).await?;
    let tx = db::begin_heal(guard, heal).await?;
    if !lease.acquire(&tx).await.map_err(DbError::from)? {
        return Err(HealError::LockedOut);
    }
    tx.commit().await.map_err(DbError::from)?;
    Ok(())
}

/// How long heal waits for a transaction before it gives the server up as frozen: the work's
/// own statement timeout (`heal.validate_timeout` for a long step), plus `heal.statement_timeout`
/// for the transaction's small statements and `heal.lock_timeout` for its lease renewal.
fn answer_within(heal: &HealConfig, long: bool) -> std::time::Duration {
    (if long { heal.validate_timeout } else { heal.statement_timeout }) + heal.statement_timeout + heal.lock_timeout
}

/// Creates the lease table if it is missing, under an advisory lock so that two healers
/// starting at once do not both create it.
async fn ensure_lease_table(client: &mut Client, heal: &HealConfig) -> Result<(), HealError> {
    let create = async {
        let tx = db::begin_heal(client, heal).await?;
        if !tx.query_typed_one(lease::EXISTS, &[]).await?.get::<_, bool>(0) {
            tx.query_typed("SELECT pg_catalog.pg_advisory_xact_lock($1)", &[(&lease::CREATE_LOCK_KEY, Type::INT8)])
                .await?;
            tx.batch_execute(&lease::create_sql()).await?;
        }
        tx.commit().await?;
        Ok::<(), DbError>(())
    };
    create.await.map_err(HealError::LeaseTable)
}

/// Why a step stopped short.
enum Stop {
    Failed(DbError),
    BudgetReached,
    Cancelled,
    /// The run's lease is gone (it expired and another run took it): stop writing at once.
    LeaseLost,
    /// The server did not answer within this long: stop the run (its session is closed).
    NoAnswer(std::time::Duration),
    /// The step failed and recorded why in the outcome: the rest of its action is skipped.
    Reported,
}

impl From<DbError> for Stop {
    fn from(e: DbError) -> Self {
        Stop::Failed(e)
    }
}

impl From<tokio_postgres::Error> for Stop {
    fn from(e: tokio_postgres::Error) -> Self {
        Stop::Failed(e.into())
    }
}

/// The session that writes, with what every transaction of it needs.
struct Writer<'a> {
    client: &'a mut Client,
    server_cancel: db::Canceller,
    cancel: &'a CancellationToken,
    /// Its timeouts, set with `SET LOCAL` first in every transaction (`db::begin_heal`).
    heal: &'a HealConfig,
    /// The run's lease, renewed first in every transaction.
    lease: &'a lease::Lease,
    /// Set when a transaction got no answer: the session's state is unknown, it is closed.
    no_answer: bool,
    /// `SET LOCAL search_path` for the tenant at hand, run right after (see [`search_path`]).
    search_path: String,
}

/// `SET LOCAL search_path = pg_catalog, "<tenant>"`: the path types and defaults are deparsed
/// relative to (see [`crate::catalog`]), so that the reference's definitions mean in the tenant
/// what they mean in the reference. `pg_catalog` comes first: a tenant's own function named like
/// a built-in one never runs in heal's statements, whose own names are all built-in or qualified.
pub fn search_path(tenant: &str) -> String {
    format!("SET LOCAL search_path = pg_catalog, {}", crate::sql::ident(tenant))
}

async fn run(
    heal: &HealConfig,
    pool: &Pool,
    guard: &mut Client,
    plan: &Plan,
    cancel: &CancellationToken,
    lease: &lease::Lease,
) -> Result<Outcome, HealError> {
    let tx = db::begin_heal(guard, heal).await.map_err(HealError::AuditTable)?;
    ensure_audit_table(&tx).await?;
    tx.commit().await.map_err(|e| HealError::AuditTable(e.into()))?;
    ensure_audit_indexes(guard, heal).await?;
    let mut session = db::session(pool, &heal.database.target).await.map_err(HealError::Connect)?;
    let server_cancel = session.canceller();
    let client: &mut Client = &mut session;
    let mut writer =
        Writer { server_cancel, client, cancel, heal, lease, no_answer: false, search_path: String::new() };
    let mut outcome = Outcome { run_id: lease.holder.clone(), ..Outcome::default() };
    let mut budget = heal.max_rows_per_run;
    for (i, tenant) in plan.tenants.iter().enumerate() {
        if cancel.is_cancelled() || outcome.interrupted {
            outcome.interrupted = true;
            break;
        }
        if budget == 0 {
            outcome.skipped.extend(plan.tenants[i..].iter().map(|t| (t.schema.clone(), SkipReason::MaxRowsPerRun)));
            break;
        }
        heal_tenant(&mut writer, heal, tenant, &mut budget, &mut outcome).await;
    }
    if writer.no_answer {
        drop(writer);
        db::discard(session);
    }
    tracing::info!(
        run_id = %outcome.run_id,
        changed = outcome.total_changed(),
        skipped = outcome.skipped.len(),
        errors = outcome.errors.len(),
        interrupted = outcome.interrupted,
        "heal finished"
    );
    Ok(outcome)
}

/// Runs one tenant's actions; a lock timeout skips the rest of the tenant, another failure skips
/// the rest of that action.
async fn heal_tenant(
    writer: &mut Writer<'_>,
    heal: &HealConfig,
    tenant: &TenantPlan,
    budget: &mut u64,
    outcome: &mut Outcome,
) {
    writer.search_path = search_path(&tenant.schema);
    for action in &tenant.actions {
        for step in &action.steps {
            let result = match step {
                Step::Batched(sql) => {
                    run_batches(writer, heal.batch_size, sql, tenant, action.repair, budget, outcome).await
                }
                Step::Once(once) => run_once(writer, once, tenant, action, outcome).await,
                Step::Copy(spec) => run_copy(writer, heal.batch_size, spec, budget, outcome).await,
                Step::Backfill(spec) => run_backfill(writer, heal.batch_size, spec, budget, outcome).await,
                Step::Undo(spec) => run_undo(writer, heal.batch_size, spec, budget, outcome).await,
            };
            match result {
                Ok(()) => {}
                Err(Stop::BudgetReached) => {
                    outcome.skipped.push((tenant.schema.clone(), SkipReason::MaxRowsPerRun));
                    return;
                }
                Err(Stop::Cancelled) => {
                    outcome.interrupted = true;
                    return;
                }
                Err(Stop::LeaseLost) => {
                    tracing::error!(run_id = %outcome.run_id, "heal stopped: its lease expired and another run holds it");
                    outcome.interrupted = true;
                    return;
                }
                Err(Stop::NoAnswer(within)) => {
                    let message = format!("the server did not answer within {}", humantime::format_duration(within));
                    tracing::error!(schema = %crate::sql::escape_controls(&tenant.schema), table = %crate::sql::escape_controls(&action.table), error = %crate::sql::escape_controls(&message.to_string()), "heal stopped");
                    outcome.errors.push((tenant.schema.clone(), action.repair, message));
                    outcome.interrupted = true;
                    return;
                }
                Err(Stop::Reported) => break,
                Err(Stop::Failed(e)) if e.code() == Some("55P03") => {
                    tracing::warn!(schema = %crate::sql::escape_controls(&tenant.schema), table = %crate::sql::escape_controls(&action.table), "heal skipped the tenant: lock not available within heal.lock_timeout");
                    outcome.skipped.push((tenant.schema.clone(), SkipReason::LockTimeout));
                    return;
                }
                Err(Stop::Failed(e)) => {
                    tracing::error!(schema = %crate::sql::escape_controls(&tenant.schema), table = %crate::sql::escape_controls(&action.table), repair = action.repair.name(), error = %crate::sql::escape_controls(&e.to_string()), "repair failed");
                    outcome.errors.push((tenant.schema.clone(), action.repair, e.to_string()));
                    break;
                }
            }
        }
    }
}

impl Writer<'_> {
    /// Runs `work` in one transaction (timeouts and search path set first), unless cancelled: then the running
    /// statement is cancelled on the server and the transaction rolls back.
    async fn transaction<T>(
        &mut self,
        work: impl for<'t> FnOnce(
            &'t tokio_postgres::Transaction<'t>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send + 't>,
        >,
    ) -> Result<T, Stop> {
        self.transaction_within(false, work).await
    }

    /// [`Self::transaction`] for a step under `heal.validate_timeout` when `long`. A transaction
    /// without an answer within [`answer_within`] is cancelled on the server and stops the run.
    async fn transaction_within<T>(
        &mut self,
        long: bool,
        work: impl for<'t> FnOnce(
            &'t tokio_postgres::Transaction<'t>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send + 't>,
        >,
    ) -> Result<T, Stop> {
        if self.cancel.is_cancelled() {
            return Err(Stop::Cancelled);
        }
        let cancel = self.cancel.clone();
        let server_cancel = self.server_cancel.clone();
        let heal = self.heal;
        let search_path = self.search_path.clone();
        let lease = self.lease;
        let within = answer_within(heal, long);
        let no_answer = &mut self.no_answer;
        let attempt = async {
            let tx = db::begin_heal(self.client, heal).await?;
            if !lease.renew(&tx).await? {
                return Ok(None);
            }
            tx.batch_execute(&search_path).await?;
            // Casts between timestamp and timestamptz (a backfill's fallback) mean the same
            // whatever time zone the session came with (a pooler's, another client's).
            tx.batch_execute("SET LOCAL TimeZone = 'UTC'").await?;
            let value = work(&tx).await?;
            tx.commit().await?;
            Ok::<Option<T>, DbError>(Some(value))
        };
        tokio::select! {
            result = attempt => result?.ok_or(Stop::LeaseLost),
            _ = cancel.cancelled() => {
                server_cancel.cancel().await;
                Err(Stop::Cancelled)
            }
            _ = tokio::time::sleep(within) => {
                server_cancel.cancel().await;
                *no_answer = true;
                Err(Stop::NoAnswer(within))
            }
        }
    }
}

/// Runs a batched statement until it changes nothing, the budget runs out, or the run is cancelled.
async fn run_batches(
    writer: &mut Writer<'_>,
    batch_size: usize,
    sql: &str,
    tenant: &TenantPlan,
    repair: Repair,
    budget: &mut u64,
    outcome: &mut Outcome,
) -> Result<(), Stop> {
    loop {
        let limit = (*budget).min(batch_size as u64) as i64;
        if limit == 0 {
            return Err(Stop::BudgetReached);
        }
        let run_id = outcome.run_id.clone();
        let sql = sql.to_string();
        let rows = writer
            .transaction(move |tx| {
                Box::pin(async move { tx.query_typed(&sql, &[(&limit, Type::INT8), (&run_id, Type::TEXT)]).await })
            })
            .await?;
        for row in &rows {
            let (table, key): (String, String) = (row.get(0), row.get(1));
            tracing::info!(run_id = %outcome.run_id, schema = %crate::sql::escape_controls(&tenant.schema), table = %crate::sql::escape_controls(&table), repair = repair.name(), key = %crate::sql::escape_controls(&key), "healed");
        }
        let changed = rows.len() as u64;
        *outcome.changed.entry(repair.name()).or_default() += changed;
        *budget = budget.saturating_sub(changed);
        if changed == 0 {
            return Ok(());
        }
    }
}

/// Runs a backfill range by range over every relation holding the table's rows, until the end of
/// each (as it was when the run reached it), the budget runs out, or the run is cancelled. The
/// backfill of an added nullable column reads its pending record first (none: nothing to do),
/// and records it done after a whole pass that found nothing left to fill.
async fn run_backfill(
    writer: &mut Writer<'_>,
    batch_size: usize,
    spec: &backfill::BackfillSpec,
    budget: &mut u64,
    outcome: &mut Outcome,
) -> Result<(), Stop> {
    let before = match spec.pending {
        true => match pending_state(writer, spec).await? {
            Pending::Open(xid) => Some(xid),
            Pending::None => return Ok(()),
            Pending::Replaced => {
                let reason = format!(
                    "backfill of {}: the column is not the one heal added (a migration dropped the table or the column and added it again since): its pending backfill is closed, nothing filled",
                    spec.column
                );
                let (sql, run_id, why) = (
                    columns::closed_record(&spec.tenant, &spec.table, &spec.column),
                    outcome.run_id.clone(),
                    reason.clone(),
                );
                writer
                    .transaction(move |tx| {
                        Box::pin(
                            async move { tx.query_typed(&sql, &[(&run_id, Type::TEXT), (&why, Type::TEXT)]).await },
                        )
                    })
                    .await?;
                tracing::warn!(run_id = %outcome.run_id, schema = %crate::sql::escape_controls(&spec.tenant), table = %crate::sql::escape_controls(&spec.table), repair = spec.repair.name(), reason = %crate::sql::escape_controls(&reason), "step set aside");
                outcome.refused.push((spec.tenant.clone(), spec.table.clone(), reason));
                return Err(Stop::Reported);
            }
            Pending::Rewritten => {
                let reason = format!(
                    "backfill of {}: the table was rewritten or its partitions changed since heal added the column (VACUUM FULL, CLUSTER, ALTER COLUMN TYPE, pg_repack, ATTACH PARTITION): every row has a new version, heal cannot tell the NULLs it left from the application's; the backfill stays pending, nothing filled (see docs/heal.md)",
                    spec.column
                );
                tracing::warn!(run_id = %outcome.run_id, schema = %crate::sql::escape_controls(&spec.tenant), table = %crate::sql::escape_controls(&spec.table), repair = spec.repair.name(), reason = %crate::sql::escape_controls(&reason), "step set aside");
                outcome.refused.push((spec.tenant.clone(), spec.table.clone(), reason));
                return Err(Stop::Reported);
            }
        },
        false => None,
    };
    let found = user_casts(writer, &spec.casts).await?;
    if !found.is_empty() {
        let reason = format!("backfill of {}: {}", spec.column, casts::reason(&found, "set these values by hand"));
        tracing::warn!(run_id = %outcome.run_id, schema = %crate::sql::escape_controls(&spec.tenant), table = %crate::sql::escape_controls(&spec.table), repair = spec.repair.name(), reason = %crate::sql::escape_controls(&reason), "step set aside");
        outcome.refused.push((spec.tenant.clone(), spec.table.clone(), reason));
        return Err(Stop::Reported);
    }
    let table_name = spec.table_name();
    let relations = writer
        .transaction(move |tx| {
            Box::pin(async move { tx.query_typed(backfill::RELATIONS, &[(&table_name, Type::TEXT)]).await })
        })
        .await?;
    let (relations, tree) = backfill::relations(&relations);
    // The table and every descendant: each is updated, and fires its own triggers.
    let checked = relations.iter().map(|r| (r.clone(), spec.table.clone())).collect();
    let refused: Vec<String> =
        refused_triggers(writer, checked, triggers::UPDATE).await?.into_iter().map(|(_, name)| name).collect();
    if !refused.is_empty() {
        let reason = format!("backfill of {}: {}", spec.column, triggers::reason(&refused, false));
        tracing::warn!(run_id = %outcome.run_id, schema = %crate::sql::escape_controls(&spec.tenant), table = %crate::sql::escape_controls(&spec.table), repair = spec.repair.name(), reason = %crate::sql::escape_controls(&reason), "step set aside");
        outcome.refused.push((spec.tenant.clone(), spec.table.clone(), reason));
        return Err(Stop::Reported);
    }
    let step = (batch_size / backfill::ROWS_PER_BLOCK).max(1) as i64;
    let mut changed_keys = std::collections::BTreeSet::new();
    let mut untouched = true;
    for relation in relations {
        let name = relation.clone();
        let blocks: i64 = writer
            .transaction(move |tx| {
                Box::pin(async move { tx.query_typed(backfill::BLOCKS, &[(&name, Type::TEXT)]).await })
            })
            .await?
            .first()
            .map(|r| r.get(0))
            .unwrap_or(0);
        let target = BatchTarget { sql: spec.batch_sql(&relation, tree), relation, tree };
        // Ranges of `step` blocks; within one, batches of at most `limit` rows in `ctid` order,
        // each starting after the last row the one before picked.
        let mut range = 0;
        let mut after = backfill::FIRST_TID.to_string();
        while range < blocks.max(1) {
            let limit = (*budget).min(batch_size as u64) as i64;
            if limit == 0 {
                return Err(Stop::BudgetReached);
            }
            let end =
                if range + step >= blocks { backfill::LAST_TID.to_string() } else { format!("({},0)", range + step) };
            let params =
                BatchParams { after: after.clone(), end: end.clone(), limit, tids: None, before: before.clone() };
            let done = match backfill_batch(writer, spec, &target, &params, outcome).await {
                Err(Stop::Failed(e)) if backfill::row_specific(&e) => {
                    split_batch(writer, spec, &target, &params, outcome).await?
                }
                other => other?,
            };
            for (table, key) in &done.changed {
                tracing::info!(run_id = %outcome.run_id, schema = %crate::sql::escape_controls(&spec.tenant), table = %crate::sql::escape_controls(table), repair = spec.repair.name(), key = %crate::sql::escape_controls(key), "healed");
            }
            let changed = done.changed.len() as u64;
            untouched &= changed == 0 && done.set_aside == 0;
            changed_keys.extend(done.changed.into_iter().map(|(_, key)| key));
            *outcome.changed.entry(spec.repair.name()).or_default() += changed;
            *budget = budget.saturating_sub(changed);
            if done.kept_null > 0 {
                // Updating them again would change nothing either: the table is left, reported.
                let message = format!(
                    "{} row(s) of {} kept {} NULL after the update (a trigger undoes it): the backfill of this table stopped",
                    done.kept_null,
                    crate::sql::escape_controls(&crate::sql::display_name(&spec.tenant, &spec.table)),
                    spec.column
                );
                tracing::error!(run_id = %outcome.run_id, schema = %crate::sql::escape_controls(&spec.tenant), table = %crate::sql::escape_controls(&spec.table), repair = spec.repair.name(), error = %crate::sql::escape_controls(&message.to_string()), "repair failed");
                outcome.errors.push((spec.tenant.clone(), spec.repair, message));
                return Err(Stop::Reported);
            }
            match done.next {
                Some(cursor) => after = cursor,
                None => {
                    range += step;
                    after = end;
                }
            }
        }
    }
    for key in spec.only.iter().flatten().filter(|k| !changed_keys.contains(*k)) {
        outcome.not_applied.push((spec.tenant.clone(), spec.table.clone(), key.clone()));
    }
    if spec.pending && untouched {
        let (sql, run_id) = (columns::done_record(&spec.tenant, &spec.table, &spec.column), outcome.run_id.clone());
        writer
            .transaction(move |tx| Box::pin(async move { tx.query_typed(&sql, &[(&run_id, Type::TEXT)]).await }))
            .await?;
    }
    Ok(())
}

/// The state of the pending backfill of `spec`'s column (see [`columns::pending_state_sql`]).
enum Pending {
    /// Pending, with the transaction id (text) recorded when the column was added.
    Open(String),
    /// No pending record left.
    None,
    /// The table or column named so is not the one heal added.
    Replaced,
    /// The table was rewritten (or its partitions changed) since the add.
    Rewritten,
}

/// Reads the latest pending record of `spec`'s column and whether it still applies.
async fn pending_state(writer: &mut Writer<'_>, spec: &backfill::BackfillSpec) -> Result<Pending, Stop> {
    let (schema, table, column) = (spec.tenant.clone(), spec.table.clone(), spec.column.clone());
    let row = writer
        .transaction(move |tx| {
            Box::pin(async move {
                tx.query_typed_opt(
                    &columns::pending_state_sql(),
                    &[(&schema, Type::TEXT), (&table, Type::TEXT), (&column, Type::TEXT)],
                )
                .await
            })
        })
        .await?;
    Ok(match row {
        None => Pending::None,
        Some(row) if !row.get::<_, bool>(1) => Pending::Replaced,
        Some(row) if !row.get::<_, bool>(2) => Pending::Rewritten,
        Some(row) => Pending::Open(row.get(0)),
    })
}

/// The relation a backfill's batches write, and their statement.
struct BatchTarget {
    relation: String,
    tree: bool,
    sql: String,
}

/// The parameters of one batch (see [`backfill::BackfillSpec::batch_sql`]).
#[derive(Clone)]
struct BatchParams {
    after: String,
    end: String,
    limit: i64,
    /// The `ctid`s a split batch may pick.
    tids: Option<Vec<String>>,
    /// The pending record's transaction id.
    before: Option<String>,
}

/// What one batch (or one split batch) did.
#[derive(Default)]
struct BatchDone {
    /// (table, key) of every row changed and audited.
    changed: Vec<(String, String)>,
    /// Rows a trigger kept NULL.
    kept_null: usize,
    /// Rows set aside (in the outcome) because their update failed.
    set_aside: usize,
    /// Where the next batch of the range starts, when this one picked its limit.
    next: Option<String>,
}

/// Runs one of a backfill batch's statements (`$1..$7`: see [`backfill::BackfillSpec`]) in its own
/// transaction.
async fn batch_query(
    writer: &mut Writer<'_>,
    sql: String,
    spec: &backfill::BackfillSpec,
    params: &BatchParams,
    outcome: &Outcome,
) -> Result<Vec<tokio_postgres::Row>, Stop> {
    let (run_id, only, p) = (outcome.run_id.clone(), spec.only.clone(), params.clone());
    writer
        .transaction(move |tx| {
            Box::pin(async move {
                tx.query_typed(
                    &sql,
                    &[
                        (&p.after, Type::TEXT),
                        (&p.end, Type::TEXT),
                        (&run_id, Type::TEXT),
                        (&p.limit, Type::INT8),
                        (&only, Type::TEXT_ARRAY),
                        (&p.tids, Type::TEXT_ARRAY),
                        (&p.before, Type::TEXT),
                    ],
                )
                .await
            })
        })
        .await
}

/// Runs one batch in its own transaction.
async fn backfill_batch(
    writer: &mut Writer<'_>,
    spec: &backfill::BackfillSpec,
    target: &BatchTarget,
    params: &BatchParams,
    outcome: &Outcome,
) -> Result<BatchDone, Stop> {
    let rows = batch_query(writer, target.sql.clone(), spec, params, outcome).await?;
    let mut done = BatchDone::default();
    for row in &rows {
        let (table, key, cursor): (Option<String>, Option<String>, Option<String>) =
            (row.get(0), row.get(1), row.get(2));
        match (table, key) {
            (Some(table), Some(key)) => done.changed.push((table, key)),
            (None, Some(_)) => done.kept_null += 1,
            _ => done.next = cursor,
        }
    }
    Ok(done)
}

/// A batch that failed on one of its rows: reads the rows it picks, then writes them in halves,
/// each its own transaction, halving again the ones that fail, down to single rows; a single row
/// that fails is set aside (in `outcome`) with the error. Returns what was done as one batch.
async fn split_batch(
    writer: &mut Writer<'_>,
    spec: &backfill::BackfillSpec,
    target: &BatchTarget,
    params: &BatchParams,
    outcome: &mut Outcome,
) -> Result<BatchDone, Stop> {
    let rows = batch_query(writer, spec.candidates_sql(&target.relation, target.tree), spec, params, outcome).await?;
    let candidates: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut done = BatchDone {
        next: candidates.last().filter(|_| candidates.len() as i64 == params.limit).map(|(tid, _)| tid.clone()),
        ..BatchDone::default()
    };
    let mut parts: Vec<&[(String, String)]> = vec![&candidates];
    while let Some(part) = parts.pop().filter(|p| !p.is_empty()) {
        let tids: Vec<String> = part.iter().map(|(tid, _)| tid.clone()).collect();
        let sub = BatchParams { limit: tids.len() as i64, tids: Some(tids), ..params.clone() };
        match backfill_batch(writer, spec, target, &sub, outcome).await {
            Ok(part_done) => {
                done.changed.extend(part_done.changed);
                done.kept_null += part_done.kept_null;
            }
            Err(Stop::Failed(e)) if backfill::row_specific(&e) => match part {
                [(_, key)] => {
                    let reason = format!("backfill of {}: {}", spec.column, e);
                    tracing::warn!(run_id = %outcome.run_id, schema = %crate::sql::escape_controls(&spec.tenant), table = %crate::sql::escape_controls(&spec.table), repair = spec.repair.name(), key = %crate::sql::escape_controls(key), reason = %crate::sql::escape_controls(&reason), "row set aside");
                    outcome.set_aside.push((spec.tenant.clone(), spec.table.clone(), key.clone(), reason));
                    done.set_aside += 1;
                }
                _ => {
                    let (first, second) = part.split_at(part.len() / 2);
                    // Popped last first: the halves run in `ctid` order.
                    parts.push(second);
                    parts.push(first);
                }
            },
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Runs a copy batch by batch (keyset over the orphaned keys) until no key is left, the budget
/// runs out, or the run is cancelled.
async fn run_copy(
    writer: &mut Writer<'_>,
    batch_size: usize,
    spec: &copy::CopySpec,
    budget: &mut u64,
    outcome: &mut Outcome,
) -> Result<(), Stop> {
    let repair = Repair::CopyMissingParents.name();
    let found = user_casts(writer, &spec.casts).await?;
    if !found.is_empty() {
        let reason = casts::reason(&found, "copy these rows by hand");
        tracing::warn!(run_id = %outcome.run_id, schema = %crate::sql::escape_controls(&spec.tenant), table = %crate::sql::escape_controls(&spec.child), repair, reason = %crate::sql::escape_controls(&reason), "step set aside");
        outcome.refused.push((spec.tenant.clone(), spec.child.clone(), reason));
        return Err(Stop::Reported);
    }
    let spec = &checked_copy(writer, spec).await?;
    let cap = copy::RowCap::new(batch_size, writer.heal.max_rows_per_run);
    let mut cursor: Vec<String> = Vec::new();
    let mut handled: std::collections::BTreeSet<Vec<String>> = Default::default();
    loop {
        let limit = (*budget).min(batch_size as u64) as i64;
        if limit == 0 {
            return Err(Stop::BudgetReached);
        }
        let rows_left = usize::try_from(limit).unwrap_or(usize::MAX);
        let (run_id, spec_owned, at) = (outcome.run_id.clone(), spec.clone(), cursor.clone());
        let done = writer
            .transaction(move |tx| {
                Box::pin(async move { copy::batch(tx, &spec_owned, limit, &at, &run_id, cap, rows_left).await })
            })
            .await?;
        if done.budget_short {
            return Err(Stop::BudgetReached);
        }
        for (table, key) in &done.inserted {
            tracing::info!(run_id = %outcome.run_id, schema = %crate::sql::escape_controls(&spec.tenant), table = %crate::sql::escape_controls(table), repair, key = %crate::sql::escape_controls(key), "healed");
        }
        for (table, seq) in &done.sequences {
            tracing::info!(run_id = %outcome.run_id, schema = %crate::sql::escape_controls(&spec.tenant), table = %crate::sql::escape_controls(table), repair, sequence = %crate::sql::escape_controls(seq), "sequence moved past the copied keys");
        }
        for (key, reason) in &done.set_aside {
            tracing::warn!(run_id = %outcome.run_id, schema = %crate::sql::escape_controls(&spec.tenant), table = %crate::sql::escape_controls(&spec.child), key = %crate::sql::escape_controls(key), reason = %crate::sql::escape_controls(reason), "orphan set aside");
            outcome.set_aside.push((spec.tenant.clone(), spec.child.clone(), key.clone(), reason.clone()));
        }
        let changed = done.inserted.len() as u64;
        *outcome.changed.entry(repair).or_default() += changed;
        *budget = budget.saturating_sub(changed);
        handled.extend(done.handled);
        if done.picked == 0 {
            for key in spec.only.iter().flatten().filter(|k| !handled.contains(*k)) {
                outcome.not_applied.push((spec.tenant.clone(), spec.child.clone(), key.join(", ")));
            }
            return Ok(());
        }
        cursor = done.cursor;
    }
}

/// Runs an undo batch by batch (by audit id, the newest first) until no audit row of its group
/// is left, the budget runs out, or the run is cancelled; lists the rows left by key.
async fn run_undo(
    writer: &mut Writer<'_>,
    batch_size: usize,
    spec: &undo::UndoSpec,
    budget: &mut u64,
    outcome: &mut Outcome,
) -> Result<(), Stop> {
    let repair = Repair::Undo.name();
    // Listed even when nothing is left to undo (`undo: 0 change(s)`).
    outcome.changed.entry(repair).or_default();
    // The same rule as heal's writes: a BEFORE row trigger could keep a row or change the value
    // undo writes, and the audit row would say otherwise.
    let event = spec.event();
    let refused: Vec<String> = refused_triggers(writer, vec![(spec.relation.clone(), spec.table.clone())], event)
        .await?
        .into_iter()
        .map(|(_, name)| name)
        .collect();
    let found = user_casts(writer, &spec.casts).await?;
    if !found.is_empty() {
        let reason = format!("undo: {}", casts::reason(&found, "undo these rows by hand"));
        tracing::warn!(run_id = %outcome.run_id, schema = %crate::sql::escape_controls(&spec.schema), table = %crate::sql::escape_controls(&spec.table), repair, reason = %crate::sql::escape_controls(&reason), "step set aside");
        outcome.refused.push((spec.schema.clone(), spec.table.clone(), reason));
        return Err(Stop::Reported);
    }
    if !refused.is_empty() {
        let reason = format!("undo: {}", triggers::event_reason(&refused, event));
        tracing::warn!(run_id = %outcome.run_id, schema = %crate::sql::escape_controls(&spec.schema), table = %crate::sql::escape_controls(&spec.table), repair, reason = %crate::sql::escape_controls(&reason), "step set aside");
        outcome.refused.push((spec.schema.clone(), spec.table.clone(), reason));
        return Err(Stop::Reported);
    }
    // The group is swept again while a sweep undid a row and left one still referenced: one copy
    // batch writes a table's rows in the shared table's order, so a row's descendants can have
    // smaller audit ids than the row and be undone in a later batch than it was tried in. Each
    // sweep tries every row not undone yet, so a row is listed as the last sweep left it; a row
    // the last sweep did not reach (the budget ran out, the run stopped) as the one before did.
    let mut previous: Vec<(String, String)> = Vec::new();
    loop {
        let mut sweep = Sweep::default();
        let result = undo_sweep(writer, batch_size, spec, budget, outcome, &mut sweep).await;
        let again =
            result.is_ok() && sweep.undone > 0 && sweep.left.iter().any(|(_, why)| why == undo::STILL_REFERENCED);
        if !again {
            previous.retain(|(key, _)| !sweep.seen.contains(key));
            let mut left: Vec<(String, String)> = sweep.left.into_iter().chain(previous).collect();
            left.sort();
            for (key, why) in left {
                outcome.left.push((spec.schema.clone(), spec.table.clone(), key, why));
            }
            return result;
        }
        previous = sweep.left;
    }
}

/// What one sweep of an undo's group did.
#[derive(Default)]
struct Sweep {
    /// Rows undone.
    undone: usize,
    /// Keys undone or left.
    seen: std::collections::HashSet<String>,
    /// (key, why) of the rows left.
    left: Vec<(String, String)>,
}

/// One sweep of an undo's group: its audit rows not undone yet, batch by batch from the newest.
async fn undo_sweep(
    writer: &mut Writer<'_>,
    batch_size: usize,
    spec: &undo::UndoSpec,
    budget: &mut u64,
    outcome: &mut Outcome,
    sweep: &mut Sweep,
) -> Result<(), Stop> {
    let repair = Repair::Undo.name();
    let mut cursor = undo::FIRST_CURSOR;
    loop {
        let limit = (*budget).min(batch_size as u64) as i64;
        if limit == 0 {
            return Err(Stop::BudgetReached);
        }
        let (run_id, spec_owned) = (outcome.run_id.clone(), spec.clone());
        let done = writer
            .transaction(move |tx| Box::pin(async move { undo::batch(tx, &spec_owned, limit, cursor, &run_id).await }))
            .await?;
        if done.picked == 0 {
            return Ok(());
        }
        for key in &done.undone {
            tracing::info!(run_id = %outcome.run_id, schema = %crate::sql::escape_controls(&spec.schema), table = %crate::sql::escape_controls(&spec.table), repair, key = %crate::sql::escape_controls(key), "healed");
        }
        let changed = done.undone.len() as u64;
        *outcome.changed.entry(repair).or_default() += changed;
        *budget = budget.saturating_sub(changed);
        sweep.undone += done.undone.len();
        sweep.seen.extend(done.undone);
        sweep.seen.extend(done.left.iter().map(|(key, _)| key.clone()));
        sweep.left.extend(done.left);
        cursor = done.cursor;
    }
}

/// `spec` with every table a `BEFORE INSERT` row trigger guards (one heal may not fire) made
/// unusable, as the database has them now: its keys are then set aside with the reason.
async fn checked_copy(writer: &mut Writer<'_>, spec: &copy::CopySpec) -> Result<copy::CopySpec, Stop> {
    let mut spec = spec.clone();
    let writable: Vec<String> =
        spec.tables.iter().filter(|(_, t)| t.in_shared && t.unusable.is_none()).map(|(n, _)| n.clone()).collect();
    let relations = writable.into_iter().map(|n| (crate::sql::qualified(&spec.tenant, &n), n)).collect();
    let refused = refused_triggers(writer, relations, triggers::INSERT).await?;
    for (name, table) in spec.tables.iter_mut() {
        let names: Vec<String> = refused.iter().filter(|(t, _)| t == name).map(|(_, n)| n.clone()).collect();
        if !names.is_empty() {
            table.unusable = Some(triggers::reason(&names, true));
        }
    }
    Ok(spec)
}

/// (table, `relation.trigger`) of every `BEFORE` row trigger of `event` on `relations` (qualified
/// relation, the table heal plans it for) and their partitions that `heal.allow_triggers` does
/// not allow, read in one transaction.
async fn refused_triggers(
    writer: &mut Writer<'_>,
    relations: Vec<(String, String)>,
    event: i32,
) -> Result<Vec<(String, String)>, Stop> {
    let tables = relations.clone();
    let relations: Vec<String> = relations.into_iter().map(|(relation, _)| relation).collect();
    let rows = writer
        .transaction(move |tx| {
            Box::pin(async move {
                tx.query_typed(triggers::BEFORE_ROW, &[(&relations, Type::TEXT_ARRAY), (&event, Type::INT4)]).await
            })
        })
        .await?;
    let allow = &writer.heal.allow_triggers;
    let mut out = Vec::new();
    for row in &rows {
        let (given, relation, trigger): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let Some((_, table)) = tables.iter().find(|(r, _)| *r == given) else { continue };
        if !triggers::allowed(allow, table, &relation, &trigger) {
            out.push((table.clone(), format!("{relation}.{trigger}")));
        }
    }
    Ok(out)
}

/// The casts of `pairs` ((source, target) types, see [`casts::USER_CASTS`]) that would run a
/// function outside `pg_catalog`, read in one transaction (under the tenant's `search_path`,
/// as the step's statements resolve the names).
async fn user_casts(writer: &mut Writer<'_>, pairs: &[(String, String)]) -> Result<Vec<casts::UserCast>, Stop> {
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    let (sources, targets) = casts::params(pairs);
    let rows = writer
        .transaction(move |tx| {
            Box::pin(async move {
                tx.query_typed(casts::USER_CASTS, &[(&sources, Type::TEXT_ARRAY), (&targets, Type::TEXT_ARRAY)]).await
            })
        })
        .await?;
    Ok(rows.iter().map(casts::UserCast::from_row).collect())
}

/// What a one-off step did.
enum OnceDone {
    /// Ran.
    Ran,
    /// Set aside: the added column's type is a constrained domain.
    Rewrite,
    /// Skipped: the column's default is no longer the one the plan saw.
    DefaultChanged,
    /// Skipped: the column to add exists (it appeared since the plan).
    Exists,
}

/// Runs a one-off statement (DDL) with its audit row in one transaction. An added column whose
/// type is a constrained domain there is set aside (nothing written) unless
/// `heal.allow_table_rewrite`: adding it would rewrite the table. A step with an expected
/// default takes the table's `ACCESS EXCLUSIVE` lock first (the one its `ALTER` needs, under
/// `heal.lock_timeout`), then runs only if the column still has that default.
async fn run_once(
    writer: &mut Writer<'_>,
    once: &OnceStep,
    tenant: &TenantPlan,
    action: &Action,
    outcome: &mut Outcome,
) -> Result<(), Stop> {
    let record = audit::record_once(&tenant.schema, &once.table, action.repair.name(), &once.key);
    let (statement, run_id) = (once.sql.clone(), outcome.run_id.clone());
    let timeout =
        once.long.then(|| format!("SET LOCAL statement_timeout = '{}ms'", writer.heal.validate_timeout.as_millis()));
    let guard = once.added.clone().filter(|_| !writer.heal.allow_table_rewrite).map(|(_, t)| t);
    let adds = once.added.clone().map(|(column, _)| column);
    let table = crate::sql::qualified(&tenant.schema, &once.table);
    let (expect, advance, pending) = (once.expect_default.clone(), once.advance.clone(), once.pending.clone());
    // The sequence a `nextval` default draws from is moved in transactions of its own, before
    // and after the `ALTER`: its `max()` reads the whole table, which must never happen under
    // the `ALTER`'s `ACCESS EXCLUSIVE` lock. The move after it catches values inserted
    // explicitly in between; both are forward only.
    let mut moved = match &advance {
        Some(sql) => advance_once(writer, sql, &outcome.run_id).await?,
        None => 0,
    };
    let done = writer
        .transaction_within(once.long, move |tx| {
            Box::pin(async move {
                if let Some(data_type) = guard {
                    let row = tx.query_typed_one(columns::CONSTRAINED_DOMAIN, &[(&data_type, Type::TEXT)]).await?;
                    if row.get::<_, bool>(0) {
                        return Ok(OnceDone::Rewrite);
                    }
                }
                if let Some(column) = adds {
                    // Under the lock the `ALTER` takes anyway: a column that appeared since the
                    // plan (a migration) is left as it is, nothing written or audited.
                    tx.batch_execute(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")).await?;
                    let exists = tx
                        .query_typed_opt(columns::CURRENT_DEFAULT, &[(&table, Type::TEXT), (&column, Type::TEXT)])
                        .await?;
                    if exists.is_some() {
                        return Ok(OnceDone::Exists);
                    }
                }
                if let Some(expect) = expect {
                    tx.batch_execute(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")).await?;
                    let now = tx
                        .query_typed_opt(
                            columns::CURRENT_DEFAULT,
                            &[(&table, Type::TEXT), (&expect.column, Type::TEXT)],
                        )
                        .await?;
                    if now.map(|r| r.get::<_, Option<String>>(0)) != Some(expect.default) {
                        return Ok(OnceDone::DefaultChanged);
                    }
                }
                if let Some(timeout) = timeout {
                    tx.batch_execute(&timeout).await?;
                }
                tx.batch_execute(&statement).await?;
                tx.query_typed(&record, &[(&run_id, Type::TEXT), (&statement, Type::TEXT)]).await?;
                if let Some(sql) = pending {
                    tx.query_typed(&sql, &[(&run_id, Type::TEXT)]).await?;
                }
                Ok(OnceDone::Ran)
            })
        })
        .await?;
    match done {
        OnceDone::Ran => {
            if let Some(sql) = &advance {
                moved += advance_once(writer, sql, &outcome.run_id).await?;
            }
        }
        OnceDone::Rewrite => {
            let (column, data_type) = once.added.clone().unwrap_or_default();
            let reason = columns::rewrite_reason(&column, &data_type);
            tracing::warn!(run_id = %outcome.run_id, schema = %crate::sql::escape_controls(&tenant.schema), table = %crate::sql::escape_controls(&once.table), repair = action.repair.name(), reason = %crate::sql::escape_controls(&reason), "step set aside");
            outcome.refused.push((tenant.schema.clone(), once.table.clone(), reason));
            return Err(Stop::Reported);
        }
        OnceDone::Exists => {
            let key = step_key(once.added.as_ref().map(|(c, _)| c.as_str()).unwrap_or_default(), "add_column");
            tracing::warn!(run_id = %outcome.run_id, schema = %crate::sql::escape_controls(&tenant.schema), table = %crate::sql::escape_controls(&once.table), repair = action.repair.name(), key = %crate::sql::escape_controls(&key), "skipped: the column exists since the plan");
            outcome.not_applied.push((tenant.schema.clone(), once.table.clone(), key));
            return Err(Stop::Reported);
        }
        OnceDone::DefaultChanged => {
            let key =
                step_key(once.expect_default.as_ref().map(|e| e.column.as_str()).unwrap_or_default(), "set_default");
            tracing::warn!(run_id = %outcome.run_id, schema = %crate::sql::escape_controls(&tenant.schema), table = %crate::sql::escape_controls(&once.table), repair = action.repair.name(), key = %crate::sql::escape_controls(&key), "skipped: the default changed since the plan");
            outcome.not_applied.push((tenant.schema.clone(), once.table.clone(), key));
            return Err(Stop::Reported);
        }
    }
    tracing::info!(run_id = %outcome.run_id, schema = %crate::sql::escape_controls(&tenant.schema), table = %crate::sql::escape_controls(&once.table), repair = action.repair.name(), statement = %crate::sql::escape_controls(&once.sql), "healed");
    if once.completes_repair {
        *outcome.changed.entry(action.repair.name()).or_default() += 1;
    }
    if moved > 0 {
        tracing::info!(run_id = %outcome.run_id, schema = %crate::sql::escape_controls(&tenant.schema), table = %crate::sql::escape_controls(&once.table), repair = action.repair.name(), "sequence moved past the column's values");
        *outcome.changed.entry(action.repair.name()).or_default() += moved;
    }
    Ok(())
}

/// Runs a one-off step's `advance` ([`sequence::advance_sql`], `$1` the run id) in a
/// transaction of its own: the number of sequences it moved.
async fn advance_once(writer: &mut Writer<'_>, sql: &str, run_id: &str) -> Result<u64, Stop> {
    let (sql, run_id) = (sql.to_string(), run_id.to_string());
    writer
        .transaction(move |tx| {
            Box::pin(async move { Ok(tx.query_typed(&sql, &[(&run_id, Type::TEXT)]).await?.len() as u64) })
        })
        .await
}

/// A one-off step's audit key as the summary names it: `{"column": C, "step": S}`.
fn step_key(column: &str, step: &str) -> String {
    format!("{{\"column\": {}, \"step\": {}}}", serde_json::Value::from(column), serde_json::Value::from(step))
}

/// Creates the audit table if it is missing.
async fn ensure_audit_table(client: &tokio_postgres::Transaction<'_>) -> Result<(), HealError> {
    let exists: bool = client
        .query_typed_one("SELECT pg_catalog.to_regclass($1) IS NOT NULL", &[(&audit::table(), Type::TEXT)])
        .await
        .map_err(|e| HealError::AuditTable(e.into()))?
        .get(0);
    if !exists {
        client.batch_execute(&audit::create_sql()).await.map_err(|e| HealError::AuditTable(e.into()))?;
    }
    Ok(())
}

/// Creates the indexes undo reads the audit table by when they are missing (audit tables of
/// earlier versions), under the run's lease (one healer creates them) and
/// `heal.validate_timeout` (an old audit table can be large; the build blocks only writes to
/// the audit table, heal's own). A role that does not own the table cannot: a warning says so,
/// and undo works without them, reading the run's audit rows from a scan of the table.
async fn ensure_audit_indexes(client: &mut Client, heal: &HealConfig) -> Result<(), HealError> {
    let create = async {
        let tx = db::begin_heal(client, heal).await?;
        let state = tx.query_typed_opt(audit::INDEXES_MISSING, &[(&audit::table(), Type::TEXT)]).await?;
        match state.map(|r| (r.get::<_, bool>(0), r.get::<_, bool>(1))) {
            Some((true, true)) => {
                let timeout = format!("SET LOCAL statement_timeout = '{}ms'", heal.validate_timeout.as_millis());
                tx.batch_execute(&timeout).await?;
                tx.batch_execute(&audit::indexes_sql()).await?;
            }
            Some((true, false)) => tracing::warn!(
                "the audit table tenant_audit.heal_log lacks the indexes undo reads it by, and the heal role does not own it: create them as docs/heal.md shows"
            ),
            _ => {}
        }
        tx.commit().await?;
        Ok::<(), DbError>(())
    };
    create.await.map_err(HealError::AuditTable)
}

/// Checks, in one query, that the role has every privilege the plan needs (see
/// [`Action::privileges`]: what copies and backfills read and write, ownership for added
/// columns, what an undo deletes, updates and reads), INSERT and SELECT on the audit table and
/// what the lease takes; the first one missing is the error.
async fn check_privileges(client: &tokio_postgres::Transaction<'_>, plan: &Plan) -> Result<(), HealError> {
    // Relations dropped since the scan are left to fail (and be reported) in their own repair.
    // A relation checked with its tree stands for its inheritance children and partitions too
    // (a backfill updates each by name; privileges on a parent do not cover that).
    const CHECK: &str = "WITH RECURSIVE r(ord, privilege, oid, tree) AS (
  SELECT t.ord, t.privilege, pg_catalog.to_regclass(t.rel)::pg_catalog.oid, t.tree
  FROM ROWS FROM (pg_catalog.unnest($1::text[]), pg_catalog.unnest($2::text[]), pg_catalog.unnest($3::bool[])) WITH ORDINALITY AS t(rel, privilege, tree, ord)
  WHERE pg_catalog.to_regclass(t.rel) IS NOT NULL
  UNION
  SELECT r.ord, r.privilege, i.inhrelid, r.tree FROM r JOIN pg_catalog.pg_inherits i ON i.inhparent = r.oid
  WHERE r.tree
)
SELECT n.nspname::text, c.relname::text, r.privilege
FROM r JOIN pg_catalog.pg_class c ON c.oid = r.oid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE NOT CASE r.privilege
    WHEN 'OWNER' THEN pg_catalog.pg_has_role(c.relowner, 'USAGE')
    ELSE pg_catalog.has_table_privilege(r.oid, r.privilege) END
ORDER BY r.ord, n.nspname, c.relname
LIMIT 1";
    // SELECT on the audit table: every write statement reads its audit rows back (`RETURNING`).
    let mut needed: Vec<plan::Needed> = [
        (audit::table(), "INSERT"),
        (audit::table(), "SELECT"),
        (lease::table(), "INSERT"),
        (lease::table(), "UPDATE"),
        (lease::table(), "DELETE"),
    ]
    .into_iter()
    .map(|(relation, privilege)| plan::Needed { relation, privilege, tree: false })
    .collect();
    for tenant in &plan.tenants {
        for action in &tenant.actions {
            needed.extend(action.privileges(&tenant.schema));
        }
    }
    let rels: Vec<&str> = needed.iter().map(|n| n.relation.as_str()).collect();
    let privileges: Vec<&str> = needed.iter().map(|n| n.privilege).collect();
    let trees: Vec<bool> = needed.iter().map(|n| n.tree).collect();
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 3] =
        [(&rels, Type::TEXT_ARRAY), (&privileges, Type::TEXT_ARRAY), (&trees, Type::BOOL_ARRAY)];
    if let Some(row) = client.query_typed_opt(CHECK, &params).await.map_err(DbError::from)? {
        let (schema, name, privilege): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let what = if privilege == "OWNER" { "ownership (to add columns)".to_string() } else { privilege };
        let rel = crate::sql::escape_controls(&crate::sql::qualified(&schema, &name));
        return Err(HealError::Privileges(format!("no {what} on {rel}")));
    }
    Ok(())
}

fn run_id() -> String {
    format!("{}-{}", chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"), std::process::id())
}
