//! Plan files: `heal --plan-out FILE` writes the plan as JSON with the rows or keys each step
//! will touch, resolved against the database (read-only); `heal --apply FILE --execute` runs
//! exactly that plan: every step re-checks its predicate, and a copy or backfill changes only the
//! keys or rows the file lists (those the application changed meanwhile are skipped and
//! reported).
//!
//! Invariants: `--apply` never runs SQL text taken from the file. [`check`] matches each action
//! of the file with the one heal derives from a fresh scan and runs the derived one (refusing a
//! file whose SQL differs); from the file it keeps only the restrictions (`only` lists, expected
//! defaults), each checked for shape. A backfill of a table without a primary key is never in a
//! plan file: its rows have no stable name.

use serde::{Deserialize, Serialize};
use tokio_postgres::types::Type;

use super::plan::{Action, Plan, Step, TenantPlan};
use super::{backfill, copy, search_path, Repair};
use crate::config::HealConfig;
use crate::db::{self, DbError, Pool};
use crate::sql;

/// The format version of plan files. Version 4: one-off steps say whether they complete their
/// column's repair (`completes_repair`, which replaced version 3's `adds_column`).
pub const VERSION: u32 = 4;

/// What is read of a plan file before the rest: its version, so that a file of another version
/// is refused as such, whatever its other fields.
#[derive(Debug, Deserialize)]
pub struct Versioned {
    pub version: u32,
}

/// A plan file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanFile {
    pub version: u32,
    /// `host:port/dbname` the plan is for; `--apply` refuses another database.
    pub database: String,
    /// The scan the plan came from.
    pub scan_started_at: chrono::DateTime<chrono::Utc>,
    pub scan_finished_at: chrono::DateTime<chrono::Utc>,
    pub plan: Plan,
}

/// Fills every copy's and backfill's `only` with the keys and rows it would touch now (and a
/// copy's `rows` with every row it would write, ancestors included, at most
/// `heal.max_rows_per_run`). An action
/// that backfills a table without a primary key is left out; returns one line per action left
/// out, saying why.
pub async fn resolve(heal: &HealConfig, pool: &Pool, plan: &mut Plan) -> Result<Vec<String>, DbError> {
    let mut left_out = Vec::new();
    for tenant in &mut plan.tenants {
        tenant.actions.retain(|action| {
            let keyless = action.steps.iter().any(|s| matches!(s, Step::Backfill(b) if b.key.is_empty()));
            if keyless {
                left_out.push(format!(
                    "left out of the plan: {} on {}: {NO_PRIMARY_KEY}",
                    action.repair.name(),
                    sql::escape_controls(&sql::display_name(&tenant.schema, &action.table))
                ));
            }
            !keyless
        });
    }
    plan.tenants.retain(|t| !t.actions.is_empty());
    let mut session = db::session(pool, &heal.database.target).await?;
    for tenant in &mut plan.tenants {
        let path = search_path(&tenant.schema);
        for action in &mut tenant.actions {
            for step in &mut action.steps {
                // Read only, so that a plan is made from a standby too.
                let tx = db::begin_heal_checks(&mut session, heal).await?;
                tx.batch_execute(&path).await?;
                match step {
                    Step::Copy(spec) => {
                        let batch = i64::try_from(heal.batch_size).unwrap_or(i64::MAX);
                        let (keys, rows) = copy::planned(&tx, spec, batch, heal.max_rows_per_run).await?;
                        spec.only = Some(keys);
                        spec.rows = Some(rows);
                    }
                    Step::Backfill(spec) => {
                        let relations =
                            tx.query_typed(backfill::RELATIONS, &[(&spec.table_name(), Type::TEXT)]).await?;
                        let (relations, tree) = backfill::relations(&relations);
                        let exists: bool = tx
                            .query_typed_one(
                                backfill::COLUMN_EXISTS,
                                &[(&spec.table_name(), Type::TEXT), (&spec.column, Type::TEXT)],
                            )
                            .await?
                            .get(0);
                        let mut keys = Vec::new();
                        for relation in relations {
                            for row in tx.query_typed(&spec.rows_sql(&relation, tree, exists), &[]).await? {
                                keys.push(row.get(0));
                            }
                        }
                        spec.only = Some(keys);
                    }
                    Step::Batched(_) | Step::Once(_) | Step::Undo(_) => {}
                }
                tx.commit().await?;
            }
        }
    }
    Ok(left_out)
}

/// Why `--apply` refuses a plan file as a whole (before the lease, nothing written).
#[derive(Debug, thiserror::Error)]
pub enum PlanFileError {
    #[error("{what} of {repair} on {table} is not what heal derives from the database now (the file was edited, or the schema changed since the plan): make a new plan with --plan-out")]
    Differs { repair: &'static str, table: String, what: String },
    #[error("{repair} on {table}: {reason}")]
    Invalid { repair: &'static str, table: String, reason: String },
}

/// Why a backfill of a table without a primary key is left out of plan files.
pub const NO_PRIMARY_KEY: &str = "the table has no primary key: a plan file cannot name its rows (a ctid names a slot that VACUUM lets another row reuse); heal --execute without a plan file heals it";

/// A plan file checked against the plan heal derives now: what to run and what to report.
#[derive(Debug, Default)]
pub struct Checked {
    /// The file's actions as heal derives them now (their SQL rebuilt from the live catalog,
    /// never the file's), restricted to the file's `only` lists and expected defaults.
    pub plan: Plan,
    /// (schema, table, key) of what the file names that no longer needs healing: skipped.
    pub gone: Vec<(String, String, String)>,
    /// (schema, table, key) of the file's backfill rows an earlier heal run filled (see
    /// [`filled_earlier`]): done, not reported as changed since the plan.
    pub filled: std::collections::BTreeSet<(String, String, String)>,
}

/// The (schema, table, key) of `file`'s backfill rows that an earlier heal run filled in every
/// column the file lists them for, audited and not undone (a plan re-applied after
/// `heal.max_rows_per_run` stopped it): read-only, through heal's sessions; no audit table, or
/// one the role may not read: none. Read before the run, so this run's rows are not among them.
pub async fn filled_earlier(
    heal: &HealConfig,
    pool: &Pool,
    file: &Plan,
) -> Result<std::collections::BTreeSet<(String, String, String)>, DbError> {
    // Per key, (columns the file lists it for, columns an earlier run filled): a key is done only
    // when every listed column was filled (not_applied names the row, not the column).
    let mut seen: std::collections::BTreeMap<(String, String, String), (usize, usize)> = Default::default();
    let mut filled = std::collections::BTreeSet::new();
    let mut session = db::session(pool, &heal.database.target).await?;
    let tx = db::begin_heal_checks(&mut session, heal).await?;
    let readable = tx.query_one(super::audit::READABLE, &[]).await?;
    if !(readable.get::<_, bool>(0) && readable.get::<_, bool>(1) && readable.get::<_, bool>(2)) {
        // Heal's own privilege check names what is missing when the plan runs.
        return Ok(filled);
    }
    let sql = super::audit::backfilled_sql();
    for tenant in &file.tenants {
        for step in tenant.actions.iter().flat_map(|a| &a.steps) {
            let Step::Backfill(b) = step else { continue };
            let Some(keys) = b.only.as_ref().filter(|k| !k.is_empty()) else { continue };
            let rows = tx
                .query_typed(
                    &sql,
                    &[
                        (&tenant.schema, Type::TEXT),
                        (&b.table, Type::TEXT),
                        (&b.column, Type::TEXT),
                        (keys, Type::TEXT_ARRAY),
                    ],
                )
                .await?;
            for key in keys {
                seen.entry((tenant.schema.clone(), b.table.clone(), key.clone())).or_default().0 += 1;
            }
            for row in &rows {
                seen.entry((tenant.schema.clone(), b.table.clone(), row.get(0))).or_default().1 += 1;
            }
        }
    }
    tx.commit().await?;
    filled.extend(seen.into_iter().filter(|(_, (listed, done))| listed == done).map(|(key, _)| key));
    Ok(filled)
}

/// Checks `file` against `derived` (the plan built now from a fresh scan). An action of the file
/// runs only as derived: the same repair, table and steps, their SQL included (a file whose SQL
/// differs is refused whole: `--apply` never runs SQL taken from the file); only the file's `only`
/// lists and expected defaults are kept from it, and checked for shape. An action the scan no
/// longer finds is skipped: every key it names is reported.
pub fn check(file: &Plan, derived: &Plan) -> Result<Checked, PlanFileError> {
    let mut out = Checked::default();
    for tenant in &file.tenants {
        let now: &[Action] = derived.tenants.iter().find(|t| t.schema == tenant.schema).map_or(&[], |t| &t.actions);
        let mut actions = Vec::new();
        for action in &tenant.actions {
            let table = sql::display_name(&tenant.schema, &action.table);
            let repair = action.repair.name();
            match now.iter().find(|d| same(d, action)) {
                Some(d) => actions.push(restricted(d, action, &table)?),
                None => {
                    if let Some(d) = now.iter().find(|d| identity(d) == identity(action)) {
                        let what = action
                            .steps
                            .iter()
                            .zip(d.steps.iter())
                            .position(|(a, b)| normalized(a) != normalized(b))
                            .map_or("a step".to_string(), |i| format!("step {}", i + 1));
                        return Err(PlanFileError::Differs { repair, table, what });
                    }
                    for step in &action.steps {
                        out.gone
                            .extend(keys(step).into_iter().map(|k| (tenant.schema.clone(), action.table.clone(), k)));
                    }
                }
            }
        }
        if !actions.is_empty() {
            out.plan.tenants.push(TenantPlan { schema: tenant.schema.clone(), actions });
        }
    }
    Ok(out)
}

/// What identifies an action whatever its SQL: repair, table and per step what it acts on.
fn identity(action: &Action) -> (Repair, &str, Vec<String>) {
    let steps = action
        .steps
        .iter()
        .map(|s| match s {
            Step::Batched(_) => "batched".to_string(),
            Step::Undo(u) => format!("undo {} {}", u.schema, u.table),
            Step::Once(o) => format!("once {} {}", o.table, o.key),
            Step::Copy(c) => format!("copy {} {}({})", c.child, c.root, c.root_columns.join(", ")),
            Step::Backfill(b) => format!("backfill {} {}", b.table, b.column),
        })
        .collect();
    (action.repair, action.table.as_str(), steps)
}

/// A step without what the file may restrict (`only`, the expected default).
fn normalized(step: &Step) -> Step {
    let mut step = step.clone();
    match &mut step {
        Step::Copy(c) => {
            c.only = None;
            c.rows = None;
        }
        Step::Backfill(b) => b.only = None,
        Step::Once(o) => o.expect_default = None,
        Step::Batched(_) | Step::Undo(_) => {}
    }
    step
}

fn same(derived: &Action, file: &Action) -> bool {
    derived.repair == file.repair
        && derived.table == file.table
        && derived.steps.len() == file.steps.len()
        && derived.steps.iter().zip(&file.steps).all(|(a, b)| normalized(a) == normalized(b))
}

/// `derived` with the file's restrictions, each checked for shape.
fn restricted(derived: &Action, file: &Action, table: &str) -> Result<Action, PlanFileError> {
    let invalid =
        |reason: String| PlanFileError::Invalid { repair: file.repair.name(), table: table.to_string(), reason };
    let mut action = derived.clone();
    action.summary = file.summary.clone();
    for (step, given) in action.steps.iter_mut().zip(&file.steps) {
        match (step, given) {
            (Step::Copy(c), Step::Copy(g)) => {
                if let Some(bad) = g.only.iter().flatten().find(|k| k.len() != c.key_len) {
                    return Err(invalid(format!(
                        "an orphaned key in only has {} value(s), the relationship has {} column(s): {bad:?}",
                        bad.len(),
                        c.key_len
                    )));
                }
                if let Some(bad) = g
                    .rows
                    .iter()
                    .flatten()
                    .find(|r| !c.tables.get(&r.table).is_some_and(|t| t.key.len() == r.key.len()))
                {
                    return Err(invalid(format!(
                        "a row in rows is not a key of a table the copy writes: {} {:?}",
                        sql::escape_controls(&bad.table),
                        bad.key
                    )));
                }
                c.only = g.only.clone();
                // A file without rows lists none: its copy writes nothing.
                c.rows = Some(g.rows.clone().unwrap_or_default());
            }
            (Step::Backfill(b), Step::Backfill(g)) => {
                if b.key.is_empty() && g.only.is_some() {
                    return Err(invalid(NO_PRIMARY_KEY.to_string()));
                }
                if let Some(bad) = g.only.iter().flatten().find(|k| !is_key(k, &b.key)) {
                    return Err(invalid(format!(
                        "{bad:?} in only is not a key of the table (a JSON object of {}, and relation for a table with children)",
                        b.key.join(", ")
                    )));
                }
                b.only = g.only.clone();
            }
            (Step::Once(o), Step::Once(g)) => o.expect_default = g.expect_default.clone(),
            _ => {}
        }
    }
    Ok(action)
}

/// Whether `text` is a JSON object of the columns `key`, and of the relation holding the row
/// when the table has inheritance children (`relation`).
fn is_key(text: &str, key: &[String]) -> bool {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(map)) => {
            key.iter().all(|k| map.contains_key(k))
                && map.keys().all(|k| k == "relation" || key.contains(k))
                && map.len() <= key.len() + 1
        }
        _ => false,
    }
}

/// The keys a step of the file names, as the summary reports them.
fn keys(step: &Step) -> Vec<String> {
    match step {
        Step::Copy(c) => c.only.iter().flatten().map(|k| k.join(", ")).collect(),
        Step::Backfill(b) => b.only.clone().unwrap_or_default(),
        Step::Once(o) => o.expect_default.iter().map(|e| super::step_key(&e.column, "set_default")).collect(),
        Step::Batched(_) | Step::Undo(_) => Vec::new(),
    }
}
