//! The scheduler: scans on the cron schedule (and on demand), never two at once, and keeps the
//! last good report for the HTTP endpoints.
//!
//! When `heal.enabled`, heal runs after each successful scheduled scan, inside the same
//! no-overlap guard; after a requested scan (`POST /scan`) only when `web.scan_requests.heal`
//! allows it too.
//!
//! Scheduled scans are incremental (see [`crate::incremental`]): the state they carry forward
//! lives here between scans. A scan asked for (`POST /scan`) is full, and so is the scan after
//! a heal run that wrote or failed.
//!
//! Invariants: at most one scan runs at a time (a tick that finds one running is skipped and
//! counted); a failed scan keeps the previous report and its metrics; everything stops when the
//! shutdown token is cancelled, running queries included.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::Config;
use crate::db::{self, Pool};
use crate::metrics::Metrics;
use crate::report::{Report, ScanKind};
use crate::scan;
use crate::{heal, incremental, replica};

/// Who asked for a scan: it decides whether heal may follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The cron schedule or `serve.scan_on_start`: heals when `heal.enabled`.
    Schedule,
    /// `POST /scan`: heals only when `web.scan_requests.heal` is set as well.
    Request,
}

/// State shared by the schedule loop, the scans it starts and the HTTP handlers.
pub struct Scheduler {
    config: Arc<Config>,
    pool: Pool,
    /// One session for pings, so that a ping never waits behind a scan's sessions.
    ping_pool: Pool,
    /// Writer sessions, only when `heal.enabled`: heal runs after every successful scheduled scan
    /// (after a requested one only with `web.scan_requests.heal`).
    heal_pool: Option<Pool>,
    /// One session to the primary, when `heal.database_url` names another server than the scan's:
    /// the replica lag in bytes.
    primary_pool: Option<Pool>,
    metrics: Arc<Metrics>,
    /// The last successful scan's report; `None` until one completes.
    last_report: RwLock<Option<Arc<Report>>>,
    /// Set while a scan runs: the no-overlap guard.
    running: AtomicBool,
    /// Whether the database answered the last ping or connection attempt in time.
    database_up: AtomicBool,
    shutdown: CancellationToken,
    /// The running scan task, awaited at shutdown.
    tasks: TaskTracker,
    /// The runtime scans run on, whoever starts them (a request arrives on the listener's).
    runtime: tokio::runtime::Handle,
    /// What incremental scans carry forward; taken by the running scan and put back when it
    /// ends (a scan that panics loses it, and the next scan is full).
    incremental: Mutex<Option<incremental::State>>,
    /// The span of the target's tasks: their logs carry its name.
    span: tracing::Span,
}

impl Scheduler {
    /// Call it on the runtime the scans are to run on.
    pub fn new(config: Arc<Config>, metrics: Arc<Metrics>, shutdown: CancellationToken) -> Arc<Scheduler> {
        let pool = db::scan_pool(&config.database, &config.scan);
        let ping_pool = db::ping_pool(&config.database, config.scan.connect_timeout);
        let heal_pool = config.heal.enabled.then(|| db::heal_pool(&config.heal, config.scan.connect_timeout));
        let primary_pool = (config.heal.database.target != config.database.target)
            .then(|| db::ping_pool(&config.heal.database, config.scan.connect_timeout));
        metrics.set_database_up(false);
        Arc::new(Scheduler {
            pool,
            ping_pool,
            heal_pool,
            primary_pool,
            metrics,
            last_report: RwLock::new(None),
            running: AtomicBool::new(false),
            database_up: AtomicBool::new(false),
            shutdown,
            tasks: TaskTracker::new(),
            runtime: tokio::runtime::Handle::current(),
            incremental: Mutex::new(None),
            span: tracing::info_span!("target", database = %config.name),
            config,
        })
    }

    /// Starts a scan in the background unless one is running; returns whether it started. A
    /// scheduled scan is incremental unless `scan.full_every` or the signals say full; a
    /// requested one checks everything.
    pub fn try_start_scan(self: &Arc<Self>, trigger: Trigger) -> bool {
        if self.shutdown.is_cancelled() || self.running.swap(true, Ordering::AcqRel) {
            return false;
        }
        let (kind, heal) = match trigger {
            Trigger::Schedule => (ScanKind::Incremental, true),
            Trigger::Request => (ScanKind::Full, self.config.web.scan_requests.heal),
        };
        let me = Arc::clone(self);
        let span = self.span.clone();
        self.tasks.spawn_on(
            async move {
                let _running = ClearOnDrop(&me.running);
                me.scan_once(kind, heal).await;
            }
            .instrument(span),
            &self.runtime,
        );
        true
    }

    pub fn last_report(&self) -> Option<Arc<Report>> {
        self.last_report.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn is_scanning(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// `Ok` when the database answered and the last successful scan is recent enough, else why not.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.database_up.load(Ordering::Acquire) {
            return Err("database unreachable".into());
        }
        let report = self.last_report().ok_or("no scan has completed yet")?;
        let age = (Utc::now() - report.finished_at).to_std().unwrap_or_default();
        if age > self.config.serve.ready_max_age {
            return Err(format!("last successful scan finished {}s ago", age.as_secs()));
        }
        Ok(())
    }

    /// The schedule loop: waits for the database (capped exponential backoff), optionally scans
    /// at once, then starts a scan at every cron tick until shutdown.
    pub async fn run(self: Arc<Self>) {
        let span = self.span.clone();
        self.schedule().instrument(span).await
    }

    /// The target's name: the `database` label of its metrics.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    async fn schedule(self: Arc<Self>) {
        if !self.wait_for_database().await {
            return;
        }
        self.tasks.spawn(Arc::clone(&self).watch_database().instrument(self.span.clone()));
        if self.config.serve.scan_on_start {
            self.try_start_scan(Trigger::Schedule);
        }
        loop {
            let Some(next) = self.config.serve.schedule.upcoming(Utc).next() else { return };
            let wait = (next - Utc::now()).to_std().unwrap_or_default();
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {
                    if !self.try_start_scan(Trigger::Schedule) {
                        tracing::warn!("scheduled scan skipped: the previous scan is still running");
                        self.metrics.record_skipped_tick();
                    }
                }
            }
        }
    }

    /// Waits until running scans have ended (they end promptly once shutdown is cancelled).
    pub async fn wait_idle(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Pings until the database answers; false if shutdown came first.
    async fn wait_for_database(&self) -> bool {
        let mut backoff = self.config.serve.retry_initial_backoff;
        loop {
            match self.ping().await {
                Ok(()) => {
                    self.set_database_up(true);
                    return true;
                }
                Err(e) => {
                    self.set_database_up(false);
                    tracing::warn!(error = %e, retry_in_seconds = backoff.as_secs_f64(), "database unreachable");
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.config.serve.retry_max_backoff);
        }
    }

    /// Pings every `database.ping_interval` until shutdown: `database_up` turns 0 when a ping
    /// does not answer within `database.ping_timeout`, and 1 again when one does.
    async fn watch_database(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.config.database_checks.ping_interval) => {}
            }
            let result = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                result = self.ping() => result,
            };
            let was_up = self.database_up.load(Ordering::Acquire);
            match result {
                Ok(()) if !was_up => tracing::info!("database answers again"),
                Err(ref e) if was_up => tracing::warn!(error = %e, "database ping failed"),
                _ => {}
            }
            self.set_database_up(result.is_ok());
        }
    }

    async fn ping(&self) -> Result<(), db::DbError> {
        db::ping(&self.ping_pool, &self.config.database.target, self.config.database_checks.ping_timeout).await
    }

    /// Exports the scan connection's replica lag (none on a primary). A failure leaves the last
    /// value: the scan that follows reports the database's state.
    async fn record_replica_lag(&self) {
        let (config, within) = (&self.config, self.config.database_checks.ping_timeout);
        let scan = (&self.ping_pool, config.database.target.as_str());
        let primary = self.primary_pool.as_ref().map(|pool| (pool, config.heal.database.target.as_str()));
        match replica::lag(scan, primary, within).await {
            Ok(lag) => self.metrics.set_replica_lag(lag.as_ref()),
            Err(e) => tracing::debug!(error = %e, "cannot read the replica lag"),
        }
    }

    fn set_database_up(&self, up: bool) {
        self.database_up.store(up, Ordering::Release);
        self.metrics.set_database_up(up);
    }

    /// One scan (`ScanKind::Full` starts from an empty incremental state); then heal, when
    /// `heal` and `heal.enabled`.
    async fn scan_once(&self, kind: ScanKind, heal: bool) {
        let clock = Instant::now();
        self.record_replica_lag().await;
        let stored = self.incremental.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut state = stored.filter(|_| kind == ScanKind::Incremental).unwrap_or_default();
        let result = scan::run_with(&self.config, &self.pool, &self.shutdown, None, Some(&mut state)).await;
        *self.incremental.lock().unwrap_or_else(|e| e.into_inner()) = Some(state);
        match result {
            Ok(scanned) => {
                for e in &scanned.report.errors {
                    tracing::warn!(
                        schema = e.schema.as_deref().map(crate::sql::escape_controls),
                        table = e.table.as_deref().map(crate::sql::escape_controls),
                        kind = e.kind.name(),
                        error = %crate::sql::escape_controls(&e.message),
                        "tenant scan error"
                    );
                }
                self.set_database_up(true);
                self.metrics.record_report(&scanned.report, self.config.metrics.max_tenant_series);
                if let Some(pool) = self.heal_pool.as_ref().filter(|_| heal) {
                    let mut plan = heal::Plan::build(&scanned, &self.config);
                    if let Err(e) = heal::resume_pending(&mut plan, &scanned, &self.config, pool).await {
                        tracing::error!(error = %e, "cannot read the pending backfills from the audit table; this run does not resume them");
                    }
                    let healed =
                        heal::execute(&self.config.heal, pool, &plan, Some(&self.metrics), &self.shutdown).await;
                    let may_have_written = match &healed {
                        Ok(outcome) => outcome.total_changed() > 0 || !outcome.errors.is_empty() || outcome.interrupted,
                        Err(e) => {
                            tracing::error!(error = %e, "heal did not run");
                            // Stood down before writing (another shard or a manual run heals
                            // now): the next scan stays incremental.
                            !matches!(e, heal::HealError::LockedOut)
                        }
                    };
                    // Heal's writes are reported by the next scan at once, not after heal's
                    // session has flushed its statistics: that scan is full.
                    if may_have_written {
                        *self.incremental.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    }
                }
                *self.last_report.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(scanned.report));
            }
            Err(scan::ScanFailure::Cancelled) => tracing::info!("scan cancelled by shutdown"),
            Err(e) => {
                if e.is_connection() {
                    self.set_database_up(false);
                    // Pooled sessions that look open may have died with the server: the next
                    // scan starts on fresh ones.
                    db::drop_idle_sessions(&self.pool);
                }
                tracing::error!(error = %e, kind = e.metric_label(), "scan failed");
                self.metrics.record_failure(e.metric_label(), clock.elapsed().as_secs_f64());
            }
        }
    }
}

/// Clears the no-overlap flag when the scan task ends, panic included.
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// How long to wait for `tasks` before giving up at shutdown.
pub fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}
