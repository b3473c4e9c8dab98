//! `orphan_rows`: child rows whose non-NULL key has no parent in the table the tenant should
//! use (its own table of that name if it has one, else the shared schema's), split by whether
//! the key exists in the shared schema (healable by copying) or nowhere.
//!
//! Relationships come, in this order of precedence, from the tenant's own foreign keys (even
//! `NOT VALID` ones, and valid ones, since replica-mode loads bypass them), from
//! `checks.relationships`, and from foreign keys other tenants or the reference declare on the
//! same table and columns. One anti-join per relationship counts both splits; samples are
//! fetched only when a count is nonzero.

use std::collections::BTreeSet;

use super::Context;
use crate::catalog::{Schema, TypeSchema};
use crate::config::SameEntityKey;
use crate::db::{self, DbError, Snapshot};
use crate::report::{Check, CopyVerdict, Detail, Finding, ParentLocation, RelationshipSource};
use crate::sql;

/// One relationship to check in one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub table: String,
    pub columns: Vec<String>,
    pub parent_schema: String,
    pub parent_table: String,
    pub parent_columns: Vec<String>,
    /// The shared schema's table of the parent's name, when the expected parent is the
    /// tenant's own table and the shared one exists: where a missing parent may be found.
    pub shared_parent: Option<String>,
    pub source: RelationshipSource,
    pub constraint: Option<String>,
    /// Whether the constraint is validated (`None` without a constraint): a `NOT VALID` one is
    /// how orphans of an otherwise enforced key got in.
    pub constraint_validated: Option<bool>,
    /// `MATCH FULL` semantics: a partly NULL key counts as an orphan.
    pub match_full: bool,
    /// Whether the parent key names the same entity in every schema (see [`same_entity`]).
    pub same_entity: bool,
}

/// Whether `table(columns)` of `schema` is a key that means the same row in every schema: every
/// column a built-in `uuid` (globally unique by construction), or the table listed in
/// `heal.same_entity_keys`. Serial and identity keys come from each schema's own sequence, so
/// the same number names unrelated rows.
pub fn same_entity(keys: &[SameEntityKey], schema: &Schema, table: &str, columns: &[String]) -> bool {
    let listed = keys.iter().any(|k| k.table == table && k.columns == columns);
    let uuid = schema.tables.get(table).is_some_and(|t| {
        columns
            .iter()
            .all(|c| t.column(c).is_some_and(|c| c.type_schema == TypeSchema::Catalog && c.data_type == "uuid"))
    });
    listed || uuid
}

/// A relationship before it is resolved against a tenant.
struct Candidate {
    table: String,
    columns: Vec<String>,
    parent_table: String,
    parent_columns: Vec<String>,
    /// The schema a constraint actually references, used when neither the tenant nor the
    /// shared schema has the parent table.
    declared_schema: Option<String>,
    source: RelationshipSource,
    constraint: Option<String>,
    constraint_validated: Option<bool>,
    match_full: bool,
}

pub fn plan(ctx: &Context<'_>, tenant: &str) -> Vec<Probe> {
    let schema = ctx.schema(tenant);
    let shared = ctx.catalog.schemas.get(ctx.shared_schema).cloned().unwrap_or_default();
    let mut seen = BTreeSet::new();
    candidates(ctx, &schema)
        .into_iter()
        .filter(|c| seen.insert((c.table.clone(), c.columns.clone())))
        .filter_map(|c| resolve(ctx, tenant, &schema, &shared, c))
        .collect()
}

fn candidates(ctx: &Context<'_>, schema: &Schema) -> Vec<Candidate> {
    let mut out = Vec::new();
    for (table, t) in &schema.tables {
        for fk in &t.foreign_keys {
            out.push(Candidate {
                table: table.clone(),
                columns: fk.columns.clone(),
                parent_table: fk.target_table.clone(),
                parent_columns: fk.target_columns.clone(),
                declared_schema: Some(fk.target_schema.clone()),
                source: RelationshipSource::Constraint,
                constraint: Some(fk.name.clone()),
                constraint_validated: Some(fk.validated),
                match_full: fk.match_full,
            });
        }
    }
    for r in &ctx.config.relationships {
        out.push(Candidate {
            table: r.table.clone(),
            columns: r.columns.clone(),
            parent_table: r.parent_table.clone(),
            parent_columns: r.parent_columns.clone(),
            declared_schema: None,
            source: RelationshipSource::Configured,
            constraint: None,
            constraint_validated: None,
            match_full: false,
        });
    }
    for ((table, columns), fk) in &ctx.reference.known_relationships {
        out.push(Candidate {
            table: table.clone(),
            columns: columns.clone(),
            parent_table: fk.table.clone(),
            parent_columns: fk.columns.clone(),
            declared_schema: None,
            source: RelationshipSource::Inferred,
            constraint: None,
            constraint_validated: None,
            match_full: false,
        });
    }
    out
}

fn resolve(ctx: &Context<'_>, tenant: &str, schema: &Schema, shared: &Schema, c: Candidate) -> Option<Probe> {
    let usable = |s: &Schema, table: &str, cols: &[String]| {
        s.tables.get(table).is_some_and(|t| t.readable && t.has_columns(cols))
    };
    if !usable(schema, &c.table, &c.columns) {
        return None;
    }
    let in_shared = usable(shared, &c.parent_table, &c.parent_columns);
    let (parent_schema, shared_parent) = if usable(schema, &c.parent_table, &c.parent_columns) {
        (tenant.to_string(), in_shared.then(|| ctx.shared_schema.to_string()))
    } else if in_shared {
        (ctx.shared_schema.to_string(), None)
    } else {
        let declared = c.declared_schema.filter(|s| !ctx.tenants.contains(s))?;
        let other = ctx.catalog.schemas.get(&declared)?;
        usable(other, &c.parent_table, &c.parent_columns).then_some(())?;
        (declared, None)
    };
    let key_schema = if in_shared { shared } else { schema };
    let same_entity = same_entity(ctx.same_entity_keys, key_schema, &c.parent_table, &c.parent_columns);
    Some(Probe {
        same_entity,
        table: c.table,
        columns: c.columns,
        parent_schema,
        parent_table: c.parent_table,
        parent_columns: c.parent_columns,
        shared_parent,
        source: c.source,
        constraint: c.constraint,
        constraint_validated: c.constraint_validated,
        match_full: c.match_full,
    })
}

impl Probe {
    /// Rows of `c` (the child) whose key has no row in the expected parent. With `MATCH SIMPLE`
    /// (the default) a key with a NULL part is not checked; with `MATCH FULL` only an all-NULL
    /// key is exempt, and a partly NULL one (which can match no parent) is an orphan.
    pub(crate) fn orphan_condition(&self) -> String {
        let not_null: Vec<String> = self.columns.iter().map(|c| format!("c.{} IS NOT NULL", sql::ident(c))).collect();
        let checked = if self.match_full { format!("({})", not_null.join(" OR ")) } else { not_null.join(" AND ") };
        format!(
            "{checked} AND NOT EXISTS (SELECT 1 FROM {} p WHERE {})",
            sql::qualified(&self.parent_schema, &self.parent_table),
            self.key_match()
        )
    }

    fn key_match(&self) -> String {
        sql::key_match("p", &self.parent_columns, "c", &self.columns)
    }

    /// Whether the orphan's key exists in the shared schema's table (`false` when there is none).
    pub(crate) fn in_shared(&self) -> String {
        match &self.shared_parent {
            Some(shared) => format!(
                "EXISTS (SELECT 1 FROM {} p WHERE {})",
                sql::qualified(shared, &self.parent_table),
                self.key_match()
            ),
            None => "false".to_string(),
        }
    }

    /// One anti-join over the child table, counting orphans by parent location.
    pub fn count_sql(&self, tenant: &str) -> String {
        format!(
            "SELECT count(*) FILTER (WHERE in_shared), count(*) FILTER (WHERE NOT in_shared)\n\
             FROM (SELECT {} AS in_shared FROM {} c WHERE {}) o",
            self.in_shared(),
            sql::qualified(tenant, &self.table),
            self.orphan_condition()
        )
    }

    /// Up to `limit` distinct orphaned keys of one location, in key order.
    pub fn sample_sql(&self, tenant: &str, location: ParentLocation, limit: usize) -> String {
        let negate = if location == ParentLocation::Shared { "" } else { "NOT " };
        let cols = sql::columns("c", &self.columns);
        format!(
            "SELECT {} FROM {} c WHERE {} AND {negate}{}\nGROUP BY {cols} ORDER BY {cols} LIMIT {limit}",
            sql::key_text("c", &self.columns),
            sql::qualified(tenant, &self.table),
            self.orphan_condition(),
            self.in_shared(),
        )
    }
}

/// Runs one probe in the tenant's snapshot.
pub async fn run(
    snapshot: &Snapshot<'_>,
    tenant: &str,
    probe: &Probe,
    samples: usize,
) -> Result<Vec<Finding>, DbError> {
    let counts = db::counts(&snapshot.rows(&probe.count_sql(tenant)).await?)?;
    let count_at = |i: usize| counts.get(i).copied().unwrap_or(0);
    let counts = [(ParentLocation::Shared, count_at(0)), (ParentLocation::Missing, count_at(1))];
    let mut out = Vec::new();
    for (location, count) in counts.into_iter().filter(|(_, n)| *n > 0) {
        let sample_keys = if samples == 0 {
            Vec::new()
        } else {
            let rows = snapshot.rows(&probe.sample_sql(tenant, location, samples)).await?;
            rows.into_iter().filter_map(|mut r| r.swap_remove(0)).collect()
        };
        out.push(Finding {
            check: Check::OrphanRows,
            severity: Check::OrphanRows.severity(),
            schema: tenant.to_string(),
            table: Some(probe.table.clone()),
            columns: probe.columns.clone(),
            count,
            sample_keys,
            detail: Detail::OrphanRows {
                parent_schema: probe.parent_schema.clone(),
                parent_table: probe.parent_table.clone(),
                parent_columns: probe.parent_columns.clone(),
                parent_location: location,
                relationship: probe.source,
                constraint: probe.constraint.clone(),
                constraint_validated: probe.constraint_validated,
                heal_copy: match location {
                    ParentLocation::Missing => CopyVerdict::NoSharedRow,
                    ParentLocation::Shared if probe.same_entity => CopyVerdict::Copy,
                    ParentLocation::Shared => CopyVerdict::NotSameEntity,
                },
            },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_sql_is_one_quoted_anti_join() {
        let probe = Probe {
            table: "Users \"Profile\"".into(),
            columns: vec!["business_id".into()],
            parent_schema: "Tenant-1".into(),
            parent_table: "business_business".into(),
            parent_columns: vec!["id".into()],
            shared_parent: Some("public".into()),
            source: RelationshipSource::Constraint,
            constraint: Some("fk".into()),
            constraint_validated: Some(true),
            match_full: false,
            same_entity: true,
        };
        assert_eq!(
            probe.count_sql("Tenant-1"),
            "SELECT count(*) FILTER (WHERE in_shared), count(*) FILTER (WHERE NOT in_shared)\n\
             FROM (SELECT EXISTS (SELECT 1 FROM \"public\".\"business_business\" p WHERE p.\"id\" = c.\"business_id\") AS in_shared \
             FROM \"Tenant-1\".\"Users \"\"Profile\"\"\" c WHERE c.\"business_id\" IS NOT NULL AND NOT EXISTS \
             (SELECT 1 FROM \"Tenant-1\".\"business_business\" p WHERE p.\"id\" = c.\"business_id\")) o"
        );
    }
}
