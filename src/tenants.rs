//! Tenant discovery: which schemas are tenants, which registered tenants have no schema, and
//! which tenant-looking schemas have no registry row.
//!
//! Invariants: a constant number of queries whatever the tenant count (`pg_namespace` and the
//! registry table, plus one re-check of the tenants' existence after the catalog is read); system schemas, the shared schema and the reference schema are never tenants.

use std::collections::BTreeSet;

use tokio_postgres::types::Type;
use tokio_postgres::GenericClient;

use crate::config::{Registry, TenantsConfig};
use crate::db::DbError;
use crate::sql;

/// The outcome of discovery, every list sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Discovery {
    /// Existing tenant schemas, to be scanned.
    pub tenants: Vec<String>,
    /// Schemas named by the registry that do not exist.
    pub missing: Vec<String>,
    /// Schemas matching the include patterns that have no registry row (both ways configured).
    pub unregistered: Vec<String>,
}

/// Why discovery failed. Discovery failing fails the scan: without it nothing can be scanned.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("tenant registry {table} does not exist (set tenants.registry_table, or tenants.registry = false)")]
    NoRegistry { table: String },
    #[error("cannot read tenant registry {table}: {cause}")]
    Registry { table: String, cause: DbError },
    #[error("cannot list schemas: {0}")]
    Namespaces(DbError),
}

/// The comment that opens both discovery queries, so they can be counted in `pg_stat_statements`.
pub const QUERY_TAG: &str = "/* tenant-audit:discovery */";

impl DiscoveryError {
    /// The database error behind it, if there is one.
    pub fn db_error(&self) -> Option<&DbError> {
        match self {
            DiscoveryError::NoRegistry { .. } => None,
            DiscoveryError::Registry { cause, .. } => Some(cause),
            DiscoveryError::Namespaces(e) => Some(e),
        }
    }
}

/// Every schema in the database, system schemas left out in SQL.
const LIST_SCHEMAS: &str = "/* tenant-audit:discovery */
SELECT nspname FROM pg_catalog.pg_namespace
WHERE nspname NOT IN ('pg_catalog', 'information_schema')
  AND nspname !~ '^pg_(toast|temp)'";

/// Discovers the tenants of the database `client` is connected to.
pub async fn discover(client: &impl GenericClient, cfg: &TenantsConfig) -> Result<Discovery, DiscoveryError> {
    let schemas: BTreeSet<String> = client
        .query_typed(LIST_SCHEMAS, &[])
        .await
        .map_err(|e| DiscoveryError::Namespaces(e.into()))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let registered = match &cfg.registry {
        Some(registry) => Some(read_registry(client, registry).await?),
        None => None,
    };
    Ok(classify(&schemas, registered.as_ref(), cfg))
}

async fn read_registry(client: &impl GenericClient, registry: &Registry) -> Result<BTreeSet<String>, DiscoveryError> {
    let table = sql::display_name(&registry.schema, &registry.table);
    let query = format!(
        "{QUERY_TAG}\nSELECT DISTINCT {col}::text FROM {tbl} WHERE {col} IS NOT NULL",
        col = sql::ident(&registry.column),
        tbl = sql::qualified(&registry.schema, &registry.table),
    );
    match client.query_typed(&query, &[]).await {
        Ok(rows) => Ok(rows.iter().map(|r| r.get(0)).collect()),
        Err(e) => {
            let e = DbError::from(e);
            match e.code() {
                Some("42P01" | "3F000") => Err(DiscoveryError::NoRegistry { table }),
                _ => Err(DiscoveryError::Registry { table, cause: e }),
            }
        }
    }
}

/// Which of `names` still exist. Run after the catalog snapshot, in a transaction of its own, to
/// notice tenants dropped while the catalog was read.
pub async fn still_present(client: &impl GenericClient, names: &[String]) -> Result<BTreeSet<String>, DbError> {
    const PRESENT: &str = "/* tenant-audit:discovery */
SELECT nspname::text FROM pg_catalog.pg_namespace WHERE nspname = ANY($1)";
    Ok(client.query_typed(PRESENT, &[(&names, Type::TEXT_ARRAY)]).await?.iter().map(|r| r.get(0)).collect())
}

/// Applies the discovery rules to the schema list and the registry contents.
pub fn classify(schemas: &BTreeSet<String>, registered: Option<&BTreeSet<String>>, cfg: &TenantsConfig) -> Discovery {
    let eligible = |name: &str| {
        !is_system(name)
            && name != cfg.shared_schema
            && cfg.reference_schema.as_deref() != Some(name)
            && !cfg.exclude.iter().any(|re| re.is_match(name))
    };
    let mut tenants = BTreeSet::new();
    let mut missing = Vec::new();
    let mut unregistered = Vec::new();
    for name in registered.into_iter().flatten().filter(|n| eligible(n)) {
        if schemas.contains(name) {
            tenants.insert(name.clone());
        } else {
            missing.push(name.clone());
        }
    }
    if !cfg.include.is_empty() {
        for name in schemas.iter().filter(|n| eligible(n) && cfg.include.iter().any(|re| re.is_match(n))) {
            if registered.is_some_and(|r| !r.contains(name)) {
                unregistered.push(name.clone());
            }
            tenants.insert(name.clone());
        }
    }
    Discovery { tenants: tenants.into_iter().collect(), missing, unregistered }
}

/// The schema where heal keeps its audit log; never a tenant.
pub const AUDIT_SCHEMA: &str = "tenant_audit";

/// Schemas PostgreSQL (or tenant-audit) owns; never tenants, whatever a pattern or registry says.
fn is_system(name: &str) -> bool {
    name == "pg_catalog"
        || name == "information_schema"
        || name == AUDIT_SCHEMA
        || name.starts_with("pg_toast")
        || name.starts_with("pg_temp")
}

#[cfg(test)]
mod tests {
    use super::*;
    use regex::Regex;

    fn cfg(registry: bool, include: &[&str], exclude: &[&str]) -> TenantsConfig {
        TenantsConfig {
            registry: registry.then(|| Registry {
                schema: "public".into(),
                table: "customers_client".into(),
                column: "schema_name".into(),
            }),
            include: include.iter().map(|p| Regex::new(p).unwrap()).collect(),
            exclude: exclude.iter().map(|p| Regex::new(p).unwrap()).collect(),
            shared_schema: "public".into(),
            reference_schema: Some("tenant_template".into()),
        }
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn registry_and_patterns_combine() {
        let schemas = set(&[
            "public",
            "tenant_a",
            "tenant_b",
            "tenant_old",
            "tenant_template",
            "pg_toast",
            "reports",
            "tenant_audit",
        ]);
        let registered = set(&["public", "tenant_a", "tenant_gone", "pg_catalog"]);
        let d = classify(&schemas, Some(&registered), &cfg(true, &["^tenant_"], &["_old$"]));
        assert_eq!(d.tenants, ["tenant_a", "tenant_b"]);
        assert_eq!(d.missing, ["tenant_gone"]);
        assert_eq!(d.unregistered, ["tenant_b"]);
    }

    #[test]
    fn patterns_alone_report_nothing_unregistered() {
        let schemas = set(&["public", "tenant_a", "pg_temp_3", "other"]);
        let d = classify(&schemas, None, &cfg(false, &["."], &[]));
        assert_eq!(d.tenants, ["other", "tenant_a"]);
        assert!(d.unregistered.is_empty() && d.missing.is_empty());
    }
}
