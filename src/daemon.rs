//! `tenant-audit serve`: one scheduler per target and the HTTP endpoints, run until the shutdown
//! token is cancelled.
//!
//! Invariants: every target has its own scheduler (its pools, schedule, incremental state,
//! heal and metrics) on its own tasks, so one target down, slow or frozen never delays or fails
//! another's scans. Once shutdown is requested the process stops accepting connections, cancels
//! running queries on the server, and returns within `serve.shutdown_timeout`.

use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Fleet;
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
    let http = tokio::spawn(http::serve(listener, endpoints, web, shutdown.clone()));
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
        let _ = http.await;
    })
    .await;
    if finished.is_err() {
        tracing::warn!("shutdown timeout reached; exiting with work still running");
    }
}
