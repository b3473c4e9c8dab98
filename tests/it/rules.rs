//! The alert rules (dashboards/alerts.yml): promtool's check and unit tests, a unit test per
//! alert where it fires and one where it does not, and each alert's labels, annotations and
//! runbook section.

use std::process::Command;

use crate::tools::{repo, run_ok, tool};

/// One rule of dashboards/alerts.yml, read line by line (the file keeps one key per line).
pub struct Alert {
    pub name: String,
    /// The rule's lines, from `- alert:` to the next rule.
    pub lines: Vec<String>,
}

/// The alerting rules of dashboards/alerts.yml, in file order.
pub fn alerts() -> Vec<Alert> {
    let text = std::fs::read_to_string(repo().join("dashboards/alerts.yml")).unwrap();
    let mut alerts: Vec<Alert> = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- alert: ") {
            alerts.push(Alert { name: name.to_string(), lines: Vec::new() });
        } else if let Some(alert) = alerts.last_mut() {
            alert.lines.push(line.to_string());
        }
    }
    alerts
}

impl Alert {
    /// The value of `key: value` in this rule, if it has that line.
    fn value(&self, key: &str) -> Option<&str> {
        self.lines.iter().find_map(|l| l.strip_prefix(key)?.strip_prefix(": "))
    }
}

#[test]
fn promtool_checks_the_rules() {
    let out =
        run_ok(Command::new(tool("promtool")).args(["check", "rules", "dashboards/alerts.yml"]).current_dir(repo()));
    assert!(out.contains(&format!("SUCCESS: {} rules found", alerts().len())), "{out}");
}

#[test]
fn promtool_unit_tests_pass() {
    run_ok(Command::new(tool("promtool")).args(["test", "rules", "dashboards/alerts_test.yml"]).current_dir(repo()));
}

#[test]
fn every_alert_is_unit_tested_firing_and_not_firing() {
    // (alertname, fires) for each `alert_rule_test` evaluation.
    let text = std::fs::read_to_string(repo().join("dashboards/alerts_test.yml")).unwrap();
    let mut cases = Vec::new();
    let mut current = None;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- alertname: ") {
            current = Some(name.to_string());
        } else if let Some(rest) = line.strip_prefix("exp_alerts:") {
            cases.push((current.take().expect("exp_alerts follows an alertname"), rest.trim() != "[]"));
        }
    }
    let names: Vec<String> = alerts().into_iter().map(|a| a.name).collect();
    for name in &names {
        for fires in [true, false] {
            assert!(cases.contains(&(name.clone(), fires)), "alerts_test.yml has no case where {name} fires={fires}");
        }
    }
    for (name, _) in &cases {
        assert!(names.contains(name), "alerts_test.yml tests {name}, which alerts.yml does not define");
    }
}

#[test]
fn every_alert_has_severity_annotations_and_a_runbook_section() {
    let runbook = std::fs::read_to_string(repo().join("docs/runbook.md")).unwrap();
    let alerts = alerts();
    assert!(alerts.len() >= 10, "only {} alerts found", alerts.len());
    for alert in &alerts {
        let name = &alert.name;
        assert!(
            name.starts_with("TenantAudit") && name.chars().all(|c| c.is_ascii_alphanumeric()),
            "{name} is not CamelCase with the TenantAudit prefix"
        );
        assert!(alert.value("expr").is_some(), "{name} has no one-line expr");
        assert!(matches!(alert.value("severity"), Some("critical" | "warning")), "{name}: severity");
        for key in ["summary", "description"] {
            assert!(alert.value(key).is_some(), "{name} has no {key}");
        }
        let anchor = name.to_lowercase();
        assert_eq!(
            alert.value("runbook_url"),
            Some(format!("https://github.com/tenant-audit/tenant-audit/blob/main/docs/runbook.md#{anchor}").as_str()),
            "{name}: runbook_url"
        );
        assert!(runbook.lines().any(|l| l == format!("## {name}")), "docs/runbook.md has no section ## {name}");
    }
    for heading in runbook.lines().filter_map(|l| l.strip_prefix("## TenantAudit")) {
        assert!(
            alerts.iter().any(|a| a.name == format!("TenantAudit{heading}")),
            "runbook section for unknown alert {heading}"
        );
    }
}
