//! Integration tests against a real PostgreSQL that the harness starts itself (or the server
//! of `DATABASE_URL`). Each test builds its own database from the SQL fixtures.

mod chart;
mod cli;
mod config_input;
mod conninfo;
mod daemon;
mod dashboard;
mod fleet;
mod freeze;
mod heal;
mod heal_backfill;
mod heal_columns_review;
mod heal_copy_review;
mod heal_ddl;
mod heal_graph;
mod heal_plan;
mod heal_plan_review;
mod heal_review;
mod heal_sequences;
mod heal_triggers;
mod heal_undo;
mod heal_undo_review;
mod incremental;
mod listener;
mod pgbouncer;
mod prometheus;
mod replica;
mod rules;
mod scan;
mod scan_locks;
mod scan_samples;
mod scan_semantics;
mod shard;
mod support;
mod tls;
mod tools;
