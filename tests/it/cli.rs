//! The command line: output formats, exit codes and the one-line errors of bad input.

use crate::support::{cli, config_file, fixture_db, pg, DEMO_SQL};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn json_report_and_exit_codes() {
    let url = fixture_db("cli_json", DEMO_SQL).await;
    let path = config_file("json", "[tenants]\ninclude = ['^tenant_']\n");
    let path = path.to_str().unwrap();
    let env = [("TENANT_AUDIT_DATABASE_URL", url.as_str())];

    let out = cli(&["scan", "--config", path, "--format", "json", "--fail-on-findings"], &env);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["version"], 1);
    assert_eq!(report["tenants"], serde_json::json!({"discovered": 7, "scanned": 7, "failed": 0}));
    assert_eq!(report["summary"]["orphan_rows"], serde_json::json!({"findings": 5, "count": 7, "schemas": 4}));
    assert_eq!(
        report["findings"][1],
        serde_json::json!({
            "check": "orphan_rows",
            "severity": "critical",
            "schema": "tenant_c3",
            "table": "users_userprofile",
            "columns": ["business_id"],
            "count": 2,
            "sample_keys": ["b0000000-0000-0000-0000-000000000002", "b0000000-0000-0000-0000-000000000003"],
            "detail": {
                "parent_schema": "tenant_c3",
                "parent_table": "business_business",
                "parent_columns": ["id"],
                "parent_location": "shared",
                "relationship": "constraint",
                "constraint": "users_userprofile_business_id_fk",
                "constraint_validated": true,
                "heal_copy": "copy"
            }
        })
    );

    let out = cli(&["scan", "--config", path], &env);
    assert_eq!(out.status.code(), Some(0), "findings without --fail-on-findings exit 0");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("CROSS_SCHEMA_FK (critical): 1 findings"), "{table}");
}

#[tokio::test]
async fn clean_database_exits_zero_with_fail_on_findings() {
    let url = fixture_db("cli_clean", "SELECT pg_temp.create_tenant('tenant_a');").await;
    let path = config_file("clean", &format!("database_url = {url:?}\n"));
    let out = cli(&["scan", "--config", path.to_str().unwrap(), "--fail-on-findings"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("No findings.\nScanned 1 of 1 tenants"));
}

#[tokio::test]
async fn database_url_file_is_read_for_mounted_secrets() {
    let url = fixture_db("cli_url_file", "SELECT pg_temp.create_tenant('tenant_a');").await;
    let dir = config_file("url_file", "database_url_file = 'db-url'\n");
    std::fs::write(dir.parent().unwrap().join("db-url"), format!("{url}\n")).unwrap();
    let out = cli(&["scan", "--config", dir.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn bad_config_is_one_line_exit_2() {
    let cases = [
        (
            "unknown",
            "database_url = 'postgres://h/d'\n[scan]\nconcurency = 2\n",
            "tenant-audit: error: config file {path}, line 3: unknown field `concurency`",
        ),
        (
            "regex",
            "database_url = 'postgres://h/d'\n[tenants]\ninclude = ['tenant_(']\n",
            "tenant-audit: error: config key tenants.include[0]: invalid regex \"tenant_(\"",
        ),
        (
            "duration",
            "database_url = 'postgres://h/d'\n[scan]\nstatement_timeout = 'soon'\n",
            "tenant-audit: error: config key scan.statement_timeout: invalid duration \"soon\"",
        ),
    ];
    for (name, text, expected) in cases {
        let path = config_file(name, text);
        let out = cli(&["scan", "--config", path.to_str().unwrap()], &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
        let expected = expected.replace("{path}", &path.display().to_string());
        assert!(err.starts_with(&expected), "{name}: {err}");
    }
}

#[test]
fn unreachable_database_names_host_not_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let path = config_file("unreachable", "[tenants]\ninclude = ['.']\n");
    let url = format!("postgres://auditor:hunter2@127.0.0.1:{port}/app");
    let out = cli(&["scan", "--config", path.to_str().unwrap()], &[("TENANT_AUDIT_DATABASE_URL", &url)]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "tenant-audit: error: cannot connect to database 127.0.0.1:{port}/app: error connecting to server"
        )),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}

#[tokio::test]
async fn missing_privileges_are_one_line_exit_2() {
    let url = fixture_db("cli_privileges", "SELECT pg_temp.create_tenant('tenant_a');").await;
    let admin = pg::connect(&url).await;
    admin
        .batch_execute(
            "DROP ROLE IF EXISTS audit_no_tables; CREATE ROLE audit_no_tables LOGIN;
             DROP ROLE IF EXISTS audit_nothing; CREATE ROLE audit_nothing LOGIN;
             REVOKE ALL ON SCHEMA public FROM PUBLIC;
             GRANT USAGE ON SCHEMA public TO audit_no_tables;
             GRANT SELECT ON public.customers_client TO audit_no_tables;",
        )
        .await
        .unwrap();
    let path = config_file("privileges", "");
    let as_role = |role: &str| url.replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);

    let out = cli(
        &["scan", "--config", path.to_str().unwrap()],
        &[("TENANT_AUDIT_DATABASE_URL", &as_role("audit_no_tables"))],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(
        err,
        "tenant-audit: error: scan incomplete: 5 errors; first [permission] public.auth_user: permission denied: \
         the scanning role needs USAGE on the schema and SELECT on the table\n"
    );

    let out =
        cli(&["scan", "--config", path.to_str().unwrap()], &[("TENANT_AUDIT_DATABASE_URL", &as_role("audit_nothing"))]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(
        err,
        "tenant-audit: error: cannot read tenant registry public.customers_client: permission denied for schema public\n"
    );
}
