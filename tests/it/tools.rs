//! External tools of the dashboard, alert and chart tests (prometheus, promtool, helm,
//! kubernetes-validate): found on PATH or in `target/tools/bin`, where scripts/test installs
//! them; a missing one fails the test with how to get it, it never skips it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The path of tool `name`; panics, telling to run scripts/test, when it is not installed.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([repo().join("target/tools/bin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed: run scripts/test, which installs it (scripts/lib/deps.sh)"))
}

/// Runs `cmd` and returns its stdout; panics with stdout and stderr when it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A fresh, empty directory for `name` under the system temp dir (removed by the caller).
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tenant-audit-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The names `tenant_audit_*` that `text` mentions, sorted and deduplicated.
pub fn metric_names(text: &str) -> Vec<String> {
    let re = regex::Regex::new(r"tenant_audit_[a-z_]+").unwrap();
    let mut names: Vec<String> = re.find_iter(text).map(|m| m.as_str().to_string()).collect();
    names.sort();
    names.dedup();
    names
}
