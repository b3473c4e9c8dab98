//! The per-table work unit of the data checks: every check that reads one table, run as ONE
//! statement.
//!
//! A [`TableWork`] is plain data planned from the catalog. Its count statement reads the table
//! once per check (each relationship's anti-join with its parents, one pass counting every
//! required timestamp column's NULLs, and each sequence-backed column's `max()` with its
//! sequence's state), a cross join of one-row aggregates, so a relationship's child and parent
//! rows come from one snapshot, and a session running it holds locks (`AccessShareLock`) on
//! exactly the relations of that statement: the table, its parents, their indexes and the
//! table's own sequences (an inheritance parent's probes, like its other checks, read it
//! `ONLY`: no child is read or locked). Samples are a second, bounded statement (see
//! [`crate::sql::sample_select`]), run only for nonzero orphan or NULL counts. Which tables to
//! run is the caller's choice, one unit at a time; the caller may also run a unit's items apart
//! (see [`TableWork::unfolded`]) to attribute an error to the check that caused it.

use super::{null_timestamps, orphan_rows, sequence_behind};
use crate::report::Finding;

/// The data checks of one table of one tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct TableWork {
    pub table: String,
    /// The table as statements name it: `ONLY "tenant"."table"`, without `ONLY` when
    /// partitioned.
    pub relation: String,
    /// The relationships whose child is this table.
    pub orphans: Vec<orphan_rows::Probe>,
    /// Its required nullable timestamp columns, if any.
    pub nulls: Option<null_timestamps::Probe>,
    /// Its columns drawing from a sequence of the tenant: one part of the count statement each
    /// (the sequence's state and the column's maximum, an index lookup).
    pub sequences: Vec<sequence_behind::Probe>,
}

/// One check of a [`TableWork`]: a relationship (by index), the NULL count pass or a
/// sequence-backed column (by index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    Orphans(usize),
    Nulls,
    Sequence(usize),
}

impl TableWork {
    /// Every check of the unit, in the order of its count columns.
    pub fn items(&self) -> Vec<Item> {
        let mut items: Vec<Item> = (0..self.orphans.len()).map(Item::Orphans).collect();
        if self.nulls.is_some() {
            items.push(Item::Nulls);
        }
        items.extend((0..self.sequences.len()).map(Item::Sequence));
        items
    }

    /// `items` as the statements they were before the sequence probes were folded into the
    /// count statement: the relationships and the NULL pass together, then each sequence probe
    /// alone. An error of one of these is attributed as it would be on its own.
    pub fn unfolded(items: &[Item]) -> Vec<Vec<Item>> {
        let (sequences, counts): (Vec<Item>, Vec<Item>) =
            items.iter().partition(|item| matches!(item, Item::Sequence(_)));
        let counts = (!counts.is_empty()).then_some(counts);
        counts.into_iter().chain(sequences.into_iter().map(|item| vec![item])).collect()
    }

    /// Whether any check is left in the unit.
    pub fn has_checks(&self) -> bool {
        !self.orphans.is_empty() || self.nulls.is_some() || !self.sequences.is_empty()
    }

    /// The schemas and tables the unit's statements read: the table and its parents.
    pub fn relations<'a>(&'a self, tenant: &'a str) -> Vec<(&'a str, &'a str)> {
        let mut out = vec![(tenant, self.table.as_str())];
        for p in &self.orphans {
            out.push((p.parent_schema.as_str(), p.parent_table.as_str()));
            if let Some(shared) = &p.shared_parent {
                out.push((shared.as_str(), p.parent_table.as_str()));
            }
        }
        out
    }

    /// One statement counting `items` of the table of `tenant`: a single row, the values of each
    /// item in order (a cross join of one-row aggregates; a sequence probe that finds nothing
    /// yields NULLs, never no row).
    pub fn count_sql(&self, tenant: &str, items: &[Item]) -> String {
        let parts: Vec<String> = items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| {
                let select = match item {
                    Item::Orphans(k) => self.orphans.get(*k)?.count_select(&self.relation),
                    Item::Nulls => self.nulls.as_ref()?.count_select(&self.relation),
                    Item::Sequence(k) => self.sequences.get(*k)?.select(tenant, &self.relation),
                };
                Some(format!("({select}) r{i}"))
            })
            .collect();
        format!("SELECT * FROM {}", parts.join("\nCROSS JOIN "))
    }

    /// The findings of `items` from the row of [`TableWork::count_sql`]. A count that is NULL or
    /// does not parse is 0.
    pub fn findings(&self, tenant: &str, items: &[Item], row: &[Option<String>]) -> Vec<Finding> {
        let mut out = Vec::new();
        let mut at = 0;
        let mut take = |n: usize| {
            let end = (at + n).min(row.len());
            let values = &row[at.min(end)..end];
            at += n;
            values
        };
        let counts = |values: &[Option<String>]| -> Vec<u64> {
            values.iter().map(|v| v.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0)).collect()
        };
        for item in items {
            match item {
                Item::Orphans(k) => {
                    let Some(probe) = self.orphans.get(*k) else { continue };
                    out.extend(probe.findings(tenant, &counts(take(orphan_rows::Probe::COUNTS))));
                }
                Item::Nulls => {
                    let Some(probe) = &self.nulls else { continue };
                    out.extend(probe.findings(tenant, &counts(take(probe.columns.len()))));
                }
                Item::Sequence(k) => {
                    let Some(probe) = self.sequences.get(*k) else { continue };
                    out.extend(probe.findings(tenant, take(sequence_behind::Probe::COLUMNS)));
                }
            }
        }
        out
    }

    /// One bounded statement with a sample column (a JSON array of keys) per finding of
    /// `findings`, or `None` when samples are off or no finding has samples (`sequence_behind`
    /// has none: a table whose only finding it is costs no sample statement).
    pub fn sample_sql(&self, findings: &[Finding], limit: usize) -> Option<String> {
        if limit == 0 {
            return None;
        }
        let selects: Vec<Option<String>> = findings.iter().map(|f| self.sample_select(f, limit)).collect();
        if selects.iter().all(Option::is_none) {
            return None;
        }
        let columns: Vec<String> = selects
            .into_iter()
            .map(|select| select.map_or_else(|| "NULL".to_string(), |select| format!("({select})")))
            .collect();
        Some(format!("SELECT {}", columns.join(",\n       ")))
    }

    fn sample_select(&self, f: &Finding, limit: usize) -> Option<String> {
        let orphan = self.orphans.iter().find_map(|p| p.location_of(f).map(|l| (p, l)));
        if let Some((probe, location)) = orphan {
            return Some(probe.sample_select(&self.relation, location, limit));
        }
        let column = f.columns.first()?;
        let nulls = self.nulls.as_ref()?;
        nulls.columns.iter().any(|(c, _)| c == column).then(|| nulls.sample_select(&self.relation, column, limit))
    }
}

/// Fills each finding's samples from the row of [`TableWork::sample_sql`] (one JSON array per
/// finding). Orphan samples keep each key once.
pub fn attach_samples(findings: &mut [Finding], row: &[Option<String>]) {
    for (f, json) in findings.iter_mut().zip(row) {
        let keys: Vec<String> = json.as_deref().and_then(|j| serde_json::from_str(j).ok()).unwrap_or_default();
        f.sample_keys = keys;
        if matches!(&f.detail, crate::report::Detail::OrphanRows { .. }) {
            f.sample_keys.dedup();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{ParentLocation, RelationshipSource};

    fn locations(findings: &[Finding]) -> Vec<Option<ParentLocation>> {
        findings
            .iter()
            .map(|f| match &f.detail {
                crate::report::Detail::OrphanRows { parent_location, .. } => Some(*parent_location),
                _ => None,
            })
            .collect()
    }

    fn work() -> TableWork {
        let orphan = orphan_rows::Probe {
            table: "child".into(),
            columns: vec!["parent_id".into()],
            parent_schema: "t".into(),
            parent_table: "parent".into(),
            parent_columns: vec!["id".into()],
            shared_parent: None,
            source: RelationshipSource::Constraint,
            constraint: Some("fk".into()),
            constraint_validated: Some(true),
            match_full: false,
            equality: vec![],
            collations: vec![None],
            parent_relation: "ONLY \"t\".\"parent\"".into(),
            shared_relation: None,
            same_entity: false,
        };
        let nulls = null_timestamps::Probe {
            table: "child".into(),
            columns: vec![("created_at".into(), "date".into())],
            key: vec!["id".into()],
        };
        TableWork {
            table: "child".into(),
            relation: "ONLY \"t\".\"child\"".into(),
            orphans: vec![orphan],
            nulls: Some(nulls),
            sequences: vec![],
        }
    }

    #[test]
    fn one_statement_counts_every_check_of_the_table() {
        let w = work();
        let items = w.items();
        assert_eq!(items, [Item::Orphans(0), Item::Nulls]);
        assert_eq!(
            w.count_sql("t", &items),
            "SELECT * FROM (SELECT count(*) FILTER (WHERE o.in_shared), count(*) FILTER (WHERE NOT o.in_shared) \
             FROM (SELECT false AS in_shared FROM ONLY \"t\".\"child\" c WHERE c.\"parent_id\" IS NOT NULL AND NOT EXISTS \
             (SELECT 1 FROM ONLY \"t\".\"parent\" p WHERE p.\"id\" OPERATOR(\"pg_catalog\".=) c.\"parent_id\")) o) r0\n\
             CROSS JOIN (SELECT count(*) FILTER (WHERE c.\"created_at\" IS NULL) FROM ONLY \"t\".\"child\" c) r1"
        );
        let row = [Some("0".into()), Some("4".into()), Some("2".into())];
        let findings = w.findings("t", &items, &row);
        assert_eq!(findings.iter().map(|f| f.count).collect::<Vec<_>>(), [4, 2]);
        assert_eq!(locations(&findings), [Some(ParentLocation::Missing), None]);
        let mut findings = findings;
        let sql = w.sample_sql(&findings, 3).unwrap();
        assert!(
            sql.starts_with(
                "SELECT (SELECT pg_catalog.json_agg(s.k ORDER BY s.o0) FROM (SELECT c.\"parent_id\"::text AS k"
            ),
            "{sql}"
        );
        attach_samples(&mut findings, &[Some("[\"7\", \"7\", \"9\"]".into()), Some("[\"1\"]".into())]);
        assert_eq!(findings[0].sample_keys, ["7", "9"]);
        assert_eq!(findings[1].sample_keys, ["1"]);
    }

    #[test]
    fn sequence_probes_are_columns_of_the_same_statement() {
        let mut w = work();
        let probe = |column: &str| sequence_behind::Probe {
            table: "child".into(),
            column: column.into(),
            sequence: format!("child_{column}_seq"),
        };
        w.sequences = vec![probe("id"), probe("no")];
        let items = w.items();
        assert_eq!(items, [Item::Orphans(0), Item::Nulls, Item::Sequence(0), Item::Sequence(1)]);
        let sql = w.count_sql("t", &items);
        // One more one-row aggregate per probe: a probe that finds nothing keeps the row.
        let parts: Vec<&str> = sql.split("\nCROSS JOIN ").collect();
        assert_eq!(parts.len(), 4, "{sql}");
        assert_eq!(parts[2], format!("({}) r2", w.sequences[0].select("t", &w.relation)));
        assert_eq!(parts[3], format!("({}) r3", w.sequences[1].select("t", &w.relation)));
        let row: Vec<Option<String>> =
            [Some("0"), Some("4"), Some("2"), None, None, Some("4"), Some("10")].map(|v| v.map(str::to_string)).into();
        let findings = w.findings("t", &items, &row);
        assert_eq!(findings.iter().map(|f| f.count).collect::<Vec<_>>(), [4, 2, 7]);
        assert_eq!(
            findings[2].detail,
            crate::report::Detail::SequenceBehind { sequence: "t.child_no_seq".into(), next_value: 4, column_max: 10 }
        );
        // A sequence finding has no samples: alone, it needs no sample statement.
        assert_eq!(w.sample_sql(&findings[2..], 3), None);
        assert!(w.sample_sql(&findings, 3).unwrap().ends_with(",\n       NULL"));
        // Run apart, the statements are those before folding: the counts, then each probe.
        assert_eq!(
            TableWork::unfolded(&items),
            [vec![Item::Orphans(0), Item::Nulls], vec![Item::Sequence(0)], vec![Item::Sequence(1)]]
        );
        assert_eq!(TableWork::unfolded(&items[2..]), [vec![Item::Sequence(0)], vec![Item::Sequence(1)]]);
        assert_eq!(TableWork::unfolded(&items[..2]), [vec![Item::Orphans(0), Item::Nulls]]);
    }
}
