//! The checks. Each module owns one check: its planning from the catalog, its SQL and its
//! evaluation. [`reference`] computes the shape tenants are compared against.
//!
//! Two families:
//! - catalog checks ([`cross_schema_fk`], [`schema_drift`]) are pure functions of the catalog
//!   and cost no query;
//! - data checks ([`orphan_rows`], [`null_timestamps`], [`sequence_behind`]) plan set-based
//!   probes from the catalog; [`work`] groups them into one unit per table.
//!
//! Invariant: nothing here writes; every generated statement quotes its identifiers through
//! [`crate::sql`].

pub mod cross_schema_fk;
pub mod null_timestamps;
pub mod orphan_rows;
pub mod reference;
pub mod schema_drift;
pub mod sequence_behind;
pub mod work;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::catalog::{Catalog, Schema};
use crate::config::{ChecksConfig, SameEntityKey};
use crate::report::Finding;

pub use reference::Shape;
pub use work::TableWork;

/// Everything a check may look at besides the tenant itself.
pub struct Context<'a> {
    pub catalog: &'a Catalog,
    pub tenants: &'a BTreeSet<String>,
    pub shared_schema: &'a str,
    pub reference: &'a Shape,
    pub config: &'a ChecksConfig,
    /// `heal.same_entity_keys`: which orphans heal would copy is part of their finding.
    pub same_entity_keys: &'a [SameEntityKey],
}

impl Context<'_> {
    /// A tenant's catalog; a tenant without tables has an empty one.
    pub fn schema(&self, tenant: &str) -> Arc<Schema> {
        self.catalog.schemas.get(tenant).cloned().unwrap_or_default()
    }
}

/// Findings of the catalog checks for one tenant, in the registry order.
pub fn catalog_findings(ctx: &Context<'_>, tenant: &str) -> Vec<Finding> {
    let mut out = cross_schema_fk::check(ctx, tenant);
    out.extend(schema_drift::check(ctx, tenant));
    out
}

/// The data checks planned for one tenant: one unit per table that has any, in table order.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub tables: Vec<TableWork>,
}

/// Plans the data checks of one tenant; probes touching unreadable tables are left out (the
/// caller reports those tables as permission errors).
pub fn plan(ctx: &Context<'_>, tenant: &str) -> Plan {
    let mut tables: BTreeMap<String, TableWork> = BTreeMap::new();
    for probe in orphan_rows::plan(ctx, tenant) {
        let table = probe.table.clone();
        unit(&mut tables, ctx, tenant, &table).orphans.push(probe);
    }
    for probe in null_timestamps::plan(ctx, tenant) {
        let table = probe.table.clone();
        unit(&mut tables, ctx, tenant, &table).nulls = Some(probe);
    }
    for probe in sequence_behind::plan(ctx, tenant) {
        let table = probe.table.clone();
        unit(&mut tables, ctx, tenant, &table).sequences.push(probe);
    }
    Plan { tables: tables.into_values().collect() }
}

/// The unit of `table`, created empty on first use.
fn unit<'a>(
    tables: &'a mut BTreeMap<String, TableWork>,
    ctx: &Context<'_>,
    tenant: &str,
    table: &str,
) -> &'a mut TableWork {
    tables.entry(table.to_string()).or_insert_with(|| TableWork {
        table: table.to_string(),
        relation: crate::catalog::relation(ctx.catalog, tenant, table),
        orphans: Vec::new(),
        nulls: None,
        sequences: Vec::new(),
    })
}
