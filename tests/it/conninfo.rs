//! libpq connection strings end to end: several hosts with `target_session_attrs` against a
//! primary and its standby (and a host where nothing listens), and `PG*` environment
//! variables as defaults where the string is silent.

use std::time::{Duration, Instant};

use tokio_postgres::SimpleQueryMessage;

use crate::support::{cli, config, config_file, pg, BASE_SQL, DEMO_SQL};

/// A primary with database `app` (the demo) and a standby that has replayed it.
async fn primary_and_standby() -> (pg::Cluster, pg::Cluster) {
    let primary = pg::Cluster::start();
    pg::connect(&primary.url("postgres")).await.batch_execute("CREATE DATABASE app").await.unwrap();
    pg::connect(&primary.url("app")).await.batch_execute(&format!("{BASE_SQL}\n{DEMO_SQL}")).await.unwrap();
    let standby = primary.standby();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((client, conn)) = tokio_postgres::connect(&standby.url("app"), tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            let replayed = "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_zz9'";
            if client.query_one(replayed, &[]).await.map(|r| r.get::<_, i64>(0)).unwrap_or(0) == 1 {
                return (primary, standby);
            }
        }
        assert!(Instant::now() < deadline, "the standby never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens one session for `url` the way the pools do; `Ok(port of the server it reached)`.
async fn reached(url: &str) -> Result<String, String> {
    let cfg = config(url, "");
    let session = tenant_audit::db::connect(&cfg.database, Duration::from_secs(5)).await.map_err(|e| e.to_string())?;
    let messages = session.simple_query("SELECT current_setting('port')").await.unwrap();
    Ok(messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap())
}

#[tokio::test]
async fn several_hosts_with_target_session_attrs() {
    let (primary, standby) = primary_and_standby().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (p, s) = (primary.port.to_string(), standby.port.to_string());
    let url = |hosts: &[&str], attrs: &str| {
        let list: Vec<String> = hosts.iter().map(|port| format!("127.0.0.1:{port}")).collect();
        format!("postgres://postgres@{}/app?sslmode=disable&target_session_attrs={attrs}", list.join(","))
    };
    let dead = dead.to_string();
    let all = [dead.as_str(), s.as_str(), p.as_str()];
    // The host where nothing listens is skipped; then each attribute picks its server.
    for (attrs, expected) in
        [("any", &s), ("read-write", &p), ("primary", &p), ("read-only", &s), ("standby", &s), ("prefer-standby", &s)]
    {
        assert_eq!(reached(&url(&all, attrs)).await.as_ref(), Ok(expected), "{attrs}");
    }
    assert_eq!(reached(&url(&[&p], "prefer-standby")).await, Ok(p.clone()), "no standby: any will do");
    // Key/value form, the same hosts.
    let kv = format!(
        "host=127.0.0.1,127.0.0.1 port={s},{p} user=postgres dbname=app sslmode=disable target_session_attrs=primary"
    );
    assert_eq!(reached(&kv).await, Ok(p.clone()));

    let err = reached(&url(&[&dead, &p], "standby")).await.unwrap_err();
    assert_eq!(
        err,
        format!(
            "cannot connect to database 127.0.0.1:{dead}/app: 127.0.0.1:{dead}: error connecting to server: Connection \
             refused (os error 111); 127.0.0.1:{p}: server is not in hot standby mode (target_session_attrs)"
        )
    );
}

#[tokio::test]
async fn libpq_environment_variables_fill_what_the_string_leaves_out() {
    let (primary, _standby) = primary_and_standby().await;
    let port = primary.port.to_string();
    let path = config_file("pg_env", "");
    let scan = |url: &str, env: &[(&str, &str)]| {
        let mut vars = vec![("TENANT_AUDIT_DATABASE_URL", url)];
        vars.extend_from_slice(env);
        let out = cli(&["scan", "--config", path.to_str().unwrap()], &vars);
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // Port, user, database and sslmode from the environment.
    let env = [("PGPORT", port.as_str()), ("PGUSER", "postgres"), ("PGDATABASE", "app"), ("PGSSLMODE", "disable")];
    assert_eq!(scan("host=127.0.0.1", &env), (Some(0), String::new()));
    // The string wins over the environment.
    let (code, err) =
        scan(&format!("postgres://postgres@127.0.0.1:{port}/app?sslmode=disable"), &[("PGSSLMODE", "verify-full")]);
    assert_eq!((code, err.as_str()), (Some(0), ""));
    // Where it is silent, the environment's sslmode holds, with libpq's rules.
    let (code, err) = scan(&format!("postgres://postgres@127.0.0.1:{port}/app"), &[("PGSSLMODE", "verify-full")]);
    assert_eq!(code, Some(2));
    assert_eq!(
        err,
        "tenant-audit: error: config key TENANT_AUDIT_DATABASE_URL: invalid connection string: parameter sslrootcert: \
         sslmode verify-full needs a root certificate: set sslrootcert to a PEM file or to system\n"
    );
}
