//! `tenant-audit serve`: wires the scheduler and the HTTP endpoints together and runs them until
//! the shutdown token is cancelled.
//!
//! Invariant: once shutdown is requested the process stops accepting connections, cancels
//! running queries on the server, and returns within `serve.shutdown_timeout`.

use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::{self, Endpoints};
use crate::metrics::Metrics;
use crate::schedule::{self, Scheduler};

/// Serves on `listener` until `shutdown` is cancelled. The caller binds the listener (tests use
/// port 0) and owns the shutdown trigger (signals in the binary).
pub async fn run(mut config: Config, listener: TcpListener, shutdown: CancellationToken) {
    // The daemon's scan deadline defaults to the schedule's interval, not the CLI's hour.
    config.scan.max_duration = config.serve.scan_max_duration;
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    let scheduler = Scheduler::new(Arc::clone(&config), Arc::clone(&metrics), shutdown.clone());
    let endpoints = Endpoints { scheduler: Arc::clone(&scheduler), metrics };
    let http = tokio::spawn(http::serve(listener, endpoints, config.web.clone(), shutdown.clone()));
    let schedule = tokio::spawn(Arc::clone(&scheduler).run());

    shutdown.cancelled().await;
    let deadline = Instant::now() + config.serve.shutdown_timeout;
    tracing::info!(timeout_seconds = config.serve.shutdown_timeout.as_secs_f64(), "shutting down");
    let finished = tokio::time::timeout(schedule::remaining(deadline), async {
        let _ = schedule.await;
        scheduler.wait_idle().await;
        let _ = http.await;
    })
    .await;
    if finished.is_err() {
        tracing::warn!("shutdown timeout reached; exiting with work still running");
    }
}
