//! The configuration file and environment, validated once into [`Config`].
//!
//! Invariants: this is the only module that reads configuration files or environment
//! variables (the listener's exporter-toolkit file is parsed by [`crate::web_config`], called
//! from here); everything else takes a validated [`Config`]. Errors name the offending key (or
//! file line) and never contain the database password.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;

use crate::conninfo::{self, ConnInfo, RootCert};
use crate::pgtls;
use crate::shard::Shard;

mod shard;
mod targets;

pub use shard::SHARD_INDEX_ENV;

/// Environment variable that overrides `database_url` (and `database_url_file`).
pub const DATABASE_URL_ENV: &str = "TENANT_AUDIT_DATABASE_URL";
/// Environment variable that overrides `heal.database_url` (and `heal.database_url_file`).
pub const HEAL_DATABASE_URL_ENV: &str = "TENANT_AUDIT_HEAL_DATABASE_URL";

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {cause}")]
    Read { path: PathBuf, cause: std::io::Error },
    #[error("config file {path}, line {line}: {message}")]
    Parse { path: PathBuf, line: usize, message: String },
    #[error("config key {key}: {message}")]
    Invalid { key: String, message: String },
    #[error(transparent)]
    WebConfig(#[from] crate::web_config::WebConfigError),
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid { key: key.into(), message: message.into() }
    }
}

/// Every target of the file, validated, and the shard this process is.
#[derive(Debug, Clone)]
pub struct Fleet {
    /// One per `[[targets]]` entry, in file order; the single top-level database otherwise.
    /// `serve`, `web`, `metrics`, `report` and `tls` are top-level only: the same in every one.
    pub targets: Vec<Config>,
    pub shard: Shard,
}

impl From<Config> for Fleet {
    fn from(config: Config) -> Fleet {
        Fleet { shard: config.shard, targets: vec![config] }
    }
}

/// The validated configuration of one target (one database) that the rest of the program
/// requires.
#[derive(Debug, Clone)]
pub struct Config {
    /// The target's name (`targets[].name`, or the top-level `name`, default `default`): the
    /// `database` label of its metrics.
    pub name: String,
    /// The shard this process is; it scans and heals only the tenants it owns.
    pub shard: Shard,
    pub database: DatabaseConfig,
    pub database_checks: DatabaseChecks,
    pub tenants: TenantsConfig,
    pub scan: ScanConfig,
    pub checks: ChecksConfig,
    pub report: ReportConfig,
    pub serve: ServeConfig,
    pub metrics: MetricsConfig,
    pub heal: HealConfig,
    pub web: WebConfig,
}

/// Repairs; every one is off unless enabled.
#[derive(Debug, Clone)]
pub struct HealConfig {
    /// The daemon heals after each successful scan.
    pub enabled: bool,
    /// The writer's connection: `heal.database_url` or, when unset, the scan's.
    pub database: DatabaseConfig,
    pub copy_missing_parents: bool,
    pub backfill_null_timestamps: bool,
    pub add_missing_columns: bool,
    pub batch_size: usize,
    pub max_rows_per_run: u64,
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
    /// The statement timeout of a `VALIDATE CONSTRAINT` (it reads the whole table).
    pub validate_timeout: Duration,
    /// Per timestamp column, the columns (or `now()`) whose value a NULL is set from, in order.
    pub fallbacks: BTreeMap<String, Vec<String>>,
    /// Tables whose key (not a `uuid`) still means the same row in every schema, so copying a
    /// row with it from the shared schema is safe.
    pub same_entity_keys: Vec<SameEntityKey>,
    /// Advance tenant sequences found behind their column (`sequence_behind`).
    pub advance_sequences: bool,
    /// What the audit table keeps of a copied or changed row.
    pub audit_values: AuditValues,
    /// `BEFORE ... FOR EACH ROW` triggers heal may fire (`heal.allow_triggers`); a table with any
    /// other one is not written.
    pub allow_triggers: Vec<AllowedTrigger>,
    /// `add_missing_columns` may add a column whose type is a domain with constraints, which
    /// rewrites the table under `ACCESS EXCLUSIVE` (`heal.allow_table_rewrite`).
    pub allow_table_rewrite: bool,
}

/// A `BEFORE` row trigger heal may fire, by table and trigger name in every tenant
/// (`heal.allow_triggers`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowedTrigger {
    pub table: String,
    pub trigger: String,
}

/// A table whose key identifies the same entity in every schema (`heal.same_entity_keys`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SameEntityKey {
    pub table: String,
    pub columns: Vec<String>,
}

/// `heal.audit_values`: `full` keeps each copied row and each new value in the audit table,
/// `keys` only the keys (no personal data in the audit table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditValues {
    Full,
    Keys,
}

impl HealConfig {
    pub fn any_repair(&self) -> bool {
        self.copy_missing_parents || self.backfill_null_timestamps || self.add_missing_columns || self.advance_sequences
    }
}

/// The daemon (`tenant-audit serve`).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: std::net::SocketAddr,
    pub schedule: cron::Schedule,
    pub scan_on_start: bool,
    /// `/readyz` fails when the last successful scan is older than this.
    pub ready_max_age: Duration,
    /// How long shutdown may take before the process exits anyway.
    pub shutdown_timeout: Duration,
    /// First and largest wait between retries while the database is unreachable.
    pub retry_initial_backoff: Duration,
    pub retry_max_backoff: Duration,
    /// The daemon's scan deadline: `scan.max_duration`, else the schedule's interval (so a hung
    /// scan never holds more than one tick), at least a minute.
    pub scan_max_duration: Duration,
}

/// Metric export settings.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// Most per-schema series exported; beyond it only aggregates are.
    pub max_tenant_series: usize,
}

/// Where and how to connect: a libpq connection string, validated at start-up. When it comes
/// from `database_url_file`, the file is read again for every new connection (rotated passwords
/// and short-lived IAM tokens), and so are the certificate files it names. Holds the password;
/// only `target` is ever displayed.
#[derive(Clone)]
pub struct DatabaseConfig {
    /// `host:port/dbname` of the first host, safe to print.
    pub target: String,
    /// The connection string as validated at start-up.
    info: ConnInfo,
    /// The URL file, when the string comes from one.
    file: Option<PathBuf>,
    /// The key (or environment variable) the string comes from, for messages.
    key: String,
    /// libpq parameters for what the string leaves out: `PG*` variables, then `tls.ca_file`.
    defaults: BTreeMap<String, String>,
}

/// A connection string as it stands now, with the certificates it names.
pub struct Resolved {
    pub info: ConnInfo,
    pub tls: pgtls::Material,
}

impl DatabaseConfig {
    /// The connection string as validated at start-up.
    pub fn info(&self) -> &ConnInfo {
        &self.info
    }

    /// The connection string for a new connection: the URL file read again (when there is one)
    /// and the certificate files loaded.
    pub fn resolve(&self) -> Result<Resolved, ConfigError> {
        let info = match &self.file {
            Some(file) => parse_conninfo(&self.key, &read_url_file(&self.key, file)?, &self.defaults)?,
            None => self.info.clone(),
        };
        let tls = load_material(&self.key, &info)?;
        Ok(Resolved { info, tls })
    }
}

/// The certificates of `info`: `sslrootcert` (a PEM file, or `system`), `sslcert` and `sslkey`.
fn load_material(key: &str, info: &ConnInfo) -> Result<pgtls::Material, ConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let invalid = |param: &str, message: String| ConfigError::invalid(key, format!("parameter {param}: {message}"));
    let certs = |param: &str, file: &Path| -> Result<Vec<CertificateDer<'static>>, ConfigError> {
        let certs = CertificateDer::pem_file_iter(file)
            .map_err(|e| invalid(param, format!("cannot read {}: {e}", file.display())))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(param, format!("{} is not valid PEM: {e}", file.display())))?;
        if certs.is_empty() {
            return Err(invalid(param, format!("{} holds no certificate", file.display())));
        }
        Ok(certs)
    };
    let roots = match &info.sslrootcert {
        None => None,
        Some(RootCert::System) => Some(rustls_native_certs::load_native_certs().certs),
        Some(RootCert::File(file)) => Some(certs("sslrootcert", file)?),
    };
    let client = match (&info.sslcert, &info.sslkey) {
        (Some(cert), Some(keyfile)) => {
            let chain = certs("sslcert", cert)?;
            let private = PrivateKeyDer::from_pem_file(keyfile)
                .map_err(|e| invalid("sslkey", format!("cannot read a private key from {}: {e}", keyfile.display())))?;
            Some((chain, private))
        }
        _ => None,
    };
    Ok(pgtls::Material { roots, client })
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig").field("target", &self.target).finish()
    }
}

/// Tenant discovery settings.
#[derive(Debug, Clone)]
pub struct TenantsConfig {
    /// The tenant registry table, if registry discovery is on.
    pub registry: Option<Registry>,
    /// Schema names matching any of these are tenants (pattern discovery is on when non-empty).
    pub include: Vec<Regex>,
    /// Schema names matching any of these are never tenants, whatever found them.
    pub exclude: Vec<Regex>,
    /// The schema shared by all tenants (`public` for django-tenants).
    pub shared_schema: String,
    /// A template schema whose shape every tenant should have; `None` means "most common shape".
    pub reference_schema: Option<String>,
}

/// The table that lists tenant schemas, one per row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    pub schema: String,
    pub table: String,
    pub column: String,
}

/// How scans run.
#[derive(Debug, Clone)]
pub struct ScanConfig {
    pub concurrency: usize,
    pub statement_timeout: Duration,
    pub lock_timeout: Duration,
    /// Per host, for the whole connection set-up (TCP, TLS, authentication).
    pub connect_timeout: Duration,
    /// The daemon's scans are full at least this often; between them they are incremental.
    pub full_every: Duration,
    /// After this long a scan is cancelled (on the server too) and fails: `scan.max_duration`,
    /// else one hour for `scan`; `serve` uses [`ServeConfig::scan_max_duration`].
    pub max_duration: Duration,
}

/// The least `scan.max_duration` derived from a schedule (one firing every second must not
/// cancel every scan after a second).
pub const MIN_DERIVED_SCAN_MAX_DURATION: Duration = Duration::from_secs(60);

/// The default `scan.max_duration` of a one-off `scan`.
pub const CLI_SCAN_MAX_DURATION: Duration = Duration::from_secs(3600);

/// The daemon's liveness checks of the database (`[database]`).
#[derive(Debug, Clone)]
pub struct DatabaseChecks {
    /// How often the daemon pings the database.
    pub ping_interval: Duration,
    /// How long a ping may take before the database counts as down.
    pub ping_timeout: Duration,
}

/// Check settings.
#[derive(Debug, Clone)]
pub struct ChecksConfig {
    pub required_timestamps: Vec<String>,
    pub relationships: Vec<DeclaredRelationship>,
}

/// A relationship without a database constraint (Django's `db_constraint=False`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeclaredRelationship {
    pub table: String,
    pub columns: Vec<String>,
    pub parent_table: String,
    pub parent_columns: Vec<String>,
}

/// Report settings.
#[derive(Debug, Clone)]
pub struct ReportConfig {
    pub sample_keys: usize,
}

impl Fleet {
    /// Reads and validates the file at `path`, applying the environment overrides.
    pub fn load(path: &Path) -> Result<Fleet, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|cause| ConfigError::Read { path: path.to_path_buf(), cause })?;
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let libpq =
            conninfo::ENV_DEFAULTS.iter().filter_map(|(var, param)| env(var).map(|v| (param.to_string(), v))).collect();
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").ok().or_else(|| env("HOSTNAME"));
        Fleet::from_toml(
            &text,
            path,
            Env {
                database_url: env(DATABASE_URL_ENV),
                heal_database_url: env(HEAL_DATABASE_URL_ENV),
                libpq,
                shard_index: env(SHARD_INDEX_ENV),
                hostname,
            },
        )
    }

    /// Parses and validates `text` with the environment overrides in `env`.
    pub fn from_toml(text: &str, path: &Path, env: Env) -> Result<Fleet, ConfigError> {
        let parse_error = |e: toml::de::Error| ConfigError::Parse {
            path: path.to_path_buf(),
            line: e.span().map(|s| line_of(text, s.start)).unwrap_or(1),
            message: e.message().to_string(),
        };
        let mut raw: RawConfig = toml::from_str(text).map_err(parse_error)?;
        let shard =
            raw.shard.take().unwrap_or_default().validate(env.shard_index.as_deref(), env.hostname.as_deref())?;
        if raw.targets.is_empty() {
            let name = raw.name.take().unwrap_or_else(|| DEFAULT_TARGET.to_string());
            targets::check_name("name", &name)?;
            return Ok(Fleet { targets: vec![raw.validate(path, env, name, shard)?], shard });
        }
        check_targets(&raw, &env)?;
        let file: toml::Table = toml::from_str(text).map_err(parse_error)?;
        let mut configs = Vec::with_capacity(raw.targets.len());
        for (index, target) in raw.targets.iter().enumerate() {
            let merged: RawConfig = toml::Table::try_into(targets::merged(&file, index)).map_err(parse_error)?;
            let env = Env { database_url: None, heal_database_url: None, ..env.clone() };
            let config = merged
                .validate(path, env, target.name.clone(), shard)
                .map_err(|e| targets::attribute(e, &file, index))?;
            configs.push(config);
        }
        Ok(Fleet { targets: configs, shard })
    }

    /// Loads the web config file at `path` (the `--web.config.file` flag) once, for the listener
    /// of every target, replacing the file's `web.config_file`.
    pub fn load_web_security(&mut self, path: &Path) -> Result<(), ConfigError> {
        let security = std::sync::Arc::new(crate::web_config::WebSecurity::load(path)?);
        for target in &mut self.targets {
            target.web.security = Some(std::sync::Arc::clone(&security));
        }
        Ok(())
    }

    /// The target `name`, or the only one when `name` is `None`; `key` names the option in
    /// messages (`--target`).
    pub fn select(self, name: Option<&str>, key: &str) -> Result<Config, ConfigError> {
        let names = || self.targets.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ");
        match name {
            Some(name) => match self.targets.iter().position(|t| t.name == name) {
                Some(i) => Ok(self.targets.into_iter().nth(i).expect("position is in range")),
                None => {
                    Err(ConfigError::invalid(key, format!("no target named {name:?}; the targets are {}", names())))
                }
            },
            None if self.targets.len() == 1 => Ok(self.targets.into_iter().next().expect("one target")),
            None => Err(ConfigError::invalid(
                key,
                format!("required: the config has {} targets ({})", self.targets.len(), names()),
            )),
        }
    }
}

/// The name of the single top-level target when `name` is unset.
pub const DEFAULT_TARGET: &str = "default";

/// What `[[targets]]` forbids or requires beyond each target's own validation.
fn check_targets(raw: &RawConfig, env: &Env) -> Result<(), ConfigError> {
    let forbidden = [
        ("database_url", raw.database_url.is_some()),
        ("database_url_file", raw.database_url_file.is_some()),
        ("name", raw.name.is_some()),
        (DATABASE_URL_ENV, env.database_url.is_some()),
        (HEAL_DATABASE_URL_ENV, env.heal_database_url.is_some()),
    ];
    if let Some((key, _)) = forbidden.iter().find(|(_, set)| *set) {
        return Err(ConfigError::invalid(
            *key,
            "not allowed with [[targets]]: give each target its own name and connection strings",
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, target) in raw.targets.iter().enumerate() {
        targets::check_name(&format!("targets[{i}].name"), &target.name)?;
        if !seen.insert(target.name.as_str()) {
            return Err(ConfigError::invalid(format!("targets[{i}].name"), format!("{:?} is used twice", target.name)));
        }
        if target.database_url.is_none() && target.database_url_file.is_none() {
            return Err(ConfigError::invalid(
                format!("targets[{i}].database_url"),
                format!("not set; set targets[{i}].database_url or targets[{i}].database_url_file"),
            ));
        }
    }
    Ok(())
}

impl Config {
    /// Reads and validates a file of one target (see [`Fleet::load`] for several).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Fleet::load(path)?.select(None, "targets")
    }

    /// Parses and validates a file of one target with the environment overrides in `env`.
    pub fn from_toml(text: &str, path: &Path, env: Env) -> Result<Config, ConfigError> {
        Fleet::from_toml(text, path, env)?.select(None, "targets")
    }
}

/// The environment variables that override configuration keys.
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// [`DATABASE_URL_ENV`]
    pub database_url: Option<String>,
    /// [`HEAL_DATABASE_URL_ENV`]
    pub heal_database_url: Option<String>,
    /// libpq's `PG*` variables that are set, by the parameter each supplies
    /// ([`conninfo::ENV_DEFAULTS`]): defaults where a connection string is silent.
    pub libpq: BTreeMap<String, String>,
    /// [`SHARD_INDEX_ENV`]
    pub shard_index: Option<String>,
    /// The host name: its trailing `-<n>` is the shard index when nothing else gives one.
    pub hostname: Option<String>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: Option<String>,
    database_url: Option<String>,
    database_url_file: Option<PathBuf>,
    #[serde(default)]
    targets: Vec<RawTarget>,
    shard: Option<shard::RawShard>,
    #[serde(default)]
    tenants: RawTenants,
    #[serde(default)]
    scan: RawScan,
    #[serde(default)]
    checks: RawChecks,
    #[serde(default)]
    report: RawReport,
    #[serde(default)]
    serve: RawServe,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    heal: RawHeal,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    web: RawWeb,
    #[serde(default)]
    database: RawDatabase,
}

/// One `[[targets]]` entry as written. The sections are parsed here only to check them (with
/// line numbers), hence their `_` names; their values reach the target through
/// [`targets::merged`], key by key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: String,
    database_url: Option<String>,
    database_url_file: Option<PathBuf>,
    #[serde(rename = "schedule")]
    _schedule: Option<String>,
    #[serde(rename = "tenants")]
    _tenants: Option<RawTenants>,
    #[serde(rename = "scan")]
    _scan: Option<RawScan>,
    #[serde(rename = "checks")]
    _checks: Option<RawChecks>,
    #[serde(rename = "heal")]
    _heal: Option<RawHeal>,
    #[serde(rename = "database")]
    _database: Option<RawDatabase>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDatabase {
    ping_interval: String,
    ping_timeout: String,
}

impl Default for RawDatabase {
    fn default() -> Self {
        RawDatabase { ping_interval: "15s".into(), ping_timeout: "5s".into() }
    }
}

impl RawDatabase {
    fn validate(self) -> Result<DatabaseChecks, ConfigError> {
        Ok(DatabaseChecks {
            ping_interval: parse_duration("database.ping_interval", &self.ping_interval)?,
            ping_timeout: parse_duration("database.ping_timeout", &self.ping_timeout)?,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_file: Option<PathBuf>,
}

/// `tls.ca_file` (relative to the config file), checked to hold PEM certificates. It is the
/// `sslrootcert` of connection strings that name none (kept from before `sslrootcert` was
/// understood).
fn ca_file(tls: &RawTls, config_path: &Path) -> Result<Option<PathBuf>, ConfigError> {
    use rustls::pki_types::pem::PemObject;
    let Some(file) = &tls.ca_file else { return Ok(None) };
    let file = config_path.parent().unwrap_or(Path::new(".")).join(file);
    let invalid = |message: String| ConfigError::invalid("tls.ca_file", message);
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(&file)
        .map_err(|e| invalid(format!("cannot read {}: {e}", file.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("{} is not valid PEM: {e}", file.display())))?;
    if certs.is_empty() {
        return Err(invalid(format!("{} holds no certificate", file.display())));
    }
    Ok(Some(file))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHeal {
    enabled: bool,
    database_url: Option<String>,
    database_url_file: Option<PathBuf>,
    copy_missing_parents: bool,
    backfill_null_timestamps: bool,
    add_missing_columns: bool,
    batch_size: i64,
    max_rows_per_run: i64,
    lock_timeout: String,
    statement_timeout: String,
    validate_timeout: String,
    fallbacks: BTreeMap<String, Vec<String>>,
    same_entity_keys: Vec<SameEntityKey>,
    advance_sequences: bool,
    audit_values: AuditValues,
    allow_triggers: Vec<AllowedTrigger>,
    allow_table_rewrite: bool,
}

impl Default for RawHeal {
    fn default() -> Self {
        let chain = |cols: &[&str]| cols.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        RawHeal {
            enabled: false,
            database_url: None,
            database_url_file: None,
            copy_missing_parents: false,
            backfill_null_timestamps: false,
            add_missing_columns: false,
            batch_size: 500,
            max_rows_per_run: 10_000,
            lock_timeout: "2s".into(),
            statement_timeout: "30s".into(),
            validate_timeout: "5m".into(),
            same_entity_keys: Vec::new(),
            advance_sequences: false,
            audit_values: AuditValues::Full,
            allow_triggers: Vec::new(),
            allow_table_rewrite: false,
            fallbacks: BTreeMap::from([
                ("updated_at".to_string(), chain(&["modified_at", "created_at", "now()"])),
                ("modified_at".to_string(), chain(&["updated_at", "created_at", "now()"])),
            ]),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServe {
    listen: String,
    schedule: String,
    scan_on_start: bool,
    ready_max_age: Option<String>,
    shutdown_timeout: String,
    retry_initial_backoff: String,
    retry_max_backoff: String,
}

impl Default for RawServe {
    fn default() -> Self {
        RawServe {
            listen: "0.0.0.0:9841".into(),
            schedule: "0 */5 * * * *".into(),
            scan_on_start: true,
            ready_max_age: None,
            shutdown_timeout: "10s".into(),
            retry_initial_backoff: "1s".into(),
            retry_max_backoff: "60s".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawMetrics {
    max_tenant_series: i64,
}

impl Default for RawMetrics {
    fn default() -> Self {
        RawMetrics { max_tenant_series: 2000 }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTenants {
    registry: bool,
    registry_schema: Option<String>,
    registry_table: String,
    registry_column: String,
    include: Vec<String>,
    exclude: Vec<String>,
    shared_schema: String,
    reference_schema: Option<String>,
}

impl Default for RawTenants {
    fn default() -> Self {
        RawTenants {
            registry: true,
            registry_schema: None,
            registry_table: "customers_client".into(),
            registry_column: "schema_name".into(),
            include: Vec::new(),
            exclude: Vec::new(),
            shared_schema: "public".into(),
            reference_schema: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawScan {
    concurrency: i64,
    statement_timeout: String,
    lock_timeout: String,
    connect_timeout: String,
    full_every: String,
    max_duration: Option<String>,
}

impl Default for RawScan {
    fn default() -> Self {
        RawScan {
            concurrency: 4,
            statement_timeout: "60s".into(),
            lock_timeout: "5s".into(),
            connect_timeout: "10s".into(),
            full_every: "1h".into(),
            max_duration: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawChecks {
    required_timestamps: Vec<String>,
    relationships: Vec<DeclaredRelationship>,
}

impl Default for RawChecks {
    fn default() -> Self {
        RawChecks {
            required_timestamps: vec!["created_at".into(), "updated_at".into(), "modified_at".into()],
            relationships: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawReport {
    sample_keys: i64,
}

impl Default for RawReport {
    fn default() -> Self {
        RawReport { sample_keys: 10 }
    }
}

impl RawConfig {
    fn validate(self, path: &Path, env: Env, name: String, shard: Shard) -> Result<Config, ConfigError> {
        let mut defaults = env.libpq.clone();
        if let Some(file) = ca_file(&self.tls, path)? {
            defaults.entry("sslrootcert".to_string()).or_insert_with(|| file.display().to_string());
        }
        let source = UrlSource { config_path: path, defaults: &defaults };
        let database =
            source.database("", self.database_url, self.database_url_file, env.database_url, DATABASE_URL_ENV)?;
        let heal = self.heal.validate(&source, env.heal_database_url, &database)?;
        let tenants = self.tenants.validate()?;
        let (scan, max_duration_set) = self.scan.validate()?;
        let checks = self.checks.validate()?;
        let mut serve = self.serve.validate()?;
        if max_duration_set {
            serve.scan_max_duration = scan.max_duration;
        }
        let database_checks = self.database.validate()?;
        let web = self.web.validate(path, &heal)?;
        if heal.add_missing_columns && tenants.reference_schema.is_none() {
            return Err(ConfigError::invalid(
                "heal.add_missing_columns",
                "needs tenants.reference_schema: against the most common shape, heal would add columns ahead of a migration still rolling out",
            ));
        }
        Ok(Config {
            name,
            shard,
            database,
            database_checks,
            tenants,
            scan,
            checks,
            report: ReportConfig { sample_keys: bounded("report.sample_keys", self.report.sample_keys, 0, 1000)? },
            serve,
            metrics: MetricsConfig {
                max_tenant_series: bounded("metrics.max_tenant_series", self.metrics.max_tenant_series, 0, 1_000_000)?,
            },
            heal,
            web,
        })
    }
}

/// Where connection strings are read from: files relative to the config file, with the libpq
/// defaults of the environment.
struct UrlSource<'a> {
    config_path: &'a Path,
    defaults: &'a BTreeMap<String, String>,
}

impl UrlSource<'_> {
    /// Resolves a connection from `{prefix}database_url`, `{prefix}database_url_file` or the
    /// environment variable `env_name` (which wins).
    fn database(
        &self,
        prefix: &str,
        url: Option<String>,
        url_file: Option<PathBuf>,
        env_url: Option<String>,
        env_name: &str,
    ) -> Result<DatabaseConfig, ConfigError> {
        let url_key = format!("{prefix}database_url");
        let file_key = format!("{prefix}database_url_file");
        let (key, url, file) = match (env_url, url, url_file) {
            (Some(env), _, _) => (env_name.to_string(), env, None),
            (None, Some(_), Some(_)) => {
                let message = format!("set {url_key} or {file_key}, not both");
                return Err(ConfigError::invalid(url_key, message));
            }
            (None, Some(url), None) => (url_key, url, None),
            (None, None, Some(file)) => {
                let file = self.config_path.parent().unwrap_or(Path::new(".")).join(file);
                (file_key.clone(), read_url_file(&file_key, &file)?, Some(file))
            }
            (None, None, None) => {
                let message = format!("not set; set {url_key}, {file_key} or {env_name}");
                return Err(ConfigError::invalid(url_key, message));
            }
        };
        let info = parse_conninfo(&key, &url, self.defaults)?;
        let target = describe_target(&info);
        let database = DatabaseConfig { target, info, file, key, defaults: self.defaults.clone() };
        // The certificate files must be readable now, not only at the first connection.
        database.resolve()?;
        Ok(database)
    }
}

fn read_url_file(key: &str, file: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| ConfigError::invalid(key, format!("cannot read {}: {e}", file.display())))?;
    Ok(text.trim().to_string())
}

/// The parser's messages name the parameter, never the URL itself (which holds the password).
fn parse_conninfo(key: &str, url: &str, defaults: &BTreeMap<String, String>) -> Result<ConnInfo, ConfigError> {
    conninfo::parse(url, defaults).map_err(|e| ConfigError::invalid(key, e.to_string()))
}

/// `host:port/dbname` (of the first host) for messages and logs; never includes credentials.
pub fn describe_target(info: &ConnInfo) -> String {
    let host = &info.hosts[0];
    let db = info.dbname.as_deref().or(info.user.as_deref()).unwrap_or("postgres");
    format!("{}:{}/{db}", host.host, host.port)
}

impl RawTenants {
    fn validate(self) -> Result<TenantsConfig, ConfigError> {
        let include = compile_all("tenants.include", &self.include)?;
        let exclude = compile_all("tenants.exclude", &self.exclude)?;
        non_empty("tenants.shared_schema", &self.shared_schema)?;
        let registry = if self.registry {
            non_empty("tenants.registry_table", &self.registry_table)?;
            non_empty("tenants.registry_column", &self.registry_column)?;
            Some(Registry {
                schema: self.registry_schema.unwrap_or_else(|| self.shared_schema.clone()),
                table: self.registry_table,
                column: self.registry_column,
            })
        } else {
            None
        };
        if registry.is_none() && include.is_empty() {
            return Err(ConfigError::invalid(
                "tenants",
                "no tenant discovery: set tenants.registry = true or give tenants.include patterns",
            ));
        }
        if let Some(reference) = &self.reference_schema {
            non_empty("tenants.reference_schema", reference)?;
            if *reference == self.shared_schema {
                return Err(ConfigError::invalid("tenants.reference_schema", "must differ from tenants.shared_schema"));
            }
        }
        Ok(TenantsConfig {
            registry,
            include,
            exclude,
            shared_schema: self.shared_schema,
            reference_schema: self.reference_schema,
        })
    }
}

fn compile_all(key: &str, patterns: &[String]) -> Result<Vec<Regex>, ConfigError> {
    patterns
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Regex::new(p).map_err(|e| {
                // regex's syntax errors span several lines; the last one says what is wrong.
                let text = e.to_string();
                let reason = text.lines().last().unwrap_or("invalid").trim().to_string();
                ConfigError::invalid(format!("{key}[{i}]"), format!("invalid regex {p:?}: {reason}"))
            })
        })
        .collect()
}

fn non_empty(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() {
        return Err(ConfigError::invalid(key, "must not be empty"));
    }
    Ok(())
}

/// `value` of `key` as a number within `min..=max`, or an error naming the key and the bounds.
fn bounded(key: &str, value: i64, min: usize, max: usize) -> Result<usize, ConfigError> {
    match usize::try_from(value) {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(ConfigError::invalid(key, format!("{value} is out of range: must be between {min} and {max}"))),
    }
}

/// The longest duration any setting accepts.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
/// The longest timeout: PostgreSQL's own settings stop at 2^31 - 1 ms (24.8 days), and a scan
/// statement that long is a mistake.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Parses a human duration such as `30s`, `2m` or `1h 30m`, greater than zero and at most a
/// year.
pub fn parse_duration(key: &str, value: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(value)
        .map_err(|e| ConfigError::invalid(key, format!("invalid duration {value:?}: {e}")))?;
    if d.is_zero() {
        return Err(ConfigError::invalid(key, "must be greater than zero"));
    }
    if d > MAX_DURATION {
        return Err(ConfigError::invalid(key, "must be at most a year"));
    }
    Ok(d)
}

/// A timeout sent to PostgreSQL (or bounding a connection attempt): whole milliseconds from
/// 1 ms to 24 h. Below 1 ms PostgreSQL would round it to 0, which disables the timeout.
pub fn parse_timeout(key: &str, value: &str) -> Result<Duration, ConfigError> {
    let d = parse_duration(key, value)?;
    if d < Duration::from_millis(1) {
        return Err(ConfigError::invalid(
            key,
            format!("{value:?} is below 1ms (PostgreSQL would disable the timeout)"),
        ));
    }
    if d > MAX_TIMEOUT {
        return Err(ConfigError::invalid(key, format!("{value:?} is longer than the 24h maximum")));
    }
    Ok(Duration::from_millis(d.as_millis() as u64))
}

impl RawScan {
    /// The scan settings, and whether `scan.max_duration` was set.
    fn validate(self) -> Result<(ScanConfig, bool), ConfigError> {
        let max_duration = self.max_duration.as_deref().map(|v| parse_duration("scan.max_duration", v)).transpose()?;
        let scan = ScanConfig {
            concurrency: bounded("scan.concurrency", self.concurrency, 1, 256)?,
            statement_timeout: parse_timeout("scan.statement_timeout", &self.statement_timeout)?,
            lock_timeout: parse_timeout("scan.lock_timeout", &self.lock_timeout)?,
            connect_timeout: parse_timeout("scan.connect_timeout", &self.connect_timeout)?,
            full_every: parse_duration("scan.full_every", &self.full_every)?,
            max_duration: max_duration.unwrap_or(CLI_SCAN_MAX_DURATION),
        };
        Ok((scan, max_duration.is_some()))
    }
}

impl RawHeal {
    fn validate(
        self,
        source: &UrlSource<'_>,
        env_url: Option<String>,
        scan_database: &DatabaseConfig,
    ) -> Result<HealConfig, ConfigError> {
        let database = if env_url.is_some() || self.database_url.is_some() || self.database_url_file.is_some() {
            source.database("heal.", self.database_url, self.database_url_file, env_url, HEAL_DATABASE_URL_ENV)?
        } else {
            scan_database.clone()
        };
        for (column, chain) in &self.fallbacks {
            if chain.is_empty() {
                return Err(ConfigError::invalid(
                    format!("heal.fallbacks.{column}"),
                    "must name at least one column or now()",
                ));
            }
        }
        for (i, key) in self.same_entity_keys.iter().enumerate() {
            non_empty(&format!("heal.same_entity_keys[{i}].table"), &key.table)?;
            if key.columns.is_empty() {
                return Err(ConfigError::invalid(format!("heal.same_entity_keys[{i}].columns"), "must not be empty"));
            }
        }
        for (i, allowed) in self.allow_triggers.iter().enumerate() {
            non_empty(&format!("heal.allow_triggers[{i}].table"), &allowed.table)?;
            non_empty(&format!("heal.allow_triggers[{i}].trigger"), &allowed.trigger)?;
        }
        let heal = HealConfig {
            enabled: self.enabled,
            database,
            copy_missing_parents: self.copy_missing_parents,
            backfill_null_timestamps: self.backfill_null_timestamps,
            add_missing_columns: self.add_missing_columns,
            batch_size: bounded("heal.batch_size", self.batch_size, 1, 100_000)?,
            max_rows_per_run: bounded("heal.max_rows_per_run", self.max_rows_per_run, 0, 1_000_000_000_000)? as u64,
            lock_timeout: parse_timeout("heal.lock_timeout", &self.lock_timeout)?,
            statement_timeout: parse_timeout("heal.statement_timeout", &self.statement_timeout)?,
            validate_timeout: parse_timeout("heal.validate_timeout", &self.validate_timeout)?,
            fallbacks: self.fallbacks,
            same_entity_keys: self.same_entity_keys,
            advance_sequences: self.advance_sequences,
            audit_values: self.audit_values,
            allow_triggers: self.allow_triggers,
            allow_table_rewrite: self.allow_table_rewrite,
        };
        if heal.enabled && !heal.any_repair() {
            return Err(ConfigError::invalid(
                "heal.enabled",
                "no repair is enabled: set copy_missing_parents, backfill_null_timestamps, add_missing_columns or advance_sequences",
            ));
        }
        Ok(heal)
    }
}

impl RawServe {
    fn validate(self) -> Result<ServeConfig, ConfigError> {
        let listen = self
            .listen
            .parse()
            .map_err(|e| ConfigError::invalid("serve.listen", format!("invalid address {:?}: {e}", self.listen)))?;
        let schedule = cron::Schedule::from_str(&self.schedule).map_err(|e| {
            // The parser's messages can span lines; a config error is one.
            let reason = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
            ConfigError::invalid("serve.schedule", format!("invalid cron expression {:?}: {reason}", self.schedule))
        })?;
        let interval = schedule_interval(&schedule)
            .ok_or_else(|| ConfigError::invalid("serve.schedule", format!("{:?} never fires twice", self.schedule)))?;
        let ready_max_age = match &self.ready_max_age {
            Some(v) => parse_duration("serve.ready_max_age", v)?,
            None => interval * 2,
        };
        let retry_initial_backoff = parse_duration("serve.retry_initial_backoff", &self.retry_initial_backoff)?;
        let retry_max_backoff = parse_duration("serve.retry_max_backoff", &self.retry_max_backoff)?;
        if retry_max_backoff < retry_initial_backoff {
            return Err(ConfigError::invalid(
                "serve.retry_max_backoff",
                "must not be less than serve.retry_initial_backoff",
            ));
        }
        Ok(ServeConfig {
            listen,
            schedule,
            scan_on_start: self.scan_on_start,
            ready_max_age,
            shutdown_timeout: parse_timeout("serve.shutdown_timeout", &self.shutdown_timeout)?,
            retry_initial_backoff,
            retry_max_backoff,
            scan_max_duration: interval.max(MIN_DERIVED_SCAN_MAX_DURATION),
        })
    }
}

/// The HTTP listener of `serve` (`[web]`): its security file, its bounds and `POST /scan`.
#[derive(Debug, Clone)]
pub struct WebConfig {
    /// TLS and basic authentication from `web.config_file` (or `--web.config.file`).
    pub security: Option<std::sync::Arc<crate::web_config::WebSecurity>>,
    /// Time a client has to send a request's headers, TLS handshake included; also how long a
    /// kept-alive connection may wait for its next request.
    pub header_read_timeout: Duration,
    /// Longest time a read or a write may make no progress (a stalled body, a client that does
    /// not read its response).
    pub idle_timeout: Duration,
    /// Most open connections; further clients wait in the kernel's accept queue.
    pub max_connections: usize,
    /// `/metrics` requires credentials when `basic_auth_users` are configured.
    pub metrics_auth: bool,
    /// `/report` requires credentials when `basic_auth_users` are configured.
    pub report_auth: bool,
    pub scan_requests: ScanRequestsConfig,
}

/// `POST /scan` (`[web.scan_requests]`).
#[derive(Debug, Clone)]
pub struct ScanRequestsConfig {
    /// Off by default: the endpoint answers 403.
    pub enabled: bool,
    /// Least time between two accepted requests; earlier ones get 429 with `Retry-After`.
    pub min_interval: Duration,
    /// A requested scan may heal (with `heal.enabled`); off by default, so that no HTTP request
    /// writes unless the operator allowed exactly that.
    pub heal: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawWeb {
    config_file: Option<PathBuf>,
    header_read_timeout: String,
    idle_timeout: String,
    max_connections: i64,
    metrics_auth: bool,
    report_auth: bool,
    scan_requests: RawScanRequests,
}

impl Default for RawWeb {
    fn default() -> Self {
        RawWeb {
            config_file: None,
            header_read_timeout: "10s".into(),
            idle_timeout: "60s".into(),
            max_connections: 512,
            metrics_auth: true,
            report_auth: true,
            scan_requests: RawScanRequests::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawScanRequests {
    enabled: bool,
    min_interval: String,
    heal: bool,
}

impl Default for RawScanRequests {
    fn default() -> Self {
        RawScanRequests { enabled: false, min_interval: "1m".into(), heal: false }
    }
}

impl RawWeb {
    fn validate(self, config_path: &Path, heal: &HealConfig) -> Result<WebConfig, ConfigError> {
        let requests = self.scan_requests;
        if requests.heal && !(requests.enabled && heal.enabled) {
            return Err(ConfigError::invalid(
                "web.scan_requests.heal",
                "needs web.scan_requests.enabled = true and heal.enabled = true",
            ));
        }
        let security = match self.config_file {
            Some(file) => {
                let file = config_path.parent().unwrap_or(Path::new(".")).join(file);
                Some(std::sync::Arc::new(crate::web_config::WebSecurity::load(&file)?))
            }
            None => None,
        };
        // A write over HTTP needs an authenticated caller: basic auth or a verified client
        // certificate. A request any web page can make a browser send must never start a heal.
        let authenticated = security.as_ref().is_some_and(|s| {
            !s.users.is_empty() || s.client_auth == crate::web_config::ClientAuth::RequireAndVerifyClientCert
        });
        if requests.heal && !authenticated {
            return Err(ConfigError::invalid(
                "web.scan_requests.heal",
                "needs authenticated requests: basic_auth_users or client_auth_type = RequireAndVerifyClientCert in web.config_file",
            ));
        }
        Ok(WebConfig {
            security,
            header_read_timeout: parse_duration("web.header_read_timeout", &self.header_read_timeout)?,
            idle_timeout: parse_duration("web.idle_timeout", &self.idle_timeout)?,
            max_connections: bounded("web.max_connections", self.max_connections, 1, 1_000_000)?,
            metrics_auth: self.metrics_auth,
            report_auth: self.report_auth,
            scan_requests: ScanRequestsConfig {
                enabled: requests.enabled,
                min_interval: parse_duration("web.scan_requests.min_interval", &requests.min_interval)?,
                heal: requests.heal,
            },
        })
    }
}

/// The longest time between two of the next 1,000 firings of `schedule`: its interval for a
/// regular schedule, the weekend for a weekdays-only one.
pub fn schedule_interval(schedule: &cron::Schedule) -> Option<Duration> {
    let firings: Vec<_> = schedule.upcoming(chrono::Utc).take(1000).collect();
    firings.windows(2).filter_map(|w| (w[1] - w[0]).to_std().ok()).max()
}

impl RawChecks {
    fn validate(self) -> Result<ChecksConfig, ConfigError> {
        for (i, r) in self.relationships.iter().enumerate() {
            let key = format!("checks.relationships[{i}]");
            if r.columns.is_empty() || r.columns.len() != r.parent_columns.len() {
                return Err(ConfigError::invalid(
                    key,
                    "columns and parent_columns must be non-empty and of the same length",
                ));
            }
            non_empty(&format!("{key}.table"), &r.table)?;
            non_empty(&format!("{key}.parent_table"), &r.parent_table)?;
        }
        Ok(ChecksConfig { required_timestamps: self.required_timestamps, relationships: self.relationships })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/t.toml"), Env::default())
    }

    #[test]
    fn defaults_follow_django_tenants() {
        let c = parse("database_url = 'postgres://u:secret@db:5433/app'").unwrap();
        assert_eq!(c.database.target, "db:5433/app");
        assert_eq!(
            c.tenants.registry,
            Some(Registry { schema: "public".into(), table: "customers_client".into(), column: "schema_name".into() })
        );
        assert_eq!(c.checks.required_timestamps, ["created_at", "updated_at", "modified_at"]);
        assert_eq!(c.report.sample_keys, 10);
        assert_eq!(c.scan.concurrency, 4);
        assert_eq!(c.scan.statement_timeout, Duration::from_secs(60));
        assert!(!format!("{c:?}").contains("secret"));
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = parse("database_url = 'postgres://db/app'\n[scan]\nconcurency = 3\n").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("config file /etc/t.toml, line 3: unknown field `concurency`"), "{text}");
    }

    #[test]
    fn bad_regex_and_duration_name_their_keys() {
        let err = parse("database_url = 'postgres://db/app'\n[tenants]\ninclude = ['^t(']\n").unwrap_err();
        assert!(err.to_string().starts_with("config key tenants.include[0]: invalid regex \"^t(\""), "{err}");
        let err = parse("database_url = 'postgres://db/app'\n[scan]\nstatement_timeout = '3 parsecs'\n").unwrap_err();
        assert!(err.to_string().starts_with("config key scan.statement_timeout: invalid duration"), "{err}");
    }

    #[test]
    fn env_url_wins_and_missing_url_is_named() {
        let env = Env { database_url: Some("postgres://b/y".into()), ..Env::default() };
        let c = Config::from_toml("database_url = 'postgres://a/x'", Path::new("c.toml"), env).unwrap();
        assert_eq!(c.database.target, "b:5432/y");
        assert_eq!(c.heal.database.target, "b:5432/y", "heal uses the scan connection by default");
        let err = parse("").unwrap_err();
        assert!(err.to_string().starts_with("config key database_url: not set"), "{err}");
    }

    #[test]
    fn serve_defaults_and_schedule_validation() {
        let c = parse("database_url = 'postgres://db/app'").unwrap();
        assert_eq!(c.serve.listen.to_string(), "0.0.0.0:9841");
        assert_eq!(c.serve.ready_max_age, Duration::from_secs(600));
        let weekdays =
            parse("database_url = 'postgres://db/app'\n[serve]\nschedule = '0 0 */6 * * Mon-Fri'\n").unwrap();
        assert_eq!(weekdays.serve.ready_max_age, Duration::from_secs(2 * 54 * 3600), "twice the weekend gap");
        assert_eq!(c.metrics.max_tenant_series, 2000);
        let err = parse("database_url = 'postgres://db/app'\n[serve]\nschedule = '*/5 * * *'\n").unwrap_err();
        assert!(err.to_string().starts_with("config key serve.schedule: invalid cron expression"), "{err}");
    }

    #[test]
    fn heal_is_off_by_default_and_has_its_own_connection() {
        let c = parse("database_url = 'postgres://replica/app'").unwrap();
        assert!(!c.heal.enabled && !c.heal.any_repair());
        assert_eq!(c.heal.fallbacks["updated_at"], ["modified_at", "created_at", "now()"]);
        assert_eq!(c.heal.validate_timeout, Duration::from_secs(300), "a VALIDATE holds SHARE UPDATE EXCLUSIVE");
        assert_eq!(
            (c.heal.batch_size, c.heal.max_rows_per_run, c.heal.lock_timeout),
            (500, 10_000, Duration::from_secs(2))
        );
        let c = parse("database_url = 'postgres://replica/app'\n[heal]\ndatabase_url = 'postgres://primary/app'\n")
            .unwrap();
        assert_eq!(
            (c.database.target.as_str(), c.heal.database.target.as_str()),
            ("replica:5432/app", "primary:5432/app")
        );
        let err = parse("database_url = 'postgres://db/app'\n[heal]\nenabled = true\n").unwrap_err();
        assert!(err.to_string().starts_with("config key heal.enabled: no repair is enabled"), "{err}");
        let err = parse("database_url = 'postgres://db/app'\n[heal]\nadd_missing_columns = true\n").unwrap_err();
        assert!(
            err.to_string().starts_with("config key heal.add_missing_columns: needs tenants.reference_schema"),
            "{err}"
        );
    }

    #[test]
    fn numbers_and_durations_are_bounded_with_the_key_named() {
        let cases = [
            (
                "[scan]\nconcurrency = 4611686018427387904",
                "config key scan.concurrency: 4611686018427387904 is out of range: must be between 1 and 256",
            ),
            ("[scan]\nconcurrency = -1", "config key scan.concurrency: -1 is out of range: must be between 1 and 256"),
            (
                "[scan]\nlock_timeout = '500us'",
                "config key scan.lock_timeout: \"500us\" is below 1ms (PostgreSQL would disable the timeout)",
            ),
            (
                "[scan]\nstatement_timeout = '30d'",
                "config key scan.statement_timeout: \"30d\" is longer than the 24h maximum",
            ),
            ("[heal]\nbatch_size = 0", "config key heal.batch_size: 0 is out of range: must be between 1 and 100000"),
            (
                "[report]\nsample_keys = 9223372036854775807",
                "config key report.sample_keys: 9223372036854775807 is out of range: must be between 0 and 1000",
            ),
            ("[serve]\nready_max_age = '500years'", "config key serve.ready_max_age: must be at most a year"),
        ];
        for (toml, expected) in cases {
            let err = parse(&format!("database_url = 'postgres://db/app'\n{toml}\n")).unwrap_err();
            assert_eq!(err.to_string(), expected);
        }
        let c = parse("database_url = 'postgres://db/app'\n[scan]\nlock_timeout = '1500us'\n").unwrap();
        assert_eq!(c.scan.lock_timeout, Duration::from_millis(1));
        let err = parse("database_url = 'postgres://db/app'\n[serve]\nschedule = '0 0 * * * * * *'\n").unwrap_err();
        assert!(!err.to_string().contains('\n'), "{err}");
        assert!(err.to_string().starts_with("config key serve.schedule: invalid cron expression"), "{err}");
    }

    #[test]
    fn allow_triggers_names_a_table_and_a_trigger() {
        let c = parse(
            "database_url = 'postgres://db/app'\n[heal]\nallow_triggers = [{ table = 'note', trigger = 'touch' }]\n",
        )
        .unwrap();
        assert_eq!(c.heal.allow_triggers, [AllowedTrigger { table: "note".into(), trigger: "touch".into() }]);
        let err =
            parse("database_url = 'postgres://db/app'\n[heal]\nallow_triggers = [{ table = 'note', trigger = '' }]\n")
                .unwrap_err();
        assert_eq!(err.to_string(), "config key heal.allow_triggers[0].trigger: must not be empty");
    }

    #[test]
    fn same_entity_keys_and_audit_values_are_validated() {
        let c = parse("database_url = 'postgres://db/app'\n[heal]\nsame_entity_keys = [{ table = 'category', columns = ['id'] }]\naudit_values = 'keys'\n").unwrap();
        assert_eq!(c.heal.same_entity_keys, [SameEntityKey { table: "category".into(), columns: vec!["id".into()] }]);
        assert_eq!(c.heal.audit_values, AuditValues::Keys);
        let err = parse(
            "database_url = 'postgres://db/app'\n[heal]\nsame_entity_keys = [{ table = 'category', columns = [] }]\n",
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "config key heal.same_entity_keys[0].columns: must not be empty");
        let err = parse("database_url = 'postgres://db/app'\n[heal]\naudit_values = 'rows'\n").unwrap_err();
        assert!(err.to_string().starts_with("config file /etc/t.toml, line 3: unknown variant `rows`"), "{err}");
    }

    #[test]
    fn web_defaults_close_the_write_paths() {
        let c = parse("database_url = 'postgres://db/app'").unwrap();
        assert!(c.web.security.is_none() && !c.web.scan_requests.enabled && !c.web.scan_requests.heal);
        assert_eq!(
            (c.web.header_read_timeout, c.web.idle_timeout, c.web.max_connections, c.web.scan_requests.min_interval),
            (Duration::from_secs(10), Duration::from_secs(60), 512, Duration::from_secs(60))
        );
        for (extra, expected) in [
            (
                "[web.scan_requests]\nheal = true\n",
                "config key web.scan_requests.heal: needs web.scan_requests.enabled = true and heal.enabled = true",
            ),
            (
                "[heal]\nenabled = true\nbackfill_null_timestamps = true\n[web.scan_requests]\nenabled = true\nheal = true\n",
                "config key web.scan_requests.heal: needs authenticated requests: basic_auth_users or client_auth_type = RequireAndVerifyClientCert in web.config_file",
            ),
            (
                "[web]\nmax_connections = 0\n",
                "config key web.max_connections: 0 is out of range: must be between 1 and 1000000",
            ),
            (
                "[web]\nmax_connections = -5\n",
                "config key web.max_connections: -5 is out of range: must be between 1 and 1000000",
            ),
            ("[web]\nheader_read_timeout = '0s'\n", "config key web.header_read_timeout: must be greater than zero"),
            ("[web]\nidle_timeout = '5000 years'\n", "config key web.idle_timeout: must be at most a year"),
            (
                "[web]\nconfig_file = 'missing.yml'\n",
                "web config file /etc/missing.yml: (file): cannot read: No such file or directory (os error 2)",
            ),
        ] {
            let err = parse(&format!("database_url = 'postgres://db/app'\n{extra}")).unwrap_err();
            assert_eq!(err.to_string(), expected);
        }
    }

    #[test]
    fn scan_deadline_and_pings() {
        let c = parse("database_url = 'postgres://db/app'").unwrap();
        assert_eq!(c.scan.max_duration, CLI_SCAN_MAX_DURATION);
        assert_eq!(c.serve.scan_max_duration, Duration::from_secs(300), "the schedule's interval");
        assert_eq!(
            (c.database_checks.ping_interval, c.database_checks.ping_timeout),
            (Duration::from_secs(15), Duration::from_secs(5))
        );
        let c = parse("database_url = 'postgres://db/app'\n[serve]\nschedule = '* * * * * *'\n").unwrap();
        assert_eq!(c.serve.scan_max_duration, Duration::from_secs(60), "at least a minute");
        let c = parse("database_url = 'postgres://db/app'\n[scan]\nmax_duration = '10m'\n").unwrap();
        assert_eq!(
            (c.scan.max_duration, c.serve.scan_max_duration),
            (Duration::from_secs(600), Duration::from_secs(600))
        );
        let err = parse("database_url = 'postgres://db/app'\n[database]\nping_timeout = '0s'\n").unwrap_err();
        assert_eq!(err.to_string(), "config key database.ping_timeout: must be greater than zero");
    }

    #[test]
    fn the_url_file_is_read_again_for_each_connection() {
        let dir = std::env::temp_dir().join(format!("tenant-audit-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("url"), "postgres://u:one@db/app\n").unwrap();
        let c = Config::from_toml("database_url_file = 'url'", &dir.join("c.toml"), Env::default()).unwrap();
        std::fs::write(dir.join("url"), "postgres://u:two@db2/app").unwrap();
        let now = c.database.resolve().unwrap().info;
        assert_eq!((now.password.as_deref(), now.hosts[0].host.as_str()), (Some("two"), "db2"));
        std::fs::write(dir.join("url"), "postgres://u:three@db/app?sslmode=sometimes").unwrap();
        let err = c.database.resolve().err().unwrap().to_string();
        assert!(
            err.starts_with("config key database_url_file: invalid connection string: parameter sslmode:"),
            "{err}"
        );
        assert!(!err.contains("three"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn invalid_connection_strings_name_key_and_parameter() {
        let err = parse("database_url = 'postgres://u:secret@db/app?sslmode=verify-fulll'").unwrap_err().to_string();
        assert!(
            err.starts_with("config key database_url: invalid connection string: parameter sslmode: invalid value"),
            "{err}"
        );
        assert!(!err.contains("secret"));
        let env = Env { libpq: BTreeMap::from([("sslmode".to_string(), "require".to_string())]), ..Env::default() };
        let c = Config::from_toml("database_url = 'postgres://db/app'", Path::new("c.toml"), env).unwrap();
        assert_eq!(c.database.info().sslmode, conninfo::SslMode::Require, "PGSSLMODE where the URL is silent");
    }

    #[test]
    fn discovery_must_be_configured() {
        let err = parse("database_url = 'postgres://db/app'\n[tenants]\nregistry = false\n").unwrap_err();
        assert!(err.to_string().starts_with("config key tenants: no tenant discovery"), "{err}");
    }
}
