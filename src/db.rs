//! Connection pools and session settings.
//!
//! Invariants: every session is tagged `application_name = 'tenant-audit'` and carries
//! `statement_timeout` and `lock_timeout`; scan sessions default to read-only transactions.
//! Errors describe the target as `host:port/db` and never include credentials.

use std::time::Duration;

use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::config::SslMode;
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
fn driver_config(db: &DatabaseConfig, connect_timeout: Duration, options: &str) -> tokio_postgres::Config {
    let mut pg = db.pg.clone();
    pg.application_name(APPLICATION_NAME);
    pg.connect_timeout(connect_timeout);
    pg.options(options);
    if pg.get_ssl_mode() == SslMode::Prefer {
        pg.ssl_mode(SslMode::Disable);
    }
    pg
}

/// A pool of read-only scan sessions, sized by `scan.concurrency`.
pub fn scan_pool(db: &DatabaseConfig, scan: &ScanConfig) -> Pool {
    let pg = driver_config(db, scan.connect_timeout, &session_options(scan.statement_timeout, scan.lock_timeout, true));
    let manager = Manager::from_config(pg, tls(db), ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager)
        .max_size(scan.concurrency)
        .build()
        .expect("a pool without a runtime-specific timeout always builds")
}

/// A pool of writer sessions for heal: its own connection settings and timeouts, two sessions
/// (one holds the heal lock, one works).
pub fn heal_pool(heal: &HealConfig, connect_timeout: Duration) -> Pool {
    let pg = driver_config(
        &heal.database,
        connect_timeout,
        &session_options(heal.statement_timeout, heal.lock_timeout, false),
    );
    let manager =
        Manager::from_config(pg, tls(&heal.database), ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager).max_size(2).build().expect("a pool without a runtime-specific timeout always builds")
}

/// Server options sent at connection start-up (`-c name=value`), so they hold for every
/// statement of the session, including the first. `search_path=pg_catalog` makes the catalog
/// render every non-system name schema-qualified (column defaults included), so no name in a
/// session of ours resolves through a schema the database's users control.
/// `standard_conforming_strings=on` keeps backslashes literal in the string literals heal
/// writes (`sql::literal`), whatever the database's default.
fn session_options(statement_timeout: Duration, lock_timeout: Duration, read_only: bool) -> String {
    format!(
        "-c statement_timeout={} -c lock_timeout={} -c default_transaction_read_only={} -c search_path=pg_catalog -c standard_conforming_strings=on",
        statement_timeout.as_millis(),
        lock_timeout.as_millis(),
        if read_only { "on" } else { "off" }
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

/// Whether a statement may use parallel workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parallel {
    Allowed,
    Serial,
}

/// The `SET LOCAL` settings of a scan transaction: each transaction sets what it needs itself,
/// so nothing depends on session state (which a transaction pooler does not keep).
pub fn scan_settings(scan: &ScanConfig) -> String {
    format!(
        "SET LOCAL statement_timeout = {}; SET LOCAL lock_timeout = {}; SET LOCAL search_path = pg_catalog",
        scan.statement_timeout.as_millis(),
        scan.lock_timeout.as_millis()
    )
}

/// Runs `sql` (one statement without parameters) in a short read-only transaction of its own
/// and returns its rows as text: `BEGIN READ ONLY; SET LOCAL ...; statement; COMMIT` go as one
/// simple query message, one round trip. The session holds the statement's locks only while it
/// runs. After a failure the transaction is rolled back (when the session still lives), so the
/// session is clean for the next statement. A `Serial` statement gets no parallel workers: a
/// bounded scan then meets rows in the table's physical order, so its samples are stable.
pub async fn read_only(
    client: &tokio_postgres::Client,
    scan: &ScanConfig,
    sql: &str,
    plan: Parallel,
) -> Result<Vec<Vec<Option<String>>>, DbError> {
    let serial = match plan {
        Parallel::Allowed => "",
        Parallel::Serial => "SET LOCAL max_parallel_workers_per_gather = 0; ",
    };
    let batch = format!("BEGIN READ ONLY; {}; {serial}{sql}; COMMIT", scan_settings(scan));
    match client.simple_query(&batch).await {
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
            if !client.is_closed() {
                let _ = client.batch_execute("ROLLBACK").await;
            }
            Err(e.into())
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
    fn options_set_timeouts_in_milliseconds() {
        assert_eq!(
            session_options(Duration::from_secs(60), Duration::from_millis(2500), true),
            "-c statement_timeout=60000 -c lock_timeout=2500 -c default_transaction_read_only=on -c search_path=pg_catalog \
             -c standard_conforming_strings=on"
        );
    }
}
