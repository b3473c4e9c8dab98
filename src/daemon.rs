//! `tenant-audit serve`: one scheduler per target and the HTTP endpoints, run until the shutdown
//! token is cancelled.
//!
//! Invariants: every target has its own scheduler (its pools, schedule, incremental state,
//! heal and metrics) on its own tasks, so one target down, slow or frozen never delays or fails
//! another's scans. Once shutdown is requested the process stops accepting connections, cancels
//! running queries on the server, and returns within `serve.shutdown_timeout`. The listener
//! runs on a thread and runtime of its own, so a scan keeping the main runtime's workers busy
//! never makes a scrape wait for one (docs/performance.md, "The listener").

use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Fleet, WebConfig};
use crate::exposition::Exposition;
use crate::http::{self, Endpoints};
use crate::metrics::Metrics;
use crate::schedule::{self, Scheduler};

/// Serves on `listener` until `shutdown` is cancelled. The caller binds the listener (tests use
/// port 0) and owns the shutdown trigger (signals in the binary).
pub async fn run(fleet: impl Into<Fleet>, listener: TcpListener, shutdown: CancellationToken) {
    let fleet = fleet.into();
    let Some(first) = fleet.targets.first() else { return };
    // `[serve]` (but the schedule) and `[web]` are the process's: the same in every target.
    let (web, shutdown_timeout) = (first.web.clone(), first.serve.shutdown_timeout);
    let mut schedulers = Vec::with_capacity(fleet.targets.len());
    let mut metrics = Vec::with_capacity(fleet.targets.len());
    for mut config in fleet.targets {
        // The daemon's scan deadline defaults to the schedule's interval, not the CLI's hour.
        config.scan.max_duration = config.serve.scan_max_duration;
        let target_metrics = Arc::new(Metrics::new(&config.name));
        schedulers.push(Scheduler::new(Arc::new(config), Arc::clone(&target_metrics), shutdown.clone()));
        metrics.push(target_metrics);
    }
    let exposition = Arc::new(Exposition::new(fleet.shard, metrics));
    let endpoints = Endpoints { schedulers: schedulers.clone(), metrics: exposition };
    let http = spawn_listener(listener, endpoints, web, shutdown.clone());
    let loops: Vec<_> = schedulers.iter().map(|s| tokio::spawn(Arc::clone(s).run())).collect();

    shutdown.cancelled().await;
    let deadline = Instant::now() + shutdown_timeout;
    tracing::info!(timeout_seconds = shutdown_timeout.as_secs_f64(), "shutting down");
    let finished = tokio::time::timeout(schedule::remaining(deadline), async {
        for schedule in loops {
            let _ = schedule.await;
        }
        for scheduler in &schedulers {
            scheduler.wait_idle().await;
        }
        if let Some(http) = http {
            let _ = http.await;
        }
    })
    .await;
    if finished.is_err() {
        tracing::warn!("shutdown timeout reached; exiting with work still running");
    }
}

/// Runs [`http::serve`] on a thread of its own with a single-threaded runtime; the receiver
/// completes when it returned. `None` (and shutdown requested) when the thread or its runtime
/// cannot be started.
fn spawn_listener(
    listener: TcpListener,
    endpoints: Endpoints,
    web: WebConfig,
    shutdown: CancellationToken,
) -> Option<tokio::sync::oneshot::Receiver<()>> {
    let fail = |what: &str, e: std::io::Error| {
        tracing::error!(error = %e, "cannot start the listener's {what}; shutting down");
        shutdown.cancel();
        None
    };
    let listener = match listener.into_std() {
        Ok(listener) => listener,
        Err(e) => return fail("socket", e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return fail("runtime", e),
    };
    let (done, finished) = tokio::sync::oneshot::channel();
    let stop = shutdown.clone();
    let thread = std::thread::Builder::new().name("listener".into()).spawn(move || {
        runtime.block_on(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => http::serve(listener, endpoints, web, stop).await,
                Err(e) => {
                    tracing::error!(error = %e, "cannot register the listener's socket; shutting down");
                    stop.cancel();
                }
            }
        });
        let _ = done.send(());
    });
    match thread {
        Ok(_) => Some(finished),
        Err(e) => fail("thread", e),
    }
}
