//! `[[targets]]`: several databases in one file. Each target's configuration is the top-level
//! one with the target's own keys laid over it, section by section and key by key, then
//! validated like a single-database file.
//!
//! Invariants: a target sets only `name`, `database_url(_file)`, `schedule` and the sections
//! `tenants`, `scan`, `checks`, `heal` and `database` (checked with line numbers by the typed
//! parse before this module runs); an error in a key the target set is named
//! `targets[i].<key>`, one in an inherited key by its top-level name.

use toml::{Table, Value};

use super::ConfigError;

/// The sections a target may override key by key.
pub(super) const SECTIONS: [&str; 5] = ["tenants", "scan", "checks", "heal", "database"];

/// The keys of the top level that belong to the whole file, not to one target.
const FILE_KEYS: [&str; 3] = ["targets", "shard", "name"];

/// Checks a target name: 1-63 characters of `[a-z0-9_-]`, starting with a letter or digit.
pub(super) fn check_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-';
    let starts_well = name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit());
    if name.is_empty() || name.len() > 63 || !starts_well || !name.chars().all(allowed) {
        return Err(ConfigError::invalid(
            key,
            format!("invalid name {name:?}: 1-63 characters of a-z, 0-9, _ and -, starting with a letter or digit"),
        ));
    }
    Ok(())
}

/// The merged table of target `index` of `file`: the top level without the file's own keys,
/// with the target's sections laid over it key by key, its URL keys at the top level and its
/// `schedule` as `serve.schedule`.
pub(super) fn merged(file: &Table, index: usize) -> Table {
    let mut out: Table = file.iter().filter(|(k, _)| !FILE_KEYS.contains(&k.as_str())).map(clone_entry).collect();
    let Some(target) = target_table(file, index) else { return out };
    for (key, value) in target {
        match key.as_str() {
            "name" => {}
            "schedule" => {
                section(&mut out, "serve").insert("schedule".into(), value.clone());
            }
            section_name if SECTIONS.contains(&section_name) => {
                if let Value::Table(keys) = value {
                    let merged = section(&mut out, section_name);
                    merged.extend(keys.iter().map(clone_entry));
                }
            }
            _ => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    out
}

/// An error of target `index`'s merged configuration, with its key renamed `targets[i].<key>`
/// when the target set that key itself.
pub(super) fn attribute(error: ConfigError, file: &Table, index: usize) -> ConfigError {
    let ConfigError::Invalid { key, message } = error else { return error };
    let set_by_target = target_table(file, index).is_some_and(|target| sets(target, &key));
    match set_by_target {
        true => ConfigError::Invalid { key: format!("targets[{index}].{}", target_key(&key)), message },
        false => ConfigError::Invalid { key, message },
    }
}

fn target_table(file: &Table, index: usize) -> Option<&Table> {
    file.get("targets")?.as_array()?.get(index)?.as_table()
}

fn clone_entry((k, v): (&String, &Value)) -> (String, Value) {
    (k.clone(), v.clone())
}

/// Section `name` of `table`, created when missing.
fn section<'t>(table: &'t mut Table, name: &str) -> &'t mut Table {
    let entry = table.entry(name.to_string()).or_insert_with(|| Value::Table(Table::new()));
    if !entry.is_table() {
        *entry = Value::Table(Table::new());
    }
    entry.as_table_mut().expect("made a table above")
}

/// The name a key of the merged configuration has inside a target.
fn target_key(key: &str) -> &str {
    if key == "serve.schedule" {
        "schedule"
    } else {
        key
    }
}

/// Whether `target` sets the (dotted, possibly indexed) key `key` of the merged configuration.
fn sets(target: &Table, key: &str) -> bool {
    let key = target_key(key);
    let mut table = target;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let name = part.split('[').next().unwrap_or(part);
        let Some(value) = table.get(name) else { return false };
        match (parts.peek(), value) {
            (None, _) => return true,
            (Some(_), Value::Table(inner)) => table = inner,
            (Some(_), _) => return true,
        }
    }
    // A key naming a whole section (`tenants`): set when the target has that section.
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Table {
        text.parse().unwrap()
    }

    #[test]
    fn targets_inherit_key_by_key() {
        let file = table(
            "[scan]\nconcurrency = 2\nlock_timeout = '3s'\n[serve]\nlisten = '127.0.0.1:1'\n\
             [[targets]]\nname = 'a'\ndatabase_url = 'postgres://a/x'\nschedule = '* * * * * *'\n\
             [targets.scan]\nconcurrency = 8\n",
        );
        let merged = merged(&file, 0);
        assert_eq!(
            merged,
            table(
                "database_url = 'postgres://a/x'\n[scan]\nconcurrency = 8\nlock_timeout = '3s'\n\
                 [serve]\nlisten = '127.0.0.1:1'\nschedule = '* * * * * *'\n"
            )
        );
    }

    #[test]
    fn errors_in_a_targets_own_keys_name_the_target() {
        let file = table("[[targets]]\nname = 'a'\nschedule = 'x'\n[targets.scan]\nconcurrency = 0\n");
        let renamed = |key: &str| match attribute(ConfigError::invalid(key, "bad"), &file, 0) {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("{other}"),
        };
        assert_eq!(renamed("scan.concurrency"), "targets[0].scan.concurrency");
        assert_eq!(renamed("serve.schedule"), "targets[0].schedule");
        assert_eq!(renamed("scan.lock_timeout"), "scan.lock_timeout");
        assert_eq!(renamed("database_url"), "database_url");
    }

    fn fleet(text: &str, env: super::super::Env) -> Result<super::super::Fleet, String> {
        super::super::Fleet::from_toml(text, std::path::Path::new("/etc/t.toml"), env).map_err(|e| e.to_string())
    }

    const TWO: &str = "[scan]\nconcurrency = 2\n[heal]\nbatch_size = 7\n\
        [[targets]]\nname = 'eu'\ndatabase_url = 'postgres://eu/app'\nschedule = '0 * * * * *'\n\
        [targets.scan]\nconcurrency = 8\n[targets.heal]\ndatabase_url = 'postgres://eu-primary/app'\n\
        [[targets]]\nname = 'us'\ndatabase_url = 'postgres://us/app'\n";

    #[test]
    fn a_fleet_file_validates_every_target() {
        let fleet = fleet(TWO, Default::default()).unwrap();
        let [eu, us] = &fleet.targets[..] else { panic!("two targets") };
        assert_eq!((eu.name.as_str(), us.name.as_str()), ("eu", "us"));
        assert_eq!((eu.database.target.as_str(), us.database.target.as_str()), ("eu:5432/app", "us:5432/app"));
        assert_eq!((eu.scan.concurrency, us.scan.concurrency), (8, 2));
        assert_eq!((eu.heal.batch_size, us.heal.batch_size), (7, 7), "inherited key by key");
        assert_eq!(
            (eu.heal.database.target.as_str(), us.heal.database.target.as_str()),
            ("eu-primary:5432/app", "us:5432/app")
        );
        assert_eq!(eu.serve.ready_max_age, std::time::Duration::from_secs(120), "twice its own schedule's interval");
        assert_eq!(us.serve.ready_max_age, std::time::Duration::from_secs(600));
        assert_eq!(fleet.clone().select(Some("us"), "--target").unwrap().name, "us");
        assert_eq!(
            fleet.clone().select(None, "--target").unwrap_err().to_string(),
            "config key --target: required: the config has 2 targets (eu, us)"
        );
        assert_eq!(
            fleet.select(Some("ap"), "--target").unwrap_err().to_string(),
            "config key --target: no target named \"ap\"; the targets are eu, us"
        );
    }

    #[test]
    fn fleet_errors_name_the_key() {
        let env_url = super::super::Env { database_url: Some("postgres://x/y".into()), ..Default::default() };
        assert_eq!(
            fleet(TWO, env_url).unwrap_err(),
            "config key TENANT_AUDIT_DATABASE_URL: not allowed with [[targets]]: give each target its own name and connection strings"
        );
        let cases = [
            (
                format!("database_url = 'postgres://a/b'\n{TWO}"),
                "config key database_url: not allowed with [[targets]]: give each target its own name and connection strings",
            ),
            (
                TWO.replace("name = 'us'", "name = 'eu'"),
                "config key targets[1].name: \"eu\" is used twice",
            ),
            (
                TWO.replace("name = 'us'", "name = 'US'"),
                "config key targets[1].name: invalid name \"US\": 1-63 characters of a-z, 0-9, _ and -, starting with a letter or digit",
            ),
            (
                TWO.replace("database_url = 'postgres://us/app'", ""),
                "config key targets[1].database_url: not set; set targets[1].database_url or targets[1].database_url_file",
            ),
            (
                TWO.replace("concurrency = 8", "concurrency = 0"),
                "config key targets[0].scan.concurrency: 0 is out of range: must be between 1 and 256",
            ),
            (
                TWO.replace("concurrency = 2", "concurrency = 0"),
                "config key scan.concurrency: 0 is out of range: must be between 1 and 256",
            ),
            (
                TWO.replace("'0 * * * * *'", "'never'"),
                "config key targets[0].schedule: invalid cron expression \"never\": never ^ The 'Seconds' field does not support using names. 'never' specified.",
            ),
            (
                TWO.replace("concurrency = 8", "concurency = 8"),
                "config file /etc/t.toml, line 10: unknown field `concurency`, expected one of `concurrency`, `statement_timeout`, `lock_timeout`, `connect_timeout`, `full_every`, `max_duration`",
            ),
            (
                TWO.replace("schedule =", "listen = '0.0.0.0:1'\nschedule ="),
                "config file /etc/t.toml, line 8: unknown field `listen`, expected one of `name`, `database_url`, `database_url_file`, `schedule`, `tenants`, `scan`, `checks`, `heal`, `database`",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(fleet(&text, Default::default()).unwrap_err(), expected, "{text}");
        }
    }

    #[test]
    fn names_are_checked() {
        for good in ["a", "0", "eu-west_1", &"x".repeat(63)] {
            check_name("targets[0].name", good).unwrap();
        }
        for bad in ["", "-a", "_a", "A", "a.b", "ä", &"x".repeat(64)] {
            assert!(check_name("targets[0].name", bad).is_err(), "{bad:?}");
        }
    }
}
