//! Command-line types (clap). No behaviour lives here.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "tenant-audit", version, about = "Consistency auditor for schema-per-tenant PostgreSQL databases")]
pub struct Cli {
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter in `RUST_LOG` syntax, e.g. `info` or `tenant_audit=debug` [default: `warn` for
    /// scan, `info` for serve].
    #[arg(long, global = true, env = "RUST_LOG")]
    pub log_filter: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Scan every tenant once and print the findings.
    Scan(ScanArgs),
    /// Run the daemon: scheduled scans, Prometheus metrics and the report over HTTP.
    Serve(ServeArgs),
    /// Scan, then print the repair plan (the exact SQL per tenant); with --execute, apply it.
    Heal(HealArgs),
}

#[derive(Debug, clap::Args)]
pub struct HealArgs {
    /// Path of the TOML configuration file.
    #[arg(long)]
    pub config: PathBuf,
    /// Apply the plan. Without it, nothing is written.
    #[arg(long)]
    pub execute: bool,
    /// Write the plan as JSON to FILE, with the keys and rows each step will touch (read from
    /// the database); nothing is written to it.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["execute", "apply", "undo"])]
    pub plan_out: Option<PathBuf>,
    /// Run the plan of FILE (from --plan-out) instead of scanning: only the keys and rows it
    /// lists, each re-checked. Needs --execute to write.
    #[arg(long, value_name = "FILE", conflicts_with = "undo")]
    pub apply: Option<PathBuf>,
    /// Revert heal run RUN_ID from its audit rows instead of healing (no scan): rows that still
    /// hold what heal wrote are reverted, the others listed. With --execute only.
    #[arg(long, value_name = "RUN_ID")]
    pub undo: Option<String>,
    /// The target (`[[targets]]` name) to heal; required when the config has several.
    #[arg(long, value_name = "NAME")]
    pub target: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Path of the TOML configuration file.
    #[arg(long)]
    pub config: PathBuf,
    /// Path of the listener's web config file (Prometheus exporter-toolkit format: TLS, basic
    /// auth); overrides `web.config_file`.
    #[arg(long = "web.config.file", value_name = "PATH")]
    pub web_config_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ScanArgs {
    /// Path of the TOML configuration file.
    #[arg(long)]
    pub config: PathBuf,
    /// Output format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Exit with code 1 when the scan has findings.
    #[arg(long)]
    pub fail_on_findings: bool,
    /// The target (`[[targets]]` name) to scan; required when the config has several.
    #[arg(long, value_name = "NAME")]
    pub target: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
