//! Where the host's time goes while it runs something: a sampling profiler inside the program
//! (the `host-profile` feature), for machines with no system profiler. Writes folded stacks
//! (`thread;outermost;…;innermost count` per line), the input of flame-graph tools.

use std::path::Path;

use anyhow::Result;

/// Samples every thread of the process at `hertz` while `work` runs, and writes the folded stacks
/// to `out`. Samples whose innermost frame is in libc, libgcc, libpthread or the vDSO are dropped
/// (unwinding from inside them can deadlock), so malloc and syscalls show up only as the gap
/// between the samples taken and `hertz` × the CPU time used; the returned count says how many
/// were kept.
#[cfg(all(feature = "host-profile", target_os = "linux"))]
pub fn sample(out: &Path, hertz: i32, work: impl FnOnce() -> Result<()>) -> Result<usize> {
    use std::fmt::Write as _;

    use anyhow::Context;

    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(hertz)
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()
        .context("starting the sampling profiler")?;
    work()?;
    let report = guard
        .report()
        .build()
        .context("building the profiler's report")?;
    let mut folded = String::new();
    let mut kept = 0;
    for (frames, &count) in &report.data {
        let mut line = frames.thread_name.replace([';', ' '], "_");
        // Innermost first in the report; folded stacks start from the outermost frame.
        for symbols in frames.frames.iter().rev() {
            for symbol in symbols.iter().rev() {
                line.push(';');
                line.push_str(&symbol.name().replace([';', ' '], "_"));
            }
        }
        writeln!(folded, "{line} {count}")?;
        kept += count.max(0) as usize;
    }
    std::fs::write(out, folded).with_context(|| format!("writing {}", out.display()))?;
    Ok(kept)
}

/// Built without the `host-profile` feature (or not on Linux): says so.
#[cfg(not(all(feature = "host-profile", target_os = "linux")))]
pub fn sample(_out: &Path, _hertz: i32, _work: impl FnOnce() -> Result<()>) -> Result<usize> {
    anyhow::bail!("--host-profile needs a build with `--features host-profile` on Linux")
}
