//! The `tenant-audit` binary: parses the command line, sets up logging, runs the command and
//! maps the outcome to an exit code (0 clean, 1 findings with `--fail-on-findings`, 2 error).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use tenant_audit::cli::{Cli, Command, Format, HealArgs, LogFormat, ScanArgs, ServeArgs};
use tenant_audit::config::{Config, Fleet};
use tenant_audit::heal::{self, HealError, Plan};
use tenant_audit::{daemon, db, scan};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    tenant_audit::memory::tune_allocator();
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Command::Scan(_) => "warn",
        Command::Serve(_) | Command::Heal(_) => "info",
    };
    if let Err(e) = init_logging(cli.log_format, cli.log_filter.as_deref().unwrap_or(default_filter)) {
        eprintln!("tenant-audit: error: {e:#}");
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tenant-audit: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Installs the log subscriber; an invalid filter is an error, never silently replaced.
fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| {
        let reason = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        anyhow::anyhow!("invalid log filter {filter:?} (--log-filter or RUST_LOG): {reason}")
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    match cli.command {
        Command::Scan(args) => runtime.block_on(scan_once(args)),
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Heal(args) => runtime.block_on(heal_once(args)),
    }
}

/// `heal`: exit 0 when everything planned was done (or printed), 1 when tenants or keys were left
/// (a lock, the row cap, another healer, orphans set aside), 2 on error.
async fn heal_once(args: HealArgs) -> anyhow::Result<ExitCode> {
    let config = Fleet::load(&args.config)?.select(args.target.as_deref(), "--target")?;
    if let Some(run_id) = &args.undo {
        return undo(&config, run_id, args.execute).await;
    }
    let cancel = shutdown_on_signals()?;
    let (plan, gone, filled) = match &args.apply {
        Some(file) => {
            let checked = checked_plan_file(file, &config, &cancel).await?;
            (checked.plan, checked.gone, checked.filled)
        }
        None => {
            if !config.heal.any_repair() {
                anyhow::bail!("no repair is enabled: set heal.copy_missing_parents, heal.backfill_null_timestamps, heal.add_missing_columns or heal.advance_sequences");
            }
            let scanned = scan::run(&config, &db::scan_pool(&config.database, &config.scan), &cancel, None).await?;
            if let Some(e) = incomplete_scan_error(&scanned.report) {
                return Err(e.context("heal needs a complete scan"));
            }
            let mut plan = Plan::build(&scanned, &config);
            if let Some(file) = &args.plan_out {
                let pool = db::heal_pool(&config.heal, config.scan.connect_timeout);
                let left_out = heal::planfile::resolve(&config.heal, &pool, &mut plan).await?;
                let document = heal::planfile::PlanFile {
                    version: heal::planfile::VERSION,
                    database: config.heal.database.target.clone(),
                    scan_started_at: scanned.report.started_at,
                    scan_finished_at: scanned.report.finished_at,
                    plan,
                };
                let json = serde_json::to_string_pretty(&document).context("cannot encode the plan")?;
                std::fs::write(file, json + "\n").with_context(|| format!("cannot write {}", file.display()))?;
                println!("wrote the plan for {} tenant(s) to {}", document.plan.tenants.len(), file.display());
                for line in left_out {
                    println!("{line}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            // Pending backfills of added columns are resumed by runs without a plan file.
            let pool = db::heal_pool(&config.heal, config.scan.connect_timeout);
            heal::resume_pending(&mut plan, &scanned, &config, &pool).await?;
            (plan, Vec::new(), Default::default())
        }
    };
    let mut out = std::io::stdout();
    if !args.execute {
        write!(out, "{}", plan.render(&config.heal.database.target, config.heal.batch_size))?;
        return Ok(ExitCode::SUCCESS);
    }
    let pool = db::heal_pool(&config.heal, config.scan.connect_timeout);
    let Some(mut outcome) = run_plan(&config, &pool, &plan, &cancel).await? else { return Ok(ExitCode::from(1)) };
    // What the new scan no longer finds comes first, as the file lists it.
    let applied = std::mem::replace(&mut outcome.not_applied, gone);
    outcome.not_applied.extend(applied);
    // Rows an earlier run of the same plan filled are done, not changed since the plan.
    let listed = outcome.not_applied.len();
    outcome.not_applied.retain(|k| !filled.contains(k));
    outcome.filled_earlier = (listed - outcome.not_applied.len()) as u64;
    write!(out, "{}", outcome.summary())?;
    if let Some((schema, repair, message)) = outcome.errors.first() {
        anyhow::bail!("{} repair(s) failed; first: {} on {schema}: {message}", outcome.errors.len(), repair.name());
    }
    if outcome.interrupted {
        eprintln!("tenant-audit: heal interrupted; every committed batch is whole, run it again to finish");
        return Ok(ExitCode::from(1));
    }
    let complete = outcome.skipped.is_empty()
        && outcome.set_aside.is_empty()
        && outcome.refused.is_empty()
        && outcome.not_applied.is_empty();
    Ok(if complete { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Runs `plan` (a heal's or an undo's); `None` when another healer holds the lease, which is
/// said on stderr (exit 1: the run is skipped, not failed).
async fn run_plan(
    config: &Config,
    pool: &db::Pool,
    plan: &Plan,
    cancel: &CancellationToken,
) -> anyhow::Result<Option<heal::Outcome>> {
    match heal::execute(&config.heal, pool, plan, None, cancel).await {
        Err(HealError::LockedOut) => {
            eprintln!("tenant-audit: {}", HealError::LockedOut);
            Ok(None)
        }
        other => Ok(Some(other?)),
    }
}

/// Reads a plan file and checks it against the plan derived from a fresh scan (with the repairs
/// the file uses enabled): the plan to run is the derived one, restricted as the file says.
async fn checked_plan_file(
    file: &std::path::Path,
    config: &Config,
    cancel: &CancellationToken,
) -> anyhow::Result<heal::planfile::Checked> {
    let given = read_plan_file(file, config)?;
    let mut config = config.clone();
    for action in given.tenants.iter().flat_map(|t| &t.actions) {
        match action.repair {
            heal::Repair::CopyMissingParents => config.heal.copy_missing_parents = true,
            heal::Repair::BackfillNullTimestamps => config.heal.backfill_null_timestamps = true,
            heal::Repair::AddMissingColumns => config.heal.add_missing_columns = true,
            heal::Repair::AdvanceSequences => config.heal.advance_sequences = true,
            heal::Repair::Undo => {
                anyhow::bail!("plan file {} holds an undo action: undo is run with --undo", file.display())
            }
        }
    }
    let scanned = scan::run(&config, &db::scan_pool(&config.database, &config.scan), cancel, None).await?;
    if let Some(e) = incomplete_scan_error(&scanned.report) {
        return Err(e.context("--apply needs a complete scan (it derives the plan's SQL again)"));
    }
    let derived = Plan::build(&scanned, &config);
    let mut checked =
        heal::planfile::check(&given, &derived).with_context(|| format!("plan file {} refused", file.display()))?;
    let pool = db::heal_pool(&config.heal, config.scan.connect_timeout);
    checked.filled = heal::planfile::filled_earlier(&config.heal, &pool, &given).await?;
    Ok(checked)
}

/// Reads a plan file of `heal --plan-out`, for the database `config` heals.
fn read_plan_file(file: &std::path::Path, config: &Config) -> anyhow::Result<Plan> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read plan file {}", file.display()))?;
    let document: heal::planfile::PlanFile =
        serde_json::from_str(&text).with_context(|| format!("plan file {} is not a heal plan", file.display()))?;
    if document.version != heal::planfile::VERSION {
        anyhow::bail!(
            "plan file {} has version {}; this heal reads version {}",
            file.display(),
            document.version,
            heal::planfile::VERSION
        );
    }
    if document.database != config.heal.database.target {
        anyhow::bail!(
            "plan file {} is for database {}, not {} (heal.database_url)",
            file.display(),
            document.database,
            config.heal.database.target
        );
    }
    Ok(document.plan)
}

/// `heal --undo RUN_ID`: prints the undo plan, or with `execute` applies it; then lists what it
/// does not undo and the rows it left because they changed since the run. Exit codes as heal's.
async fn undo(config: &Config, run_id: &str, execute: bool) -> anyhow::Result<ExitCode> {
    let cancel = shutdown_on_signals()?;
    let pool = db::heal_pool(&config.heal, config.scan.connect_timeout);
    let mut session = db::session(&pool, &config.heal.database.target).await?;
    // Read only: the plan of an undo is printed from a standby too.
    let tx = db::begin_heal_checks(&mut session, &config.heal).await?;
    let (plan, notes) = heal::undo::plan(&tx, run_id, &config.checks.relationships).await?;
    tx.commit().await.context("cannot read the audit table")?;
    drop(session);
    let mut out = std::io::stdout();
    if plan.tenants.is_empty() && notes.is_empty() {
        anyhow::bail!("heal run {run_id:?} has no audit rows in tenant_audit.heal_log");
    }
    if !execute {
        write!(out, "{}", plan.render(&config.heal.database.target, config.heal.batch_size))?;
        for note in &notes {
            writeln!(out, "-- {}", note.text)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(outcome) = run_plan(config, &pool, &plan, &cancel).await? else { return Ok(ExitCode::from(1)) };
    write!(out, "{}", outcome.summary())?;
    for note in &notes {
        writeln!(out, "not undone: {}", note.text)?;
    }
    for (schema, table, key, why) in &outcome.left {
        let place = tenant_audit::sql::escape_controls(&tenant_audit::sql::display_name(schema, table));
        writeln!(out, "left ({why}): {place} {}", tenant_audit::sql::escape_controls(key))?;
    }
    if let Some((schema, repair, message)) = outcome.errors.first() {
        anyhow::bail!("{} repair(s) failed; first: {} on {schema}: {message}", outcome.errors.len(), repair.name());
    }
    let blocked = notes.iter().any(|n| n.blocked);
    Ok(
        if outcome.left.is_empty()
            && outcome.refused.is_empty()
            && !outcome.interrupted
            && outcome.skipped.is_empty()
            && !blocked
        {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        },
    )
}

/// The error of a scan that met failures (other than tenants dropped meanwhile), if it did.
fn incomplete_scan_error(report: &tenant_audit::report::Report) -> Option<anyhow::Error> {
    let failures: Vec<_> = report.failures().collect();
    let first = failures.first()?;
    Some(anyhow::anyhow!(
        "scan incomplete: {} errors; first [{}] {}: {}",
        failures.len(),
        first.kind.name(),
        first.place(),
        first.message
    ))
}

/// A token cancelled by the first SIGTERM or SIGINT.
fn shutdown_on_signals() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let trigger = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        trigger.cancel();
    });
    Ok(token)
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut fleet = Fleet::load(&args.config)?;
    if let Some(path) = &args.web_config_file {
        fleet.load_web_security(path)?;
    }
    let web = &fleet.targets[0].web;
    let listen = fleet.targets[0].serve.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (serve.listen)"))?;
    let address = listener.local_addr().context("cannot read the listening address")?;
    let scheme = if web.security.as_ref().is_some_and(|s| s.tls.is_some()) { "https" } else { "http" };
    let targets: Vec<String> = fleet.targets.iter().map(|t| format!("{} ({})", t.name, t.database.target)).collect();
    tracing::info!(
        %address,
        targets = %targets.join(", "),
        shard = fleet.shard.index,
        shards = fleet.shard.count,
        "listening; metrics at {scheme}://{address}/metrics"
    );
    let shutdown = shutdown_on_signals()?;
    daemon::run(fleet, listener, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

async fn scan_once(args: ScanArgs) -> anyhow::Result<ExitCode> {
    let config = Fleet::load(&args.config)?.select(args.target.as_deref(), "--target")?;
    let pool = db::scan_pool(&config.database, &config.scan);
    let terminal = std::io::stderr().is_terminal();
    let show_progress = |done: usize, total: usize| {
        eprint!("\rscanned {done}/{total} tenants");
        if done == total {
            eprintln!();
        }
    };
    let cancel = shutdown_on_signals()?;
    let report = scan::run(&config, &pool, &cancel, terminal.then_some(&show_progress as scan::Progress)).await?.report;
    let rendered = match args.format {
        Format::Table => report.to_table(),
        Format::Json => report.to_json() + "\n",
    };
    std::io::stdout().write_all(rendered.as_bytes()).context("cannot write the report")?;
    if let Some(e) = incomplete_scan_error(&report) {
        return Err(e);
    }
    if args.fail_on_findings && !report.findings.is_empty() {
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
