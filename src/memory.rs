//! How the process asks glibc's allocator to hand freed memory back, so that the daemon's RSS
//! follows the memory it uses rather than the most it ever used.
//!
//! With its defaults glibc gives every thread that meets a locked arena an arena of its own (up
//! to 8 per core), keeps memory freed at the top of each arena below a threshold that grows
//! with every large block freed, and serves large blocks from those arenas once a large
//! `mmap`ed block was freed. Measured with the daemon's scan loop at 10,000 tenants x 5 tables
//! (docs/performance.md, "Daemon memory"): a heap peak of 39 MiB made a 77 MiB RSS high-water
//! mark. [`tune_allocator`] caps the arenas at 2 and fixes both thresholds at 128 KiB (which
//! also stops them from growing), before any thread starts: the same loop then keeps
//! 52 MiB between scans and peaks at 62 MiB.
//!
//! An operator's own choice wins: a setting whose glibc environment variable is set
//! (`MALLOC_ARENA_MAX`, `MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`), or any setting when
//! `GLIBC_TUNABLES` names a `glibc.malloc` tunable, is left as glibc read it. Elsewhere than
//! Linux with glibc this does nothing.

/// The arenas glibc may create.
const ARENA_MAX: i32 = 2;
/// Bytes: freed memory above this at an arena's top goes back to the OS, and blocks at least
/// this large are `mmap`ed on their own (and unmapped when freed).
const THRESHOLD: i32 = 128 * 1024;

/// Applies the settings above. Call it first in `main`, before the async runtime starts threads.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tunables = std::env::var_os("GLIBC_TUNABLES").unwrap_or_default();
        if tunables.to_string_lossy().contains("glibc.malloc.") {
            return;
        }
        let settings = [
            ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, ARENA_MAX),
            ("MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD, THRESHOLD),
            ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, THRESHOLD),
        ];
        for (variable, param, value) in settings {
            if std::env::var_os(variable).is_none() {
                // SAFETY: `mallopt` only changes allocator parameters; every value is in range.
                unsafe { libc::mallopt(param, value) };
            }
        }
    }
}
