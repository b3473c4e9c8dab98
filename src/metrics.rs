//! The Prometheus metrics: an owned registry, updated from a finished scan and read by `/metrics`.
//!
//! Invariants: metrics change only when a scan or a heal run ends (or the scheduler records a
//! skipped tick or the database state), never on a scrape; per-finding series are rebuilt from each successful
//! report, so a fixed problem's series disappears on the next scan; per-schema series are capped
//! at `metrics.max_tenant_series` and the rest are only in the aggregates. Names and labels are
//! documented in docs/metrics.md. Every method that changes a metric ends with
//! [`Metrics::changed`], so that [`Metrics::generation`] tells the HTTP layer when its encoded
//! copy is stale.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use prometheus::{
    Encoder, Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::report::{Check, Detail, ErrorKind, Finding, Report, ScanKind};

/// Every metric of the process, registered in one registry.
pub struct Metrics {
    registry: Registry,
    /// Held while a report is applied and while metrics are encoded, so a scrape never sees a
    /// half-rebuilt set of per-finding series.
    consistency: Mutex<()>,
    /// Incremented after every change: the HTTP layer re-encodes only when it moved.
    generation: AtomicU64,
    orphan_rows: IntGaugeVec,
    null_timestamps: IntGaugeVec,
    sequence_behind: IntGaugeVec,
    cross_schema_fks: IntGaugeVec,
    schema_drift: IntGaugeVec,
    registry_findings: IntGaugeVec,
    table_orphan_rows: IntGaugeVec,
    affected_rows: IntGaugeVec,
    affected_tenants: IntGaugeVec,
    findings: IntGaugeVec,
    series_dropped: IntGauge,
    tenants_discovered: IntGauge,
    tenants_scanned: IntGauge,
    tenants_failed: IntGauge,
    last_scan_duration: Gauge,
    last_success_timestamp: Gauge,
    last_scan_success: IntGauge,
    scan_errors: IntCounterVec,
    scans: IntCounterVec,
    skipped_ticks: IntCounter,
    database_up: IntGauge,
    healed_rows: IntCounterVec,
    heal_errors: IntCounterVec,
    heal_skipped_tenants: IntCounterVec,
    heal_set_aside: IntCounter,
    heal_runs: IntCounterVec,
    last_heal_timestamp: Gauge,
    scan_kind_duration: GaugeVec,
    scans_by_kind: IntCounterVec,
    scan_tables: IntGaugeVec,
    carried_forward_age: Gauge,
    /// No labels of their own: a series exists only while the scan connection is a standby.
    replica_lag_seconds: GaugeVec,
    replica_lag_bytes: GaugeVec,
}

/// The repairs heal can make: the `repair` label of the heal metrics.
pub const REPAIRS: [&str; 5] =
    ["copy_missing_parents", "backfill_null_timestamps", "add_missing_columns", "advance_sequences", "undo"];
/// Why heal left a tenant alone: the `reason` label of `tenant_audit_heal_skipped_tenants_total`.
pub const HEAL_SKIP_REASONS: [&str; 2] = ["lock_timeout", "max_rows_per_run"];
/// Outcomes of a heal run: the `result` label of `tenant_audit_heal_runs_total`.
pub const HEAL_RESULTS: [&str; 3] = ["success", "failure", "locked_out"];

/// Label values of `tenant_audit_scan_errors_total{kind}` besides the per-tenant [`ErrorKind`]s:
/// failures that stopped a whole scan.
pub const SCAN_FAILURE_KINDS: [&str; 4] = ["discovery", "catalog", "config", "deadline"];

/// Registers the metrics of one target in its registry, each with the constant label
/// `database`.
struct Builder<'a> {
    registry: &'a Registry,
    database: &'a str,
}

impl Builder<'_> {
    fn opts(&self, name: &str, help: &str) -> Opts {
        Opts::new(name, help).const_label("database", self.database)
    }

    fn register<M: prometheus::core::Collector + Clone + 'static>(&self, metric: M) -> M {
        self.registry.register(Box::new(metric.clone())).expect("metric registered once");
        metric
    }
}

fn gauge_vec(b: &Builder<'_>, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    b.register(IntGaugeVec::new(b.opts(name, help), labels).expect("valid metric definition"))
}

fn int_gauge(b: &Builder<'_>, name: &str, help: &str) -> IntGauge {
    b.register(IntGauge::with_opts(b.opts(name, help)).expect("valid metric definition"))
}

fn gauge(b: &Builder<'_>, name: &str, help: &str) -> Gauge {
    b.register(Gauge::with_opts(b.opts(name, help)).expect("valid metric definition"))
}

fn counter(b: &Builder<'_>, name: &str, help: &str) -> IntCounter {
    b.register(IntCounter::with_opts(b.opts(name, help)).expect("valid metric definition"))
}

fn float_gauge_vec(b: &Builder<'_>, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    b.register(GaugeVec::new(b.opts(name, help), labels).expect("valid metric definition"))
}

fn counter_vec(b: &Builder<'_>, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    b.register(IntCounterVec::new(b.opts(name, help), labels).expect("valid metric definition"))
}

impl Metrics {
    /// The metrics of target `database` (its name: the value of their `database` label).
    pub fn new(database: &str) -> Metrics {
        let r = Registry::new();
        let b = Builder { registry: &r, database };
        let per_schema = ["schema", "table", "column"];
        let m = Metrics {
            generation: AtomicU64::new(0),
            orphan_rows: gauge_vec(
                &b,
                "tenant_audit_orphan_rows",
                "Child rows whose parent is missing from the tenant's expected parent table.",
                &[&per_schema[..], &["parent_table", "parent_location"]].concat(),
            ),
            null_timestamps: gauge_vec(
                &b,
                "tenant_audit_null_timestamps",
                "NULL values in a required timestamp column.",
                &per_schema,
            ),
            sequence_behind: gauge_vec(
                &b,
                "tenant_audit_sequence_behind",
                "How many of a tenant sequence's next values are already taken in its column.",
                &per_schema,
            ),
            cross_schema_fks: gauge_vec(
                &b,
                "tenant_audit_cross_schema_fks",
                "Foreign keys of a tenant that check another schema's table.",
                &[&per_schema[..], &["target_schema", "target_table", "reason"]].concat(),
            ),
            schema_drift: gauge_vec(
                &b,
                "tenant_audit_schema_drift",
                "Differences between a tenant table and the reference shape.",
                &[&per_schema[..], &["difference"]].concat(),
            ),
            registry_findings: gauge_vec(
                &b,
                "tenant_audit_registry_findings",
                "Registry rows without a schema and schemas without a registry row.",
                &["schema", "check"],
            ),
            table_orphan_rows: gauge_vec(
                &b,
                "tenant_audit_table_orphan_rows",
                "Orphan rows summed over all tenants.",
                &["table", "column", "parent_table", "parent_location"],
            ),
            affected_rows: gauge_vec(
                &b,
                "tenant_audit_affected_rows",
                "Rows (or structural problems) found, summed over all tenants.",
                &["check", "table"],
            ),
            affected_tenants: gauge_vec(
                &b,
                "tenant_audit_affected_tenants",
                "Tenants with at least one finding.",
                &["check", "table"],
            ),
            findings: gauge_vec(&b, "tenant_audit_findings", "Findings of the last successful scan.", &["check"]),
            series_dropped: int_gauge(
                &b,
                "tenant_audit_series_dropped",
                "Per-schema series not exported because of metrics.max_tenant_series.",
            ),
            tenants_discovered: int_gauge(
                &b,
                "tenant_audit_tenants_discovered",
                "Tenant schemas found by the last successful scan.",
            ),
            tenants_scanned: int_gauge(
                &b,
                "tenant_audit_tenants_scanned",
                "Tenants the last successful scan checked without error.",
            ),
            tenants_failed: int_gauge(
                &b,
                "tenant_audit_tenants_failed",
                "Tenants with an error in the last successful scan.",
            ),
            last_scan_duration: gauge(
                &b,
                "tenant_audit_last_scan_duration_seconds",
                "Duration of the last scan, successful or not.",
            ),
            last_success_timestamp: gauge(
                &b,
                "tenant_audit_last_success_timestamp_seconds",
                "Unix time at which the last successful scan finished.",
            ),
            last_scan_success: int_gauge(
                &b,
                "tenant_audit_last_scan_success",
                "1 if the last scan completed, 0 if it failed.",
            ),
            scan_errors: counter_vec(&b, "tenant_audit_scan_errors_total", "Errors met by scans, by kind.", &["kind"]),
            scans: counter_vec(&b, "tenant_audit_scans_total", "Scans run, by result.", &["result"]),
            skipped_ticks: counter(
                &b,
                "tenant_audit_skipped_ticks_total",
                "Scheduled scans skipped because a scan was running.",
            ),
            database_up: int_gauge(
                &b,
                "tenant_audit_database_up",
                "1 if the database answered the last attempt, else 0.",
            ),
            healed_rows: counter_vec(
                &b,
                "tenant_audit_healed_rows_total",
                "Rows (or columns) changed by heal, by repair.",
                &["repair"],
            ),
            heal_errors: counter_vec(
                &b,
                "tenant_audit_heal_errors_total",
                "Repairs of a tenant that failed, by repair.",
                &["repair"],
            ),
            heal_skipped_tenants: counter_vec(
                &b,
                "tenant_audit_heal_skipped_tenants_total",
                "Tenants heal left for a later run, by reason.",
                &["reason"],
            ),
            heal_set_aside: counter(
                &b,
                "tenant_audit_heal_set_aside_total",
                "Orphaned keys a copy set aside (broken chain, not the same entity, a clash) and steps heal refused (a BEFORE row trigger not allowed, a table rewrite).",
            ),
            heal_runs: counter_vec(
                &b,
                "tenant_audit_heal_runs_total",
                "Heal runs, by result (locked_out: another healer held the lock).",
                &["result"],
            ),
            last_heal_timestamp: gauge(
                &b,
                "tenant_audit_last_heal_timestamp_seconds",
                "Unix time the last heal run finished.",
            ),
            scan_kind_duration: float_gauge_vec(
                &b,
                "tenant_audit_scan_kind_duration_seconds",
                "Duration of the last successful scan of each kind (full or incremental).",
                &["scan_kind"],
            ),
            scans_by_kind: counter_vec(
                &b,
                "tenant_audit_scans_completed_total",
                "Successful scans, by kind (full or incremental).",
                &["scan_kind"],
            ),
            scan_tables: gauge_vec(
                &b,
                "tenant_audit_scan_tables",
                "Tables with data checks in the last successful scan: checked, or carried forward from an earlier scan.",
                &["scan_kind", "state"],
            ),
            carried_forward_age: gauge(
                &b,
                "tenant_audit_carried_forward_oldest_age_seconds",
                "Age, when the last successful scan finished, of its oldest carried-forward result (0 when none).",
            ),
            replica_lag_seconds: float_gauge_vec(
                &b,
                "tenant_audit_replica_lag_seconds",
                "When the scan connection is a hot standby: now() - pg_last_xact_replay_timestamp() at the start of the last scan, 0 when nothing waits for replay.",
                &[],
            ),
            replica_lag_bytes: float_gauge_vec(
                &b,
                "tenant_audit_replica_lag_bytes",
                "When the scan connection is a hot standby and heal connects to the primary: WAL bytes the standby had not replayed at the start of the last scan.",
                &[],
            ),
            consistency: Mutex::new(()),
            registry: r,
        };
        // Counters exist from the start, so that rate() and alert rules see them before the
        // first error.
        for kind in ErrorKind::ALL {
            m.scan_errors.with_label_values(&[kind.name()]);
        }
        for kind in SCAN_FAILURE_KINDS {
            m.scan_errors.with_label_values(&[kind]);
        }
        for result in ["success", "failure"] {
            m.scans.with_label_values(&[result]);
        }
        for kind in ScanKind::ALL {
            m.scans_by_kind.with_label_values(&[kind.name()]);
        }
        for check in Check::ALL {
            m.findings.with_label_values(&[check.name()]);
        }
        for repair in REPAIRS {
            m.healed_rows.with_label_values(&[repair]);
            m.heal_errors.with_label_values(&[repair]);
        }
        for reason in HEAL_SKIP_REASONS {
            m.heal_skipped_tenants.with_label_values(&[reason]);
        }
        for result in HEAL_RESULTS {
            m.heal_runs.with_label_values(&[result]);
        }
        m
    }

    /// Replaces the findings series with those of `report` and records the scan's health.
    pub fn record_report(&self, report: &Report, max_tenant_series: usize) {
        let _guard = self.consistency.lock().unwrap_or_else(|e| e.into_inner());
        for vec in [
            &self.orphan_rows,
            &self.null_timestamps,
            &self.sequence_behind,
            &self.cross_schema_fks,
            &self.schema_drift,
            &self.registry_findings,
            &self.table_orphan_rows,
            &self.affected_rows,
            &self.affected_tenants,
        ] {
            vec.reset();
        }
        let mut per_schema: Vec<&Finding> = report.findings.iter().collect();
        // Most severe first, then largest: what the cap keeps.
        per_schema.sort_by_key(|f| (f.check, std::cmp::Reverse(f.count)));
        let kept = per_schema.len().min(max_tenant_series);
        for f in &per_schema[..kept] {
            self.per_schema_gauge(f).add(f.count as i64);
        }
        self.series_dropped.set((per_schema.len() - kept) as i64);
        self.record_aggregates(report);

        self.tenants_discovered.set(report.tenants.discovered as i64);
        self.tenants_scanned.set(report.tenants.scanned as i64);
        self.tenants_failed.set(report.tenants.failed as i64);
        self.last_scan_duration.set(report.duration_seconds);
        self.last_success_timestamp.set(report.finished_at.timestamp_millis() as f64 / 1000.0);
        self.last_scan_success.set(1);
        self.database_up.set(1);
        self.scans.with_label_values(&["success"]).inc();
        self.record_scan_kind(report);
        for e in &report.errors {
            self.scan_errors.with_label_values(&[e.kind.name()]).inc();
        }
        self.changed();
    }

    /// Records a scan that failed as a whole; the last good findings stay exported.
    pub fn record_failure(&self, kind: &str, duration_seconds: f64) {
        self.last_scan_success.set(0);
        self.last_scan_duration.set(duration_seconds);
        self.scans.with_label_values(&["failure"]).inc();
        self.scan_errors.with_label_values(&[kind]).inc();
        self.changed();
    }

    /// Records a heal run: its changes, skipped tenants and errors, or why it did not run.
    pub fn record_heal(&self, result: &Result<crate::heal::Outcome, crate::heal::HealError>) {
        self.last_heal_timestamp.set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
        match result {
            Ok(outcome) => {
                self.heal_runs.with_label_values(&["success"]).inc();
                for (repair, n) in &outcome.changed {
                    self.healed_rows.with_label_values(&[repair]).inc_by(*n);
                }
                for (_, reason) in &outcome.skipped {
                    self.heal_skipped_tenants.with_label_values(&[reason.name()]).inc();
                }
                self.heal_set_aside.inc_by((outcome.set_aside.len() + outcome.refused.len()) as u64);
                for (_, repair, _) in &outcome.errors {
                    self.heal_errors.with_label_values(&[repair.name()]).inc();
                }
            }
            Err(e) => self.heal_runs.with_label_values(&[e.metric_label()]).inc(),
        }
        self.changed();
    }

    /// Records whether the database answered. Called after every ping: the metrics count as
    /// changed only when the value did, so that `/metrics` is not encoded again for nothing.
    pub fn set_database_up(&self, up: bool) {
        if self.database_up.get() != i64::from(up) {
            self.database_up.set(i64::from(up));
            self.changed();
        }
    }

    /// Records the scan connection's replica lag: `None` on a primary (the series go away;
    /// on a primary that had none, nothing changes).
    pub fn set_replica_lag(&self, lag: Option<&crate::replica::Lag>) {
        let had_series = !prometheus::core::Collector::collect(&self.replica_lag_seconds)
            .iter()
            .all(|family| family.get_metric().is_empty());
        if lag.is_none() && !had_series {
            return;
        }
        self.replica_lag_seconds.reset();
        self.replica_lag_bytes.reset();
        if let Some(lag) = lag {
            self.replica_lag_seconds.with_label_values::<&str>(&[]).set(lag.seconds);
            if let Some(bytes) = lag.bytes {
                self.replica_lag_bytes.with_label_values::<&str>(&[]).set(bytes);
            }
        }
        self.changed();
    }

    pub fn record_skipped_tick(&self) {
        self.skipped_ticks.inc();
        self.changed();
    }

    /// Marks the metrics changed; called after every change.
    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// A number that moves whenever a metric changed. Read it before [`Metrics::encode`]: an
    /// encoding is current for the generation read before it.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.gather(), &mut out).expect("text encoding of gathered metrics");
        String::from_utf8(out).expect("the text format is UTF-8")
    }

    /// Every metric family, read in one consistent state.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        let _guard = self.consistency.lock().unwrap_or_else(|e| e.into_inner());
        self.registry.gather()
    }

    fn per_schema_gauge(&self, f: &Finding) -> IntGauge {
        let table = f.table.as_deref().unwrap_or("");
        let column = f.columns.join(",");
        match &f.detail {
            Detail::OrphanRows { parent_table, parent_location, .. } => {
                self.orphan_rows.with_label_values(&[&f.schema, table, &column, parent_table, parent_location.name()])
            }
            Detail::NullTimestamps { .. } => self.null_timestamps.with_label_values(&[&f.schema, table, &column]),
            Detail::SequenceBehind { .. } => self.sequence_behind.with_label_values(&[&f.schema, table, &column]),
            Detail::CrossSchemaFk { target_schema, target_table, reason, .. } => self
                .cross_schema_fks
                .with_label_values(&[&f.schema, table, &column, target_schema, target_table, reason.name()]),
            Detail::SchemaDrift { difference, .. } => {
                self.schema_drift.with_label_values(&[&f.schema, table, &column, difference.name()])
            }
            Detail::None => self.registry_findings.with_label_values(&[&f.schema, f.check.name()]),
        }
    }

    /// The kind of the scan, what it checked and carried forward, and the oldest result's age.
    fn record_scan_kind(&self, report: &Report) {
        let kind = report.scan.kind.name();
        self.scan_kind_duration.with_label_values(&[kind]).set(report.duration_seconds);
        self.scans_by_kind.with_label_values(&[kind]).inc();
        self.scan_tables.reset();
        self.scan_tables.with_label_values(&[kind, "checked"]).set(report.scan.tables_checked as i64);
        self.scan_tables.with_label_values(&[kind, "carried_forward"]).set(report.scan.tables_carried_forward as i64);
        let age = report
            .scan
            .oldest_carried_forward_at
            .map_or(0.0, |at| (report.finished_at - at).num_milliseconds().max(0) as f64 / 1000.0);
        self.carried_forward_age.set(age);
    }

    fn record_aggregates(&self, report: &Report) {
        for (check, summary) in &report.summary {
            self.findings.with_label_values(&[check.name()]).set(summary.findings as i64);
        }
        let mut tenants: std::collections::BTreeMap<(Check, &str), std::collections::BTreeSet<&str>> =
            Default::default();
        for f in &report.findings {
            let table = f.table.as_deref().unwrap_or("");
            self.affected_rows.with_label_values(&[f.check.name(), table]).add(f.count as i64);
            tenants.entry((f.check, table)).or_default().insert(&f.schema);
            if let Detail::OrphanRows { parent_table, parent_location, .. } = &f.detail {
                self.table_orphan_rows
                    .with_label_values(&[table, &f.columns.join(","), parent_table, parent_location.name()])
                    .add(f.count as i64);
            }
        }
        for ((check, table), schemas) in tenants {
            self.affected_tenants.with_label_values(&[check.name(), table]).set(schemas.len() as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_and_a_primary_s_lag_change_the_metrics_only_when_a_value_changes() {
        let m = Metrics::new("db");
        let start = m.generation();
        m.set_database_up(false);
        m.set_replica_lag(None);
        assert_eq!(m.generation(), start, "database_up starts at 0 and a primary has no lag series");
        m.set_database_up(true);
        let up = m.generation();
        assert_ne!(up, start);
        m.set_database_up(true);
        assert_eq!(m.generation(), up);
        m.set_replica_lag(Some(&crate::replica::Lag { seconds: 2.0, bytes: None }));
        let lagging = m.generation();
        assert_ne!(lagging, up);
        m.set_replica_lag(None);
        assert_ne!(m.generation(), lagging, "the lag series go away");
        assert!(!m.encode().contains("replica_lag"));
    }
}
