//! Throwaway PostgreSQL 15 for integration tests: `Cluster`s, the per-process `shared()` server, `fresh_db`, `connect`.

use std::fs::{self, Permissions};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// `pg_stat_statements.max` is raised so that the tests counting statements never see entries
/// evicted by the thousands of distinct probe statements of a large fixture.
const SETTINGS: &str = "-c fsync=off -c full_page_writes=off -c synchronous_commit=off \
    -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.max=20000 -c max_locks_per_transaction=1024 -c max_connections=200";

/// A private cluster in a temp dir (`DIR/data`, log `DIR/pg.log`, socket in `DIR`).
pub struct Cluster {
    pub host: String,
    pub port: u16,
    /// `None` once dropped; the reaper also removes it when the test process exits.
    dir: Option<PathBuf>,
    /// Server settings besides the common ones (`-c name=value ...`).
    extra: String,
}

impl Cluster {
    /// initdb + start on a free port; panics (with the log tail) on failure.
    pub fn start() -> Cluster {
        Cluster::start_with("")
    }

    /// Like `start`, with extra server settings (`-c ssl=on ...`).
    pub fn start_with(extra: &str) -> Cluster {
        let (mut cluster, dir) = Cluster::empty();
        cluster.extra = extra.to_string();
        run(pg("initdb").arg("-D").arg(dir.join("data")).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ]));
        cluster.pg_ctl_start();
        spawn_reaper(&dir);
        cluster
    }

    /// A hot standby of this cluster (pg_basebackup -R), started on its own port.
    pub fn standby(&self) -> Cluster {
        let (cluster, dir) = Cluster::empty();
        run(pg("pg_basebackup").arg("-D").arg(dir.join("data")).args([
            "-h",
            &self.host,
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-R",
            "-X",
            "stream",
            "--checkpoint=fast",
            "--no-sync",
        ]));
        cluster.pg_ctl_start();
        spawn_reaper(&dir);
        cluster
    }

    /// A free port and a fresh directory owned by the cluster's user.
    fn empty() -> (Cluster, PathBuf) {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("find a free port").port();
        let out = Command::new("mktemp").args(["-d", "-t", "tenant-audit-pg.XXXXXX"]).output().expect("run mktemp");
        assert!(out.status.success(), "mktemp -d failed");
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        // From here on, a panic drops `cluster`, which cleans up.
        let cluster = Cluster { host: "127.0.0.1".into(), port, dir: Some(dir.clone()), extra: String::new() };
        if running_as_root() {
            run(Command::new("chown").arg("postgres:").arg(&dir));
        }
        fs::set_permissions(&dir, Permissions::from_mode(0o700)).expect("chmod 700");
        (cluster, dir)
    }

    /// Fast shutdown; the data dir is kept for `restart`.
    pub fn stop(&self) {
        run(pg("pg_ctl").arg("-D").arg(self.dir().join("data")).args(["-m", "fast", "-w", "stop"]));
    }

    /// Immediate shutdown, as in a crash: every session dies at once, so none can finish a
    /// statement on its way out. The data dir is kept for `restart` (which recovers).
    pub fn crash(&self) {
        run(pg("pg_ctl").arg("-D").arg(self.dir().join("data")).args(["-m", "immediate", "-w", "stop"]));
    }

    /// Starts the stopped cluster again on the same port and data dir.
    pub fn restart(&self) {
        self.pg_ctl_start();
    }

    /// The postmaster's process id (first line of `postmaster.pid`).
    pub fn postmaster_pid(&self) -> u32 {
        let text = fs::read_to_string(self.dir().join("data/postmaster.pid")).expect("read postmaster.pid");
        text.lines().next().and_then(|l| l.trim().parse().ok()).expect("postmaster.pid starts with the pid")
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@{}:{}/{db}", self.host, self.port)
    }

    /// The server's log file.
    pub fn log(&self) -> PathBuf {
        self.dir().join("pg.log")
    }

    fn dir(&self) -> &Path {
        self.dir.as_deref().expect("cluster already dropped")
    }

    fn pg_ctl_start(&self) {
        let dir = self.dir();
        let log = dir.join("pg.log");
        let opts = format!("-h {} -p {} -k {} {SETTINGS} {}", self.host, self.port, dir.display(), self.extra);
        let out = pg("pg_ctl")
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-w", "-t", "30", "-l"])
            .arg(&log)
            .args(["-o", &opts, "start"])
            .output()
            .expect("run pg_ctl");
        if !out.status.success() {
            let log = fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!("PostgreSQL failed to start on port {}:\n{}", self.port, tail.join("\n"));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = pg("pg_ctl").arg("-D").arg(dir.join("data")).args(["-m", "immediate", "stop"]).output();
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

/// The server all tests of this process share.
pub struct Server {
    /// `user[:password]`
    userinfo: String,
    host: String,
    port: u16,
    /// Owned by the static, hence never dropped: the reaper stops it after the process exits.
    _cluster: Option<Cluster>,
}

impl Server {
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{}@{}:{}/{db}", self.userinfo, self.host, self.port)
    }
}

/// `$DATABASE_URL`'s server if set, else a `Cluster` started on first use.
pub fn shared() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| match std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) {
        Some(url) => {
            // Minimal parse of postgres://user[:pass]@host[:port][/db]
            let rest = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
            let (userinfo, rest) = rest.split_once('@').expect("DATABASE_URL must contain user@host");
            let hostport = rest.split(['/', '?']).next().unwrap_or_default();
            let (host, port) = match hostport.rsplit_once(':') {
                Some((host, port)) => (host, port.parse().expect("DATABASE_URL port")),
                None => (hostport, 5432),
            };
            Server { userinfo: userinfo.into(), host: host.into(), port, _cluster: None }
        }
        None => {
            let cluster = Cluster::start();
            Server {
                userinfo: "postgres".into(),
                host: cluster.host.clone(),
                port: cluster.port,
                _cluster: Some(cluster),
            }
        }
    })
}

/// (Re)creates database `name` on the shared server and returns its URL.
pub async fn fresh_db(name: &str) -> String {
    let server = shared();
    let admin = connect(&server.url("postgres")).await;
    let ident = format!("\"{}\"", name.replace('"', "\"\""));
    // Separate statements: a multi-statement batch would be an implicit transaction.
    for sql in [format!("DROP DATABASE IF EXISTS {ident} WITH (FORCE)"), format!("CREATE DATABASE {ident}")] {
        admin.batch_execute(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    server.url(name)
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("postgres connection error: {e}");
        }
    });
    client
}

fn running_as_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        let out = Command::new("id").arg("-u").output().expect("run `id -u`");
        String::from_utf8_lossy(&out.stdout).trim() == "0"
    })
}

/// A PostgreSQL binary, run as `postgres` when we are root (initdb and postgres refuse root).
fn pg(bin: &str) -> Command {
    let path = format!("{PG_BIN}/{bin}");
    if running_as_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--", &path]);
        cmd
    } else {
        Command::new(path)
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Statics are never dropped, so a detached shell stops the cluster and removes `dir`
/// once this process has exited (own process group: survives Ctrl-C of the test run).
#[allow(clippy::zombie_processes)] // Detached on purpose: it must outlive this process.
fn spawn_reaper(dir: &Path) {
    let runas = if running_as_root() { "runuser -u postgres -- " } else { "" };
    let script = format!(
        r#"while kill -0 "$1" 2>/dev/null; do sleep 0.5; done; {runas}{PG_BIN}/pg_ctl -D "$2/data" -m immediate stop; rm -rf "$2""#
    );
    Command::new("sh")
        .args(["-c", &script, "reaper", &std::process::id().to_string()])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn reaper");
}
