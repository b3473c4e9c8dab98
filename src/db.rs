//! Connections, pools and transaction settings.
//!
//! Invariants: every session is tagged `application_name = 'tenant-audit'`. Nothing relies on
//! startup parameters or session state, so sessions survive a transaction-pooling PgBouncer:
//! every transaction starts through [`begin_scan`], [`begin_heal`] or [`begin_heal_checks`], which set what it needs
//! with `SET LOCAL` (timeouts, `search_path`, `standard_conforming_strings`) and declare it
//! read-only or read-write; statements with parameters go through `query_typed` (unnamed
//! statements), so no named prepared statement outlives its transaction.
//! No wait is unbounded: a connection's whole set-up (TCP, TLS, authentication and the
//! `target_session_attrs` check) has a deadline per host, TCP keepalives and `tcp_user_timeout`
//! notice a dead peer, pools bound their waits, pings and server-side cancels have deadlines.
//! Every new connection reads the connection string again ([`DatabaseConfig::resolve`]).
//! Errors describe the target as `host:port/db` and never include credentials.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult, Timeouts};
use tokio_postgres::{CancelToken, Client, IsolationLevel, SimpleQueryMessage, Transaction};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{DatabaseConfig, HealConfig, ScanConfig};
use crate::conninfo::{ConnInfo, HostSpec, SslMode, TargetSessionAttrs};
use crate::pgtls::{self, Verify};

/// The name every session reports in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "tenant-audit";

/// TCP keepalive and `tcp_user_timeout` defaults where the connection string is silent: a peer
/// that vanished (a dead NAT entry, a host powered off) is noticed after idle + count x interval
/// (60 s) when idle, and after `tcp_user_timeout` (30 s) when data we sent goes unacknowledged.
pub const KEEPALIVES_IDLE: Duration = Duration::from_secs(30);
pub const KEEPALIVES_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVES_COUNT: u32 = 3;
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

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

/// A pool of sessions; each new one is opened by [`connect`].
pub type Pool = managed::Pool<Manager>;
/// A session taken from a [`Pool`]; it dereferences to the driver's `Client`.
pub type Session = managed::Object<Manager>;

/// Opens the sessions of a pool and checks idle ones before reuse.
pub struct Manager {
    db: DatabaseConfig,
    /// Per host, for the whole set-up, unless the connection string sets `connect_timeout`.
    connect_timeout: Duration,
}

impl managed::Manager for Manager {
    type Type = Connection;
    type Error = DbError;

    async fn create(&self) -> Result<Connection, DbError> {
        connect(&self.db, self.connect_timeout).await
    }

    async fn recycle(&self, conn: &mut Connection, _: &Metrics) -> RecycleResult<DbError> {
        if conn.client.is_closed() {
            return Err(RecycleError::message("the session is closed"));
        }
        Ok(())
    }
}

/// An open session and what cancelling its statements on the server needs.
pub struct Connection {
    client: Client,
    /// The TLS configuration the session was opened with; a cancel request uses it too.
    tls: MakeRustlsConnect,
    /// How long a cancel request may take (the connect deadline: it opens a connection).
    cancel_within: Duration,
}

impl Deref for Connection {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

impl Connection {
    /// What cancels this session's running statement on the server.
    pub fn canceller(&self) -> Canceller {
        Canceller { token: self.client.cancel_token(), tls: self.tls.clone(), within: self.cancel_within }
    }
}

/// Cancels a session's running statement on the server, within the connect deadline (a frozen
/// server does not answer the cancel request either).
#[derive(Clone)]
pub struct Canceller {
    token: CancelToken,
    tls: MakeRustlsConnect,
    within: Duration,
}

impl Canceller {
    pub async fn cancel(&self) {
        let _ = tokio::time::timeout(self.within, self.token.cancel_query(self.tls.clone())).await;
    }
}

/// A pool of scan sessions, sized by `scan.concurrency`.
pub fn scan_pool(db: &DatabaseConfig, scan: &ScanConfig) -> Pool {
    pool(db, scan.connect_timeout, scan.concurrency)
}

/// A pool of writer sessions for heal: its own connection settings, two sessions (one checks
/// and holds the lease, one works).
pub fn heal_pool(heal: &HealConfig, connect_timeout: Duration) -> Pool {
    pool(&heal.database, connect_timeout, 2)
}

/// A pool of one session for the daemon's pings, apart from the scan's sessions so that a ping
/// never waits behind a scan.
pub fn ping_pool(db: &DatabaseConfig, connect_timeout: Duration) -> Pool {
    pool(db, connect_timeout, 1)
}

fn pool(db: &DatabaseConfig, connect_timeout: Duration, size: usize) -> Pool {
    let info = db.info();
    // Every host may use its whole deadline, twice with prefer-standby; `connect` keeps to it,
    // the pool's own timeouts are the backstop.
    let per_host = info.connect_timeout.unwrap_or(connect_timeout);
    let passes = if info.target_session_attrs == TargetSessionAttrs::PreferStandby { 2 } else { 1 };
    let attempts = u32::try_from(info.hosts.len()).unwrap_or(u32::MAX).saturating_mul(passes);
    let create = per_host.saturating_mul(attempts).saturating_add(Duration::from_secs(1));
    let timeouts = Timeouts { wait: Some(create), create: Some(create), recycle: Some(connect_timeout) };
    Pool::builder(Manager { db: db.clone(), connect_timeout })
        .max_size(size)
        .timeouts(timeouts)
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .expect("a pool with the tokio runtime always builds")
}

/// Opens one session: the connection string read again, then each host in turn (each within
/// its deadline) until one accepts and has the `target_session_attrs` asked for.
pub async fn connect(db: &DatabaseConfig, connect_timeout: Duration) -> Result<Connection, DbError> {
    let fail = |reason: String| DbError::Connect { target: db.target.clone(), reason };
    let resolved = db.resolve().map_err(|e| fail(e.to_string()))?;
    let info = &resolved.info;
    let verify = Verify::for_mode(info.sslmode, resolved.tls.roots.is_some());
    if verify == Verify::Nothing && info.sslmode == SslMode::Require {
        warn_unverified();
    }
    let tls = pgtls::connector(verify, &resolved.tls).map_err(fail)?;
    let deadline = info.connect_timeout.unwrap_or(connect_timeout);
    let passes: &[bool] =
        if info.target_session_attrs == TargetSessionAttrs::PreferStandby { &[true, false] } else { &[false] };
    let mut failures = Vec::new();
    for &standby_only in passes {
        for host in &info.hosts {
            let attempt = connect_host(info, host, &tls, deadline, standby_only);
            match tokio::time::timeout(deadline, attempt).await {
                Ok(Ok(client)) => return Ok(Connection { client, tls, cancel_within: deadline }),
                Ok(Err(reason)) => failures.push((host.display(), reason)),
                Err(_) => failures.push((
                    host.display(),
                    format!(
                        "no answer within {} (connection set-up: TCP, TLS and authentication)",
                        humantime::format_duration(deadline)
                    ),
                )),
            }
        }
    }
    let reason = match failures.as_slice() {
        [(_, reason)] => reason.clone(),
        all => all.iter().map(|(host, reason)| format!("{host}: {reason}")).collect::<Vec<_>>().join("; "),
    };
    Err(fail(reason))
}

/// libpq's `require` without a root certificate encrypts but cannot tell the server from an
/// impostor: said once per process.
fn warn_unverified() {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "sslmode=require: the database server's certificate is not verified (no sslrootcert): the connection is encrypted but \
             not authenticated; set sslrootcert and sslmode=verify-full to verify it"
        );
    }
}

/// One host: TLS as `sslmode` says (with libpq's fallbacks for `allow` and `prefer`), then the
/// session attributes checked.
async fn connect_host(
    info: &ConnInfo,
    host: &HostSpec,
    tls: &MakeRustlsConnect,
    deadline: Duration,
    standby_only: bool,
) -> Result<Client, String> {
    use tokio_postgres::config::SslMode as Driver;
    let attempts: &[(Driver, &str)] = match info.sslmode {
        SslMode::Disable => &[(Driver::Disable, "")],
        SslMode::Allow => &[(Driver::Disable, "without TLS: "), (Driver::Require, "with TLS: ")],
        SslMode::Prefer => &[(Driver::Prefer, "with TLS: "), (Driver::Disable, "without TLS: ")],
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => &[(Driver::Require, "")],
    };
    let mut errors = Vec::new();
    for (mode, label) in attempts {
        match driver_config(info, host, *mode, deadline).connect(tls.clone()).await {
            Ok((client, connection)) => {
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %describe(&e), "database connection ended");
                    }
                });
                let wanted = if standby_only { TargetSessionAttrs::Standby } else { info.target_session_attrs };
                check_session_attrs(&client, wanted).await?;
                return Ok(client);
            }
            Err(e) => {
                errors.push(format!("{label}{}", describe(&e)));
                // libpq tries the other way only when the server answered (it refused, or the
                // TLS handshake failed); an unreachable server is not asked twice.
                if e.as_db_error().is_none() && !e.to_string().starts_with("error performing TLS handshake") {
                    break;
                }
            }
        }
    }
    // A single attempt needs no "with TLS" label.
    match errors.as_slice() {
        [only] => {
            Err(only.strip_prefix("with TLS: ").or(only.strip_prefix("without TLS: ")).unwrap_or(only).to_string())
        }
        _ => Err(errors.join("; ")),
    }
}

fn driver_config(
    info: &ConnInfo,
    host: &HostSpec,
    mode: tokio_postgres::config::SslMode,
    deadline: Duration,
) -> tokio_postgres::Config {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&host.host).port(host.port);
    if let Some(addr) = host.hostaddr {
        pg.hostaddr(addr);
    }
    if let Some(user) = &info.user {
        pg.user(user);
    }
    if let Some(password) = &info.password {
        pg.password(password);
    }
    if let Some(dbname) = &info.dbname {
        pg.dbname(dbname);
    }
    if let Some(options) = &info.options {
        pg.options(options);
    }
    pg.application_name(APPLICATION_NAME)
        .ssl_mode(mode)
        .connect_timeout(deadline)
        .keepalives(info.keepalives)
        .keepalives_idle(info.keepalives_idle.unwrap_or(KEEPALIVES_IDLE))
        .keepalives_interval(info.keepalives_interval.unwrap_or(KEEPALIVES_INTERVAL))
        .keepalives_retries(info.keepalives_count.unwrap_or(KEEPALIVES_COUNT))
        .tcp_user_timeout(info.tcp_user_timeout.unwrap_or(TCP_USER_TIMEOUT));
    pg
}

/// libpq's `target_session_attrs`, checked with one simple query (pooler-safe).
async fn check_session_attrs(client: &Client, wanted: TargetSessionAttrs) -> Result<(), String> {
    if matches!(wanted, TargetSessionAttrs::Any | TargetSessionAttrs::PreferStandby) {
        return Ok(());
    }
    const STATE: &str =
        "SELECT pg_catalog.pg_is_in_recovery()::text, pg_catalog.current_setting('transaction_read_only')";
    let messages = client.simple_query(STATE).await.map_err(|e| describe(&e))?;
    let Some((recovery, read_only)) = messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some((r.get(0) == Some("true"), r.get(1) == Some("on"))),
        _ => None,
    }) else {
        return Err("the session state query returned no row".to_string());
    };
    let refused = match wanted {
        TargetSessionAttrs::ReadWrite if read_only => "session is read-only",
        TargetSessionAttrs::ReadOnly if !read_only => "session is not read-only",
        TargetSessionAttrs::Primary if recovery => "server is in hot standby mode",
        TargetSessionAttrs::Standby if !recovery => "server is not in hot standby mode",
        _ => return Ok(()),
    };
    Err(format!("{refused} (target_session_attrs)"))
}

/// Starts a scan transaction: `REPEATABLE READ, READ ONLY` (one snapshot), with the scan's
/// timeouts. Discovery, the change signals and the catalog run in one of these, with `jit` off:
/// their cost estimates (functions and subqueries per catalog row) pass the JIT thresholds,
/// and compiling a catalog query took 2.1 s of its 2.6 s at 2,000 tables (docs/performance.md).
pub async fn begin_scan<'a>(client: &'a mut Client, scan: &ScanConfig) -> Result<Transaction<'a>, DbError> {
    let tx = client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start().await?;
    tx.batch_execute(&format!("{}; SET LOCAL jit = off", set_local(scan.statement_timeout, scan.lock_timeout))).await?;
    Ok(tx)
}

/// Starts a heal transaction: `READ WRITE` (whatever the server's default), `READ COMMITTED`,
/// with heal's timeouts. Every heal statement runs in one of these.
pub async fn begin_heal<'a>(client: &'a mut Client, heal: &HealConfig) -> Result<Transaction<'a>, DbError> {
    let tx = client.build_transaction().read_only(false).start().await?;
    tx.batch_execute(&set_local(heal.statement_timeout, heal.lock_timeout)).await?;
    Ok(tx)
}

/// Starts a read-only transaction with heal's timeouts: heal's checks before it writes (which
/// must also run on a replica, to find out that it is one).
pub async fn begin_heal_checks<'a>(client: &'a mut Client, heal: &HealConfig) -> Result<Transaction<'a>, DbError> {
    let tx = client.build_transaction().read_only(true).start().await?;
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

/// Checks that the database answers within `within`. A session that did not answer is closed.
pub async fn ping(pool: &Pool, target: &str, within: Duration) -> Result<(), DbError> {
    let attempt = async {
        let client = session(pool, target).await?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| DbError::Connect { target: target.to_string(), reason: describe(&e) })?;
        Ok(())
    };
    match tokio::time::timeout(within, attempt).await {
        Ok(result) => result,
        Err(_) => {
            drop_idle_sessions(pool);
            let reason = format!("no answer to a ping within {}", humantime::format_duration(within));
            Err(DbError::Connect { target: target.to_string(), reason })
        }
    }
}

/// Whether a statement may use parallel workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parallel {
    Allowed,
    Serial,
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
    let batch =
        format!("BEGIN READ ONLY; {}; {serial}{sql}; COMMIT", set_local(scan.statement_timeout, scan.lock_timeout));
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

/// The single row an aggregate statement returns; a missing row is an error, never zeros.
pub fn one_row(rows: Vec<Vec<Option<String>>>) -> Result<Vec<Option<String>>, DbError> {
    rows.into_iter().next().ok_or(DbError::NoRow)
}

/// Closes every idle session of `pool`. After the server restarted, pooled sessions that look
/// open may be dead; after a deadline, sessions may be back in the pool with a statement still
/// running. Fresh ones are opened on demand.
pub fn drop_idle_sessions(pool: &Pool) {
    pool.retain(|_, _| false);
}

/// Closes `session` instead of returning it to its pool (its state is unknown: a statement may
/// still be running on it).
pub fn discard(session: Session) {
    drop(managed::Object::take(session));
}

/// Takes a session from the pool, turning pool failures into a [`DbError`] naming the target.
pub async fn session(pool: &Pool, target: &str) -> Result<Session, DbError> {
    pool.get().await.map_err(|e| match e {
        managed::PoolError::Backend(e) => e,
        managed::PoolError::Timeout(managed::TimeoutType::Wait) => {
            DbError::Connect { target: target.to_string(), reason: "timed out waiting for a free session".into() }
        }
        managed::PoolError::Timeout(_) => {
            DbError::Connect { target: target.to_string(), reason: "timed out opening a session".into() }
        }
        other => DbError::Connect { target: target.to_string(), reason: other.to_string() },
    })
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
