//! Identifier quoting: the single place where names become SQL text.
//!
//! Invariant: every schema, table and column name that appears in generated SQL passes through
//! [`ident`] (or [`qualified`]); values never do, they are bind parameters.

use std::fmt::Write;

/// Quotes an identifier the way PostgreSQL's `quote_ident` would when forced: wraps it in
/// double quotes and doubles any embedded double quote. Always quoting keeps case, spaces,
/// hyphens and non-ASCII letters intact and makes keywords harmless.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A schema-qualified relation name, both parts quoted.
pub fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", ident(schema), ident(table))
}

/// A string literal: single-quoted, embedded quotes doubled (`standard_conforming_strings` is
/// on in every supported PostgreSQL). For names written into audit rows, never for identifiers.
pub fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// `ROWS FROM (pg_catalog.unnest(a), pg_catalog.unnest(b))`: arrays side by side, as the
/// multi-argument `unnest(a, b)` (which PostgreSQL expands only when unqualified) does.
pub fn unnest(arrays: &[String]) -> String {
    let each: Vec<String> = arrays.iter().map(|a| format!("pg_catalog.unnest({a})")).collect();
    format!("ROWS FROM ({})", each.join(", "))
}

/// `"a", "b"`: a bare column list, as in `INSERT INTO t ("a", "b")`.
pub fn ident_list(names: &[String]) -> String {
    names.iter().map(|n| ident(n)).collect::<Vec<_>>().join(", ")
}

/// `alias."a", alias."b"`: a column list for SELECT, GROUP BY or ORDER BY.
pub fn columns(alias: &str, names: &[String]) -> String {
    names.iter().map(|n| format!("{alias}.{}", ident(n))).collect::<Vec<_>>().join(", ")
}

/// A key as one text value: the column's text for a single column, the row literal
/// (`(7,abc)`) for a composite key.
pub fn key_text(alias: &str, names: &[String]) -> String {
    match names {
        [one] => format!("{alias}.{}::text", ident(one)),
        _ => format!("ROW({})::text", columns(alias, names)),
    }
}

/// `OPERATOR("schema".=)`: an operator named with its schema, so that no `search_path` decides
/// which one compares. Operator names consist of operator characters only; anything else (which
/// the catalog cannot hold) falls back to the built-in `OPERATOR(pg_catalog.=)`.
pub fn operator(schema: &str, name: &str) -> String {
    let valid = !name.is_empty() && name.chars().all(|c| "+-*/<>=~!@#%^&|`?".contains(c));
    if valid {
        format!("OPERATOR({}.{name})", ident(schema))
    } else {
        "OPERATOR(pg_catalog.=)".to_string()
    }
}

/// A bounded sample: the keys (`key` columns, or `ctid` when empty) of the first `limit` rows
/// of `relation` (alias `c`) that match `condition`, as one JSON array of key texts in key
/// order, or NULL without any. `LIMIT` without `ORDER BY` stops at the `limit`-th match, so no
/// sort of the table is ever needed; only the kept keys are ordered, inside the aggregate.
pub fn sample_select(relation: &str, key: &[String], condition: &str, limit: usize) -> String {
    let ctid = ["ctid".to_string()];
    let (text, order_columns) =
        if key.is_empty() { ("c.ctid::text".to_string(), &ctid[..]) } else { (key_text("c", key), key) };
    let order: Vec<String> = (0..order_columns.len()).map(|i| format!("s.o{i}")).collect();
    let select: Vec<String> =
        order_columns.iter().enumerate().map(|(i, col)| format!("c.{} AS o{i}", ident(col))).collect();
    format!(
        "SELECT pg_catalog.json_agg(s.k ORDER BY {}) FROM (SELECT {text} AS k, {} FROM {relation} c WHERE {condition} LIMIT {limit}) s",
        order.join(", "),
        select.join(", ")
    )
}

/// Renders `name` as it appears in human output: `schema.table`, quoted only where needed.
pub fn display_name(schema: &str, table: &str) -> String {
    format!("{}.{}", display_ident(schema), display_ident(table))
}

fn display_ident(name: &str) -> String {
    let plain = !name.is_empty()
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_string()
    } else {
        ident(name)
    }
}

/// `text` safe for a terminal or a SQL comment line: control characters (C0, DEL, C1: ESC
/// sequences, carriage returns, newlines) and the invisible format characters that reorder or
/// hide text (bidirectional overrides and isolates such as U+202E, zero-width characters) become
/// `\u{..}` escapes, and a backslash becomes `\\`, so an escape in the output is always ours. A
/// name holding a newline can then neither end a `--` comment line (and have the rest run by
/// `psql -f`) nor drive the terminal. Applied once, where text is written for people.
pub fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let hidden =
            matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}');
        if c == '\\' {
            out.push_str("\\\\");
        } else if c.is_control() || hidden {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_hostile_names() {
        assert_eq!(ident("plain"), "\"plain\"");
        assert_eq!(ident("We\"ird"), "\"We\"\"ird\"");
        assert_eq!(ident("x\"; DROP TABLE t; --"), "\"x\"\"; DROP TABLE t; --\"");
        assert_eq!(qualified("Ten ant", "Ä-b"), "\"Ten ant\".\"Ä-b\"");
    }

    #[test]
    fn literals_double_quotes() {
        assert_eq!(literal("it's"), "'it''s'");
    }

    #[test]
    fn keys_render_as_one_text_value() {
        let one = vec!["id".to_string()];
        let two = vec!["a".to_string(), "B b".to_string()];
        assert_eq!(key_text("c", &one), "c.\"id\"::text");
        assert_eq!(key_text("c", &two), "ROW(c.\"a\", c.\"B b\")::text");
    }

    #[test]
    fn display_quotes_only_when_needed() {
        assert_eq!(display_name("tenant_a", "users_userprofile"), "tenant_a.users_userprofile");
        assert_eq!(display_name("Tenant A", "t"), "\"Tenant A\".t");
    }
}
