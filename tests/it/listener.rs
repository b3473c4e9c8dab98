//! The listener over real sockets: HTTPS with the web config's certificate (and client
//! certificates), basic authentication per endpoint, `POST /scan` refused, rate limited and
//! never healing unless allowed, the header-read timeout against 300 half-sent requests, the
//! daemon binary under an fd limit of 256 (no spinning, no log flood), and `/metrics` and
//! `/report` bytes served as encoded (gzip when asked).

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{checksum, config, config_file, fixture_db, pg, start_daemon, web_auth, DEMO_SQL};
use crate::tools::temp_dir;

/// Demo tenants by pattern; a schedule that never fires during a test.
const DAEMON: &str = "[tenants]\ninclude = ['^tenant_']\n[serve]\nschedule = '0 0 0 1 1 *'\n";

/// A certificate authority, a server certificate for 127.0.0.1 and a client certificate, made by
/// openssl in `dir`: ca.pem, server.pem/server.key, client.pem/client.key.
fn certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=listener test CA"],
    ]
    .concat());
    for (name, ext) in [
        ("server", "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
        ("client", "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"),
    ] {
        let (key, csr, pem, cnf) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.cnf"));
        run(&[&["req"][..], &ec, &["-keyout", &key, "-out", &csr, "-subj", &format!("/CN={name}")]].concat());
        std::fs::write(dir.join(&cnf), ext).unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &cnf,
        ]);
    }
}

/// A bcrypt hash of `password` (cost 4: the format's minimum, fast for tests).
fn hash(password: &str) -> String {
    bcrypt::hash(password, 4).unwrap()
}

/// A web config file in `dir` with the server certificate, `extra` YAML, and alice's password
/// "wonderland".
fn web_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("web.yml");
    let text = format!(
        "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n{extra}basic_auth_users:\n  alice: {}\n",
        hash("wonderland")
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// An HTTPS client trusting only the test CA, optionally with the client certificate.
fn https_client(dir: &Path, client_cert: bool) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(dir.join("ca.pem")).unwrap()).unwrap();
    let mut builder = reqwest::Client::builder().tls_built_in_root_certs(false).add_root_certificate(ca).tls_info(true);
    if client_cert {
        let mut pem = std::fs::read(dir.join("client.pem")).unwrap();
        pem.extend(std::fs::read(dir.join("client.key")).unwrap());
        builder = builder.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    builder.build().unwrap()
}

/// Status, `Retry-After` and body of a request, with `credentials` as basic auth if given.
async fn send(request: reqwest::RequestBuilder, credentials: Option<(&str, &str)>) -> (u16, Option<String>, String) {
    let request = match credentials {
        Some((user, password)) => request.basic_auth(user, Some(password)),
        None => request,
    };
    let r = request.send().await.unwrap();
    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    (r.status().as_u16(), retry, r.text().await.unwrap())
}

const ALICE: Option<(&str, &str)> = Some(("alice", "wonderland"));

/// Polls `{base}/metrics` (30 s at most) until it has the sample line `line`.
async fn wait_for(client: &reqwest::Client, base: &str, credentials: Option<(&str, &str)>, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _, text) = send(client.get(format!("{base}/metrics")), credentials).await;
        if status == 200 && text.lines().any(|l| l == line) {
            return;
        }
        assert!(Instant::now() < deadline, "{line} never appeared; last answer {status}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn https_basic_auth_and_scan_requests() {
    let dir = temp_dir("listener-https");
    certificates(&dir);
    let url = fixture_db("listener_https", DEMO_SQL).await;
    let web = web_config(&dir, "");
    let daemon = start_daemon(config(&url, &format!("{DAEMON}[web]\nconfig_file = {web:?}\n"))).await;
    let base = daemon.base.replace("http://", "https://");
    let client = https_client(&dir, false);

    // The configured certificate is what the client gets.
    let response = client.get(format!("{base}/healthz")).send().await.unwrap();
    let served = response.extensions().get::<reqwest::tls::TlsInfo>().unwrap().peer_certificate().unwrap().to_vec();
    let pem = std::fs::read(dir.join("server.pem")).unwrap();
    let configured = rustls::pki_types::pem::PemObject::from_pem_slice(&pem)
        .map(|c: rustls::pki_types::CertificateDer| c.to_vec())
        .unwrap();
    assert_eq!(served, configured);
    assert_eq!(
        (response.status().as_u16(), response.text().await.unwrap()),
        (200, "ok\n".to_string()),
        "probes need no credentials"
    );
    // Plain HTTP on the TLS port gets no HTTP answer.
    assert!(reqwest::get(format!("{}/healthz", daemon.base)).await.is_err());

    let metrics = || client.get(format!("{base}/metrics"));
    let unauthorized = (401, None, "{\"status\":\"credentials required\"}".to_string());
    assert_eq!(send(metrics(), None).await, unauthorized);
    assert_eq!(send(metrics(), Some(("alice", "looking-glass"))).await, unauthorized);
    assert_eq!(send(metrics(), Some(("mallory", "wonderland"))).await, unauthorized);
    let challenge = metrics().send().await.unwrap();
    assert_eq!(challenge.headers()["www-authenticate"], "Basic realm=\"tenant-audit\", charset=\"UTF-8\"");
    let (status, _, text) = send(metrics(), ALICE).await;
    assert_eq!(status, 200);
    assert!(text.contains("\ntenant_audit_database_up{database=\"default\"} "), "{text}");
    wait_for(&client, &base, ALICE, "tenant_audit_scans_total{database=\"default\",result=\"success\"} 1").await;
    assert_eq!(send(client.get(format!("{base}/report")), None).await, unauthorized);
    assert_eq!(send(client.get(format!("{base}/report")), ALICE).await.0, 200);

    // POST /scan is off by default: 401 without credentials, 403 with them.
    let scan = |base: &str| client.post(format!("{base}/scan"));
    assert_eq!(send(scan(&base), None).await, unauthorized);
    let disabled = (403, None, "{\"status\":\"POST /scan is disabled (web.scan_requests.enabled)\"}".to_string());
    assert_eq!(send(scan(&base), ALICE).await, disabled);
    daemon.stop().await;

    // Enabled, with /metrics open to scrapers without credentials and /report still closed.
    let extra = format!(
        "{DAEMON}[web]\nconfig_file = {web:?}\nmetrics_auth = false\n[web.scan_requests]\nenabled = true\nmin_interval = '1h'\n"
    );
    let daemon = start_daemon(config(&url, &extra)).await;
    let base = daemon.base.replace("http://", "https://");
    assert_eq!(send(client.get(format!("{base}/metrics")), None).await.0, 200);
    assert_eq!(send(client.get(format!("{base}/report")), None).await.0, 401);
    wait_for(&client, &base, None, "tenant_audit_scans_total{database=\"default\",result=\"success\"} 1").await;
    assert_eq!(send(scan(&base), None).await, unauthorized);
    assert_eq!(send(scan(&base), ALICE).await, (202, None, "{\"status\":\"scan started\"}".to_string()));
    let limited = (429, Some("3600".to_string()), "{\"status\":\"too many scan requests\"}".to_string());
    assert_eq!(send(scan(&base), ALICE).await, limited);
    wait_for(&client, &base, None, "tenant_audit_scans_total{database=\"default\",result=\"success\"} 2").await;
    assert_eq!(send(scan(&base), ALICE).await, limited, "the limit counts from the last accepted request");
    daemon.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn client_certificates_are_required_when_configured() {
    let dir = temp_dir("listener-mtls");
    certificates(&dir);
    let url = fixture_db("listener_mtls", DEMO_SQL).await;
    let web = web_config(&dir, "  client_ca_file: ca.pem\n  client_auth_type: RequireAndVerifyClientCert\n");
    let extra = format!("{DAEMON}[web]\nconfig_file = {web:?}\nheader_read_timeout = '1s'\n");
    let daemon = start_daemon(config(&url, &extra)).await;
    let base = daemon.base.replace("http://", "https://");
    assert!(https_client(&dir, false).get(format!("{base}/healthz")).send().await.is_err(), "no client certificate");
    let (status, _, body) = send(https_client(&dir, true).get(format!("{base}/healthz")), None).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // A client that never starts its TLS handshake is closed after header_read_timeout.
    let mut silent = tokio::net::TcpStream::connect(daemon.base.trim_start_matches("http://")).await.unwrap();
    let opened = Instant::now();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut buf)).await.unwrap().unwrap();
    let took = opened.elapsed();
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(3), "closed after {took:?}");
    assert_eq!(buf.len(), 0);
    daemon.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The DER of the certificate that `client` is served by `url`.
async fn served_certificate(client: &reqwest::Client, url: &str) -> Option<Vec<u8>> {
    let response = client.get(url).send().await.ok()?;
    Some(response.extensions().get::<reqwest::tls::TlsInfo>()?.peer_certificate()?.to_vec())
}

fn der(pem_file: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(pem_file).unwrap().to_vec()
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let (dir, next) = (temp_dir("listener-rotate"), temp_dir("listener-rotate-next"));
    certificates(&dir);
    certificates(&next);
    let url = fixture_db("listener_rotate", DEMO_SQL).await;
    let web = web_config(&dir, "");
    let daemon = start_daemon(config(&url, &format!("{DAEMON}[web]\nconfig_file = {web:?}\n"))).await;
    let healthz = format!("{}/healthz", daemon.base.replace("http://", "https://"));
    let mut builder = reqwest::Client::builder().tls_built_in_root_certs(false).tls_info(true);
    for ca in [&dir, &next] {
        builder = builder
            .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca.join("ca.pem")).unwrap()).unwrap());
    }
    let client = builder.pool_max_idle_per_host(0).build().unwrap();
    assert_eq!(served_certificate(&client, &healthz).await, Some(der(&dir.join("server.pem"))));

    // The certificate and key are replaced, as a Secret volume update does.
    for file in ["server.key", "server.pem"] {
        std::fs::copy(next.join(file), dir.join(format!("{file}.new"))).unwrap();
        std::fs::rename(dir.join(format!("{file}.new")), dir.join(file)).unwrap();
    }
    let rotated = Some(der(&next.join("server.pem")));
    let deadline = Instant::now() + Duration::from_secs(30);
    while served_certificate(&client, &healthz).await != rotated {
        assert!(Instant::now() < deadline, "the rotated certificate was never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A broken file keeps what was loaded.
    std::fs::write(&web, "tls_server_config:\n  cert_file: missing.pem\n").unwrap();
    tokio::time::sleep(tenant_audit::http::RELOAD_CHECK_INTERVAL * 2).await;
    for _ in 0..3 {
        assert_eq!(served_certificate(&client, &healthz).await, rotated);
    }
    daemon.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&next).unwrap();
}

/// heal.enabled with one repair; scans only on request.
const HEALING: &str = "[tenants]\ninclude = ['^tenant_']\n[heal]\nenabled = true\nbackfill_null_timestamps = true\n\
    [serve]\nschedule = '0 0 0 1 1 *'\nscan_on_start = false\n";
const NULLS: &str = "SELECT count(*) FROM tenant_d4.users_userprofile WHERE updated_at IS NULL";

#[tokio::test]
async fn requested_scans_heal_only_when_allowed() {
    let url = fixture_db("listener_heal", DEMO_SQL).await;
    let before = checksum(&url).await;
    let daemon = start_daemon(config(&url, &format!("{HEALING}[web.scan_requests]\nenabled = true\n"))).await;
    assert_eq!(daemon.post("/scan").await.0, 202);
    daemon.wait_for("tenant_audit_scans_total{database=\"default\",result=\"success\"} 1").await;
    assert_eq!(checksum(&url).await, before, "a requested scan wrote");
    let runs = daemon.samples("tenant_audit_heal_runs_total").await;
    assert!(runs.iter().all(|l| l.ends_with(" 0")), "{runs:?}");
    daemon.stop().await;

    // Allowed: the same request heals.
    let db = pg::connect(&url).await;
    assert_eq!(db.query_one(NULLS, &[]).await.unwrap().get::<_, i64>(0), 3);
    let web = web_auth::web_section("listener_heal");
    let allowed = format!("{HEALING}{web}[web.scan_requests]\nenabled = true\nheal = true\n");
    let daemon = start_daemon(config(&url, &allowed)).await;
    assert_eq!(web_auth::post(&daemon, "/scan").await, 202);
    daemon.wait_for("tenant_audit_heal_runs_total{database=\"default\",result=\"success\"} 1").await;
    assert_eq!(db.query_one(NULLS, &[]).await.unwrap().get::<_, i64>(0), 0);
    daemon.stop().await;
}

#[tokio::test]
async fn half_sent_requests_are_closed_within_the_header_timeout() {
    let url = fixture_db("listener_slow", DEMO_SQL).await;
    let extra = format!("{DAEMON}[web]\nheader_read_timeout = '2s'\n");
    let daemon = start_daemon(config(&url, &extra)).await;
    daemon.wait_for("tenant_audit_scans_total{database=\"default\",result=\"success\"} 1").await;
    let address = daemon.base.trim_start_matches("http://").to_string();
    let opened = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: tenant-audit\r\n").await.unwrap();
        slow.push(stream);
    }
    // A real scrape is served meanwhile.
    let (status, text) = daemon.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(text.contains("tenant_audit_scans_total{database=\"default\",result=\"success\"} 1"));
    assert!(opened.elapsed() < Duration::from_secs(2), "the scrape ran after the timeout: {:?}", opened.elapsed());
    // Every half-sent request is closed by the server: end of stream (or a reset), and no response.
    let closed = futures::future::join_all(slow.into_iter().map(|mut stream| async move {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
        (read.is_ok(), opened.elapsed(), String::from_utf8_lossy(&buf).into_owned())
    }))
    .await;
    let latest = closed.iter().map(|(_, at, _)| *at).max().unwrap();
    assert!(closed.iter().all(|(ended, _, _)| *ended), "a half-sent request is still open after 10 s");
    assert!(closed.iter().all(|(_, at, _)| *at >= Duration::from_secs(2)), "closed before the timeout");
    assert!(latest < Duration::from_secs(4), "the last one closed after {latest:?}; header_read_timeout is 2 s");
    let answered: Vec<_> = closed.iter().filter(|(_, _, body)| body.starts_with("HTTP/1.1 200")).collect();
    assert_eq!(answered.len(), 0);
    daemon.stop().await;
}

#[tokio::test]
async fn shutdown_does_not_wait_for_half_sent_requests() {
    let url = fixture_db("listener_shutdown", DEMO_SQL).await;
    let daemon = start_daemon(config(&url, &format!("{DAEMON}[web]\nheader_read_timeout = '5m'\n"))).await;
    daemon.wait_for("tenant_audit_scans_total{database=\"default\",result=\"success\"} 1").await;
    let address = daemon.base.trim_start_matches("http://").to_string();
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        stream.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        slow.push(stream);
    }
    // Each connection is being served (an answered scrape follows them in accept order).
    assert_eq!(daemon.get("/healthz").await.0, 200);
    let stopping = Instant::now();
    daemon.stop().await;
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(4), "shutdown took {took:?}; the grace is 2 s, header_read_timeout 5 min");
    assert!(
        took >= tenant_audit::http::SHUTDOWN_GRACE,
        "shutdown took {took:?}: it did not wait for the open requests"
    );
}

/// utime + stime of process `pid`, in clock ticks (/proc/PID/stat fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name (field 2) may hold spaces; the fields after its ')' start at field 3.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn clock_ticks_per_second() -> u64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn accept_failures(log: &Path) -> usize {
    std::fs::read_to_string(log).unwrap().lines().filter(|l| l.contains("accept failed")).count()
}

#[tokio::test]
async fn out_of_file_descriptors_the_daemon_neither_spins_nor_floods_its_log() {
    let url = fixture_db("listener_emfile", DEMO_SQL).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let path = config_file(
        "emfile",
        &format!(
            "database_url = {url:?}\n{DAEMON}scan_on_start = false\nlisten = '127.0.0.1:{port}'\n\
             [web]\nheader_read_timeout = '5m'\nmax_connections = 1000\n"
        ),
    );
    let log = path.with_file_name("serve.log");
    let mut child = Command::new("prlimit")
        .args(["--nofile=256:256", "--"])
        .arg(env!("CARGO_BIN_EXE_tenant-audit"))
        .args(["serve", "--config", path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "the daemon never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 300 idle connections: more than the daemon has descriptors for.
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    while accept_failures(&log) == 0 {
        assert!(Instant::now() < deadline, "accept never failed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (ticks, lines) = (cpu_ticks(child.id()), accept_failures(&log));
    let window = Duration::from_secs(3);
    tokio::time::sleep(window).await;
    let used = (cpu_ticks(child.id()) - ticks) as f64 / clock_ticks_per_second() as f64;
    assert!(used < 0.3, "the daemon used {used} s of CPU in {window:?} while out of descriptors");
    assert_eq!(accept_failures(&log) - lines, 0, "logged again within {window:?}");
    assert_eq!(accept_failures(&log), 1);

    // Descriptors back: it serves again.
    drop(idle);
    let (status, text) = loop {
        if let Ok(Ok(r)) =
            tokio::time::timeout(Duration::from_secs(5), http.get(format!("{base}/metrics")).send()).await
        {
            break (r.status().as_u16(), r.text().await.unwrap());
        }
        assert!(
            Instant::now() < deadline + Duration::from_secs(30),
            "no scrape succeeded after the connections closed"
        );
    };
    assert_eq!(status, 200);
    assert!(text.contains("tenant_audit_database_up{database=\"default\"} 1"), "{text}");
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert!(child.wait().unwrap().success());
}

#[tokio::test]
async fn metrics_and_report_are_served_as_encoded_and_gzipped() {
    let url = fixture_db("listener_gzip", DEMO_SQL).await;
    let daemon = start_daemon(config(&url, DAEMON)).await;
    daemon.wait_for("tenant_audit_scans_total{database=\"default\",result=\"success\"} 1").await;
    let http = reqwest::Client::new();
    for (path, content_type) in
        [("/metrics", "text/plain; version=0.0.4; charset=utf-8"), ("/report", "application/json")]
    {
        let get = |encoding: &'static str| {
            http.get(format!("{}{path}", daemon.base)).header("accept-encoding", encoding).send()
        };
        let plain = get("identity").await.unwrap();
        assert_eq!(plain.headers()["content-type"], content_type);
        assert_eq!(plain.headers()["vary"], "Accept-Encoding");
        assert!(plain.headers().get("content-encoding").is_none());
        let plain = plain.bytes().await.unwrap();
        assert_eq!(get("identity").await.unwrap().bytes().await.unwrap(), plain, "{path}: a second scrape differs");
        let zipped = get("br;q=1.0, gzip;q=0.8").await.unwrap();
        assert_eq!(zipped.headers()["content-encoding"], "gzip");
        let zipped = zipped.bytes().await.unwrap();
        let mut decoded = Vec::new();
        flate2::read::GzDecoder::new(&zipped[..]).read_to_end(&mut decoded).unwrap();
        assert_eq!(decoded, plain, "{path}: gzip decodes to other bytes");
        assert!(zipped.len() * 3 < plain.len(), "{path}: {} gzip bytes for {}", zipped.len(), plain.len());
    }
    daemon.stop().await;
}

#[test]
fn a_bad_web_config_file_is_one_line_with_exit_code_2() {
    let path = config_file("badweb", "database_url = 'postgres://127.0.0.1:1/none'\n[tenants]\ninclude = ['^t']\n");
    let web = path.with_file_name("web.yml");
    std::fs::write(&web, "tls_server_config:\n  cert_file: nope.pem\n  key_file: nope.key\n").unwrap();
    let out = crate::support::cli(
        &["serve", "--config", path.to_str().unwrap(), "--web.config.file", web.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let dir = web.parent().unwrap().display().to_string();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("tenant-audit: error: web config file {dir}/web.yml: tls_server_config.cert_file: cannot read {dir}/nope.pem: No such file or directory (os error 2)\n")
    );
}
