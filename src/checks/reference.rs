//! The reference shape every tenant is compared against: a configured template schema, or
//! else, element by element, what most tenants have.
//!
//! Invariant: derived from the catalog alone, deterministic (ties are broken by ordering), and
//! expressed without schema names: a foreign key's target is "own schema", "shared schema" or a
//! named other schema, so that shapes of different tenants compare equal.

use std::collections::{BTreeMap, BTreeSet};

use crate::catalog::{Catalog, Column, ForeignKey, Identity, QualifiedName, Schema, TypeSchema};

/// Where a foreign key points, relative to the schema that declares it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Own,
    Shared,
    Schema(String),
}

/// A foreign key without its schema names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FkShape {
    pub target: Target,
    pub table: String,
    pub columns: Vec<String>,
    pub deferrable: bool,
}

impl FkShape {
    pub fn of(fk: &ForeignKey, own_schema: &str, shared_schema: &str) -> FkShape {
        let target_schema = fk.target_schema.name(own_schema);
        let target = if target_schema == own_schema {
            Target::Own
        } else if target_schema == shared_schema {
            Target::Shared
        } else {
            Target::Schema(target_schema.to_string())
        };
        FkShape {
            target,
            table: fk.target_table.clone(),
            columns: fk.target_columns.clone(),
            deferrable: fk.deferrable,
        }
    }

    /// `table(cols)`, prefixed by the schema when it is not the declaring one, followed by
    /// ` DEFERRABLE` when it is.
    pub fn describe(&self, shared_schema: &str) -> String {
        let prefix = match &self.target {
            Target::Own => String::new(),
            Target::Shared => format!("{shared_schema}."),
            Target::Schema(s) => format!("{s}."),
        };
        let deferrable = if self.deferrable { " DEFERRABLE" } else { "" };
        format!("{prefix}{}({}){deferrable}", self.table, self.columns.join(", "))
    }
}

/// The expected shape of one column: each attribute is `None` when the tenants do not agree on
/// it (no value has a strict majority), and is then not compared. Types and defaults are the
/// catalog's text relative to each column's own schema (see [`crate::catalog`]), so identical
/// tenants have identical shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnShape {
    /// The type's text and where it is defined, voted together.
    pub data_type: Option<String>,
    pub type_schema: Option<TypeSchema>,
    pub not_null: Option<bool>,
    pub default: Option<Option<String>>,
    /// Whether that default is volatile, voted with it.
    pub default_volatile: Option<bool>,
    /// Identity and generation, voted together.
    pub kind: Option<(Option<Identity>, bool)>,
    /// The column's collation as [`collation`] writes it (`None` inside: the database default,
    /// or a type without collation).
    pub collation: Option<Option<String>>,
}

/// The collation of `column` of `table` (of schema `own`) as SQL text after `COLLATE`,
/// relative to the table's schema (a collation of its own schema unqualified, so identical
/// tenants agree): `None` for the database default (`pg_catalog.default`) and for a column
/// whose type has no collation.
pub fn collation(table: &crate::catalog::Table, column: &str, own: &str) -> Option<String> {
    let c = table.collations.get(column)?;
    match (c.schema.as_str(), c.name.as_str()) {
        ("pg_catalog", "default") => None,
        (schema, name) if schema == own => Some(crate::sql::ident(name)),
        _ => Some(c.quoted()),
    }
}

impl ColumnShape {
    fn of(c: &Column, table: &crate::catalog::Table, own: &str) -> ColumnShape {
        ColumnShape {
            collation: Some(collation(table, &c.name, own)),
            data_type: Some(c.data_type.clone()),
            type_schema: Some(c.type_schema.clone()),
            not_null: Some(c.not_null),
            default: Some(c.default.clone()),
            default_volatile: Some(c.default_volatile),
            kind: Some((c.identity, c.generated)),
        }
    }

    /// The column as the reference has it, when its type is known and it is a plain column (an
    /// identity or generated column is never added by heal).
    pub fn to_column(&self, name: &str) -> Option<Column> {
        if self.kind != Some((None, false)) {
            return None;
        }
        Some(Column {
            name: name.to_string(),
            data_type: self.data_type.clone()?,
            type_schema: self.type_schema.clone()?,
            not_null: self.not_null.unwrap_or(false),
            default: self.default.clone().flatten(),
            default_volatile: self.default_volatile.unwrap_or(true),
            sequence: None,
            identity: None,
            generated: false,
        })
    }
}

/// The expected shape of one table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableShape {
    pub columns: BTreeMap<String, ColumnShape>,
    /// Keyed by the referencing columns.
    pub foreign_keys: BTreeMap<Vec<String>, FkShape>,
}

/// The expected shape of a tenant, plus every relationship any tenant or the reference knows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Shape {
    pub tables: BTreeMap<String, TableShape>,
    /// (table, columns) -> the most common target among all tenants and the reference that
    /// declare a foreign key there, limited to own-schema and shared-schema targets.
    pub known_relationships: BTreeMap<(String, Vec<String>), KnownRelationship>,
}

/// A relationship some tenants (or the reference) declare: its target, and the equality
/// operators of the first constraint (in schema order) that declares it, which a tenant lacking
/// the constraint is checked with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownRelationship {
    pub shape: FkShape,
    pub equality: Vec<QualifiedName>,
}

impl Shape {
    /// Builds the shape: from `reference_schema` when given, else by majority over `tenants`.
    pub fn build(catalog: &Catalog, tenants: &BTreeSet<String>, shared: &str, reference_schema: Option<&str>) -> Shape {
        let mut shape = match reference_schema {
            Some(name) => from_schema(catalog.schemas.get(name).map(|s| &**s).unwrap_or(&EMPTY), name, shared),
            None => by_majority(catalog, tenants, shared),
        };
        let mut sources: Vec<(&str, &Schema)> =
            tenants.iter().filter_map(|t| catalog.schemas.get(t).map(|s| (t.as_str(), &**s))).collect();
        if let Some(name) = reference_schema {
            if let Some(s) = catalog.schemas.get(name) {
                sources.push((name, s));
            }
        }
        shape.known_relationships = known_relationships(&sources, shared);
        shape
    }
}

fn from_schema(schema: &Schema, name: &str, shared: &str) -> Shape {
    let tables = schema
        .tables
        .iter()
        .map(|(table_name, t)| {
            let columns = t.columns.iter().map(|c| (c.name.clone(), ColumnShape::of(c, t, name))).collect();
            let foreign_keys =
                t.foreign_keys.iter().map(|fk| (fk.columns.clone(), FkShape::of(fk, name, shared))).collect();
            (table_name.clone(), TableShape { columns, foreign_keys })
        })
        .collect();
    Shape { tables, known_relationships: BTreeMap::new() }
}

/// The value more than half of the votes agree on, if any.
fn majority<T: Ord>(votes: impl IntoIterator<Item = T>) -> Option<T> {
    let mut counts: BTreeMap<T, usize> = BTreeMap::new();
    let mut total = 0;
    for v in votes {
        *counts.entry(v).or_default() += 1;
        total += 1;
    }
    counts.into_iter().find(|(_, n)| n * 2 > total).map(|(v, _)| v)
}

/// The most voted value, ties going to the smallest (for relationships, where any known one
/// beats none).
fn mode<T: Ord>(votes: impl IntoIterator<Item = T>) -> Option<T> {
    let mut counts: BTreeMap<T, usize> = BTreeMap::new();
    for v in votes {
        *counts.entry(v).or_default() += 1;
    }
    let best = counts.values().copied().max()?;
    counts.into_iter().find(|(_, n)| *n == best).map(|(v, _)| v)
}

fn by_majority(catalog: &Catalog, tenants: &BTreeSet<String>, shared: &str) -> Shape {
    let schemas: Vec<(&str, &Schema)> =
        tenants.iter().map(|t| (t.as_str(), catalog.schemas.get(t).map(|s| &**s).unwrap_or(&EMPTY))).collect();
    let table_names: BTreeSet<&String> = schemas.iter().flat_map(|(_, s)| s.tables.keys()).collect();
    let mut tables = BTreeMap::new();
    for name in table_names {
        let having: Vec<(&str, &crate::catalog::Table)> =
            schemas.iter().filter_map(|(n, s)| s.tables.get(name).map(|t| (*n, t))).collect();
        if having.len() * 2 <= schemas.len() {
            continue;
        }
        tables.insert(name.clone(), majority_table(&having, shared));
    }
    Shape { tables, known_relationships: BTreeMap::new() }
}

static EMPTY: Schema = Schema { tables: BTreeMap::new() };

fn majority_table(having: &[(&str, &crate::catalog::Table)], shared: &str) -> TableShape {
    let m = having.len();
    let column_names: BTreeSet<&String> = having.iter().flat_map(|(_, t)| t.columns.iter().map(|c| &c.name)).collect();
    let mut columns = BTreeMap::new();
    for name in column_names {
        let found: Vec<&Column> = having.iter().filter_map(|(_, t)| t.column(name)).collect();
        if found.len() * 2 <= m {
            continue;
        }
        let data_type = majority(found.iter().map(|c| (&c.data_type, &c.type_schema)));
        let default = majority(found.iter().map(|c| (&c.default, &c.default_volatile)));
        let shape = ColumnShape {
            data_type: data_type.map(|(t, _)| t.clone()),
            type_schema: data_type.map(|(_, s)| s.clone()),
            not_null: majority(found.iter().map(|c| c.not_null)),
            default: default.map(|(d, _)| d.clone()),
            default_volatile: default.map(|(_, v)| *v),
            kind: majority(found.iter().map(|c| (c.identity, c.generated))),
            collation: majority(
                having.iter().filter(|(_, t)| t.column(name).is_some()).map(|(schema, t)| collation(t, name, schema)),
            ),
        };
        columns.insert(name.clone(), shape);
    }
    let fk_columns: BTreeSet<&Vec<String>> =
        having.iter().flat_map(|(_, t)| t.foreign_keys.iter().map(|f| &f.columns)).collect();
    let mut foreign_keys = BTreeMap::new();
    for cols in fk_columns {
        let targets: Vec<FkShape> = having
            .iter()
            .filter_map(|(schema, t)| {
                t.foreign_keys.iter().find(|f| &f.columns == cols).map(|f| FkShape::of(f, schema, shared))
            })
            .collect();
        if targets.len() * 2 <= m {
            continue;
        }
        if let Some(target) = majority(targets) {
            foreign_keys.insert(cols.clone(), target);
        }
    }
    TableShape { columns, foreign_keys }
}

fn known_relationships(
    sources: &[(&str, &Schema)],
    shared: &str,
) -> BTreeMap<(String, Vec<String>), KnownRelationship> {
    type Votes<'a> = Vec<(FkShape, &'a Vec<QualifiedName>)>;
    let mut votes: BTreeMap<(String, Vec<String>), Votes> = BTreeMap::new();
    for (schema, s) in sources {
        for (table, t) in &s.tables {
            for fk in &t.foreign_keys {
                let shape = FkShape::of(fk, schema, shared);
                if matches!(shape.target, Target::Own | Target::Shared) {
                    votes.entry((table.clone(), fk.columns.clone())).or_default().push((shape, &fk.equality));
                }
            }
        }
    }
    votes
        .into_iter()
        .filter_map(|(k, v)| {
            let shape = mode(v.iter().map(|(s, _)| s.clone()))?;
            let equality = v.iter().find(|(s, _)| *s == shape).map(|(_, e)| (*e).clone()).unwrap_or_default();
            Some((k, KnownRelationship { shape, equality }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Table;

    fn col(name: &str, ty: &str, not_null: bool) -> Column {
        Column {
            name: name.into(),
            data_type: ty.into(),
            type_schema: TypeSchema::Catalog,
            not_null,
            default: None,
            default_volatile: false,
            sequence: None,
            identity: None,
            generated: false,
        }
    }

    fn fk(schema: &str, cols: &[&str], target_schema: &str, target: &str) -> ForeignKey {
        ForeignKey {
            name: format!("{schema}_fk"),
            columns: cols.iter().map(|c| c.to_string()).collect(),
            target_schema: crate::catalog::SchemaRef::of(target_schema.to_string(), schema),
            target_table: target.into(),
            target_columns: vec!["id".into()],
            validated: true,
            deferrable: false,
            match_full: false,
            equality: vec![],
        }
    }

    fn tenant(name: &str, with_updated: bool, fk_target_schema: Option<&str>) -> std::sync::Arc<Schema> {
        let mut columns = vec![col("id", "integer", true), col("business_id", "uuid", false)];
        if with_updated {
            columns.push(col("updated_at", "timestamp with time zone", true));
        }
        let foreign_keys =
            fk_target_schema.map(|s| vec![fk(name, &["business_id"], s, "business_business")]).unwrap_or_default();
        let table = Table { columns, primary_key: vec!["id".into()], foreign_keys, readable: true, ..Table::default() };
        Schema { tables: [("users_userprofile".to_string(), table)].into() }.into()
    }

    #[test]
    fn majority_shape_per_element() {
        let mut catalog = Catalog::default();
        catalog.schemas.insert("t1".into(), tenant("t1", true, Some("t1")));
        catalog.schemas.insert("t2".into(), tenant("t2", true, Some("t2")));
        catalog.schemas.insert("t3".into(), tenant("t3", false, Some("public")));
        let tenants: BTreeSet<String> = ["t1", "t2", "t3"].iter().map(|s| s.to_string()).collect();
        let shape = Shape::build(&catalog, &tenants, "public", None);
        let t = &shape.tables["users_userprofile"];
        assert_eq!(t.columns.keys().collect::<Vec<_>>(), ["business_id", "id", "updated_at"]);
        assert_eq!(t.columns["updated_at"].not_null, Some(true));
        let fk = &t.foreign_keys[&vec!["business_id".to_string()]];
        assert_eq!(fk.target, Target::Own);
        assert_eq!(fk.describe("public"), "business_business(id)");
        let known = &shape.known_relationships[&("users_userprofile".to_string(), vec!["business_id".to_string()])];
        assert_eq!(known.shape.target, Target::Own);
    }

    #[test]
    fn ties_leave_elements_out() {
        let mut catalog = Catalog::default();
        catalog.schemas.insert("t1".into(), tenant("t1", true, None));
        catalog.schemas.insert("t2".into(), tenant("t2", false, None));
        let tenants: BTreeSet<String> = ["t1", "t2"].iter().map(|s| s.to_string()).collect();
        let shape = Shape::build(&catalog, &tenants, "public", None);
        assert!(!shape.tables["users_userprofile"].columns.contains_key("updated_at"));
    }

    #[test]
    fn attributes_are_voted_one_by_one() {
        // Five tenants: three text columns with three different defaults, two varchar(20).
        let mut catalog = Catalog::default();
        let kinds = [
            ("text", Some("'a'")),
            ("text", Some("'b'")),
            ("text", None),
            ("varchar(20)", None),
            ("varchar(20)", Some("'a'")),
        ];
        for (i, (ty, default)) in kinds.iter().enumerate() {
            let column = Column {
                name: "note".into(),
                data_type: ty.to_string(),
                type_schema: TypeSchema::Catalog,
                not_null: i == 0,
                default: default.map(str::to_string),
                default_volatile: false,
                sequence: None,
                identity: None,
                generated: false,
            };
            let table = Table { columns: vec![column], readable: true, ..Table::default() };
            catalog.schemas.insert(format!("t{i}"), Schema { tables: [("notes".to_string(), table)].into() }.into());
        }
        let tenants: BTreeSet<String> = (0..5).map(|i| format!("t{i}")).collect();
        let shape = Shape::build(&catalog, &tenants, "public", None);
        let note = &shape.tables["notes"].columns["note"];
        assert_eq!(
            note,
            &ColumnShape {
                data_type: Some("text".into()),
                type_schema: Some(TypeSchema::Catalog),
                not_null: Some(false),
                default: None,
                default_volatile: None,
                kind: Some((None, false)),
                collation: Some(None),
            }
        );
    }
}
