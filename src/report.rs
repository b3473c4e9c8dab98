//! The scan report: findings and errors, and their table (for people) and JSON (stable,
//! documented in `docs/report.md`) renderings.
//!
//! Invariant: the JSON shape changes only on purpose, with [`REPORT_VERSION`] and CHANGELOG.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::sql::{display_name, escape_controls as escape};

/// Version of the JSON report format.
pub const REPORT_VERSION: u32 = 1;

/// The kinds of finding, declared most severe first (the derived order is the display order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    CrossSchemaFk,
    OrphanRows,
    SequenceBehind,
    MissingSchema,
    NullTimestamps,
    SchemaDrift,
    UnregisteredSchema,
}

impl Check {
    pub const ALL: [Check; 7] = [
        Check::CrossSchemaFk,
        Check::OrphanRows,
        Check::SequenceBehind,
        Check::MissingSchema,
        Check::NullTimestamps,
        Check::SchemaDrift,
        Check::UnregisteredSchema,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Check::CrossSchemaFk => "cross_schema_fk",
            Check::OrphanRows => "orphan_rows",
            Check::SequenceBehind => "sequence_behind",
            Check::MissingSchema => "missing_schema",
            Check::NullTimestamps => "null_timestamps",
            Check::SchemaDrift => "schema_drift",
            Check::UnregisteredSchema => "unregistered_schema",
        }
    }

    pub fn severity(self) -> Severity {
        match self {
            Check::CrossSchemaFk | Check::OrphanRows | Check::SequenceBehind => Severity::Critical,
            Check::MissingSchema | Check::NullTimestamps | Check::SchemaDrift => Severity::Warning,
            Check::UnregisteredSchema => Severity::Info,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Critical,
    Warning,
    Info,
}

/// One problem found, keyed by (check, schema, table, columns) plus the detail that tells
/// two findings on the same columns apart (such as the parent location of orphans).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub check: Check,
    pub severity: Severity,
    pub schema: String,
    pub table: Option<String>,
    pub columns: Vec<String>,
    /// Rows affected (orphan rows, NULL values) or 1 for a structural finding.
    pub count: u64,
    /// Up to `report.sample_keys` key values as text: the orphaned foreign-key value for orphan
    /// rows, the primary key (or `ctid`) of the row for NULL timestamps. Composite keys are
    /// rendered as PostgreSQL row literals, e.g. `(7,abc)`.
    pub sample_keys: Vec<String>,
    pub detail: Detail,
}

/// Per-check facts about a finding; serialized as a flat object (or `null`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Detail {
    CrossSchemaFk {
        constraint: String,
        target_schema: String,
        target_table: String,
        reason: FkReason,
    },
    OrphanRows {
        parent_schema: String,
        parent_table: String,
        parent_columns: Vec<String>,
        parent_location: ParentLocation,
        relationship: RelationshipSource,
        constraint: Option<String>,
        /// Whether the constraint is validated; `false` for one added `NOT VALID`.
        constraint_validated: Option<bool>,
        /// Whether heal's `copy_missing_parents` would copy the missing parent, and if not, why.
        heal_copy: CopyVerdict,
    },
    NullTimestamps {
        data_type: String,
    },
    SchemaDrift {
        difference: DriftKind,
        expected: Option<String>,
        actual: Option<String>,
    },
    SequenceBehind {
        /// `schema.name` of the sequence.
        sequence: String,
        /// The value the next `nextval` returns.
        next_value: i64,
        /// The column's largest value, at or above `next_value`.
        column_max: i64,
    },
    None,
}

/// Why a cross-schema foreign key is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FkReason {
    /// It references another schema's table while the tenant has a table of that name.
    ShadowedByTenantTable,
    /// It references another tenant's schema.
    TenantToTenant,
}

impl FkReason {
    pub fn name(self) -> &'static str {
        match self {
            FkReason::ShadowedByTenantTable => "shadowed_by_tenant_table",
            FkReason::TenantToTenant => "tenant_to_tenant",
        }
    }
}

/// Whether heal would copy an orphan's missing parent from the shared schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyVerdict {
    /// A row with the key exists in the shared schema and is the same entity: the key is a
    /// `uuid` (globally unique by construction) or the table is in `heal.same_entity_keys`.
    Copy,
    /// A row with the key exists in the shared schema, but a key drawn from each schema's own
    /// sequence (an integer, say) names unrelated rows there: copying it would re-parent the
    /// orphans to another entity. List the table in `heal.same_entity_keys` only if the
    /// application guarantees the key means the same row everywhere.
    NotSameEntity,
    /// No row with the key exists in the shared schema.
    NoSharedRow,
}

impl CopyVerdict {
    pub fn name(self) -> &'static str {
        match self {
            CopyVerdict::Copy => "copy",
            CopyVerdict::NotSameEntity => "not_same_entity",
            CopyVerdict::NoSharedRow => "no_shared_row",
        }
    }
}

/// Where the missing parent of an orphan row can be found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParentLocation {
    /// A row with the key exists in the shared schema's table of that name (whether it is the
    /// same entity is [`CopyVerdict`]'s business).
    Shared,
    /// The key exists nowhere.
    Missing,
}

impl ParentLocation {
    pub fn name(self) -> &'static str {
        match self {
            ParentLocation::Shared => "shared",
            ParentLocation::Missing => "missing",
        }
    }
}

/// Where the relationship an orphan violates comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelationshipSource {
    /// A foreign-key constraint of the tenant (possibly `NOT VALID`, or bypassed).
    Constraint,
    /// Declared in the configuration (`checks.relationships`).
    Configured,
    /// A foreign key that other tenants or the reference have and this tenant lacks.
    Inferred,
}

/// What differs between a tenant and the reference shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    MissingTable,
    MissingColumn,
    TypeMismatch,
    NullabilityMismatch,
    DefaultMismatch,
    MissingForeignKey,
    ForeignKeyTarget,
    CollationMismatch,
}

impl DriftKind {
    pub fn name(self) -> &'static str {
        match self {
            DriftKind::MissingTable => "missing_table",
            DriftKind::MissingColumn => "missing_column",
            DriftKind::TypeMismatch => "type_mismatch",
            DriftKind::NullabilityMismatch => "nullability_mismatch",
            DriftKind::DefaultMismatch => "default_mismatch",
            DriftKind::CollationMismatch => "collation_mismatch",
            DriftKind::MissingForeignKey => "missing_foreign_key",
            DriftKind::ForeignKeyTarget => "foreign_key_target",
        }
    }
}

/// A failure met during a scan that did not stop it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanError {
    pub kind: ErrorKind,
    pub schema: Option<String>,
    pub table: Option<String>,
    pub message: String,
}

impl ScanError {
    /// Where it happened: `schema.table`, `schema`, or `scan`.
    pub fn place(&self) -> String {
        match (&self.schema, &self.table) {
            (Some(s), Some(t)) => display_name(s, t),
            (Some(s), None) => s.clone(),
            _ => "scan".to_string(),
        }
    }
}

/// The class of a scan error, also used as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The tenant's schema was dropped while the scan ran: reported, not a failure.
    TenantDropped,
    Permission,
    /// A statement or lock timeout (SQLSTATE 57014, 55P03).
    Timeout,
    Connection,
    Query,
    /// Cancelled by a recovery conflict on a standby (40001, 40P01) on every attempt.
    Conflict,
    /// The server session was terminated (57P01, e.g. `pg_terminate_backend`).
    Terminated,
    /// The server ran out of a resource: memory, the shared lock table, disk, connections (53xxx).
    Resources,
    /// Not read on purpose (an unlogged table on a standby): reported, not a failure.
    Skipped,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::TenantDropped,
        ErrorKind::Permission,
        ErrorKind::Timeout,
        ErrorKind::Connection,
        ErrorKind::Query,
        ErrorKind::Conflict,
        ErrorKind::Terminated,
        ErrorKind::Resources,
        ErrorKind::Skipped,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::TenantDropped => "tenant_dropped",
            ErrorKind::Permission => "permission",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connection => "connection",
            ErrorKind::Query => "query",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Terminated => "terminated",
            ErrorKind::Resources => "resources",
            ErrorKind::Skipped => "skipped",
        }
    }

    /// Whether an error of this kind means the scan missed data: everything but a tenant
    /// dropped meanwhile and a table skipped on purpose.
    pub fn is_failure(self) -> bool {
        !matches!(self, ErrorKind::TenantDropped | ErrorKind::Skipped)
    }
}

/// How many tenants the scan saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantCounts {
    /// Existing tenant schemas found by discovery.
    pub discovered: usize,
    /// Tenants whose data checks all ran.
    pub scanned: usize,
    /// Tenants with at least one error.
    pub failed: usize,
}

/// The kind of a scan: every table's data checks ran, or only those of tables that may have
/// changed since the last scan (the others' findings were carried forward).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanKind {
    Full,
    Incremental,
}

impl ScanKind {
    pub const ALL: [ScanKind; 2] = [ScanKind::Full, ScanKind::Incremental];

    pub fn name(self) -> &'static str {
        match self {
            ScanKind::Full => "full",
            ScanKind::Incremental => "incremental",
        }
    }
}

/// What the scan checked and what it carried forward. A table counts when it has data checks
/// (orphan rows or NULL timestamps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanSummary {
    pub kind: ScanKind,
    /// Tables whose data checks ran in this scan.
    pub tables_checked: usize,
    /// Tables whose findings were carried forward from an earlier scan.
    pub tables_carried_forward: usize,
    /// When the oldest carried-forward result was computed (the start of its scan); `null`
    /// when nothing was carried forward.
    pub oldest_carried_forward_at: Option<DateTime<Utc>>,
}

/// Totals for one check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSummary {
    pub findings: usize,
    /// Sum of the findings' counts.
    pub count: u64,
    /// Distinct schemas with a finding.
    pub schemas: usize,
}

/// The result of one scan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub version: u32,
    /// `host:port/dbname` of the scanned database.
    pub database: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub duration_seconds: f64,
    /// The template schema, or `null` when the reference is the most common tenant shape.
    pub reference_schema: Option<String>,
    pub tenants: TenantCounts,
    /// Whether the data checks ran on every table or only on those that may have changed.
    pub scan: ScanSummary,
    /// One entry for every check, in severity order, zero when clean.
    pub summary: BTreeMap<Check, CheckSummary>,
    /// Sorted by check (most severe first), schema, table, columns.
    pub findings: Vec<Finding>,
    pub errors: Vec<ScanError>,
}

impl Report {
    /// Summarises `findings` per check.
    pub fn summarize(findings: &[Finding]) -> BTreeMap<Check, CheckSummary> {
        Check::ALL
            .iter()
            .map(|&check| {
                let mine: Vec<&Finding> = findings.iter().filter(|f| f.check == check).collect();
                let schemas: std::collections::BTreeSet<&str> = mine.iter().map(|f| f.schema.as_str()).collect();
                let summary = CheckSummary {
                    findings: mine.len(),
                    count: mine.iter().map(|f| f.count).sum(),
                    schemas: schemas.len(),
                };
                (check, summary)
            })
            .collect()
    }

    /// Errors other than tenants dropped during the scan (which are expected in a live system)
    /// and tables skipped on purpose.
    pub fn failures(&self) -> impl Iterator<Item = &ScanError> {
        self.errors.iter().filter(|e| e.kind.is_failure())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report always serializes")
    }

    /// The human rendering: one block per check with findings, most severe first. Every name,
    /// key and message is escaped (see [`escape`]): identifiers can hold terminal control
    /// sequences.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        for check in Check::ALL {
            let summary = self.summary.get(&check).copied().unwrap_or_default();
            if summary.findings == 0 {
                continue;
            }
            let _ = writeln!(
                out,
                "{} ({}): {} findings, count {}, {} schemas",
                check.name().to_uppercase(),
                format!("{:?}", check.severity()).to_lowercase(),
                summary.findings,
                summary.count,
                summary.schemas
            );
            for f in self.findings.iter().filter(|f| f.check == check) {
                let _ = writeln!(out, "  {}", escape(&describe(f)));
                if !f.sample_keys.is_empty() {
                    let _ = writeln!(out, "      sample keys: {}", escape(&f.sample_keys.join(", ")));
                }
            }
            out.push('\n');
        }
        if self.findings.is_empty() {
            out.push_str("No findings.\n");
        }
        let _ = writeln!(
            out,
            "Scanned {} of {} tenants of {} in {:.2}s; {} findings, {} errors.",
            self.tenants.scanned,
            self.tenants.discovered,
            escape(&self.database),
            self.duration_seconds,
            self.findings.len(),
            self.errors.len()
        );
        if self.scan.kind == ScanKind::Incremental {
            let _ = writeln!(
                out,
                "Incremental scan: {} tables checked, {} carried forward{}.",
                self.scan.tables_checked,
                self.scan.tables_carried_forward,
                self.scan.oldest_carried_forward_at.map(|t| format!(" (oldest from {t})")).unwrap_or_default()
            );
        }
        for e in &self.errors {
            let _ = writeln!(out, "  error [{}] {}: {}", e.kind.name(), escape(&e.place()), escape(&e.message));
        }
        out
    }
}

/// One line describing a finding for people.
fn describe(f: &Finding) -> String {
    let place = match &f.table {
        Some(t) => display_name(&f.schema, t),
        None => f.schema.clone(),
    };
    let cols = if f.columns.is_empty() { String::new() } else { format!(" ({})", f.columns.join(", ")) };
    let detail = match &f.detail {
        Detail::CrossSchemaFk { constraint, target_schema, target_table, reason } => {
            let why = match reason {
                FkReason::ShadowedByTenantTable => "the tenant has its own table of that name",
                FkReason::TenantToTenant => "tenant isolation breach",
            };
            format!("constraint {constraint} references {}: {why}", display_name(target_schema, target_table))
        }
        Detail::OrphanRows {
            parent_schema,
            parent_table,
            parent_columns,
            parent_location,
            relationship,
            heal_copy,
            ..
        } => {
            format!(
                "{} row(s) without parent in {}({}); parent {}, {} relationship{}",
                f.count,
                display_name(parent_schema, parent_table),
                parent_columns.join(", "),
                match parent_location {
                    ParentLocation::Shared => "key exists in the shared schema",
                    ParentLocation::Missing => "missing everywhere",
                },
                format!("{relationship:?}").to_lowercase(),
                match heal_copy {
                    CopyVerdict::NotSameEntity => {
                        "; not copied by heal: the key is not globally unique (not a uuid), so the shared row is another entity (heal.same_entity_keys)"
                    }
                    _ => "",
                }
            )
        }
        Detail::SequenceBehind { sequence, next_value, column_max } => {
            format!("sequence {sequence} would next give {next_value}, the column already holds up to {column_max}")
        }
        Detail::NullTimestamps { data_type } => format!("{} NULL value(s) ({data_type})", f.count),
        Detail::SchemaDrift { difference, expected, actual } => format!(
            "{}: expected {}, found {}",
            difference.name(),
            expected.as_deref().unwrap_or("nothing"),
            actual.as_deref().unwrap_or("nothing")
        ),
        Detail::None => match f.check {
            Check::MissingSchema => "registered tenant has no schema".to_string(),
            Check::UnregisteredSchema => "schema matches the tenant pattern but has no registry row".to_string(),
            _ => String::new(),
        },
    };
    format!("{place}{cols}: {detail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_neutralises_terminal_sequences() {
        assert_eq!(escape("tenant\u{1b}[2J\u{202e}cba\r\nx\\y é"), "tenant\\u{1b}[2J\\u{202e}cba\\u{d}\\u{a}x\\\\y é");
    }
}
