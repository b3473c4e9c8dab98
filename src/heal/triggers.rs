//! `BEFORE ... FOR EACH ROW` triggers on the tables heal writes: such a trigger can change or
//! suppress the row heal inserts or updates, so heal refuses to write a table that has one,
//! unless the operator allows it by name (`heal.allow_triggers`). `AFTER` triggers cannot change
//! the row; they are only named in the plan. Undo's deletes and updates follow the same rule
//! (`BEFORE DELETE` and `BEFORE UPDATE` row triggers on the relation it changes).
//!
//! Invariants: the plan refuses from the scan's catalog, and every write step checks again at
//! run time, in one catalog read per step (no relation is locked), against what the database has
//! then: a trigger created since the scan, or on a partition or an inheritance child, is seen.
//! With an allowed trigger the audit keeps what was really written (the writing statement's
//! `RETURNING`, which shows the row after `BEFORE` triggers).

use crate::catalog::Table;
use crate::config::AllowedTrigger;

/// `tgtype` bit of an `INSERT` trigger.
pub const INSERT: i32 = 4;
/// `tgtype` bit of a `DELETE` trigger.
pub const DELETE: i32 = 8;
/// `tgtype` bit of an `UPDATE` trigger.
pub const UPDATE: i32 = 16;

/// `$1` qualified relation names, `$2` the event bit: (relation as given, name of the relation
/// the trigger is on, trigger) of every enabled user `BEFORE ... FOR EACH ROW` trigger of that
/// event on each relation and, for a partitioned table, on its partitions (an insert into the
/// partitioned table fires theirs). Reads only the catalog; relations that no longer exist are
/// left out.
pub const BEFORE_ROW: &str = "WITH RECURSIVE r(oid, given) AS (
  SELECT pg_catalog.to_regclass(t)::pg_catalog.oid, t FROM pg_catalog.unnest($1::text[]) t WHERE pg_catalog.to_regclass(t) IS NOT NULL
  UNION SELECT i.inhrelid, r.given FROM pg_catalog.pg_inherits i JOIN r ON i.inhparent = r.oid
    JOIN pg_catalog.pg_class p ON p.oid = i.inhrelid WHERE p.relispartition
)
SELECT r.given, c.relname::text, tg.tgname::text
FROM r JOIN pg_catalog.pg_class c ON c.oid = r.oid JOIN pg_catalog.pg_trigger tg ON tg.tgrelid = r.oid
WHERE NOT tg.tgisinternal AND tg.tgenabled IN ('O', 'A') AND tg.tgtype & 3 = 3 AND tg.tgtype & $2 <> 0
ORDER BY 1, 2, 3";

/// Whether the trigger `trigger` on relation `relation` (a partition or child of `table`, or
/// `table` itself) is allowed: listed for either name.
pub fn allowed(allow: &[AllowedTrigger], table: &str, relation: &str, trigger: &str) -> bool {
    allow.iter().any(|a| a.trigger == trigger && (a.table == table || a.table == relation))
}

/// The `BEFORE` row triggers of `own` (table `name`) for the event that are not allowed.
pub fn refused_in_catalog(allow: &[AllowedTrigger], name: &str, own: &Table, insert: bool) -> Vec<String> {
    own.triggers
        .iter()
        .filter(|t| t.before_row && if insert { t.on_insert } else { t.on_update })
        .filter(|t| !allowed(allow, name, name, &t.name))
        .map(|t| format!("{name}.{}", t.name))
        .collect()
}

/// Why a table with the refused triggers `names` (`relation.trigger`) is not written.
pub fn reason(names: &[String], insert: bool) -> String {
    event_reason(names, if insert { INSERT } else { UPDATE })
}

/// Why a relation with the refused triggers `names` for `event` (a `tgtype` bit) is not written.
pub fn event_reason(names: &[String], event: i32) -> String {
    let event = match event {
        INSERT => "INSERT",
        DELETE => "DELETE",
        _ => "UPDATE",
    };
    format!(
        "BEFORE {event} trigger(s) {} can change or suppress the rows heal writes (heal's audit and undo would not match them); allow each with heal.allow_triggers = [{{ table = ..., trigger = ... }}]",
        names.join(", ")
    )
}
