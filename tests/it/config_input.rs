//! Bad input never panics: malformed configuration values and log filters are one-line errors
//! naming the key (exit 2), and hostile identifiers are escaped in table output.

use crate::support::{cli, config_file, fixture_db};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn malformed_values_are_one_line_errors_naming_the_key() {
    let cases = [
        (
            "concurrency",
            "[scan]\nconcurrency = 4611686018427387904\n",
            "tenant-audit: error: config key scan.concurrency: 4611686018427387904 is out of range: must be between 1 and 256\n",
        ),
        (
            "lock_timeout",
            "[scan]\nlock_timeout = '500us'\n",
            "tenant-audit: error: config key scan.lock_timeout: \"500us\" is below 1ms (PostgreSQL would disable the timeout)\n",
        ),
        (
            "statement_timeout",
            "[scan]\nstatement_timeout = '30d'\n",
            "tenant-audit: error: config key scan.statement_timeout: \"30d\" is longer than the 24h maximum\n",
        ),
        (
            "heal_batch",
            "[heal]\nbatch_size = 18446744073\n",
            "tenant-audit: error: config key heal.batch_size: 18446744073 is out of range: must be between 1 and 100000\n",
        ),
        (
            "sample_keys",
            "[report]\nsample_keys = -3\n",
            "tenant-audit: error: config key report.sample_keys: -3 is out of range: must be between 0 and 1000\n",
        ),
    ];
    for (name, text, expected) in cases {
        let path = config_file(&format!("input_{name}"), &format!("database_url = 'postgres://h/d'\n{text}"));
        let out = cli(&["scan", "--config", path.to_str().unwrap()], &[]);
        assert_eq!(out.status.code(), Some(2), "{name}: {}", stderr(&out));
        assert_eq!(stderr(&out), expected, "{name}");
    }
    // The cron parser's own message spans lines; ours is one.
    let path = config_file("input_cron", "database_url = 'postgres://h/d'\n[serve]\nschedule = '0 0 25 * * * *'\n");
    let out = cli(&["serve", "--config", path.to_str().unwrap()], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("tenant-audit: error: config key serve.schedule: invalid cron expression \"0 0 25 * * * *\": "),
        "{err}"
    );
}

#[test]
fn an_invalid_log_filter_is_an_error() {
    let path = config_file("input_filter", "database_url = 'postgres://h/d'\n");
    for args in [vec!["--log-filter", "tenant_audit=loud"], vec!["--log-filter", "[{"]] {
        let mut argv = args.clone();
        argv.extend(["scan", "--config", path.to_str().unwrap()]);
        let out = cli(&argv, &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with(&format!(
                "tenant-audit: error: invalid log filter {:?} (--log-filter or RUST_LOG): ",
                args[1]
            )),
            "{err}"
        );
    }
    let out = cli(&["scan", "--config", path.to_str().unwrap()], &[("RUST_LOG", "tenant_audit=loud")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[tokio::test]
async fn hostile_identifiers_are_escaped_in_table_output() {
    let sql = "
        CREATE SCHEMA \"tenant_\x1b[2J\x1b]0;owned\x07\";
        CREATE TABLE \"tenant_\x1b[2J\x1b]0;owned\x07\".\"evil\u{202e}txt.exe\" (id int PRIMARY KEY, created_at timestamptz);
        INSERT INTO \"tenant_\x1b[2J\x1b]0;owned\x07\".\"evil\u{202e}txt.exe\" VALUES (1, NULL);";
    let url = fixture_db("input_hostile", sql).await;
    let path = config_file(
        "input_hostile",
        &format!("database_url = {url:?}\n[tenants]\nregistry = false\ninclude = ['^tenant_']\n"),
    );
    let out = cli(&["scan", "--config", path.to_str().unwrap(), "--format", "table"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(!table.chars().any(|c| c.is_control() && c != '\n' || c == '\u{202e}'), "{table:?}");
    assert!(
        table.contains(
            "  \"tenant_\\u{1b}[2J\\u{1b}]0;owned\\u{7}\".\"evil\\u{202e}txt.exe\" (created_at): 1 NULL value(s)"
        ),
        "{table}"
    );
}
