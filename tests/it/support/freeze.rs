//! Servers that stop answering: a cluster frozen with SIGSTOP ([`freeze`]) and a TCP proxy that
//! can turn into a peer that accepts and never answers ([`Proxy`]).

use std::process::Command;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::pg::Cluster;

/// Every process of a cluster, stopped with SIGSTOP until [`Frozen::thaw`] (or drop) sends
/// SIGCONT. Use a dedicated cluster: a frozen shared one would hang every other test.
pub struct Frozen {
    pids: Vec<u32>,
}

/// Stops the postmaster first (so that it forks no new backend), then each of its children.
pub fn freeze(cluster: &Cluster) -> Frozen {
    let postmaster = cluster.postmaster_pid();
    signal("STOP", postmaster);
    let out = Command::new("ps").args(["-o", "pid=", "--ppid", &postmaster.to_string()]).output().expect("run ps");
    let children: Vec<u32> =
        String::from_utf8_lossy(&out.stdout).split_whitespace().map(|p| p.parse().expect("a pid")).collect();
    for &child in &children {
        signal("STOP", child);
    }
    let mut pids = children;
    pids.push(postmaster);
    Frozen { pids }
}

impl Frozen {
    pub fn thaw(mut self) {
        self.resume();
    }

    fn resume(&mut self) {
        for pid in self.pids.drain(..) {
            signal("CONT", pid);
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.resume();
    }
}

fn signal(name: &str, pid: u32) {
    // A child may have exited meanwhile; that is no failure.
    let _ = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status();
}

/// A TCP proxy to a cluster on `127.0.0.1:port`. Once [`Proxy::silence`]d it still accepts
/// connections but answers nothing, on new and existing connections alike (as a dead NAT entry
/// or a frozen host would), until [`Proxy::resume`].
pub struct Proxy {
    pub port: u16,
    silent: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// A proxy to `upstream`; `silent` from the start if asked (a peer that never answers).
    pub async fn start(upstream: u16, silent: bool) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = watch::channel(silent);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    // Not even the upstream connection is made while silent.
                    if rx.wait_for(|silent| !*silent).await.is_err() {
                        return;
                    }
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else { return };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, rx.clone()), pump(sr, cw, rx));
                });
            }
        });
        Proxy { port, silent: tx, task }
    }

    pub fn silence(&self) {
        self.silent.send_replace(true);
    }

    pub fn resume(&self) {
        self.silent.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to`, holding every byte while the proxy is silent.
async fn pump(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    mut silent: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if silent.wait_for(|s| !*s).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if silent.wait_for(|s| !*s).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
