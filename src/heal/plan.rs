//! The heal plan: for each tenant, the repairs to make and the exact SQL of each step, built
//! from a finished scan (its findings, catalog and reference shape). Planning only reads data
//! already in memory; it never touches the database.

use std::fmt::Write as _;

use super::{backfill, casts, columns, copy, sequence, triggers, undo, Repair};
use crate::checks::orphan_rows;
use crate::config::Config;
use crate::report::{Check, CopyVerdict, Detail, DriftKind, Finding, ParentLocation, RelationshipSource};
use crate::scan::Scanned;
use crate::sql;

/// Everything one heal run would do.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    pub tenants: Vec<TenantPlan>,
}

/// The repairs of one tenant, in the order they run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TenantPlan {
    pub schema: String,
    pub actions: Vec<Action>,
}

/// One repair of one table.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Action {
    pub repair: Repair,
    /// The table of the finding.
    pub table: String,
    /// What the finding says, for people: the rows or column concerned.
    pub summary: String,
    pub steps: Vec<Step>,
    /// `table.trigger (EVENT)` of every enabled user trigger heal's writes fire.
    pub triggers: Vec<String>,
}

/// One statement of a repair.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Step {
    /// Run in a transaction per batch (`$1` batch size, `$2` run id) until it changes no row;
    /// returns one (table, key) row per change, each already written to the audit table.
    Batched(String),
    /// Run once in its own transaction, with its audit row.
    Once(OnceStep),
    /// Copies orphans' parents with their closure, batch by batch (see [`copy`]).
    Copy(Box<copy::CopySpec>),
    /// Sets NULLs from a fallback, block range by block range (see [`backfill`]).
    Backfill(Box<backfill::BackfillSpec>),
    /// Undoes a group of a run's audit rows, batch by batch (see [`undo`]).
    Undo(Box<undo::UndoSpec>),
}

/// A one-off statement (DDL, a sequence) and what its audit row says.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OnceStep {
    pub sql: String,
    /// The table the audit row names.
    pub table: String,
    /// The audit row's key, a `jsonb` expression.
    pub key: String,
    /// The step completes the repair of its column (the column added, its default restored, it
    /// made NOT NULL on its own): counted as one change in the summary and the metrics when it
    /// runs. The steps leading to it (a check added or validated, the NOT NULL of a column this
    /// action adds) are not; backfilled rows and moved sequences count themselves.
    pub completes_repair: bool,
    /// Runs under `heal.validate_timeout` instead of `heal.statement_timeout` (a `VALIDATE`
    /// reads the whole table, blocking no reads or writes).
    pub long: bool,
    /// (column, type) of a column this step adds: refused, unless `heal.allow_table_rewrite`,
    /// when the type is a domain with constraints there (see [`columns::CONSTRAINED_DOMAIN`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added: Option<(String, String)>,
    /// The step runs only while the column still has this default (a `set_default`): checked
    /// under the table's `ACCESS EXCLUSIVE` lock in the step's transaction; otherwise the step is
    /// skipped and reported (`changed since the plan`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_default: Option<ExpectDefault>,
    /// Run before and after `sql`, each time in a transaction of its own (never under the
    /// `ALTER`'s lock: it reads the whole column), `$1` the run id ([`sequence::advance_sql`]):
    /// moves the sequence a new `nextval` default draws from past the column's values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advance: Option<String>,
    /// Run after `sql` in the same transaction, `$1` the run id
    /// ([`columns::pending_record`]): records the backfill of the added column as pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
}

/// The default a column had when the plan was made (`None`: no default).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExpectDefault {
    pub column: String,
    pub default: Option<String>,
}

/// A privilege a heal run needs: on `relation` (qualified and quoted), and with `tree` on every
/// inheritance child and partition of it too (a backfill updates each of them by name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needed {
    pub relation: String,
    pub privilege: &'static str,
    pub tree: bool,
}

impl Action {
    /// Every privilege the repair needs on the tables of `schema` (its tenant) and the shared
    /// schema: SELECT on every table a copy reads (the orphans' table, and each table of its
    /// closure in the tenant and the shared schema), INSERT on those it may write, SELECT and
    /// UPDATE on their sequences; SELECT and UPDATE for a backfill, on the table and its
    /// descendants; ownership for column changes; for an undo, those of [`undo::UndoSpec`].
    pub fn privileges(&self, schema: &str) -> Vec<Needed> {
        let mut out = Vec::new();
        let mut need = |relation: String, privilege: &'static str, tree: bool| {
            let needed = Needed { relation, privilege, tree };
            if !out.contains(&needed) {
                out.push(needed);
            }
        };
        if self.repair == Repair::AddMissingColumns {
            need(sql::qualified(schema, &self.table), "OWNER", false);
        }
        for step in &self.steps {
            match step {
                Step::Copy(spec) => {
                    need(sql::qualified(schema, &spec.child), "SELECT", false);
                    // The orphans are locked `FOR SHARE`, which PostgreSQL allows only with UPDATE.
                    need(sql::qualified(schema, &spec.child), "UPDATE", false);
                    for (name, t) in &spec.tables {
                        need(sql::qualified(schema, name), "SELECT", false);
                        for edge in &t.edges {
                            need(sql::qualified(schema, &edge.target), "SELECT", false);
                        }
                        if !t.in_shared {
                            continue;
                        }
                        need(sql::qualified(&spec.shared, name), "SELECT", false);
                        if t.unusable.is_none() {
                            need(sql::qualified(schema, name), "INSERT", false);
                            for (_, seq) in &t.sequences {
                                need(sql::qualified(schema, seq), "SELECT", false);
                                need(sql::qualified(schema, seq), "UPDATE", false);
                            }
                        }
                    }
                }
                Step::Backfill(spec) => {
                    need(sql::qualified(schema, &spec.table), "SELECT", true);
                    need(sql::qualified(schema, &spec.table), "UPDATE", true);
                }
                Step::Undo(spec) => {
                    for (relation, privilege) in spec.privileges() {
                        need(relation, privilege, false);
                    }
                }
                Step::Batched(_) | Step::Once(_) => {}
            }
        }
        out
    }
}

impl Step {
    /// A one-off step on `table.column`, named `step` in its audit key, that completes no repair
    /// (see [`Step::completing`]).
    pub fn once(table: &str, column: &str, step: &str, sql: String) -> Step {
        let key = format!(
            "pg_catalog.jsonb_build_object('column', {}, 'step', {})",
            sql::literal(column),
            sql::literal(step)
        );
        Step::Once(OnceStep {
            sql,
            table: table.to_string(),
            key,
            completes_repair: false,
            long: false,
            added: None,
            expect_default: None,
            advance: None,
            pending: None,
        })
    }

    /// The step, a one-off one, as the one that completes its column's repair (see
    /// [`OnceStep::completes_repair`]).
    pub fn completing(mut self) -> Step {
        if let Step::Once(once) = &mut self {
            once.completes_repair = true;
        }
        self
    }
}

impl Plan {
    /// Plans the enabled repairs for the findings of `scanned`.
    pub fn build(scanned: &Scanned, config: &Config) -> Plan {
        let heal = &config.heal;
        let mut tenants: Vec<TenantPlan> = Vec::new();
        // Parents first, then values of existing columns, then columns (whose NOT NULL comes
        // after their own backfill).
        let repairs = [
            (heal.copy_missing_parents, Repair::CopyMissingParents),
            (heal.backfill_null_timestamps, Repair::BackfillNullTimestamps),
            (heal.add_missing_columns, Repair::AddMissingColumns),
            (heal.advance_sequences, Repair::AdvanceSequences),
        ];
        // A lost default is set before anything else of its column (a NOT NULL without it would
        // fail the application's inserts).
        let mut findings: Vec<&Finding> = scanned.report.findings.iter().collect();
        findings
            .sort_by_key(|f| !matches!(f.detail, Detail::SchemaDrift { difference: DriftKind::DefaultMismatch, .. }));
        for (_, repair) in repairs.into_iter().filter(|(on, _)| *on) {
            for f in findings.iter().copied() {
                let Some(action) = action(scanned, config, repair, f) else { continue };
                match tenants.iter_mut().find(|t| t.schema == f.schema) {
                    Some(t) => t.actions.push(action),
                    None => tenants.push(TenantPlan { schema: f.schema.clone(), actions: vec![action] }),
                }
            }
        }
        tenants.sort_by(|a, b| a.schema.cmp(&b.schema));
        Plan { tenants }
    }

    /// Adds, after each tenant's other actions, the resumption of every pending backfill of an
    /// added nullable column (`pending`: (schema, table, column) from the audit table, see
    /// [`columns::pending_sql`]) when `heal.add_missing_columns` is on, the tenant's table still
    /// has the column and the reference's column can fill it.
    pub fn resume(&mut self, scanned: &Scanned, config: &Config, pending: &[(String, String, String)]) {
        if !config.heal.add_missing_columns {
            return;
        }
        for (tenant, table, name) in pending {
            let Some(own) = scanned.catalog.table(tenant, table).filter(|t| t.column(name).is_some()) else {
                continue;
            };
            let Some(column) = scanned.shape.tables.get(table).and_then(|t| t.columns.get(name)?.to_column(name))
            else {
                continue;
            };
            let chain = config.heal.fallbacks.get(name).cloned().unwrap_or_default();
            let Some(step) = columns::resume(tenant, table, own, &column, &chain) else { continue };
            let summary = format!(
                "finish the pending backfill of the added column {name}: the rows unchanged since it was added get {}",
                backfill::describe_fallback(&chain, Some(own), column.default.as_deref())
            );
            let steps = vec![step];
            let triggers = fired_triggers(&scanned.catalog, tenant, &steps, &config.heal.allow_triggers);
            let action = Action { repair: Repair::AddMissingColumns, table: table.clone(), summary, steps, triggers };
            match self.tenants.iter_mut().find(|t| &t.schema == tenant) {
                Some(t) => t.actions.push(action),
                None => self.tenants.push(TenantPlan { schema: tenant.clone(), actions: vec![action] }),
            }
        }
        self.tenants.sort_by(|a, b| a.schema.cmp(&b.schema));
    }

    /// The plan as commented SQL, as `heal` prints it without `--execute`.
    pub fn render(&self, target: &str, batch_size: usize) -> String {
        let mut out = format!("-- heal plan for {target} (dry run: nothing is written; --execute applies it)\n\n");
        for tenant in &self.tenants {
            let _ = writeln!(out, "-- tenant {}", sql::escape_controls(&tenant.schema));
            let _ = writeln!(
                out,
                "-- each transaction starts with SET LOCAL lock_timeout, statement_timeout and: {};",
                sql::escape_controls(&super::search_path(&tenant.schema))
            );
            for action in &tenant.actions {
                let _ = writeln!(
                    out,
                    "-- {} on {}: {}",
                    action.repair.name(),
                    sql::escape_controls(&sql::display_name(&tenant.schema, &action.table)),
                    sql::escape_controls(&action.summary)
                );
                if !action.triggers.is_empty() {
                    let _ = writeln!(out, "-- fires triggers: {}", sql::escape_controls(&action.triggers.join(", ")));
                }
                for step in &action.steps {
                    match step {
                        Step::Batched(sql) => {
                            let _ = writeln!(out, "-- batched: $1 = {batch_size} (heal.batch_size), $2 = run id; repeated until no row changes");
                            let _ = writeln!(out, "{sql};");
                        }
                        Step::Backfill(spec) => {
                            render_casts(&mut out, &spec.casts);
                            let _ = writeln!(
                                out,
                                "-- the relations holding the rows ($1 = {}):\n{};",
                                sql::escape_controls(&sql::literal(&spec.table_name())),
                                backfill::RELATIONS
                            );
                            let _ = writeln!(
                                out,
                                "-- then per relation: its size ($1 = the relation):\n{};",
                                backfill::BLOCKS
                            );
                            let _ = writeln!(out, "-- and per range of {} block(s), batch by batch ($1 the ctid the batch starts after: {} first, then the last one the previous batch picked or the previous range's end; $2 the range's end ctid, the last one ending at {}; $3 run id; $4 = {batch_size} (heal.batch_size, fewer when heal.max_rows_per_run has fewer left); the audit key names the relation when the table has descendants):", (batch_size / backfill::ROWS_PER_BLOCK).max(1), backfill::FIRST_TID, backfill::LAST_TID);
                            if spec.pending {
                                let _ = writeln!(out, "-- only the rows unchanged since the column was added: $7 = the id of the transaction that added it (its backfill_pending audit row); $6 NULL, or the ctids of a batch split to set aside the rows that fail");
                            }
                            let _ =
                                writeln!(out, "{};", spec.batch_sql(&sql::qualified(&spec.tenant, &spec.table), false));
                        }
                        Step::Copy(spec) => {
                            render_casts(&mut out, &spec.casts);
                            let _ = writeln!(
                                out,
                                "-- batched: $1 = {batch_size} (heal.batch_size); repeated until no key is left; a transaction writes at most $1 rows (fewer when heal.max_rows_per_run has fewer left), and a key whose parent and all its ancestors need more than heal.batch_size or heal.max_rows_per_run rows is set aside"
                            );
                            out.push_str(&spec.render());
                        }
                        Step::Undo(spec) => {
                            render_casts(&mut out, &spec.casts);
                            let _ = writeln!(out, "-- batched: $1 = {batch_size} (heal.batch_size, heal.max_rows_per_run in all), $2 = the smallest audit id of the previous batch ({} first); repeated until no audit row is left, and the whole group again while a sweep undid a row and left one still referenced:", undo::FIRST_CURSOR);
                            let _ = writeln!(out, "{};", spec.pick_sql);
                            let _ = writeln!(
                                out,
                                "-- then in the same transaction ($1 = run id, $2 = the audit ids picked), repeated while it undoes a row and leaves one:"
                            );
                            let _ = writeln!(out, "{};", spec.undo_sql);
                        }
                        Step::Once(once) => {
                            if let Some((column, data_type)) = &once.added {
                                let _ = writeln!(
                                    out,
                                    "-- first, in the same transaction ($1 = {}): set aside, unless heal.allow_table_rewrite, when the type is a domain with constraints (adding it rewrites the table):\n{};",
                                    sql::escape_controls(&sql::literal(data_type)),
                                    columns::CONSTRAINED_DOMAIN
                                );
                                let table = sql::qualified(&tenant.schema, &once.table);
                                let _ = writeln!(
                                    out,
                                    "-- then LOCK TABLE {} IN ACCESS EXCLUSIVE MODE; and ($1 = {}, $2 = {}) skipped, nothing written, if the column exists already:\n{};",
                                    sql::escape_controls(&table),
                                    sql::escape_controls(&sql::literal(&table)),
                                    sql::escape_controls(&sql::literal(column)),
                                    columns::CURRENT_DEFAULT
                                );
                            }
                            if let Some(expect) = &once.expect_default {
                                let table = sql::qualified(&tenant.schema, &once.table);
                                let seen = expect.default.as_deref().unwrap_or("none");
                                let _ = writeln!(
                                    out,
                                    "-- first, in the same transaction: LOCK TABLE {} IN ACCESS EXCLUSIVE MODE; then ($1 = {}, $2 = {}) only if the default is still {}, else skipped:\n{};",
                                    sql::escape_controls(&table),
                                    sql::escape_controls(&sql::literal(&table)),
                                    sql::escape_controls(&sql::literal(&expect.column)),
                                    sql::escape_controls(seen),
                                    columns::CURRENT_DEFAULT
                                );
                            }
                            if once.long {
                                let _ =
                                    writeln!(out, "-- under heal.validate_timeout instead of heal.statement_timeout");
                            }
                            let _ = writeln!(out, "{};", once.sql);
                            if let Some(advance) = &once.advance {
                                let _ = writeln!(out, "-- before and after it, each time in a transaction of its own ($1 = run id):\n{advance};");
                            }
                            if let Some(pending) = &once.pending {
                                let _ = writeln!(
                                    out,
                                    "-- then, in the same transaction ($1 = run id), the backfill recorded as pending:\n{pending};"
                                );
                            }
                        }
                    }
                }
            }
            out.push('\n');
        }
        let _ = writeln!(out, "-- {} tenant(s) to heal", self.tenants.len());
        out
    }
}

/// The check that comes first in a step whose statements cast to `casts`' types: the step is
/// set aside, nothing of it run, when one of those casts runs a function outside `pg_catalog`.
fn render_casts(out: &mut String, pairs: &[(String, String)]) {
    if pairs.is_empty() {
        return;
    }
    let (sources, targets) = casts::params(pairs);
    let array =
        |items: &[String]| format!("ARRAY[{}]", items.iter().map(|i| sql::literal(i)).collect::<Vec<_>>().join(", "));
    let _ = writeln!(
        out,
        "-- first ($1 = {}, $2 = {}): set aside, nothing of it run, if a cast it makes runs a function outside pg_catalog (a tenant's CREATE CAST ... WITH FUNCTION):\n{};",
        sql::escape_controls(&array(&sources)),
        sql::escape_controls(&array(&targets)),
        casts::USER_CASTS
    );
}

fn action(scanned: &Scanned, config: &Config, repair: Repair, f: &Finding) -> Option<Action> {
    let tenant = &f.schema;
    let table = f.table.clone()?;
    let catalog = &scanned.catalog;
    let own = catalog.table(tenant, &table)?;
    let shared = &config.tenants.shared_schema;
    let (summary, steps) = match (repair, &f.check, &f.detail) {
        (
            Repair::CopyMissingParents,
            Check::OrphanRows,
            Detail::OrphanRows {
                parent_table,
                parent_location: ParentLocation::Shared,
                heal_copy: CopyVerdict::Copy,
                ..
            },
        ) => {
            let probe =
                orphan_rows::Probe { same_entity: true, ..orphan_rows::probe_for(catalog, &scanned.shape, shared, f)? };
            let summary = format!("{} orphan row(s) whose {parent_table} row exists in {shared}", f.count);
            let links = links(scanned, config);
            let spec = copy::spec(catalog, shared, tenant, &probe, &config.heal, &links)?;
            (summary, vec![Step::Copy(Box::new(spec))])
        }
        (Repair::BackfillNullTimestamps, Check::NullTimestamps, Detail::NullTimestamps { data_type }) => {
            let column = f.columns.first()?;
            let chain = config.heal.fallbacks.get(column)?;
            let fallback = backfill::fallback(chain, Some(own), data_type, None)?;
            let summary = format!("{} NULL {column} value(s) set from {}", f.count, chain.join(", "));
            (
                summary,
                vec![Step::Backfill(Box::new(backfill::BackfillSpec {
                    tenant: tenant.clone(),
                    table: table.clone(),
                    column: column.clone(),
                    casts: backfill::casts(&fallback, own, data_type),
                    fallback,
                    key: own.primary_key.clone(),
                    repair,
                    only: None,
                    pending: false,
                }))],
            )
        }
        (Repair::AddMissingColumns, Check::SchemaDrift, Detail::SchemaDrift { difference, .. }) => {
            let name = f.columns.first()?;
            let shape = scanned.shape.tables.get(&table)?.columns.get(name)?;
            let column = &shape.to_column(name)?;
            let collation = shape.collation.clone().flatten();
            let chain = config.heal.fallbacks.get(name).cloned().unwrap_or_default();
            match difference {
                DriftKind::MissingColumn => {
                    let summary = format!(
                        "add column {name} {}{}{}{} as the reference has it",
                        column.data_type,
                        collation.as_deref().map(|c| format!(" COLLATE {c}")).unwrap_or_default(),
                        if column.not_null { " NOT NULL" } else { "" },
                        column.default.as_deref().map(|d| format!(" DEFAULT {d}")).unwrap_or_default()
                    );
                    (summary, columns::add(tenant, &table, own, column, collation.as_deref(), &chain))
                }
                DriftKind::DefaultMismatch => {
                    let default = column.default.as_deref()?;
                    let seen = own.column(name)?.default.as_deref();
                    let sequence = reference_sequence(scanned, config, &table, column);
                    (
                        format!("set the default of {name} to {default} as the reference has it"),
                        columns::set_default(tenant, &table, column, seen, sequence.as_deref())?,
                    )
                }
                DriftKind::NullabilityMismatch if column.not_null => {
                    let steps = columns::not_null(tenant, &table, own, column, &chain, true);
                    if steps.is_empty() {
                        return None;
                    }
                    let summary = if columns::has_unvalidated_check(own, name) {
                        format!("make {name} NOT NULL as the reference has it: VALIDATE the existing NOT VALID check tenant_audit_{name}_not_null an interrupted run left, then SET NOT NULL")
                    } else {
                        format!("make {name} NOT NULL as the reference has it")
                    };
                    (summary, steps)
                }
                _ => return None,
            }
        }
        (Repair::AdvanceSequences, Check::SequenceBehind, Detail::SequenceBehind { next_value, column_max, .. }) => {
            let column = f.columns.first()?;
            let (seq_schema, seq) = own.column(column)?.sequence_in(tenant)?;
            if seq_schema != tenant {
                return None;
            }
            let summary = format!("move sequence {seq} from {next_value} past {column_max}, the largest {column}");
            (summary, vec![Step::Batched(sequence::advance_sql("$2", tenant, &table, column, seq, repair.name()))])
        }
        _ => return None,
    };
    let triggers = fired_triggers(catalog, tenant, &steps, &config.heal.allow_triggers);
    Some(Action { repair, table, summary, steps, triggers })
}

/// The sequence (by name, in the column's own schema) that `column`'s default draws from where
/// a schema has that default: the reference schema's table when there is one, else the first
/// schema whose table has the column with this very default on a sequence of its own schema.
fn reference_sequence(
    scanned: &Scanned,
    config: &Config,
    table: &str,
    column: &crate::catalog::Column,
) -> Option<String> {
    let reference = config.tenants.reference_schema.as_deref();
    let schemas = reference.into_iter().chain(scanned.catalog.schemas.keys().map(String::as_str));
    schemas
        .filter_map(|schema| scanned.catalog.table(schema, table)?.column(&column.name))
        .filter(|c| c.default == column.default)
        .find_map(|c| match &c.sequence {
            Some((crate::catalog::SchemaRef::Own, name)) => Some(name.clone()),
            _ => None,
        })
}

/// The relationships the checks know besides the tenants' constraints: `checks.relationships`,
/// then the foreign keys other tenants (or the reference) declare.
fn links(scanned: &Scanned, config: &Config) -> Vec<copy::Link> {
    let configured = config.checks.relationships.iter().map(|r| copy::Link {
        table: r.table.clone(),
        columns: r.columns.clone(),
        parent_table: r.parent_table.clone(),
        parent_columns: r.parent_columns.clone(),
        source: RelationshipSource::Configured,
    });
    let inferred = scanned.shape.known_relationships.iter().map(|((table, columns), known)| copy::Link {
        table: table.clone(),
        columns: columns.clone(),
        parent_table: known.shape.table.clone(),
        parent_columns: known.shape.columns.clone(),
        source: RelationshipSource::Inferred,
    });
    configured.chain(inferred).collect()
}

/// The enabled user triggers the steps' writes fire: `INSERT` triggers of every table a copy
/// may write, `UPDATE` triggers of a backfilled table (its inheritance children's own triggers
/// are not listed, they are checked when the step runs). DDL fires none. A `BEFORE` row trigger
/// heal may not fire (see [`super::triggers`]) says that its step will be set aside.
fn fired_triggers(
    catalog: &crate::catalog::Catalog,
    tenant: &str,
    steps: &[Step],
    allow: &[crate::config::AllowedTrigger],
) -> Vec<String> {
    let mut out = Vec::new();
    let mut add = |table: &str, insert: bool| {
        let Some(t) = catalog.table(tenant, table) else { return };
        for trigger in t.triggers.iter().filter(|t| if insert { t.on_insert } else { t.on_update }) {
            let event = if insert { "INSERT" } else { "UPDATE" };
            let timing = match (trigger.before_row, triggers::allowed(allow, table, table, &trigger.name)) {
                (false, _) => "",
                (true, true) => "BEFORE ",
                (true, false) => "refused, not in heal.allow_triggers: BEFORE ",
            };
            out.push(format!("{}.{} ({timing}{event})", sql::display_name(tenant, table), trigger.name));
        }
    };
    for step in steps {
        match step {
            Step::Copy(spec) => {
                // The tables written, and those a refused trigger keeps from being written.
                let refused = |name: &str| {
                    catalog
                        .table(tenant, name)
                        .is_some_and(|own| !triggers::refused_in_catalog(allow, name, own, true).is_empty())
                };
                for (name, _) in spec.tables.iter().filter(|(n, t)| t.in_shared && (t.unusable.is_none() || refused(n)))
                {
                    add(name, true);
                }
            }
            Step::Backfill(spec) => add(&spec.table, false),
            Step::Batched(_) | Step::Once(_) | Step::Undo(_) => {}
        }
    }
    out
}
