//! The daemon's scan loop, driven by `scripts/bench`: a full scan, then incremental scans with
//! nothing changed, then incremental scans after each run of a change script, then more
//! unchanged scans to see whether memory stays flat. Every scan records its report in a
//! [`Metrics`] registry, as the daemon does. Prints one JSON line per scan (kind, wall seconds,
//! tables checked and carried forward, RSS and peak RSS in KiB, and from a counting allocator
//! the heap in use after the scan, its peak during the scan and the part the report holds) and
//! writes the last report's JSON to `--report`; then a last line with the heap the incremental
//! state held (`state_kib`).
//!
//! ```text
//! incremental_bench --config FILE --report OUT.json [--unchanged N] [--changed N] [--repeat N] \
//!     [--change-sql FILE]
//! ```
//! The change script runs in its own session before each changed scan, with `:round` replaced
//! by the round number (1, 2, ...); the session's statistics are flushed before the scan.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{bail, Context as _};
use tenant_audit::config::Config;
use tenant_audit::incremental::State;
use tenant_audit::metrics::Metrics;
use tenant_audit::report::Report;
use tenant_audit::scan::Scanned;
use tokio_util::sync::CancellationToken;

/// The system allocator, counting the bytes in use and their peak (what RSS cannot tell apart:
/// live data, and memory the allocator keeps for reuse).
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let now = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; only counters are updated.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap bytes in use, in KiB.
fn heap_kib() -> usize {
    LIVE.load(Ordering::Relaxed) / 1024
}

struct Args {
    config: PathBuf,
    report: PathBuf,
    unchanged: usize,
    changed: usize,
    repeat: usize,
    change_sql: Option<PathBuf>,
}

fn args() -> anyhow::Result<Args> {
    let mut out =
        Args { config: PathBuf::new(), report: PathBuf::new(), unchanged: 3, changed: 0, repeat: 0, change_sql: None };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--config" => out.config = value.into(),
            "--report" => out.report = value.into(),
            "--unchanged" => out.unchanged = value.parse().context("--unchanged")?,
            "--changed" => out.changed = value.parse().context("--changed")?,
            "--repeat" => out.repeat = value.parse().context("--repeat")?,
            "--change-sql" => out.change_sql = Some(value.into()),
            other => bail!("unknown flag {other}"),
        }
    }
    if out.config.as_os_str().is_empty() || out.report.as_os_str().is_empty() {
        bail!("--config and --report are required");
    }
    if out.changed > 0 && out.change_sql.is_none() {
        bail!("--changed needs --change-sql");
    }
    Ok(out)
}

/// (VmRSS, VmHWM) of this process in KiB.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// What every scan of the loop needs, and the last report (held while the next scan runs, as
/// the daemon holds it for `/report`).
struct Bench<'a> {
    config: &'a Config,
    pool: &'a tenant_audit::db::Pool,
    metrics: &'a Metrics,
    never: &'a CancellationToken,
    state: &'a mut State,
    last: Option<Report>,
}

impl Bench<'_> {
    /// One incremental scan (full when the state says so), recorded in the metrics; prints its
    /// line. `report_kib` is the heap the previous report held (dropped after this scan).
    async fn scan(&mut self, phase: &str, round: usize) -> anyhow::Result<()> {
        PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
        let started = Instant::now();
        let scanned =
            tenant_audit::scan::run_with(self.config, self.pool, self.never, None, Some(&mut *self.state)).await?;
        let seconds = started.elapsed().as_secs_f64();
        self.metrics.record_report(&scanned.report, self.config.metrics.max_tenant_series);
        let heap_peak = PEAK.load(Ordering::Relaxed) / 1024;
        // The catalog and shape go (heal would use them); the report stays until the next scan.
        let Scanned { report, catalog, shape } = scanned;
        drop((catalog, shape));
        let with_previous = heap_kib();
        drop(self.last.replace(report));
        let heap = heap_kib();
        let (rss, hwm) = rss();
        let s = &self.last.as_ref().expect("just stored").scan;
        println!(
            "{{\"phase\": \"{phase}\", \"round\": {round}, \"kind\": \"{}\", \"seconds\": {seconds:.4}, \
             \"tables_checked\": {}, \"tables_carried_forward\": {}, \"rss_kib\": {rss}, \"hwm_kib\": {hwm}, \
             \"heap_kib\": {heap}, \"heap_peak_kib\": {heap_peak}, \"report_kib\": {}}}",
            s.kind.name(),
            s.tables_checked,
            s.tables_carried_forward,
            with_previous - heap
        );
        Ok(())
    }
}

/// The allocator is tuned as the daemon's is, before the runtime starts its threads.
fn main() -> anyhow::Result<()> {
    tenant_audit::memory::tune_allocator();
    tokio::runtime::Runtime::new()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args = args()?;
    let config = Config::load(&args.config)?;
    let pool = tenant_audit::db::scan_pool(&config.database, &config.scan);
    let metrics = Metrics::new(&config.name);
    let never = CancellationToken::new();
    let mut state = State::default();
    let mut bench =
        Bench { config: &config, pool: &pool, metrics: &metrics, never: &never, state: &mut state, last: None };
    bench.scan("full", 0).await?;
    for round in 1..=args.unchanged {
        bench.scan("unchanged", round).await?;
    }
    if let Some(path) = &args.change_sql {
        let script = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let (client, connection) = tokio_postgres::connect(&std::env::var("BENCH_CHANGE_URL")?, tokio_postgres::NoTls)
            .await
            .context("connect for the change script (BENCH_CHANGE_URL)")?;
        tokio::spawn(connection);
        for round in 1..=args.changed {
            client.batch_execute(&script.replace(":round", &round.to_string())).await.context("change script")?;
            client.batch_execute("SELECT pg_stat_force_next_flush()").await?;
            bench.scan("changed", round).await?;
        }
    }
    for round in 1..=args.repeat {
        bench.scan("repeat", round).await?;
    }
    let last = bench.last.take().expect("at least one scan");
    std::fs::write(&args.report, last.to_json()).with_context(|| format!("write {}", args.report.display()))?;
    // What the state between scans holds: the heap it frees.
    let with_state = heap_kib();
    drop(std::mem::take(bench.state));
    println!("{{\"phase\": \"end\", \"state_kib\": {}}}", with_state - heap_kib());
    Ok(())
}
