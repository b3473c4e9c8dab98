//! A PgBouncer (Debian's `pgbouncer`) in front of a test cluster, started by the test with an
//! ini file of its own, in transaction or session pool mode.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PGBOUNCER: &str = "/usr/sbin/pgbouncer";

/// A running PgBouncer; stopped (by its pid) and its directory removed on drop.
pub struct PgBouncer {
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

impl PgBouncer {
    /// PgBouncer on a free port in `mode` (`transaction` or `session`) for every database of the
    /// cluster on `127.0.0.1:upstream`, with `pool_size` server connections per database (few in
    /// transaction mode, so that clients share them and any session state would leak from one
    /// transaction to the next).
    pub fn start(upstream: u16, mode: &str, pool_size: usize) -> PgBouncer {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("find a free port").port();
        let out = Command::new("mktemp").args(["-d", "-t", "tenant-audit-pgbouncer.XXXXXX"]).output().unwrap();
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n* = host=127.0.0.1 port={upstream}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
                 listen_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {dir}/users.txt\n\
                 pool_mode = {mode}\ndefault_pool_size = {pool_size}\nmax_client_conn = 500\nlogfile = {dir}/pgbouncer.log\n",
                dir = dir.display()
            ),
        )
        .unwrap();
        let root = String::from_utf8_lossy(&Command::new("id").arg("-u").output().unwrap().stdout).trim() == "0";
        let mut cmd = if root {
            assert!(Command::new("chown").args(["-R", "postgres:"]).arg(&dir).status().unwrap().success());
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--", PGBOUNCER]);
            cmd
        } else {
            Command::new(PGBOUNCER)
        };
        let child = cmd.arg(dir.join("pgbouncer.ini")).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let bouncer = PgBouncer { port, dir, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "pgbouncer did not listen:\n{}", bouncer.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        bouncer
    }

    /// A connection string for `db` through this PgBouncer (which has no TLS).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // runuser passes the signal on to pgbouncer.
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
