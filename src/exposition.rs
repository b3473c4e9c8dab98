//! The process's `/metrics`: the build info plus every target's [`Metrics`], merged into one
//! text exposition.
//!
//! Invariants: each metric name appears once (the families of all targets are merged, their
//! series told apart by the `database` label); the build info, a process-wide metric, has no
//! `database` label. Like [`Metrics`], nothing here queries a database.

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus::proto::MetricFamily;
use prometheus::{Encoder, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::metrics::Metrics;
use crate::shard::Shard;

/// What `/metrics` encodes.
pub struct Exposition {
    /// The process-wide metrics (`tenant_audit_build_info`).
    process: Registry,
    /// One per target, in configuration order.
    targets: Vec<Arc<Metrics>>,
}

impl Exposition {
    /// The exposition of `targets` for a process that is `shard`.
    pub fn new(shard: Shard, targets: Vec<Arc<Metrics>>) -> Exposition {
        let process = Registry::new();
        let labels = ["version", "shard", "shards"];
        let build =
            IntGaugeVec::new(Opts::new("tenant_audit_build_info", "Always 1; labels carry the build."), &labels)
                .expect("valid metric definition");
        process.register(Box::new(build.clone())).expect("metric registered once");
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), &shard.index.to_string(), &shard.count.to_string()])
            .set(1);
        Exposition { process, targets }
    }

    /// A number that moves whenever a metric of any target changed (the sum of their
    /// generations). Read it before [`Exposition::encode`].
    pub fn generation(&self) -> u64 {
        self.targets.iter().map(|m| m.generation()).fold(0, u64::wrapping_add)
    }

    /// The Prometheus text exposition of every metric of the process.
    pub fn encode(&self) -> String {
        let mut families: BTreeMap<String, MetricFamily> = BTreeMap::new();
        let gathered = self.targets.iter().flat_map(|m| m.gather()).chain(self.process.gather());
        for mut family in gathered {
            match families.get_mut(family.name()) {
                Some(merged) => merged.mut_metric().extend(family.take_metric()),
                None => {
                    families.insert(family.name().to_string(), family);
                }
            }
        }
        let families: Vec<MetricFamily> = families.into_values().collect();
        let mut out = Vec::new();
        TextEncoder::new().encode(&families, &mut out).expect("text encoding of gathered metrics");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_merge_into_one_family_per_name() {
        let (a, b) = (Arc::new(Metrics::new("a")), Arc::new(Metrics::new("b")));
        b.set_database_up(true);
        let exposition = Exposition::new(Shard { index: 1, count: 3 }, vec![a, b]);
        let text = exposition.encode();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("database_up") || l.contains("build_info")).collect();
        assert_eq!(
            lines,
            [
                "# HELP tenant_audit_build_info Always 1; labels carry the build.",
                "# TYPE tenant_audit_build_info gauge",
                &format!(
                    "tenant_audit_build_info{{shard=\"1\",shards=\"3\",version=\"{}\"}} 1",
                    env!("CARGO_PKG_VERSION")
                ),
                "# HELP tenant_audit_database_up 1 if the database answered the last attempt, else 0.",
                "# TYPE tenant_audit_database_up gauge",
                "tenant_audit_database_up{database=\"a\"} 0",
                "tenant_audit_database_up{database=\"b\"} 1",
            ]
        );
    }
}
