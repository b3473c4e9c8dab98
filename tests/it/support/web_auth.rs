//! A web config file with one basic-auth user, for daemons whose `POST /scan` may heal (a write
//! over HTTP needs an authenticated caller: `web.scan_requests.heal` is refused without one).

use std::path::PathBuf;

use super::RunningDaemon;

const USER: &str = "alice";
const PASSWORD: &str = "wonderland";

/// `[web]` TOML for a daemon: a web config file (in a directory named after `name`) with the
/// user, `/metrics` left open (the tests read it without credentials).
pub fn web_section(name: &str) -> String {
    let dir: PathBuf = std::env::temp_dir().join(format!("tenant-audit-it-{}-{name}-web", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("web.yml");
    std::fs::write(&path, format!("basic_auth_users:\n  {USER}: {}\n", bcrypt::hash(PASSWORD, 4).unwrap())).unwrap();
    format!("[web]\nconfig_file = {:?}\nmetrics_auth = false\n", path.to_str().unwrap())
}

/// `POST path` with the user's credentials: the status.
pub async fn post(daemon: &RunningDaemon, path: &str) -> u16 {
    let url = format!("{}{path}", daemon.base);
    reqwest::Client::new().post(url).basic_auth(USER, Some(PASSWORD)).send().await.unwrap().status().as_u16()
}
