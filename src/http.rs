//! The HTTP endpoints (hyper 1.x, one listener): `/metrics`, `/healthz`, `/readyz`, `/report`
//! and `POST /scan`.
//!
//! Invariant: no handler touches PostgreSQL. `/metrics` encodes what the last scan recorded,
//! `/report` serves the last successful report, and `POST /scan` only asks the scheduler to
//! start a scan in the background.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::CONTENT_TYPE;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::schedule::Scheduler;

/// What the handlers read.
#[derive(Clone)]
pub struct Endpoints {
    pub scheduler: Arc<Scheduler>,
    pub metrics: Arc<Metrics>,
}

/// Accepts connections until `shutdown`, then lets open requests finish.
pub async fn serve(listener: TcpListener, endpoints: Endpoints, shutdown: CancellationToken) {
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let endpoints = endpoints.clone();
        let service = service_fn(move |req| {
            let endpoints = endpoints.clone();
            async move { Ok::<_, Infallible>(handle(&endpoints, &req)) }
        });
        let connection = graceful.watch(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

fn handle(endpoints: &Endpoints, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            respond(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", endpoints.metrics.encode())
        }
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n".into()),
        (&Method::GET, "/readyz") => match endpoints.scheduler.readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
        },
        (&Method::GET, "/report") => match endpoints.scheduler.last_report() {
            Some(report) => respond(StatusCode::OK, "application/json", report.to_json()),
            None => json_status(StatusCode::SERVICE_UNAVAILABLE, "no scan has completed yet"),
        },
        (&Method::POST, "/scan") => {
            if endpoints.scheduler.try_start_scan() {
                json_status(StatusCode::ACCEPTED, "scan started")
            } else {
                json_status(StatusCode::CONFLICT, "a scan is already running")
            }
        }
        (_, "/metrics" | "/healthz" | "/readyz" | "/report" | "/scan") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n".into())
        }
        _ => text(StatusCode::NOT_FOUND, "not found; try /metrics, /healthz, /readyz, /report or POST /scan\n".into()),
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, content_type.parse().expect("static content type"));
    response
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body)
}

fn json_status(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    respond(status, "application/json", serde_json::json!({ "status": message }).to_string())
}
