//! One healer per database, through any pooler: the lease row of `tenant_audit.heal_lease`.
//!
//! A session-level advisory lock means nothing through a transaction-pooling PgBouncer (the next
//! transaction may run on another server session, and the lock stays behind on an idle one). So
//! a run takes a lease, a row with an expiry, in a transaction of its own; every write
//! transaction renews it first and holds the transaction-level advisory lock [`super::LOCK_KEY`]
//! until it commits; the run deletes it at the end.
//!
//! Invariants: a write transaction commits only while its run holds the lease (the renewal
//! re-checks the holder inside that transaction, and its row lock serialises it against a
//! taker); a run that was killed leaves a lease that expires after [`Lease::ttl`] and is then
//! taken over; the advisory lock also keeps out a healer of an older version (which holds it at
//! session level) and a transaction still running after its lease expired.

use std::time::Duration;

use tokio_postgres::types::Type;
use tokio_postgres::Transaction;

use crate::sql;
use crate::tenants::AUDIT_SCHEMA;

/// The lease of one heal run.
pub struct Lease {
    /// Who holds it: the run id.
    pub holder: String,
    /// How long it lasts after each renewal: longer than any gap between two transactions of a
    /// run (a statement before the first write, the work between batches).
    pub ttl: Duration,
}

/// The lease table, qualified and quoted.
pub fn table() -> String {
    sql::qualified(AUDIT_SCHEMA, "heal_lease")
}

/// Whether the lease table exists (it is created once, by [`create_sql`]).
pub const EXISTS: &str = "SELECT pg_catalog.to_regclass('tenant_audit.heal_lease') IS NOT NULL";

/// Creates the lease table. Run in a transaction holding [`CREATE_LOCK_KEY`], so that two
/// healers starting at once do not both create it.
pub fn create_sql() -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {table} (
    id int PRIMARY KEY CHECK (id = 1),
    holder text NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    expires_at timestamptz NOT NULL,
    backend_pid int NOT NULL,
    backend_start timestamptz
);",
        schema = sql::ident(AUDIT_SCHEMA),
        table = table()
    )
}

/// The advisory lock (transaction level, waited for under `lock_timeout`) that serialises the
/// creation of the lease table.
pub const CREATE_LOCK_KEY: i64 = super::LOCK_KEY + 1;

impl Lease {
    pub fn new(holder: String, statement_timeout: Duration) -> Lease {
        Lease { holder, ttl: statement_timeout + Duration::from_secs(60) }
    }

    /// Takes the lease in `tx` (a heal transaction of its own): when no run holds it, the
    /// holder's lease has expired, or the server session that took it is gone (a killed run, on
    /// a direct connection; through a pooler that session lives on and the expiry decides).
    /// False when another run holds it, is in the middle of a write transaction (its renewal
    /// locks the row), or holds the advisory lock; `tx` must then be rolled back.
    pub async fn acquire(&self, tx: &Transaction<'_>) -> Result<bool, tokio_postgres::Error> {
        let table = table();
        // A run inside a write transaction has the row locked: it is alive, do not wait for it.
        let busy = format!("SELECT 1 FROM {table} WHERE id = 1 FOR UPDATE NOWAIT");
        match tx.query_typed(&busy, &[]).await {
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => return Ok(false),
            other => other?,
        };
        let take = format!(
            "INSERT INTO {table} AS l (id, holder, expires_at, backend_pid, backend_start)
SELECT 1, $1, pg_catalog.now() + pg_catalog.make_interval(secs => $2), pg_catalog.pg_backend_pid(),
       (SELECT a.backend_start FROM pg_catalog.pg_stat_activity a WHERE a.pid = pg_catalog.pg_backend_pid())
ON CONFLICT (id) DO UPDATE SET holder = EXCLUDED.holder, acquired_at = pg_catalog.now(),
    expires_at = EXCLUDED.expires_at, backend_pid = EXCLUDED.backend_pid, backend_start = EXCLUDED.backend_start
WHERE l.expires_at < pg_catalog.now()
   OR NOT EXISTS (SELECT FROM pg_catalog.pg_stat_activity a WHERE a.pid = l.backend_pid
                  AND (a.backend_start IS NULL OR l.backend_start IS NULL OR a.backend_start = l.backend_start))
RETURNING holder"
        );
        let ttl = self.ttl.as_secs_f64();
        if tx.query_typed(&take, &[(&self.holder, Type::TEXT), (&ttl, Type::FLOAT8)]).await?.is_empty() {
            return Ok(false);
        }
        // Taken only once the row is ours, so that waiting here never fences out a live holder's
        // renewal; false when a healer of an older version holds it at session level.
        let lock = "SELECT pg_catalog.pg_try_advisory_xact_lock($1)";
        Ok(tx.query_typed_one(lock, &[(&super::LOCK_KEY, Type::INT8)]).await?.get(0))
    }

    /// Renews the lease inside a write transaction, first thing, and takes the transaction-level
    /// advisory lock. False when the lease is no longer this run's: the transaction must not go on.
    pub async fn renew(&self, tx: &Transaction<'_>) -> Result<bool, tokio_postgres::Error> {
        let sql = format!(
            "UPDATE {table} SET expires_at = pg_catalog.now() + pg_catalog.make_interval(secs => $2)
WHERE id = 1 AND holder = $1 AND pg_catalog.pg_try_advisory_xact_lock($3)
RETURNING holder",
            table = table()
        );
        let rows = tx
            .query_typed(
                &sql,
                &[(&self.holder, Type::TEXT), (&self.ttl.as_secs_f64(), Type::FLOAT8), (&super::LOCK_KEY, Type::INT8)],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    /// Gives the lease up (in a heal transaction of its own).
    pub async fn release(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        let sql = format!("DELETE FROM {} WHERE id = 1 AND holder = $1", table());
        tx.query_typed(&sql, &[(&self.holder, Type::TEXT)]).await?;
        Ok(())
    }
}
