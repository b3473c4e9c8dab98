//! Integration tests against a real PostgreSQL that the harness starts itself (or the server
//! of `DATABASE_URL`). Each test builds its own database from the SQL fixtures.

mod chart;
mod cli;
mod daemon;
mod dashboard;
mod heal;
mod heal_ddl;
mod incremental;
mod listener;
mod prometheus;
mod rules;
mod scan;
mod support;
mod tls;
mod tools;
