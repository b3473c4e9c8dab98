//! Connection pools and session settings.
//!
//! Invariants: every session is tagged `application_name = 'tenant-audit'`. Nothing relies on
//! startup parameters or session state, so sessions survive a transaction-pooling PgBouncer:
//! every transaction starts through [`begin_scan`] or [`begin_heal`], which set what it needs
//! with `SET LOCAL` (timeouts, `search_path`, `standard_conforming_strings`) and declare it
//! read-only or read-write; statements with parameters go through `query_typed` (unnamed
//! statements), so no named prepared statement outlives its transaction.
//! Errors describe the target as `host:port/db` and never include credentials.

use std::time::Duration;

use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, IsolationLevel, Transaction};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{DatabaseConfig, HealConfig, ScanConfig};

/// The name every session reports in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "tenant-audit";

/// Database failures, with enough context to act on and no secrets.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to database {target}: {reason}")]
    Connect { target: String, reason: String },
    #[error("{}", describe(.0))]
    Query(tokio_postgres::Error),
    /// A count that came back without its row: the session ended mid-statement.
    #[error("the statement returned no row (the connection ended)")]
    NoRow,
}

// Written by hand rather than `#[from]`, which would also make the driver error the `source`
// and print its message twice in an error chain.
impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        DbError::Query(e)
    }
}

impl DbError {
    /// Whether the connection, rather than the statement, failed: no server error at all, a
    /// connection exception (class 08), or the server shutting down or restarting.
    pub fn is_connection(&self) -> bool {
        match self.code() {
            None => true,
            Some(code) => code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03"),
        }
    }

    /// The SQLSTATE of a server-side error, if this is one.
    pub fn code(&self) -> Option<&str> {
        match self {
            DbError::Query(e) => e.as_db_error().map(|d| d.code().code()),
            DbError::Connect { .. } | DbError::NoRow => None,
        }
    }
}

/// One line describing a driver error: the server's message when there is one, otherwise the
/// driver's own description with its cause.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.message().to_string();
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// The TLS connector of a connection: rustls with the system's certificate authorities plus
/// `tls.ca_file`. Certificates and host names are always verified.
pub type Tls = MakeRustlsConnect;

pub fn tls(db: &DatabaseConfig) -> Tls {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    roots.add_parsable_certificates(db.extra_roots.iter().cloned());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    MakeRustlsConnect::new(config)
}

/// The driver configuration of a pool. `sslmode=prefer` (also the default when the URL names
/// none) becomes `disable`: libpq's `prefer` accepts any certificate, ours would verify and fail
/// where libpq connects, so TLS is used exactly when the URL says `sslmode=require`.
fn driver_config(db: &DatabaseConfig, connect_timeout: Duration) -> tokio_postgres::Config {
    let mut pg = db.pg.clone();
    pg.application_name(APPLICATION_NAME);
    pg.connect_timeout(connect_timeout);
    if pg.get_ssl_mode() == SslMode::Prefer {
        pg.ssl_mode(SslMode::Disable);
    }
    pg
}

/// A pool of read-only scan sessions, sized by `scan.concurrency`.
pub fn scan_pool(db: &DatabaseConfig, scan: &ScanConfig) -> Pool {
    let pg = driver_config(db, scan.connect_timeout);
    let manager = Manager::from_config(pg, tls(db), ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager)
        .max_size(scan.concurrency)
        .build()
        .expect("a pool without a runtime-specific timeout always builds")
}

/// A pool of writer sessions for heal: its own connection settings and timeouts, two sessions
/// (one holds the heal lock, one works).
pub fn heal_pool(heal: &HealConfig, connect_timeout: Duration) -> Pool {
    let pg = driver_config(&heal.database, connect_timeout);
    let manager =
        Manager::from_config(pg, tls(&heal.database), ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager).max_size(2).build().expect("a pool without a runtime-specific timeout always builds")
}

/// Starts a scan transaction: `REPEATABLE READ, READ ONLY` (one snapshot), with the scan's
/// timeouts. Every scan query runs in one of these.
pub async fn begin_scan<'a>(client: &'a mut Client, scan: &ScanConfig) -> Result<Transaction<'a>, DbError> {
    let tx = client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start().await?;
    tx.batch_execute(&set_local(scan.statement_timeout, scan.lock_timeout)).await?;
    Ok(tx)
}

/// Starts a heal transaction: `READ WRITE` (whatever the server's default), `READ COMMITTED`,
/// with heal's timeouts. Every heal statement runs in one of these.
pub async fn begin_heal<'a>(client: &'a mut Client, heal: &HealConfig) -> Result<Transaction<'a>, DbError> {
    let tx = client.build_transaction().read_only(false).start().await?;
    tx.batch_execute(&set_local(heal.statement_timeout, heal.lock_timeout)).await?;
    Ok(tx)
}

/// The settings every transaction of ours runs with, for its own duration only (a pooler may
/// hand the next transaction to another server session). `search_path=pg_catalog` makes the
/// catalog render every non-system name schema-qualified (column defaults included), so no name
/// in a transaction of ours resolves through a schema the database's users control.
/// `standard_conforming_strings=on` keeps backslashes literal in the string literals heal
/// writes (`sql::literal`), whatever the database's default.
fn set_local(statement_timeout: Duration, lock_timeout: Duration) -> String {
    format!(
        "SET LOCAL statement_timeout = {}; SET LOCAL lock_timeout = {}; SET LOCAL search_path = pg_catalog; \
         SET LOCAL standard_conforming_strings = on",
        statement_timeout.as_millis(),
        lock_timeout.as_millis(),
    )
}

/// Checks that the database answers.
pub async fn ping(pool: &Pool, target: &str) -> Result<(), DbError> {
    let client = session(pool, target).await?;
    client
        .simple_query("SELECT 1")
        .await
        .map_err(|e| DbError::Connect { target: target.to_string(), reason: describe(&e) })?;
    Ok(())
}

/// A tenant's read-only snapshot (its transaction) that runs each check statement under a
/// savepoint of its own, in one round trip: `SAVEPOINT; statement; RELEASE` go as one simple
/// query message. A failing statement rolls its savepoint back, so the snapshot stays usable
/// for the tenant's other checks.
pub struct Snapshot<'a> {
    tx: &'a tokio_postgres::Transaction<'a>,
}

impl<'a> Snapshot<'a> {
    pub fn new(tx: &'a tokio_postgres::Transaction<'a>) -> Snapshot<'a> {
        Snapshot { tx }
    }

    /// Runs `sql` (a single statement without parameters) and returns its rows as text.
    pub async fn rows(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>, DbError> {
        let batch = format!("SAVEPOINT check_statement; {sql}; RELEASE SAVEPOINT check_statement");
        match self.tx.simple_query(&batch).await {
            Ok(messages) => Ok(messages
                .into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(row) => {
                        Some((0..row.len()).map(|i| row.get(i).map(str::to_string)).collect())
                    }
                    _ => None,
                })
                .collect()),
            Err(e) => {
                let _ = self.tx.batch_execute("ROLLBACK TO SAVEPOINT check_statement").await;
                Err(e.into())
            }
        }
    }
}

/// The counts of the single row an aggregate statement returns, as numbers; a missing row is
/// an error, never zero.
pub fn counts(rows: &[Vec<Option<String>>]) -> Result<Vec<u64>, DbError> {
    let row = rows.first().ok_or(DbError::NoRow)?;
    Ok(row.iter().map(|v| v.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0)).collect())
}

/// Closes every idle session of `pool`. After the server restarted, pooled sessions that look
/// open may be dead; fresh ones are opened on demand.
pub fn drop_idle_sessions(pool: &Pool) {
    pool.retain(|_, _| false);
}

/// Takes a session from the pool, turning pool failures into a [`DbError`] naming the target.
pub async fn session(pool: &Pool, target: &str) -> Result<deadpool_postgres::Object, DbError> {
    pool.get().await.map_err(|e| DbError::Connect { target: target.to_string(), reason: pool_reason(e) })
}

fn pool_reason(e: deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => describe(&e),
        deadpool_postgres::PoolError::Timeout(_) => "timed out waiting for a connection".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transactions_set_timeouts_in_milliseconds() {
        assert_eq!(
            set_local(Duration::from_secs(60), Duration::from_millis(2500)),
            "SET LOCAL statement_timeout = 60000; SET LOCAL lock_timeout = 2500; SET LOCAL search_path = pg_catalog; \
             SET LOCAL standard_conforming_strings = on"
        );
    }
}
