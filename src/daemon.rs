//! `tenant-audit serve`: one scheduler per target and the HTTP endpoints, run until the shutdown
//! token is cancelled.
//!
//! Invariants: every target has its own scheduler (its pools, schedule, incremental state,
//! heal and metrics) on its own tasks, so one target down, slow or frozen never delays or fails
//! another's scans. Once shutdown is requested the process stops accepting connections, cancels
//! running queries on the server, and returns within `serve.shutdown_timeout`. The listener
//! runs on a thread and runtime of its own, so a scan keeping the main runtime's workers busy
//! never makes a scrape wait for one (docs/performance.md, "The listener"). A listener that
//! cannot be started shuts the daemon down and is returned as an error (`serve` exits 2).

use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Fleet, WebConfig};
use crate::exposition::Exposition;
use crate::http::{self, Endpoints};
use crate::metrics::Metrics;
use crate::schedule::{self, Scheduler};

/// Why the daemon stopped other than by a shutdown request.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot start the listener's {what}: {source}")]
    Listener { what: &'static str, source: std::io::Error },
}

/// What the listener thread ends with.
type Finished = tokio::sync::oneshot::Receiver<Result<(), DaemonError>>;

/// Serves on `listener` until `shutdown` is cancelled. The caller binds the listener (tests use
/// port 0) and owns the shutdown trigger (signals in the binary). An error when the listener
/// could not be started (the schedulers were shut down).
pub async fn run(
    fleet: impl Into<Fleet>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let fleet = fleet.into();
    let Some(first) = fleet.targets.first() else { return Ok(()) };
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
    let (http, failed) = match spawn_listener(listener, endpoints, web, shutdown.clone()) {
        Ok(finished) => (Some(finished), None),
        Err(e) => (None, Some(e)),
    };
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
        match http {
            Some(finished) => finished.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    })
    .await;
    let listener = finished.unwrap_or_else(|_| {
        tracing::warn!("shutdown timeout reached; exiting with work still running");
        Ok(())
    });
    failed.map_or(listener, Err)
}

/// Runs [`http::serve`] on a thread of its own with a single-threaded runtime; the receiver
/// completes when it returned. An error (and shutdown requested) when the thread, its runtime
/// or its socket cannot be set up.
fn spawn_listener(
    listener: TcpListener,
    endpoints: Endpoints,
    web: WebConfig,
    shutdown: CancellationToken,
) -> Result<Finished, DaemonError> {
    let listener = listener.into_std().map_err(failed("socket", &shutdown))?;
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(failed("runtime", &shutdown))?;
    let (done, finished) = tokio::sync::oneshot::channel();
    let stop = shutdown.clone();
    std::thread::Builder::new()
        .name("listener".into())
        .spawn(move || {
            let ended = runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).map_err(failed("socket", &stop))?;
                http::serve(listener, endpoints, web, stop).await;
                Ok(())
            });
            let _ = done.send(ended);
        })
        .map_err(failed("thread", &shutdown))?;
    Ok(finished)
}

/// Logs why the listener cannot start, requests shutdown and makes the error of it.
fn failed<'a>(what: &'static str, stop: &'a CancellationToken) -> impl FnOnce(std::io::Error) -> DaemonError + 'a {
    move |source| {
        tracing::error!(error = %source, "cannot start the listener's {what}; shutting down");
        stop.cancel();
        DaemonError::Listener { what, source }
    }
}
