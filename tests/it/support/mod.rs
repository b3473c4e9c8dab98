//! Test support: the throwaway PostgreSQL (`pg`), fixture databases, configs, and the binary.

pub mod freeze;
pub mod pg;
pub mod pgbouncer;
pub mod web_auth;

use std::path::Path;
use std::process::{Command, Output};

use tenant_audit::config::Config;
use tenant_audit::report::{Detail, Finding, Report};

/// The SQL every fixture starts from (shared tables and `pg_temp.create_tenant`).
pub const BASE_SQL: &str = include_str!("../../fixtures/base.sql");
/// The demo database: every failure mode of the post-mortem.
pub const DEMO_SQL: &str = include_str!("../../fixtures/demo.sql");

/// A fresh database named `name` holding `BASE_SQL` followed by `sql`, run in one session.
pub async fn fixture_db(name: &str, sql: &str) -> String {
    let url = pg::fresh_db(name).await;
    let client = pg::connect(&url).await;
    client.batch_execute(&format!("{BASE_SQL}\n{sql}")).await.unwrap_or_else(|e| panic!("fixture {name}: {e:?}"));
    url
}

/// A validated config for `url` plus extra TOML (sections after the URL line).
pub fn config(url: &str, extra: &str) -> Config {
    let text = format!("database_url = {url:?}\n{extra}");
    Config::from_toml(&text, Path::new("test.toml"), tenant_audit::config::Env::default())
        .unwrap_or_else(|e| panic!("config: {e}\n{text}"))
}

/// Runs one scan in-process.
pub async fn scan(config: &Config) -> Report {
    let pool = tenant_audit::db::scan_pool(&config.database, &config.scan);
    let never = tokio_util::sync::CancellationToken::new();
    tenant_audit::scan::run(config, &pool, &never, None).await.unwrap_or_else(|e| panic!("scan failed: {e}")).report
}

/// One line per finding: `check schema.table(cols) count detail [samples]`, compact enough to
/// assert a whole report at once.
pub fn lines(findings: &[Finding]) -> Vec<String> {
    findings.iter().map(line).collect()
}

fn line(f: &Finding) -> String {
    let place = match &f.table {
        Some(t) => format!("{}.{}({})", f.schema, t, f.columns.join(",")),
        None => f.schema.clone(),
    };
    let detail = match &f.detail {
        Detail::CrossSchemaFk { target_schema, target_table, reason, .. } => {
            format!("-> {target_schema}.{target_table} {reason:?}")
        }
        Detail::OrphanRows { parent_schema, parent_table, parent_location, relationship, .. } => {
            format!("-> {parent_schema}.{parent_table} {parent_location:?} {relationship:?}")
        }
        Detail::NullTimestamps { data_type } => data_type.clone(),
        Detail::SequenceBehind { sequence, next_value, column_max } => {
            format!("{sequence} next {next_value} max {column_max}")
        }
        Detail::SchemaDrift { difference, expected, actual } => format!("{difference:?} {expected:?} {actual:?}"),
        Detail::None => String::new(),
    };
    format!("{} {place} {} {detail} {:?}", f.check.name(), f.count, f.sample_keys).trim_end().to_string()
}

/// Runs the `tenant-audit` binary with `args` and extra environment variables.
pub fn cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tenant-audit"));
    cmd.args(args).env_remove("TENANT_AUDIT_DATABASE_URL").env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run tenant-audit")
}

/// `tenant-audit heal --config <name> ARGS` with the config file `text`: (exit code, stdout with
/// the run id cut from its total line, stderr).
pub fn heal_cli(name: &str, text: &str, args: &[&str]) -> (Option<i32>, Vec<String>, String) {
    let path = config_file(name, text);
    let mut all = vec!["heal", "--config", path.to_str().unwrap()];
    all.extend(args);
    let out = cli(&all, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| match l.strip_prefix("heal run ") {
            Some(rest) => format!("heal run: {}", rest.split_once(": ").map(|(_, r)| r).unwrap_or(rest)),
            None => l.to_string(),
        })
        .collect();
    (out.status.code(), stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The first column of every row `sql` returns, as text.
/// Two tenants with a `doc` table; tenant_b's ids (1..10) draw from tenant_a's sequence, so
/// the reference's `nextval('doc_id_seq')` points tenant_b at its own sequence, still at 1.
pub const BORROWED_SEQUENCE_SQL: &str = "SELECT pg_temp.create_tenant(t) FROM unnest(ARRAY['tenant_a', 'tenant_b']) t;
        CREATE TABLE tenant_a.doc (id serial PRIMARY KEY, title text);
        CREATE TABLE tenant_b.doc (id serial PRIMARY KEY, title text);
        ALTER TABLE tenant_b.doc ALTER COLUMN id SET DEFAULT nextval('tenant_a.doc_id_seq');
        INSERT INTO tenant_b.doc (title) SELECT 'doc ' || g FROM generate_series(1, 10) g;";

/// What heal printed on stdout, with the run id (which changes every run) cut from its total line.
pub fn heal_summary(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| match l.strip_prefix("heal run ") {
            Some(rest) => format!("heal run: {}", rest.split_once(": ").map(|(_, r)| r).unwrap_or(rest)),
            None => l.to_string(),
        })
        .collect()
}

pub async fn rows(url: &str, sql: &str) -> Vec<String> {
    let client = pg::connect(url).await;
    client.query(sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

/// `column type [NOT NULL] [DEFAULT expr]` of every column of `schema.table`, as PostgreSQL
/// prints them with the default search path.
pub async fn column_definitions(url: &str, schema: &str, table: &str) -> Vec<String> {
    let sql = format!(
        "SELECT format('%s %s%s%s', a.attname, format_type(a.atttypid, a.atttypmod),
                CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END,
                coalesce(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), ''))
         FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE a.attrelid = '{schema}.{table}'::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"
    );
    rows(url, &sql).await
}

/// Writes `text` to a config file in a fresh temp dir and returns its path.
pub fn config_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tenant-audit-it-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A daemon running in-process on `127.0.0.1:0`, with its own shutdown trigger.
pub struct RunningDaemon {
    pub base: String,
    shutdown: tokio_util::sync::CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), tenant_audit::daemon::DaemonError>>,
    http: reqwest::Client,
}

/// Starts `tenant_audit::daemon::run` for `config` (one target, or a whole `Fleet`).
pub async fn start_daemon(config: impl Into<tenant_audit::config::Fleet>) -> RunningDaemon {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(tenant_audit::daemon::run(config.into(), listener, shutdown.clone()));
    RunningDaemon { base, shutdown, handle, http: reqwest::Client::new() }
}

impl RunningDaemon {
    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = self.http.get(format!("{}{path}", self.base)).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    pub async fn post(&self, path: &str) -> (u16, String) {
        let r = self.http.post(format!("{}{path}", self.base)).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// The sample lines of `/metrics` whose metric name is `name` (exactly), sorted.
    pub async fn samples(&self, name: &str) -> Vec<String> {
        let (status, text) = self.get("/metrics").await;
        assert_eq!(status, 200);
        metric_lines(&text, name)
    }

    /// Polls `/metrics` until it has the sample line `line` (30 s at most).
    pub async fn wait_for(&self, line: &str) {
        let name = line.split(['{', ' ']).next().unwrap();
        let found = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                if self.samples(name).await.iter().any(|l| l == line) {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
        })
        .await;
        if found.is_err() {
            panic!("{line} never appeared; /metrics has {:?}", self.samples(name).await);
        }
    }

    /// The value of the sample `series` (name and labels, as on `/metrics`), if present.
    pub async fn value(&self, series: &str) -> Option<f64> {
        let name = series.split(['{', ' ']).next().unwrap();
        let lines = self.samples(name).await;
        lines.iter().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// Polls `/metrics` until the sample `series` is present and above `floor` (60 s at most);
    /// returns its value.
    pub async fn wait_above(&self, series: &str, floor: f64) -> f64 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            match self.value(series).await {
                Some(v) if v > floor => return v,
                other => assert!(std::time::Instant::now() < deadline, "{series} stayed at {other:?}"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }

    /// Requests shutdown and waits for the daemon, which must end without an error.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap().expect("the daemon ended with an error");
    }
}

/// Sample lines of metric `name` in a text exposition, sorted.
pub fn metric_lines(text: &str, name: &str) -> Vec<String> {
    let mut out: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && l.split(['{', ' ']).next() == Some(name))
        .map(str::to_string)
        .collect();
    out.sort();
    out
}

/// A fingerprint of every user table's rows and of the columns of every schema, to show that
/// something wrote nothing.
pub async fn checksum(url: &str) -> std::collections::BTreeMap<String, String> {
    let client = pg::connect(url).await;
    let tables = client
        .query(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables
             WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let mut out = std::collections::BTreeMap::new();
    for row in tables {
        let table: String = row.get(0);
        let sql = format!("SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {table} t");
        out.insert(table, client.query_one(&sql, &[]).await.unwrap().get(0));
    }
    let columns = "SELECT md5(string_agg(format('%s.%s.%s %s %s %s', table_schema, table_name, column_name,
                     data_type, is_nullable, column_default), '|' ORDER BY table_schema, table_name, column_name))
                   FROM information_schema.columns WHERE table_schema NOT IN ('pg_catalog', 'information_schema')";
    out.insert("(columns)".into(), client.query_one(columns, &[]).await.unwrap().get(0));
    out
}

/// Tenants `tenant_a` and `tenant_c`, plus `tenant_b` whose only table, `audit_trail`, is read by
/// a single probe and has no column defaults: a test that locks it (see [`lock_audit_trail`])
/// blocks a scan in its data phase, holding no other lock of `tenant_b` (DROP SCHEMA would
/// otherwise deadlock with the scan) and without blocking the catalog query (which reads
/// column defaults with `pg_get_expr`, which locks the table).
pub const LOCKABLE_SQL: &str = "SELECT pg_temp.create_tenant('tenant_a');
    SELECT pg_temp.create_tenant('tenant_c');
    CREATE SCHEMA tenant_b;
    CREATE TABLE tenant_b.audit_trail (id int PRIMARY KEY, created_at timestamptz);
    INSERT INTO public.customers_client (schema_name, name) VALUES ('tenant_b', 'b');";

/// A session holding `ACCESS EXCLUSIVE` on `tenant_b.audit_trail` of [`LOCKABLE_SQL`] until it
/// commits.
pub async fn lock_audit_trail(url: &str) -> tokio_postgres::Client {
    let locker = pg::connect(url).await;
    locker.batch_execute("BEGIN; LOCK TABLE tenant_b.audit_trail IN ACCESS EXCLUSIVE MODE").await.unwrap();
    locker
}

/// Waits (30 s at most) until a tenant-audit session waits on a lock.
pub async fn wait_until_scan_blocked(url: &str) {
    let watcher = pg::connect(url).await;
    let waiting =
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tenant-audit' AND wait_event_type = 'Lock'
           AND datname = current_database()";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while watcher.query_one(waiting, &[]).await.unwrap().get::<_, i64>(0) == 0 {
        assert!(std::time::Instant::now() < deadline, "the scan never blocked on the lock");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// `n` rows of `tenant_a` pointing at shared parents its own table lacks: `n` copies to make.
pub fn many_orphans(n: u32) -> String {
    format!(
        "SELECT pg_temp.create_tenant('tenant_a');
        INSERT INTO public.business_business (id, name)
          SELECT ('c0000000-0000-0000-0000-' || lpad(g::text, 12, '0'))::uuid, 'shared ' || g FROM generate_series(1, {n}) g;
        SET session_replication_role = replica;
        INSERT INTO tenant_a.users_userprofile (user_id, business_id, created_at, modified_at)
          SELECT 1, ('c0000000-0000-0000-0000-' || lpad(g::text, 12, '0'))::uuid, now(), now() FROM generate_series(1, {n}) g;
        RESET session_replication_role;"
    )
}
