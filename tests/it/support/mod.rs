//! Shared helpers for the `it` integration tests.
pub mod pg;
