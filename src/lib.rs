//! tenant-audit: a consistency auditor for schema-per-tenant PostgreSQL databases.
//!
//! # Bird's-eye view
//! A scan discovers the tenant schemas, reads the catalog of every tenant (and of the shared and
//! reference schemas) in a few queries per chunk of schemas, plans the per-tenant checks from
//! that catalog as one work unit per table, runs each unit as one statement in a short read-only
//! transaction of its own (so a session holds locks only on the table at hand), and returns a
//! [`report::Report`]: findings plus the errors met on the way.
//!
//! # Code map
//! - [`cli`]: clap types of the command line.
//! - [`config`]: the TOML file and environment, validated once into [`config::Config`]. The only
//!   reader of files and of tenant-audit's environment variables.
//! - [`conninfo`]: libpq connection strings (URL and `key=value`), with libpq's meaning. Pure.
//! - [`pgtls`]: the TLS verification each `sslmode` asks for (rustls).
//! - [`db`]: connections (deadline on the whole set-up, keepalives), pools, pings, and the one
//!   helper per transaction kind that sets its timeouts with `SET LOCAL` (pooler-safe).
//! - [`sql`]: identifier quoting; no SQL is built from an unquoted name.
//! - [`tenants`]: tenant discovery (registry table and/or name patterns).
//! - [`catalog`]: catalog introspection into plain data. Read-only; no tenant relation locked;
//!   a constant number of queries per chunk of schemas.
//! - [`checks`]: one module per check. Pure planning from the catalog, plus the set-based SQL
//!   that counts in the database; [`checks::work`] groups one table's checks into one unit.
//! - [`incremental`]: per-table change signals and the state between scans that carries a
//!   table's findings forward while nothing its checks read may have changed.
//! - [`scan`]: one pass: tenants -> catalog -> checks -> report. A failing table or tenant is
//!   recorded, never fatal.
//! - [`heal`]: plans and repairs; the ONLY code that writes to a tenant database.
//! - [`report`]: report types and their table and JSON renderings.
//! - [`memory`]: glibc allocator settings that return freed memory to the OS (RSS follows use).
//! - [`metrics`]: one target's Prometheus registry (every series labelled `database`), rebuilt
//!   from each finished report.
//! - [`exposition`]: `/metrics` of the process: the build info and every target's metrics.
//! - [`replica`]: the replica lag of a scan connection that is a hot standby.
//! - [`shard`]: which shard owns a tenant (rendezvous hashing of the schema name).
//! - [`schedule`]: the cron loop; one scan at a time; keeps the last good report.
//! - [`http`]: the HTTP listener and endpoints: TLS, basic auth, timeouts, a connection cap,
//!   accept back-off, responses encoded once per change. Never queries PostgreSQL.
//! - [`web_config`]: the listener's exporter-toolkit web config file (TLS, basic auth users).
//! - [`daemon`]: `serve`: one scheduler per target and the HTTP listener; one target down, slow
//!   or frozen never delays another; shuts down within the timeout.
//!
//! Outside `src/`: `dashboards/` (Grafana dashboard, alert rules and their promtool tests),
//! `helm/tenant-audit/` (the chart), `tests/it/` (one integration binary against real
//! PostgreSQL and Prometheus), `scripts/` (demo, test, bench) and `docs/`.
//!
//! # Invariants
//! - Scanning only reads: every scan query runs in a `READ ONLY` transaction.
//! - Every identifier in generated SQL goes through [`sql::ident`]; values are bind parameters.
//! - No password is ever logged or put into an error message.
//! - A scrape of `/metrics` costs no database query: metrics change only when a scan ends.
//! - No HTTP request writes to a database unless the operator enabled both `POST /scan`
//!   (`web.scan_requests.enabled`) and healing on request (`web.scan_requests.heal`).

pub mod catalog;
pub mod checks;
pub mod cli;
pub mod config;
pub mod conninfo;
pub mod daemon;
pub mod db;
pub mod exposition;
pub mod heal;
pub mod http;
pub mod incremental;
pub mod memory;
pub mod metrics;
pub mod pgtls;
pub mod replica;
pub mod report;
pub mod scan;
pub mod schedule;
pub mod shard;
pub mod sql;
pub mod tenants;
pub mod web_config;
