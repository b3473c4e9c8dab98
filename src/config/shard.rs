//! `[shard]`: which shard this process is. `shard.index` when set; with `count > 1` and no
//! index, the environment variable [`SHARD_INDEX_ENV`], else the trailing `-<n>` of the host
//! name (a StatefulSet's pod `tenant-audit-2` is shard 2).
//!
//! Invariant: the result is a valid [`Shard`] (`index < count <= MAX_SHARDS`) or an error
//! naming the key or variable.

use serde::Deserialize;

use super::ConfigError;
use crate::shard::{Shard, MAX_SHARDS};

/// Environment variable giving the shard index when `shard.index` is unset.
pub const SHARD_INDEX_ENV: &str = "TENANT_AUDIT_SHARD_INDEX";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShard {
    count: Option<i64>,
    index: Option<i64>,
}

impl RawShard {
    /// The shard, from the keys, then `env_index`, then `hostname`.
    pub(super) fn validate(&self, env_index: Option<&str>, hostname: Option<&str>) -> Result<Shard, ConfigError> {
        let count = match self.count {
            None => 1,
            Some(n) if (1..=i64::from(MAX_SHARDS)).contains(&n) => n as u32,
            Some(n) => {
                return Err(ConfigError::invalid(
                    "shard.count",
                    format!("{n} is out of range: must be between 1 and {MAX_SHARDS}"),
                ))
            }
        };
        let range = |key: &str, n: i64| match u32::try_from(n) {
            Ok(i) if i < count => Ok(i),
            _ => Err(ConfigError::invalid(key, format!("{n} is out of range: must be between 0 and {}", count - 1))),
        };
        let index = match (self.index, env_index, hostname.and_then(pod_ordinal)) {
            (Some(n), _, _) => range("shard.index", n)?,
            _ if count == 1 => 0,
            (None, Some(text), _) => {
                let n = text.trim().parse::<i64>().map_err(|_| {
                    ConfigError::invalid(SHARD_INDEX_ENV, format!("{text:?} is not a shard index (a whole number)"))
                })?;
                range(SHARD_INDEX_ENV, n)?
            }
            (None, None, Some(n)) => range("shard.index (from the host name)", n)?,
            (None, None, None) => {
                return Err(ConfigError::invalid(
                    "shard.index",
                    format!("not set with shard.count = {count}; set shard.index or {SHARD_INDEX_ENV}, or run on a host named like tenant-audit-0"),
                ))
            }
        };
        Ok(Shard { index, count })
    }
}

/// The `n` of a host name ending in `-<n>` (a StatefulSet pod's ordinal).
fn pod_ordinal(hostname: &str) -> Option<i64> {
    let (_, digits) = hostname.trim().rsplit_once('-')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(count: Option<i64>, index: Option<i64>, env: Option<&str>, host: Option<&str>) -> Result<Shard, String> {
        RawShard { count, index }.validate(env, host).map_err(|e| e.to_string())
    }

    #[test]
    fn index_comes_from_the_key_then_the_environment_then_the_host_name() {
        assert_eq!(shard(None, None, Some("7"), Some("x-9")), Ok(Shard::SINGLE));
        assert_eq!(shard(Some(3), Some(1), Some("2"), Some("x-0")), Ok(Shard { index: 1, count: 3 }));
        assert_eq!(shard(Some(3), None, Some(" 2\n"), Some("x-0")), Ok(Shard { index: 2, count: 3 }));
        assert_eq!(shard(Some(3), None, None, Some("tenant-audit-2")), Ok(Shard { index: 2, count: 3 }));
    }

    #[test]
    fn bad_values_name_their_source() {
        let cases = [
            (shard(Some(0), None, None, None), "config key shard.count: 0 is out of range: must be between 1 and 1024"),
            (shard(Some(3), Some(3), None, None), "config key shard.index: 3 is out of range: must be between 0 and 2"),
            (shard(Some(1), Some(-1), None, None), "config key shard.index: -1 is out of range: must be between 0 and 0"),
            (
                shard(Some(2), None, Some("one"), None),
                "config key TENANT_AUDIT_SHARD_INDEX: \"one\" is not a shard index (a whole number)",
            ),
            (
                shard(Some(2), None, Some("5"), None),
                "config key TENANT_AUDIT_SHARD_INDEX: 5 is out of range: must be between 0 and 1",
            ),
            (
                shard(Some(2), None, None, Some("tenant-audit-4")),
                "config key shard.index (from the host name): 4 is out of range: must be between 0 and 1",
            ),
            (
                shard(Some(2), None, None, Some("laptop")),
                "config key shard.index: not set with shard.count = 2; set shard.index or TENANT_AUDIT_SHARD_INDEX, or run on a host named like tenant-audit-0",
            ),
        ];
        for (got, expected) in cases {
            assert_eq!(got, Err(expected.to_string()));
        }
    }
}
