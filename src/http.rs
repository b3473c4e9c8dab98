//! The HTTP listener (hyper 1.x, HTTP/1.1, optionally TLS through rustls) and its endpoints:
//! `/metrics`, `/healthz`, `/readyz`, `/report` and `POST /scan`.
//!
//! Invariants: no handler touches PostgreSQL. `/metrics` and `/report` serve bytes encoded once
//! per change of the metrics or the report (and their gzip form), never re-encoded per request.
//! `POST /scan` only asks the scheduler to start a scan; it is refused unless
//! `web.scan_requests.enabled`, rate limited, and never heals unless `web.scan_requests.heal`.
//! With `basic_auth_users`, `POST /scan` always requires credentials, `/metrics` and `/report`
//! unless `web.metrics_auth` / `web.report_auth` are false; `/healthz` and `/readyz` (probes)
//! never do. Every connection is bounded: the TLS handshake and each request's headers must
//! arrive within `web.header_read_timeout`, no read or write may stall longer than
//! `web.idle_timeout`, at most `web.max_connections` are open, and accept errors (EMFILE) back
//! off instead of spinning, logged at most once per [`ACCEPT_LOG_INTERVAL`]. At shutdown, open
//! connections get [`SHUTDOWN_GRACE`] to finish. The web config file is loaded again when it or
//! a file it names changes (checked at most once per [`RELOAD_CHECK_INTERVAL`], when a
//! connection is accepted); a connection keeps the security it was accepted with.

use std::collections::HashSet;
use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{
    HeaderValue, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER, VARY, WWW_AUTHENTICATE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;

use crate::config::WebConfig;
use crate::exposition::Exposition;
use crate::report::Report;
use crate::schedule::{Scheduler, Trigger};
use crate::web_config::WebSecurity;

/// While accepting fails (e.g. EMFILE: no file descriptor left), at most one log line per this
/// interval; the failures in between are counted in the next line.
pub const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// First and longest wait after an accept error that is not about one connection.
const ACCEPT_FIRST_BACKOFF: Duration = Duration::from_millis(10);
const ACCEPT_MAX_BACKOFF: Duration = Duration::from_secs(1);
/// At shutdown, how long open connections may take to finish their request before the listener
/// stops waiting for them (a half-sent request would otherwise hold shutdown for the whole
/// header-read timeout).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Least time between two looks at the web config file's modification times.
pub const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Bcrypt verifications running at once: wrong passwords cannot take every core.
const BCRYPT_SLOTS: usize = 2;
/// Verified credentials remembered (as SHA-256 digests), so a scrape costs no bcrypt.
const VERIFIED_CACHE: usize = 1024;

const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the handlers read.
#[derive(Clone)]
pub struct Endpoints {
    /// One per target, in configuration order (at least one).
    pub schedulers: Vec<Arc<Scheduler>>,
    pub metrics: Arc<Exposition>,
}

/// Accepts connections until `shutdown`, then lets open requests finish (for at most
/// [`SHUTDOWN_GRACE`]).
pub async fn serve(listener: TcpListener, endpoints: Endpoints, web: WebConfig, shutdown: CancellationToken) {
    let server = Arc::new(Server::new(endpoints, web));
    if server.security().auth.is_none() {
        tracing::info!("no basic_auth_users configured: /metrics and /report answer anyone who reaches the listener");
    }
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(server.web.max_connections));
    let mut errors = AcceptErrors::default();
    loop {
        // At the cap, wait for a connection to end before accepting: further clients wait in the
        // kernel's accept queue instead of costing memory and descriptors here.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = Arc::clone(&permits).acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    errors.succeeded();
                    accepted
                }
                Err(e) => {
                    if let Some(wait) = errors.failed(&e) {
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                    continue;
                }
            },
        };
        let server = Arc::clone(&server);
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            server.connection(stream, peer, watcher).await;
            drop(permit);
        });
    }
    drop(listener);
    let open = graceful.count();
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::info!(open_at_shutdown = open, "shutdown: stopped waiting for open connections");
    }
}

/// Back-off and log rate limit of accept errors.
#[derive(Default)]
struct AcceptErrors {
    /// The next wait; zero after a successful accept.
    backoff: Duration,
    /// Failures since the last log line.
    unlogged: u64,
    last_log: Option<Instant>,
}

impl AcceptErrors {
    /// Records a failed accept; returns how long to wait before the next one, if at all.
    fn failed(&mut self, e: &std::io::Error) -> Option<Duration> {
        use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset, Interrupted};
        // These concern one connection, already gone from the queue: accepting again is right.
        let per_connection = matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset | Interrupted);
        let wait = (!per_connection).then(|| {
            self.backoff = (self.backoff * 2).clamp(ACCEPT_FIRST_BACKOFF, ACCEPT_MAX_BACKOFF);
            self.backoff
        });
        self.unlogged += 1;
        if self.last_log.map_or(true, |t| t.elapsed() >= ACCEPT_LOG_INTERVAL) {
            tracing::warn!(
                error = %e,
                failures = self.unlogged,
                retry_in_ms = wait.unwrap_or_default().as_millis() as u64,
                "accept failed; further failures within {}s are counted in the next line",
                ACCEPT_LOG_INTERVAL.as_secs()
            );
            self.unlogged = 0;
            self.last_log = Some(Instant::now());
        }
        wait
    }

    fn succeeded(&mut self) {
        self.backoff = Duration::ZERO;
    }
}

/// A report and its encoding.
type EncodedReport = (Arc<Report>, Arc<Encoded>);
/// Every target's report (or none yet) and the encoding of all of them.
type EncodedReports = (Vec<Option<Arc<Report>>>, Arc<Encoded>);

/// The listener's shared state.
struct Server {
    endpoints: Endpoints,
    web: WebConfig,
    /// TLS and credentials in force; replaced when the web config file or a file it names
    /// changes (a rotated certificate), checked at most once per [`RELOAD_CHECK_INTERVAL`].
    security: RwLock<Arc<Security>>,
    /// When the files were last looked at.
    reload_checked: Mutex<Instant>,
    /// The last encoded `/metrics` and the metrics generation it was encoded at.
    metrics_body: Mutex<Option<(u64, Arc<Encoded>)>>,
    /// Per target, the last encoded report and the report it encodes.
    report_bodies: Vec<Mutex<Option<EncodedReport>>>,
    /// With several targets, the last encoded `/report` of all of them and the reports it
    /// encodes.
    all_reports_body: Mutex<Option<EncodedReports>>,
    /// When the last `POST /scan` was accepted: the rate limit.
    last_scan_request: Mutex<Option<Instant>>,
}

impl Server {
    fn new(endpoints: Endpoints, web: WebConfig) -> Server {
        let security = RwLock::new(Arc::new(Security::new(web.security.clone())));
        let report_bodies = endpoints.schedulers.iter().map(|_| Mutex::new(None)).collect();
        Server {
            endpoints,
            web,
            security,
            reload_checked: Mutex::new(Instant::now()),
            metrics_body: Mutex::new(None),
            report_bodies,
            all_reports_body: Mutex::new(None),
            last_scan_request: Mutex::new(None),
        }
    }

    /// The security in force, first loading the web config file again if it or a file it
    /// names changed. A changed file that does not load keeps the previous security (and says
    /// why once per change).
    fn security(&self) -> Arc<Security> {
        let current = Arc::clone(&self.security.read().unwrap_or_else(|e| e.into_inner()));
        let Some(source) = &current.source else { return current };
        {
            let mut checked = self.reload_checked.lock().unwrap_or_else(|e| e.into_inner());
            if checked.elapsed() < RELOAD_CHECK_INTERVAL {
                return current;
            }
            *checked = Instant::now();
        }
        let stamps = modification_times(&source.files);
        if stamps == current.stamps {
            return current;
        }
        let next = match WebSecurity::load(&source.path) {
            Ok(loaded) => {
                tracing::info!(path = %source.path.display(), "web config file loaded again after a change");
                Security::new(Some(Arc::new(loaded)))
            }
            Err(e) => {
                tracing::warn!(error = %e, "web config file changed but does not load; keeping the previous one");
                Security { stamps, ..(*current).clone() }
            }
        };
        let next = Arc::new(next);
        *self.security.write().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&next);
        next
    }

    /// Serves one accepted connection until it closes, stalls or times out.
    async fn connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, watcher: Watcher) {
        let _ = stream.set_nodelay(true);
        let mut stream = TimeoutStream::new(stream);
        stream.set_read_timeout(Some(self.web.idle_timeout));
        stream.set_write_timeout(Some(self.web.idle_timeout));
        let stream = Box::pin(stream);
        let security = self.security();
        match security.tls.clone() {
            None => self.http(stream, security, peer, watcher).await,
            Some(acceptor) => match tokio::time::timeout(self.web.header_read_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => self.http(tls, security, peer, watcher).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            },
        }
    }

    /// HTTP on one connection, with the security that was in force when it was accepted.
    async fn http<IO>(self: Arc<Self>, io: IO, security: Arc<Security>, peer: SocketAddr, watcher: Watcher)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let server = Arc::clone(&self);
        let service = service_fn(move |req| {
            let (server, security) = (Arc::clone(&server), Arc::clone(&security));
            async move { Ok::<_, Infallible>(server.handle(&req, &security, peer).await) }
        });
        let mut builder = http1::Builder::new();
        // hyper starts this timer whenever it waits for a request's headers, the first one
        // and each next one on a kept-alive connection.
        builder.timer(TokioTimer::new()).header_read_timeout(self.web.header_read_timeout);
        if let Err(e) = watcher.watch(builder.serve_connection(TokioIo::new(io), service)).await {
            tracing::debug!(%peer, error = %e, "http connection ended with an error");
        }
    }

    async fn handle(&self, req: &Request<Incoming>, security: &Security, peer: SocketAddr) -> Response<Full<Bytes>> {
        let mut response = self.route(req, security, peer).await;
        if let Some(source) = &security.source {
            for (name, value) in &source.headers {
                response.headers_mut().insert(name.clone(), value.clone());
            }
        }
        response
    }

    async fn route(&self, req: &Request<Incoming>, security: &Security, peer: SocketAddr) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        let needs_auth = match (req.method(), path) {
            (&Method::GET, "/metrics") => self.web.metrics_auth,
            (&Method::GET, "/report") => self.web.report_auth,
            (&Method::POST, "/scan") => true,
            _ => false,
        };
        let user = match (&security.auth, needs_auth) {
            (Some(auth), true) => match auth.check(req.headers().get(AUTHORIZATION)).await {
                Some(user) => Some(user),
                None => return unauthorized(),
            },
            _ => None,
        };
        let gzip = accepts_gzip(req.headers().get_all(ACCEPT_ENCODING).iter());
        match (req.method(), path) {
            (&Method::GET, "/metrics") => encoded(METRICS_CONTENT_TYPE, &self.metrics_body(), gzip),
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n".into()),
            (&Method::GET, "/readyz") => match self.readiness() {
                Ok(()) => text(StatusCode::OK, "ready\n".into()),
                Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
            },
            (&Method::GET, "/report") => self.report(req.uri().query(), gzip),
            (&Method::POST, "/scan") => match self.selected(req.uri().query()) {
                Ok(targets) => self.scan_request(&targets, peer, user.as_deref()),
                Err(response) => response,
            },
            (_, "/metrics" | "/healthz" | "/readyz" | "/report" | "/scan") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n".into())
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /metrics, /healthz, /readyz, /report or POST /scan\n".into(),
            ),
        }
    }

    /// `POST /scan`: 403 unless enabled, 429 within `min_interval` of the last accepted
    /// request, 409 while a scan runs, else 202.
    fn scan_request(&self, targets: &[usize], peer: SocketAddr, user: Option<&str>) -> Response<Full<Bytes>> {
        let requests = &self.web.scan_requests;
        if !requests.enabled {
            return json_status(StatusCode::FORBIDDEN, "POST /scan is disabled (web.scan_requests.enabled)");
        }
        let mut last = self.last_scan_request.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(wait) = last.and_then(|t| requests.min_interval.checked_sub(t.elapsed())) {
            let mut response = json_status(StatusCode::TOO_MANY_REQUESTS, "too many scan requests");
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(seconds));
            return response;
        }
        let schedulers = targets.iter().map(|&i| &self.endpoints.schedulers[i]);
        let started = schedulers.filter(|s| s.try_start_scan(Trigger::Request)).count();
        if started == 0 {
            return json_status(StatusCode::CONFLICT, "a scan is already running");
        }
        *last = Some(Instant::now());
        tracing::info!(%peer, user, heal = requests.heal, "scan requested over HTTP");
        json_status(StatusCode::ACCEPTED, "scan started")
    }

    /// The encoded metrics, encoded again only when they changed since.
    fn metrics_body(&self) -> Arc<Encoded> {
        let mut cache = self.metrics_body.lock().unwrap_or_else(|e| e.into_inner());
        // Read before encoding: a change during the encoding makes the next scrape encode again.
        let generation = self.endpoints.metrics.generation();
        match &*cache {
            Some((g, body)) if *g == generation => Arc::clone(body),
            _ => {
                let body = Arc::new(Encoded::new(self.endpoints.metrics.encode().into_bytes()));
                *cache = Some((generation, Arc::clone(&body)));
                body
            }
        }
    }

    /// `Ok` when every target is ready; else why not (with several targets, each stale one by
    /// name).
    fn readiness(&self) -> Result<(), String> {
        let schedulers = &self.endpoints.schedulers;
        if let [only] = &schedulers[..] {
            return only.readiness();
        }
        let stale: Vec<String> =
            schedulers.iter().filter_map(|s| s.readiness().err().map(|why| format!("{}: {why}", s.name()))).collect();
        match stale.is_empty() {
            true => Ok(()),
            false => Err(stale.join("; ")),
        }
    }

    /// The targets a request names with `?database=NAME` (all of them without it), or the 404
    /// response for a name that is not a target.
    #[allow(clippy::result_large_err)]
    fn selected(&self, query: Option<&str>) -> Result<Vec<usize>, Response<Full<Bytes>>> {
        let schedulers = &self.endpoints.schedulers;
        match database_parameter(query) {
            None => Ok((0..schedulers.len()).collect()),
            Some(name) => match schedulers.iter().position(|s| s.name() == name) {
                Some(i) => Ok(vec![i]),
                None => Err(json_status(StatusCode::NOT_FOUND, &format!("no target named {name:?}"))),
            },
        }
    }

    /// `GET /report`: one target's report (the only one, or `?database=NAME`), or with several
    /// targets and no name, `{"targets": {NAME: report or null}}`.
    fn report(&self, query: Option<&str>, gzip: bool) -> Response<Full<Bytes>> {
        let targets = match self.selected(query) {
            Ok(targets) => targets,
            Err(response) => return response,
        };
        if let [one] = targets[..] {
            return match self.report_body(one) {
                Some(body) => encoded("application/json", &body, gzip),
                None => json_status(StatusCode::SERVICE_UNAVAILABLE, "no scan has completed yet"),
            };
        }
        encoded("application/json", &self.all_reports_body(), gzip)
    }

    /// The encoded last report of target `index`, encoded once per report.
    fn report_body(&self, index: usize) -> Option<Arc<Encoded>> {
        let report = self.endpoints.schedulers[index].last_report()?;
        let mut cache = self.report_bodies[index].lock().unwrap_or_else(|e| e.into_inner());
        match &*cache {
            Some((r, body)) if Arc::ptr_eq(r, &report) => Some(Arc::clone(body)),
            _ => {
                let body = Arc::new(Encoded::new(report.to_json().into_bytes()));
                *cache = Some((report, Arc::clone(&body)));
                Some(body)
            }
        }
    }

    /// `{"targets": {NAME: report or null, ...}}`, encoded once per change of any report.
    fn all_reports_body(&self) -> Arc<Encoded> {
        let reports: Vec<Option<Arc<Report>>> = self.endpoints.schedulers.iter().map(|s| s.last_report()).collect();
        let mut cache = self.all_reports_body.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cached, body)) = &*cache {
            let same = |a: &Option<Arc<Report>>, b: &Option<Arc<Report>>| match (a, b) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if cached.iter().zip(&reports).all(|(a, b)| same(a, b)) {
                return Arc::clone(body);
            }
        }
        let mut json = String::from("{\"targets\":{");
        for (i, (scheduler, report)) in self.endpoints.schedulers.iter().zip(&reports).enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str(&serde_json::Value::from(scheduler.name()).to_string());
            json.push(':');
            match report {
                Some(report) => json.push_str(&report.to_json()),
                None => json.push_str("null"),
            }
        }
        json.push_str("}}");
        let body = Arc::new(Encoded::new(json.into_bytes()));
        *cache = Some((reports, Arc::clone(&body)));
        body
    }
}

/// The value of the query parameter `database`, if given.
fn database_parameter(query: Option<&str>) -> Option<&str> {
    query?.split('&').find_map(|pair| pair.strip_prefix("database="))
}

/// TLS and credentials from one load of the web config file.
#[derive(Clone)]
struct Security {
    /// `None` without a web config file: plain HTTP, no credentials, nothing to load again.
    source: Option<Arc<WebSecurity>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// `None` without `basic_auth_users`.
    auth: Option<Arc<Authenticator>>,
    /// Modification times of `source.files` when it was loaded.
    stamps: Vec<Option<SystemTime>>,
}

impl Security {
    fn new(source: Option<Arc<WebSecurity>>) -> Security {
        let tls = source.as_ref().and_then(|s| s.tls.clone()).map(tokio_rustls::TlsAcceptor::from);
        let auth =
            source.as_ref().filter(|s| !s.users.is_empty()).map(|s| Arc::new(Authenticator::new(s.users.clone())));
        let stamps = source.as_ref().map(|s| modification_times(&s.files)).unwrap_or_default();
        Security { source, tls, auth, stamps }
    }
}

/// The modification time of each file (`None` for one that cannot be read). Follows symbolic
/// links, as a Kubernetes Secret volume swaps them on an update.
fn modification_times(files: &[std::path::PathBuf]) -> Vec<Option<SystemTime>> {
    files.iter().map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok()).collect()
}

/// A response body as it is and gzip-compressed, both built once.
struct Encoded {
    identity: Bytes,
    gzip: Bytes,
}

impl Encoded {
    fn new(body: Vec<u8>) -> Encoded {
        let mut encoder =
            flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 4), flate2::Compression::fast());
        encoder.write_all(&body).expect("writing to memory");
        let gzip = encoder.finish().expect("writing to memory");
        Encoded { identity: Bytes::from(body), gzip: Bytes::from(gzip) }
    }
}

/// Whether `Accept-Encoding` allows gzip (`gzip`, `x-gzip` or `*`, with a non-zero q-value).
fn accepts_gzip<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> bool {
    let mut gzip = None;
    let mut any = None;
    for item in values.filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')) {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q=").or_else(|| p.trim().strip_prefix("Q=")))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match coding.as_str() {
            "gzip" | "x-gzip" => gzip = Some(q > 0.0),
            "*" => any = Some(q > 0.0),
            _ => {}
        }
    }
    gzip.or(any).unwrap_or(false)
}

fn encoded(content_type: &'static str, body: &Encoded, gzip: bool) -> Response<Full<Bytes>> {
    let bytes = if gzip { body.gzip.clone() } else { body.identity.clone() };
    let mut response = Response::new(Full::new(bytes));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(VARY, HeaderValue::from_static("Accept-Encoding"));
    if gzip {
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    response
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body)
}

fn json_status(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    respond(status, "application/json", serde_json::json!({ "status": message }).to_string())
}

fn unauthorized() -> Response<Full<Bytes>> {
    let mut response = json_status(StatusCode::UNAUTHORIZED, "credentials required");
    response
        .headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"tenant-audit\", charset=\"UTF-8\""));
    response
}

/// Basic authentication against bcrypt hashes, with a cache of verified credentials.
struct Authenticator {
    users: std::collections::BTreeMap<String, String>,
    /// Verified for unknown users too, so that the answer takes as long as for a known one.
    decoy: String,
    /// SHA-256 of `user:password` pairs verified before.
    verified: Mutex<HashSet<[u8; 32]>>,
    slots: Semaphore,
}

impl Authenticator {
    fn new(users: std::collections::BTreeMap<String, String>) -> Authenticator {
        let cost = users
            .values()
            .find_map(|h| h.parse::<bcrypt::HashParts>().ok())
            .map_or(bcrypt::DEFAULT_COST, |p| p.get_cost());
        let decoy = bcrypt::hash_with_salt("tenant-audit decoy", cost, [7; 16]).expect("a valid cost").to_string();
        Authenticator { users, decoy, verified: Mutex::new(HashSet::new()), slots: Semaphore::new(BCRYPT_SLOTS) }
    }

    /// The user name, when `header` holds valid Basic credentials.
    async fn check(&self, header: Option<&HeaderValue>) -> Option<String> {
        let value = header?.to_str().ok()?;
        let (scheme, encoded) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
        let digest: [u8; 32] =
            ring::digest::digest(&ring::digest::SHA256, &decoded).as_ref().try_into().expect("SHA-256 is 32 bytes");
        let (user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
        let (user, password) = (user.to_string(), password.to_string());
        if self.verified.lock().unwrap_or_else(|e| e.into_inner()).contains(&digest) {
            return Some(user);
        }
        let known = self.users.get(&user);
        let hash = known.unwrap_or(&self.decoy).clone();
        let _slot = self.slots.acquire().await.expect("the semaphore is never closed");
        let matches = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
            .await
            .unwrap_or(false);
        if !(matches && known.is_some()) {
            return None;
        }
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= VERIFIED_CACHE {
            verified.clear();
        }
        verified.insert(digest);
        Some(user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gzip(values: &[&'static str]) -> bool {
        let values: Vec<HeaderValue> = values.iter().map(|v| HeaderValue::from_static(v)).collect();
        accepts_gzip(values.iter())
    }

    #[test]
    fn accept_encoding_is_negotiated() {
        assert!(gzip(&["gzip"]));
        assert!(gzip(&["deflate, gzip;q=0.5"]));
        assert!(gzip(&["br", "x-gzip"]));
        assert!(gzip(&["*"]));
        assert!(!gzip(&[]));
        assert!(!gzip(&["identity"]));
        assert!(!gzip(&["gzip;q=0"]));
        assert!(!gzip(&["*, gzip;q=0"]));
        assert!(!gzip(&["*;q=0"]));
    }

    #[test]
    fn accept_errors_back_off_and_log_once_per_interval() {
        let mut errors = AcceptErrors::default();
        let emfile = std::io::Error::from_raw_os_error(24);
        let waits: Vec<_> = (0..9).map(|_| errors.failed(&emfile).unwrap().as_millis()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert_eq!(errors.unlogged, 8, "only the first failure was logged");
        assert_eq!(errors.failed(&std::io::Error::from(std::io::ErrorKind::ConnectionAborted)), None);
        errors.succeeded();
        assert_eq!(errors.failed(&emfile), Some(ACCEPT_FIRST_BACKOFF));
    }

    #[test]
    fn encoded_gzip_decodes_to_the_body() {
        use std::io::Read as _;
        let body = Encoded::new(b"tenant_audit_database_up 1\n".repeat(100));
        let mut decoded = Vec::new();
        flate2::read::GzDecoder::new(&body.gzip[..]).read_to_end(&mut decoded).unwrap();
        assert_eq!(decoded, body.identity);
        assert!(body.gzip.len() < body.identity.len() / 10);
    }
}
