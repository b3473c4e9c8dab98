//! `orphan_rows`: child rows whose non-NULL key has no parent in the table the tenant should
//! use (its own table of that name if it has one, else the shared schema's), split by whether
//! the key exists in the shared schema (healable by copying) or nowhere.
//!
//! Relationships come, in this order of precedence, from the tenant's own foreign keys (even
//! `NOT VALID` ones, and valid ones, since replica-mode loads bypass them), from
//! `checks.relationships`, and from foreign keys other tenants or the reference declare on the
//! same table and columns. One anti-join per relationship counts both splits, reading the child
//! and its parents in one statement (so one snapshot); samples come from a bounded query run
//! only when a count is nonzero.
//!
//! Keys compare as the database compares them: with the constraint's own equality operators
//! (`conpfeqop`, so `citext` keys that differ in case match, an `int` key finds its `bigint`
//! parent) and the parent column's collation (so a child of another collation never fails the
//! statement). An inferred relationship uses the operators of the constraint it is inferred
//! from. A configured one, which has no constraint, uses the `=` of the schema that defines the
//! parent column's type when that is the shared schema (an extension type such as `citext`
//! installed there), and the built-in `OPERATOR(pg_catalog.=)` otherwise: never a bare `=`,
//! which would resolve to an operator a tenant defined (for its own domain, or for a pair of
//! types `pg_catalog` has none for) and run the tenant's function with the auditor's privileges.

use std::collections::BTreeSet;

use super::Context;
use crate::catalog::{self, Catalog, QualifiedName, Schema, TypeSchema};
use crate::checks::Shape;
use crate::config::SameEntityKey;
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
    /// Per key column, the equality operator `parent = child`; empty only before
    /// [`Probe::with_fallback`] (then the built-in `=`).
    pub equality: Vec<QualifiedName>,
    /// Per key column, the parent column's collation (`None` for a type without one).
    pub collations: Vec<Option<QualifiedName>>,
    /// The parent as statements name it (`ONLY` unless partitioned), and the shared one.
    pub parent_relation: String,
    pub shared_relation: Option<String>,
    /// Whether the parent key names the same entity in every schema (see [`same_entity`]).
    pub same_entity: bool,
}

/// Whether `table(columns)` of `schema` is a key that means the same row in every schema: every
/// column a built-in `uuid` or a domain over it (globally unique by construction), or the table listed in
/// `heal.same_entity_keys`. Serial and identity keys come from each schema's own sequence, so
/// the same number names unrelated rows.
pub fn same_entity(keys: &[SameEntityKey], schema: &Schema, table: &str, columns: &[String]) -> bool {
    let listed = keys.iter().any(|k| k.table == table && k.columns == columns);
    let uuid = schema.tables.get(table).is_some_and(|t| {
        columns.iter().all(|c| {
            t.uuid_columns.contains(c)
                || t.column(c).is_some_and(|c| c.type_schema == TypeSchema::Catalog && c.data_type == "uuid")
        })
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
    equality: Vec<QualifiedName>,
}

pub fn plan(ctx: &Context<'_>, tenant: &str) -> Vec<Probe> {
    let schema = ctx.schema(tenant);
    let shared = ctx.schema(ctx.shared_schema);
    let mut seen = BTreeSet::new();
    candidates(ctx, tenant, &schema)
        .into_iter()
        .filter(|c| seen.insert((c.table.clone(), c.columns.clone())))
        .filter_map(|c| resolve(ctx, tenant, &schema, &shared, c))
        .collect()
}

fn candidates(ctx: &Context<'_>, schema_name: &str, schema: &Schema) -> Vec<Candidate> {
    let mut out = Vec::new();
    for (table, t) in &schema.tables {
        for fk in &t.foreign_keys {
            out.push(Candidate {
                table: table.clone(),
                columns: fk.columns.clone(),
                parent_table: fk.target_table.clone(),
                parent_columns: fk.target_columns.clone(),
                declared_schema: Some(fk.target_schema.name(schema_name).to_string()),
                source: RelationshipSource::Constraint,
                constraint: Some(fk.name.clone()),
                constraint_validated: Some(fk.validated),
                match_full: fk.match_full,
                equality: fk.equality.clone(),
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
            equality: Vec::new(),
        });
    }
    for ((table, columns), known) in &ctx.reference.known_relationships {
        out.push(Candidate {
            table: table.clone(),
            columns: columns.clone(),
            parent_table: known.shape.table.clone(),
            parent_columns: known.shape.columns.clone(),
            declared_schema: None,
            source: RelationshipSource::Inferred,
            constraint: None,
            constraint_validated: None,
            match_full: false,
            equality: known.equality.clone(),
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
    let probe =
        Probe::new(ctx.catalog, c.table, c.columns, parent_schema, c.parent_table, c.parent_columns, shared_parent);
    Some(
        Probe {
            same_entity,
            source: c.source,
            constraint: c.constraint,
            constraint_validated: c.constraint_validated,
            match_full: c.match_full,
            equality: if c.equality.len() == probe.columns.len() { c.equality } else { Vec::new() },
            ..probe
        }
        .with_fallback(ctx.catalog, ctx.shared_schema),
    )
}

/// The probe behind an orphan finding of `tenant`, with the comparison the scan used (heal
/// re-checks the same predicate in its writes).
pub fn probe_for(catalog: &Catalog, shape: &Shape, shared: &str, f: &Finding) -> Option<Probe> {
    let Detail::OrphanRows {
        parent_schema,
        parent_table,
        parent_columns,
        relationship,
        constraint,
        constraint_validated,
        ..
    } = &f.detail
    else {
        return None;
    };
    let table = f.table.clone()?;
    let has_shared = parent_schema != shared && catalog.table(shared, parent_table).is_some();
    let probe = Probe::new(
        catalog,
        table.clone(),
        f.columns.clone(),
        parent_schema.clone(),
        parent_table.clone(),
        parent_columns.clone(),
        has_shared.then(|| shared.to_string()),
    );
    let own = catalog.table(&f.schema, &table);
    let equality = match (relationship, constraint) {
        (RelationshipSource::Constraint, Some(name)) => {
            own.and_then(|t| t.foreign_keys.iter().find(|fk| &fk.name == name)).map(|fk| fk.equality.clone())
        }
        (RelationshipSource::Inferred, _) => {
            shape.known_relationships.get(&(table, f.columns.clone())).map(|k| k.equality.clone())
        }
        _ => None,
    }
    .unwrap_or_default();
    let match_full = match constraint {
        Some(name) => {
            own.and_then(|t| t.foreign_keys.iter().find(|fk| &fk.name == name)).is_some_and(|fk| fk.match_full)
        }
        None => false,
    };
    Some(
        Probe {
            source: *relationship,
            constraint: constraint.clone(),
            constraint_validated: *constraint_validated,
            match_full,
            equality: if equality.len() == probe.columns.len() { equality } else { Vec::new() },
            ..probe
        }
        .with_fallback(catalog, shared),
    )
}

impl Probe {
    /// Without a constraint's operators, the `=` of each parent column's type: the shared
    /// schema's own when it defines the type, else (and for arrays, whose built-in `=` compares
    /// elements with their type's default equality) the built-in one (see the module comment).
    fn with_fallback(self, catalog: &Catalog, shared: &str) -> Probe {
        if !self.equality.is_empty() {
            return self;
        }
        let parent = catalog.table(&self.parent_schema, &self.parent_table);
        let home = |column: &String| {
            let column = parent.and_then(|t| t.column(column)).filter(|c| !c.data_type.ends_with("[]"));
            let defined_in = match column.map(|c| &c.type_schema) {
                Some(TypeSchema::Own) => Some(self.parent_schema.as_str()),
                Some(TypeSchema::Other(s)) => Some(s.as_str()),
                Some(TypeSchema::Catalog) | None => None,
            };
            let schema = if defined_in == Some(shared) { shared } else { "pg_catalog" };
            QualifiedName { schema: schema.to_string(), name: "=".to_string() }
        };
        let equality = self.parent_columns.iter().map(home).collect();
        Probe { equality, ..self }
    }

    /// A constraint-less probe (no operators yet, `MATCH SIMPLE`) of `table(columns)` against its parent,
    /// with the parent's collations and relation names from `catalog`.
    fn new(
        catalog: &Catalog,
        table: String,
        columns: Vec<String>,
        parent_schema: String,
        parent_table: String,
        parent_columns: Vec<String>,
        shared_parent: Option<String>,
    ) -> Probe {
        let parent = catalog.table(&parent_schema, &parent_table);
        let collations = parent_columns.iter().map(|c| parent.and_then(|t| t.collations.get(c)).cloned()).collect();
        Probe {
            parent_relation: catalog::relation(catalog, &parent_schema, &parent_table),
            shared_relation: shared_parent.as_deref().map(|s| catalog::relation(catalog, s, &parent_table)),
            table,
            columns,
            parent_schema,
            parent_table,
            parent_columns,
            shared_parent,
            source: RelationshipSource::Configured,
            constraint: None,
            constraint_validated: None,
            match_full: false,
            equality: Vec::new(),
            collations,
            same_entity: false,
        }
    }

    /// Rows of `c` (the child) whose key has no row in the expected parent. With `MATCH SIMPLE`
    /// (the default) a key with a NULL part is not checked; with `MATCH FULL` only an all-NULL
    /// key is exempt, and a partly NULL one (which can match no parent) is an orphan.
    pub(crate) fn orphan_condition(&self) -> String {
        let not_null: Vec<String> = self.columns.iter().map(|c| format!("c.{} IS NOT NULL", sql::ident(c))).collect();
        let checked = if self.match_full { format!("({})", not_null.join(" OR ")) } else { not_null.join(" AND ") };
        format!("{checked} AND NOT EXISTS (SELECT 1 FROM {} p WHERE {})", self.parent_relation, self.key_match())
    }

    /// `p.k COLLATE coll OPERATOR(schema.=) c.k AND ...`: the parent's key against the child's,
    /// as the constraint compares them.
    fn key_match(&self) -> String {
        let parts: Vec<String> = self
            .parent_columns
            .iter()
            .zip(&self.columns)
            .enumerate()
            .map(|(i, (parent, child))| {
                let collate = match self.collations.get(i) {
                    Some(Some(c)) => format!(" COLLATE {}", c.quoted()),
                    _ => String::new(),
                };
                let operator = self
                    .equality
                    .get(i)
                    .map_or_else(|| sql::operator("pg_catalog", "="), |o| sql::operator(&o.schema, &o.name));
                format!("p.{}{collate} {operator} c.{}", sql::ident(parent), sql::ident(child))
            })
            .collect();
        parts.join(" AND ")
    }

    /// Whether the orphan's key exists in the shared schema's table (`false` when there is none).
    pub(crate) fn in_shared(&self) -> String {
        match &self.shared_relation {
            Some(shared) => format!("EXISTS (SELECT 1 FROM {shared} p WHERE {})", self.key_match()),
            None => "false".to_string(),
        }
    }

    /// How many count columns [`Probe::count_select`] returns.
    pub const COUNTS: usize = 2;

    /// One anti-join over the child (`child`: the tenant's table as statements name it): the
    /// orphans whose key is in the shared schema, and the others.
    pub fn count_select(&self, child: &str) -> String {
        format!(
            "SELECT count(*) FILTER (WHERE o.in_shared), count(*) FILTER (WHERE NOT o.in_shared) \
             FROM (SELECT {} AS in_shared FROM {child} c WHERE {}) o",
            self.in_shared(),
            self.orphan_condition()
        )
    }

    /// The findings of one relationship from its two counts (samples still empty).
    pub fn findings(&self, tenant: &str, counts: &[u64]) -> Vec<Finding> {
        let count_at = |i: usize| counts.get(i).copied().unwrap_or(0);
        let counts = [(ParentLocation::Shared, count_at(0)), (ParentLocation::Missing, count_at(1))];
        counts
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(location, count)| Finding {
                check: Check::OrphanRows,
                severity: Check::OrphanRows.severity(),
                schema: tenant.to_string(),
                table: Some(self.table.clone()),
                columns: self.columns.clone(),
                count,
                sample_keys: Vec::new(),
                detail: Detail::OrphanRows {
                    parent_schema: self.parent_schema.clone(),
                    parent_table: self.parent_table.clone(),
                    parent_columns: self.parent_columns.clone(),
                    parent_location: location,
                    relationship: self.source,
                    constraint: self.constraint.clone(),
                    constraint_validated: self.constraint_validated,
                    heal_copy: match location {
                        ParentLocation::Missing => CopyVerdict::NoSharedRow,
                        ParentLocation::Shared if self.same_entity => CopyVerdict::Copy,
                        ParentLocation::Shared => CopyVerdict::NotSameEntity,
                    },
                },
            })
            .collect()
    }

    /// Whether `f` is a finding of this relationship, and at which parent location.
    pub fn location_of(&self, f: &Finding) -> Option<ParentLocation> {
        match &f.detail {
            Detail::OrphanRows { parent_location, .. } if f.check == Check::OrphanRows && f.columns == self.columns => {
                Some(*parent_location)
            }
            _ => None,
        }
    }

    /// Up to `limit` orphaned keys of one location as a JSON array, in key order: the first
    /// `limit` orphan rows met (no sort of the table; a key that repeats among them is kept
    /// once by the caller).
    pub fn sample_select(&self, child: &str, location: ParentLocation, limit: usize) -> String {
        let negate = if location == ParentLocation::Shared { "" } else { "NOT " };
        sql::sample_select(
            child,
            &self.columns,
            &format!("{} AND {negate}{}", self.orphan_condition(), self.in_shared()),
            limit,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_select_is_one_quoted_anti_join_with_the_constraints_operator() {
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
            equality: vec![QualifiedName { schema: "ext".into(), name: "=".into() }],
            collations: vec![Some(QualifiedName { schema: "pg_catalog".into(), name: "C".into() })],
            parent_relation: "ONLY \"Tenant-1\".\"business_business\"".into(),
            shared_relation: Some("\"public\".\"business_business\"".into()),
            same_entity: true,
        };
        let key = "p.\"id\" COLLATE \"pg_catalog\".\"C\" OPERATOR(\"ext\".=) c.\"business_id\"";
        assert_eq!(
            probe.count_select("ONLY \"Tenant-1\".\"Users \"\"Profile\"\"\""),
            format!(
                "SELECT count(*) FILTER (WHERE o.in_shared), count(*) FILTER (WHERE NOT o.in_shared) \
                 FROM (SELECT EXISTS (SELECT 1 FROM \"public\".\"business_business\" p WHERE {key}) AS in_shared \
                 FROM ONLY \"Tenant-1\".\"Users \"\"Profile\"\"\" c WHERE c.\"business_id\" IS NOT NULL AND NOT EXISTS \
                 (SELECT 1 FROM ONLY \"Tenant-1\".\"business_business\" p WHERE {key})) o"
            )
        );
    }
}
