//! `cross_schema_fk`: foreign keys of a tenant that check a copy of the data the application
//! does not write (the post-mortem's bug) or that reach into another tenant.
//!
//! A catalog check: it costs no query. A key to a table that exists only in the shared schema
//! (a shared `auth_user`, say) is legitimate and not reported.

use super::Context;
use crate::report::{Check, Detail, Finding, FkReason};

pub fn check(ctx: &Context<'_>, tenant: &str) -> Vec<Finding> {
    let schema = ctx.schema(tenant);
    let mut out = Vec::new();
    for (table_name, table) in &schema.tables {
        for fk in table.foreign_keys.iter().filter(|fk| fk.target_schema.name(tenant) != tenant) {
            let target_schema = fk.target_schema.name(tenant);
            let reason = if ctx.tenants.contains(target_schema) {
                FkReason::TenantToTenant
            } else if schema.tables.contains_key(&fk.target_table) {
                FkReason::ShadowedByTenantTable
            } else {
                continue;
            };
            out.push(Finding {
                check: Check::CrossSchemaFk,
                severity: Check::CrossSchemaFk.severity(),
                schema: tenant.to_string(),
                table: Some(table_name.clone()),
                columns: fk.columns.clone(),
                count: 1,
                sample_keys: Vec::new(),
                detail: Detail::CrossSchemaFk {
                    constraint: fk.name.clone(),
                    target_schema: target_schema.to_string(),
                    target_table: fk.target_table.clone(),
                    reason,
                },
            });
        }
    }
    out
}
