//! TLS: `sslmode=require` connects over TLS and verifies the server against the system's
//! authorities plus `tls.ca_file`; an unknown authority is a one-line error.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{cli, config_file, pg, start_daemon, BASE_SQL, DEMO_SQL};

/// A throwaway certificate authority and a server certificate for 127.0.0.1, made with openssl.
fn certificates() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tenant-audit-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(&dir).output().expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=tenant-audit test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    // The server reads its key as its own user, and only a private key file.
    let owner = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&owner.stdout).trim() == "0" {
        assert!(Command::new("chown")
            .args(["postgres:", "server.key", "server.pem"])
            .current_dir(&dir)
            .status()
            .unwrap()
            .success());
    }
    assert!(Command::new("chmod").args(["600", "server.key"]).current_dir(&dir).status().unwrap().success());
    assert!(Command::new("chmod").args(["755", "."]).current_dir(&dir).status().unwrap().success());
    dir
}

fn ssl_cluster(certs: &Path) -> pg::Cluster {
    pg::Cluster::start_with(&format!(
        "-c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
        certs.join("server.pem").display(),
        certs.join("server.key").display()
    ))
}

#[tokio::test]
async fn sslmode_require_verifies_the_server_certificate() {
    let certs = certificates();
    let cluster = ssl_cluster(&certs);
    pg::connect(&cluster.url("postgres")).await.batch_execute("CREATE DATABASE app").await.unwrap();
    pg::connect(&cluster.url("app")).await.batch_execute(&format!("{BASE_SQL}\n{DEMO_SQL}")).await.unwrap();
    let url = format!("{}?sslmode=require", cluster.url("app"));

    let trusted =
        config_file("tls_trusted", &format!("[tls]\nca_file = {:?}\n", certs.join("ca.pem").display().to_string()));
    let out = cli(
        &["scan", "--config", trusted.to_str().unwrap(), "--format", "json"],
        &[("TENANT_AUDIT_DATABASE_URL", &url)],
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["summary"]["orphan_rows"]["count"], 7);

    let untrusted = config_file("tls_untrusted", "");
    let out = cli(&["scan", "--config", untrusted.to_str().unwrap()], &[("TENANT_AUDIT_DATABASE_URL", &url)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "tenant-audit: error: cannot connect to database 127.0.0.1:{}/app: error performing TLS handshake",
            cluster.port
        )),
        "{err}"
    );
    assert!(err.contains("UnknownIssuer"), "{err}");

    // The daemon's pooled sessions really are encrypted.
    let text = format!(
        "database_url = {url:?}\n[tls]\nca_file = {:?}\n[serve]\nschedule = '0 0 0 1 1 *'\n",
        certs.join("ca.pem").display().to_string()
    );
    let config = tenant_audit::config::Config::from_toml(&text, Path::new("tls.toml"), Default::default()).unwrap();
    let daemon = start_daemon(config).await;
    daemon.wait_for("tenant_audit_scans_total{result=\"success\"} 1").await;
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

#[test]
fn a_bad_ca_file_is_a_config_error() {
    let path = config_file("tls_bad_ca", "database_url = 'postgres://h/d'\n[tls]\nca_file = 'missing.pem'\n");
    let out = cli(&["scan", "--config", path.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.starts_with("tenant-audit: error: config key tls.ca_file: cannot read "), "{err}");
}
