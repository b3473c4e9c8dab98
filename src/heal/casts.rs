//! Casts heal's statements make to a column's type (`$n::text::T` of a copy's keys,
//! `pg_catalog.now()::T` and `c."a"::T` of a backfill's fallback, `(x.new_value->>'k')::T` of an
//! undo), and the user-defined cast functions they would run.
//!
//! Invariant: heal never runs a function a tenant defined. A column's type can be the tenant's
//! own (an enum, a composite, a domain over one), and `CREATE CAST (text AS t) WITH FUNCTION f`
//! makes every `::t` from text call `f` as the heal role. Before a copy, backfill or undo runs,
//! [`USER_CASTS`] finds each cast its statements make that runs a function outside
//! `pg_catalog`; such a step is set aside with [`reason`] and nothing of it runs.

/// `$1` source types, `$2` target types (type names as the step's statements write them, pairs
/// by position, resolved under the step's `search_path`): (source, target, function) of every
/// cast with a function (`castmethod = 'f'`) outside `pg_catalog` from a source (or a type in its
/// chain: a domain's base type, an array's element type) to a target (or a type in its chain),
/// each name qualified with its schema (but for `pg_catalog`'s). Reads only the catalog. A name that does not resolve yields nothing (the step's own statement
/// then fails on it).
pub const USER_CASTS: &str = "WITH RECURSIVE given(i, source, target) AS (
  SELECT p.i, pg_catalog.to_regtype(p.s)::pg_catalog.oid, pg_catalog.to_regtype(p.t)::pg_catalog.oid
  FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]), pg_catalog.unnest($2::pg_catalog.text[])) WITH ORDINALITY AS p(s, t, i)
), sources(i, oid) AS (
  SELECT g.i, g.source FROM given g WHERE g.source IS NOT NULL
  UNION
  SELECT s.i, CASE WHEN ty.typtype OPERATOR(pg_catalog.=) 'd' THEN ty.typbasetype ELSE ty.typelem END
  FROM sources s JOIN pg_catalog.pg_type ty ON ty.oid OPERATOR(pg_catalog.=) s.oid
  WHERE ty.typtype OPERATOR(pg_catalog.=) 'd' OR (ty.typcategory OPERATOR(pg_catalog.=) 'A' AND ty.typelem OPERATOR(pg_catalog.<>) 0)
), targets(i, oid) AS (
  SELECT g.i, g.target FROM given g WHERE g.target IS NOT NULL
  UNION
  SELECT t.i, CASE WHEN ty.typtype OPERATOR(pg_catalog.=) 'd' THEN ty.typbasetype ELSE ty.typelem END
  FROM targets t JOIN pg_catalog.pg_type ty ON ty.oid OPERATOR(pg_catalog.=) t.oid
  WHERE ty.typtype OPERATOR(pg_catalog.=) 'd' OR (ty.typcategory OPERATOR(pg_catalog.=) 'A' AND ty.typelem OPERATOR(pg_catalog.<>) 0)
), names(oid, name) AS (
  SELECT ty.oid, CASE WHEN tn.nspname OPERATOR(pg_catalog.=) 'pg_catalog' THEN pg_catalog.format_type(ty.oid, NULL)
    ELSE pg_catalog.format('%I.%I', tn.nspname, ty.typname) END
  FROM pg_catalog.pg_type ty JOIN pg_catalog.pg_namespace tn ON tn.oid OPERATOR(pg_catalog.=) ty.typnamespace
  WHERE ty.oid OPERATOR(pg_catalog.=) ANY (SELECT c.castsource FROM pg_catalog.pg_cast c UNION ALL SELECT c.casttarget FROM pg_catalog.pg_cast c UNION ALL SELECT pg_catalog.unnest(f.proargtypes::pg_catalog.oid[]) FROM pg_catalog.pg_cast c JOIN pg_catalog.pg_proc f ON f.oid OPERATOR(pg_catalog.=) c.castfunc)
)
SELECT DISTINCT (SELECT n.name FROM names n WHERE n.oid OPERATOR(pg_catalog.=) c.castsource),
  (SELECT n.name FROM names n WHERE n.oid OPERATOR(pg_catalog.=) c.casttarget),
  pg_catalog.format('%I.%I(%s)', fn.nspname, f.proname, (
    SELECT pg_catalog.string_agg(n.name, ', ' ORDER BY a.i)
    FROM pg_catalog.unnest(f.proargtypes::pg_catalog.oid[]) WITH ORDINALITY AS a(oid, i)
    JOIN names n ON n.oid OPERATOR(pg_catalog.=) a.oid
  ))
FROM sources s
JOIN targets t ON t.i OPERATOR(pg_catalog.=) s.i
JOIN pg_catalog.pg_cast c ON c.castsource OPERATOR(pg_catalog.=) s.oid AND c.casttarget OPERATOR(pg_catalog.=) t.oid
JOIN pg_catalog.pg_proc f ON f.oid OPERATOR(pg_catalog.=) c.castfunc
JOIN pg_catalog.pg_namespace fn ON fn.oid OPERATOR(pg_catalog.=) f.pronamespace
WHERE c.castmethod OPERATOR(pg_catalog.=) 'f'
  AND f.pronamespace OPERATOR(pg_catalog.<>) 'pg_catalog'::pg_catalog.regnamespace::pg_catalog.oid
ORDER BY 1, 2, 3";

/// A cast [`USER_CASTS`] found: its source and target type and its function, as PostgreSQL
/// names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserCast {
    pub source: String,
    pub target: String,
    pub function: String,
}

impl UserCast {
    pub fn from_row(row: &tokio_postgres::Row) -> UserCast {
        UserCast { source: row.get(0), target: row.get(1), function: row.get(2) }
    }
}

/// The `$1` (sources) and `$2` (targets) of [`USER_CASTS`] for `pairs` of (source, target).
pub fn params(pairs: &[(String, String)]) -> (Vec<String>, Vec<String>) {
    pairs.iter().cloned().unzip()
}

/// Why a step is set aside: `a cast from text to tenant_a.t runs function tenant_a.f(text)` for
/// each cast (`; ` between them), then that heal does not run them and what to do instead.
pub fn reason(casts: &[UserCast], instead: &str) -> String {
    let each: Vec<String> = casts
        .iter()
        .map(|c| format!("a cast from {} to {} runs function {}", c.source, c.target, c.function))
        .collect();
    format!("{}: heal does not run tenant functions; {instead}", each.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reason_names_each_cast_and_what_to_do() {
        let cast = |s: &str, f: &str| UserCast { source: s.into(), target: "tenant_a.t".into(), function: f.into() };
        assert_eq!(
            reason(&[cast("text", "tenant_a.f(text)")], "copy these rows by hand"),
            "a cast from text to tenant_a.t runs function tenant_a.f(text): heal does not run tenant functions; copy these rows by hand"
        );
        assert_eq!(
            reason(&[cast("text", "tenant_a.f(text)"), cast("integer", "tenant_a.g(integer)")], "x"),
            "a cast from text to tenant_a.t runs function tenant_a.f(text); a cast from integer to tenant_a.t runs function tenant_a.g(integer): heal does not run tenant functions; x"
        );
    }

    #[test]
    fn params_split_the_pairs_by_position() {
        let pairs = vec![("text".to_string(), "a".to_string()), ("integer".to_string(), "b".to_string())];
        assert_eq!(
            params(&pairs),
            (vec!["text".to_string(), "integer".to_string()], vec!["a".to_string(), "b".to_string()])
        );
    }
}
