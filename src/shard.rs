//! Tenant sharding: which of `count` daemons scans (and heals) a tenant schema.
//!
//! A tenant belongs to the shard with the highest rendezvous weight for its schema name
//! (highest random weight hashing): growing from `n` to `n + 1` shards moves only the tenants
//! whose new shard now weighs most, about `1 / (n + 1)` of them, and every other tenant keeps
//! its shard.
//!
//! Invariant: the assignment is a pure function of the schema name's bytes and the shard
//! count, fixed across versions and platforms (it never uses std's `DefaultHasher`, whose
//! output may change between Rust releases). The weight of schema `s` on shard `i` is
//! `fmix64(fnv1a64(s) ^ fmix64(i + 1))`, where `fnv1a64` is 64-bit FNV-1a over the UTF-8 bytes
//! (offset basis `0xcbf29ce484222325`, prime `0x100000001b3`) and `fmix64` is MurmurHash3's
//! 64-bit finalizer; ties go to the lower index. The unit tests pin assignments: a change that
//! moves one is a breaking change of the sharding.

/// Which shard this process is, of how many (`[shard]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// `0..count`.
    pub index: u32,
    /// `1..=MAX_SHARDS`.
    pub count: u32,
}

/// The largest `shard.count`.
pub const MAX_SHARDS: u32 = 1024;

impl Shard {
    /// One shard: it owns every tenant and the database-wide findings.
    pub const SINGLE: Shard = Shard { index: 0, count: 1 };

    /// Whether this shard scans and heals tenant `schema`.
    pub fn owns(&self, schema: &str) -> bool {
        self.count <= 1 || owner(schema, self.count) == self.index
    }

    /// Whether this shard reports the database-wide findings (the registry's): shard 0 only, so
    /// that a sum over shards counts them once.
    pub fn reports_database_findings(&self) -> bool {
        self.index == 0
    }
}

/// The shard (of `count`, at least 1) that owns tenant `schema`.
pub fn owner(schema: &str, count: u32) -> u32 {
    let key = fnv1a64(schema.as_bytes());
    let mut best = (0u64, 0u32);
    for index in 0..count.max(1) {
        let w = weight(key, index);
        if index == 0 || w > best.0 {
            best = (w, index);
        }
    }
    best.1
}

/// The rendezvous weight of a schema (by its FNV-1a hash) on shard `index`.
fn weight(key: u64, index: u32) -> u64 {
    fmix64(key ^ fmix64(u64::from(index) + 1))
}

/// 64-bit FNV-1a.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// MurmurHash3's 64-bit finalizer: every input bit affects every output bit.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_the_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn assignments_are_pinned() {
        let names = ["tenant_a", "tenant_b", "tenant_c", "tenant_0001", "tenant_0002", "acme", "ünïcode"];
        let got: Vec<[u32; 4]> = names.iter().map(|n| [1, 2, 3, 4].map(|c| owner(n, c))).collect();
        assert_eq!(got, PINNED);
    }

    /// Owners of the names above with 1, 2, 3 and 4 shards.
    const PINNED: [[u32; 4]; 7] =
        [[0, 1, 1, 1], [0, 0, 2, 2], [0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]];

    #[test]
    fn growing_moves_tenants_only_to_the_new_shard() {
        let names: Vec<String> = (1..=300).map(|i| format!("tenant_{i:04}")).collect();
        let mut sizes = [0usize; 3];
        let mut moved = 0;
        for name in &names {
            let (before, after) = (owner(name, 3), owner(name, 4));
            sizes[before as usize] += 1;
            if before != after {
                assert_eq!(after, 3, "{name} moved between old shards");
                moved += 1;
            }
        }
        assert_eq!(sizes, [104, 97, 99]);
        assert_eq!(moved, 76, "about a quarter");
    }

    #[test]
    fn a_single_shard_owns_everything() {
        assert!(Shard::SINGLE.owns("anything"));
        assert!(Shard::SINGLE.reports_database_findings());
        let second = Shard { index: 1, count: 2 };
        assert!(!second.reports_database_findings());
        assert_eq!(second.owns("tenant_a"), owner("tenant_a", 2) == 1);
    }
}
