//! TLS and libpq connection strings against a cluster with a private CA made by the test:
//! every `sslmode` with libpq's meaning, `sslrootcert` (also as `tls.ca_file`), a client
//! certificate for a `cert`-only role, and a rotated password in `database_url_file`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{cli, config_file, pg, start_daemon, BASE_SQL, DEMO_SQL};

/// A throwaway certificate authority, a server certificate for 127.0.0.1 (only), a client
/// certificate for the role `certuser`, a second unrelated CA, and the cluster's `pg_hba.conf`,
/// made with openssl in a fresh directory.
fn certificates(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tenant-audit-tls-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(&dir).output().expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    for ca in ["ca", "other-ca"] {
        let (key, pem, subj) = (format!("{ca}.key"), format!("{ca}.pem"), format!("/CN=tenant-audit test {ca}"));
        run(&[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &pem, "-days", "2", "-subj",
            &subj,
        ]);
    }
    let sign = |name: &str, subject: &str, ext: &str| {
        let (key, csr, pem, cnf) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.cnf"));
        run(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", subject]);
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
    };
    sign(
        "server",
        "/CN=127.0.0.1",
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    );
    sign("client", "/CN=certuser", "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n");
    // `certuser` may only log in with its certificate; `pwuser` only with its password.
    std::fs::write(
        dir.join("pg_hba.conf"),
        "local all all trust\n\
         hostssl all certuser 127.0.0.1/32 cert\n\
         host all certuser 127.0.0.1/32 reject\n\
         host all pwuser 127.0.0.1/32 scram-sha-256\n\
         host all all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    // The server reads its key as its own user, and only a private key file.
    let owner = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&owner.stdout).trim() == "0" {
        assert!(Command::new("chown")
            .args(["postgres:", "server.key", "server.pem", "pg_hba.conf"])
            .current_dir(&dir)
            .status()
            .unwrap()
            .success());
    }
    assert!(Command::new("chmod")
        .args(["600", "server.key", "client.key"])
        .current_dir(&dir)
        .status()
        .unwrap()
        .success());
    assert!(Command::new("chmod").args(["755", "."]).current_dir(&dir).status().unwrap().success());
    dir
}

/// A cluster with TLS on, client certificates checked against the test CA, the test's
/// `pg_hba.conf`, and database `app` holding the demo fixture.
async fn ssl_cluster(certs: &Path) -> pg::Cluster {
    let cluster = pg::Cluster::start_with(&format!(
        "-c ssl=on -c ssl_cert_file={} -c ssl_key_file={} -c ssl_ca_file={} -c hba_file={}",
        certs.join("server.pem").display(),
        certs.join("server.key").display(),
        certs.join("ca.pem").display(),
        certs.join("pg_hba.conf").display()
    ));
    pg::connect(&cluster.url("postgres")).await.batch_execute("CREATE DATABASE app").await.unwrap();
    pg::connect(&cluster.url("app")).await.batch_execute(&format!("{BASE_SQL}\n{DEMO_SQL}")).await.unwrap();
    cluster
}

/// `scan --format json` of `url` with the config `toml`: (exit code, orphan count, stderr).
fn scan(name: &str, toml: &str, url: &str) -> (Option<i32>, Option<u64>, String) {
    let path = config_file(name, toml);
    let out =
        cli(&["scan", "--config", path.to_str().unwrap(), "--format", "json"], &[("TENANT_AUDIT_DATABASE_URL", url)]);
    let orphans = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|r| r["summary"]["orphan_rows"]["count"].as_u64());
    (out.status.code(), orphans, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn sslmodes_have_libpq_meaning() {
    let certs = certificates("modes");
    let cluster = ssl_cluster(&certs).await;
    let ca = certs.join("ca.pem").display().to_string();
    let other_ca = certs.join("other-ca.pem").display().to_string();
    let port = cluster.port;
    let ip = |query: &str| format!("postgres://postgres@127.0.0.1:{port}/app?{query}");
    // A name the certificate does not carry, dialled at the right address.
    let by_name =
        |query: &str| format!("host=localhost hostaddr=127.0.0.1 port={port} user=postgres dbname=app {query}");

    assert_eq!(scan("verify_full", "", &ip(&format!("sslmode=verify-full&sslrootcert={ca}"))).0, Some(0));
    let (code, orphans, err) = scan("verify_full_name", "", &by_name(&format!("sslmode=verify-full sslrootcert={ca}")));
    assert_eq!((code, orphans), (Some(2), None), "{err}");
    assert_eq!(
        err,
        format!(
            "tenant-audit: error: cannot connect to database localhost:{port}/app: error performing TLS handshake: \
             invalid peer certificate: certificate not valid for name \"localhost\"; certificate is only valid for \
             IpAddress(127.0.0.1)\n"
        )
    );
    let (code, orphans, err) = scan("verify_ca", "", &by_name(&format!("sslmode=verify-ca sslrootcert={ca}")));
    assert_eq!((code, orphans), (Some(0), Some(7)), "verify-ca does not check the name: {err}");

    // require without a root certificate encrypts without verifying, and says so once.
    let (code, orphans, err) = scan("require", "", &by_name("sslmode=require"));
    assert_eq!((code, orphans), (Some(0), Some(7)), "{err}");
    assert_eq!(err.matches("certificate is not verified").count(), 1, "{err}");
    // With a root certificate, require verifies the chain like verify-ca (and the name not).
    let (code, _, err) = scan("require_other_ca", "", &by_name(&format!("sslmode=require sslrootcert={other_ca}")));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("invalid peer certificate: UnknownIssuer"), "{err}");
    assert_eq!(scan("require_ca", "", &by_name(&format!("sslmode=require sslrootcert={ca}"))).0, Some(0));
    // tls.ca_file is the sslrootcert of a string that names none.
    let alias = format!("[tls]\nca_file = {ca:?}\n");
    assert_eq!(scan("ca_file_alias", &alias, &ip("sslmode=verify-full")).0, Some(0));
    // prefer (libpq's default) and allow connect too.
    assert_eq!(scan("prefer", "", &ip("")).0, Some(0));
    assert_eq!(scan("allow", "", &ip("sslmode=allow")).0, Some(0));

    let (code, _, err) = scan("verify_full_no_root", "", &ip("sslmode=verify-full"));
    assert_eq!(code, Some(2));
    assert_eq!(
        err,
        "tenant-audit: error: config key TENANT_AUDIT_DATABASE_URL: invalid connection string: parameter sslrootcert: \
         sslmode verify-full needs a root certificate: set sslrootcert to a PEM file or to system\n"
    );

    // The daemon's pooled sessions really are encrypted.
    let text = format!(
        "database_url = {:?}\n[serve]\nschedule = '0 0 0 1 1 *'\n",
        ip(&format!("sslmode=verify-full&sslrootcert={ca}"))
    );
    let config = tenant_audit::config::Config::from_toml(&text, Path::new("tls.toml"), Default::default()).unwrap();
    let daemon = start_daemon(config).await;
    daemon.wait_for("tenant_audit_scans_total{database=\"default\",result=\"success\"} 1").await;
    let row = pg::connect(&cluster.url("app"))
        .await
        .query_one(
            "SELECT count(*), bool_and(s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'tenant-audit'",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, i64>(0) > 0);
    assert_eq!(row.get::<_, Option<bool>>(1), Some(true));
    daemon.stop().await;
}

#[tokio::test]
async fn a_certificate_only_role_connects_with_sslcert_and_sslkey() {
    let certs = certificates("client");
    let cluster = ssl_cluster(&certs).await;
    pg::connect(&cluster.url("app")).await.batch_execute("CREATE ROLE certuser LOGIN SUPERUSER").await.unwrap();
    let file = |name: &str| certs.join(name).display().to_string();
    let base = format!(
        "postgres://certuser@127.0.0.1:{}/app?sslmode=verify-full&sslrootcert={}",
        cluster.port,
        file("ca.pem")
    );

    let with_cert = format!("{base}&sslcert={}&sslkey={}", file("client.pem"), file("client.key"));
    let (code, orphans, err) = scan("client_cert", "", &with_cert);
    assert_eq!((code, orphans), (Some(0), Some(7)), "{err}");
    let (code, _, err) = scan("no_client_cert", "", &base);
    assert_eq!(code, Some(2));
    assert_eq!(
        err,
        format!(
            "tenant-audit: error: cannot connect to database 127.0.0.1:{}/app: connection requires a valid client \
             certificate\n",
            cluster.port
        )
    );
}

#[tokio::test]
async fn a_rotated_password_in_the_url_file_reaches_new_connections() {
    let certs = certificates("rotate");
    let cluster = ssl_cluster(&certs).await;
    let admin = pg::connect(&cluster.url("app")).await;
    admin.batch_execute("CREATE ROLE pwuser LOGIN SUPERUSER PASSWORD 'first'").await.unwrap();
    let url = |password: &str| format!("postgres://pwuser:{password}@127.0.0.1:{}/app?sslmode=disable\n", cluster.port);
    let dir = config_file("rotate", "").parent().unwrap().to_path_buf();
    let url_file = dir.join("database-url");
    std::fs::write(&url_file, url("first")).unwrap();
    let text = format!(
        "database_url_file = {:?}\n[serve]\nschedule = '* * * * * *'\nscan_on_start = true\n",
        url_file.display().to_string()
    );
    let config = tenant_audit::config::Config::from_toml(&text, &dir.join("config.toml"), Default::default()).unwrap();
    let daemon = start_daemon(config).await;
    daemon.wait_for("tenant_audit_scans_total{database=\"default\",result=\"success\"} 1").await;

    // The password changes and every session of the old one ends: new connections need the new one.
    admin.batch_execute("ALTER ROLE pwuser PASSWORD 'second'").await.unwrap();
    let kill = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = 'pwuser'";
    admin.query_one(kill, &[]).await.unwrap();
    let failures = |text: &str| {
        crate::support::metric_lines(text, "tenant_audit_scans_total")
            .iter()
            .find_map(|l| {
                l.strip_prefix("tenant_audit_scans_total{database=\"default\",result=\"failure\"} ")
                    .map(|v| v.parse::<u64>().unwrap())
            })
            .unwrap()
    };
    let successes = |text: &str| {
        crate::support::metric_lines(text, "tenant_audit_scans_total")
            .iter()
            .find_map(|l| {
                l.strip_prefix("tenant_audit_scans_total{database=\"default\",result=\"success\"} ")
                    .map(|v| v.parse::<u64>().unwrap())
            })
            .unwrap()
    };
    // Until the file changes, scans fail: the old password no longer opens a session.
    let before = failures(&daemon.get("/metrics").await.1);
    poll(&daemon, |text| failures(text) > before).await;
    std::fs::write(&url_file, url("second")).unwrap();
    let after = successes(&daemon.get("/metrics").await.1);
    poll(&daemon, |text| successes(text) > after).await;
    let sessions = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'pwuser' AND application_name = 'tenant-audit'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert!(sessions > 0, "the daemon's sessions log in with the new password");
    daemon.stop().await;
}

/// Polls `/metrics` (30 s at most) until `done` holds for its text.
async fn poll(daemon: &crate::support::RunningDaemon, done: impl Fn(&str) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (status, text) = daemon.get("/metrics").await;
        assert_eq!(status, 200);
        if done(&text) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "condition never held; /metrics:\n{text}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[test]
fn a_bad_ca_file_is_a_config_error() {
    let path = config_file("tls_bad_ca", "database_url = 'postgres://h/d'\n[tls]\nca_file = 'missing.pem'\n");
    let out = cli(&["scan", "--config", path.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.starts_with("tenant-audit: error: config key tls.ca_file: cannot read "), "{err}");
}
