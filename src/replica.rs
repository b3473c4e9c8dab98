//! Replica lag of a scan connection that is a hot standby: how far its data, which the scan
//! reads, is behind the primary, which heal writes.
//!
//! Invariants: read-only queries of server functions only (no relation is read or locked), each
//! bounded by the caller's timeout; on a primary there is no lag to report (`None`).

use std::time::Duration;

use crate::db::{self, DbError, Pool};

/// How far a standby is behind.
#[derive(Debug, Clone, PartialEq)]
pub struct Lag {
    /// `now() - pg_last_xact_replay_timestamp()`, or 0 when everything received is replayed
    /// (or no transaction was replayed since the standby started).
    pub seconds: f64,
    /// WAL bytes between the primary's current position and the standby's replay position,
    /// when a primary connection was given.
    pub bytes: Option<f64>,
}

/// On a standby: the replay delay in seconds (0 when nothing received waits for replay) and
/// the replay position. No row on a primary.
const STANDBY_LAG: &str = "SELECT greatest(0,
         CASE WHEN pg_catalog.pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_catalog.pg_last_wal_replay_lsn()
              THEN 0
              ELSE coalesce(extract(epoch FROM pg_catalog.now() - pg_catalog.pg_last_xact_replay_timestamp()), 0)
         END)::float8,
       pg_catalog.pg_last_wal_replay_lsn()::text
     WHERE pg_catalog.pg_is_in_recovery()";

/// On the primary: bytes of WAL written past the standby's replay position `$1`.
const BYTES_BEHIND: &str =
    "SELECT greatest(0, pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), $1::text::pg_lsn))::float8";

/// The lag of the server behind `scan` (`None` on a primary), with the bytes behind the primary
/// of `primary` when given. Each query must answer within `within`.
pub async fn lag(
    scan: (&Pool, &str),
    primary: Option<(&Pool, &str)>,
    within: Duration,
) -> Result<Option<Lag>, DbError> {
    let Some((seconds, replayed)) = bounded(within, scan.1, standby_lag(scan.0, scan.1)).await? else {
        return Ok(None);
    };
    let bytes = match (primary, replayed) {
        (Some((pool, target)), Some(replayed)) => {
            Some(bounded(within, target, bytes_behind(pool, target, &replayed)).await?)
        }
        _ => None,
    };
    Ok(Some(Lag { seconds, bytes }))
}

async fn standby_lag(pool: &Pool, target: &str) -> Result<Option<(f64, Option<String>)>, DbError> {
    let client = db::session(pool, target).await?;
    let row = client.query_typed_opt(STANDBY_LAG, &[]).await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

async fn bytes_behind(pool: &Pool, target: &str, replayed: &str) -> Result<f64, DbError> {
    let client = db::session(pool, target).await?;
    let row = client.query_typed_one(BYTES_BEHIND, &[(&replayed, tokio_postgres::types::Type::TEXT)]).await?;
    Ok(row.get(0))
}

/// `work`, or a connection error naming `target` when it takes longer than `within`.
async fn bounded<T>(
    within: Duration,
    target: &str,
    work: impl std::future::Future<Output = Result<T, DbError>>,
) -> Result<T, DbError> {
    tokio::time::timeout(within, work).await.unwrap_or_else(|_| {
        let reason = format!("no answer within {}", humantime::format_duration(within));
        Err(DbError::Connect { target: target.to_string(), reason })
    })
}
