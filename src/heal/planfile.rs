//! Plan files: `heal --plan-out FILE` writes the plan as JSON with the rows or keys each step
//! will touch, resolved against the database (read-only); `heal --apply FILE --execute` runs
//! exactly that plan: every step re-checks its predicate, and a copy or backfill changes only the
//! keys or rows the file lists (those the application changed meanwhile are skipped and
//! reported).

use serde::{Deserialize, Serialize};
use tokio_postgres::types::Type;

use super::plan::{Plan, Step};
use super::{backfill, search_path};
use crate::config::HealConfig;
use crate::db::{self, DbError, Pool};

/// The format version of plan files.
pub const VERSION: u32 = 1;

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

/// Fills every copy's and backfill's `only` with the keys and rows it would touch now.
pub async fn resolve(heal: &HealConfig, pool: &Pool, plan: &mut Plan) -> Result<(), DbError> {
    let mut session = db::session(pool, &heal.database.target).await?;
    for tenant in &mut plan.tenants {
        let path = search_path(&tenant.schema);
        for action in &mut tenant.actions {
            for step in &mut action.steps {
                let tx = db::begin_heal(&mut session, heal).await?;
                tx.batch_execute(&format!("SET TRANSACTION READ ONLY; {path}")).await?;
                match step {
                    Step::Copy(spec) => {
                        let nulls: Vec<Option<String>> = vec![None; spec.key_len];
                        let mut params: Vec<(&(dyn tokio_postgres::types::ToSql + Sync), Type)> =
                            vec![(&i64::MAX, Type::INT8)];
                        params.extend(
                            nulls.iter().map(|n| (n as &(dyn tokio_postgres::types::ToSql + Sync), Type::TEXT)),
                        );
                        let rows = tx.query_typed(&spec.pick_sql, &params).await?;
                        let keys = rows
                            .iter()
                            .map(|r| {
                                (0..spec.key_len).map(|i| r.get::<_, Option<String>>(i).unwrap_or_default()).collect()
                            })
                            .collect();
                        spec.only = Some(keys);
                    }
                    Step::Backfill(spec) => {
                        let relations =
                            tx.query_typed(backfill::RELATIONS, &[(&spec.table_name(), Type::TEXT)]).await?;
                        let (relations, tree) = backfill::relations(&relations);
                        let mut keys = Vec::new();
                        for relation in relations {
                            for row in tx.query_typed(&spec.rows_sql(&relation, tree), &[]).await? {
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
    Ok(())
}
