//! `pai-train watch`: keep the journal and dataset current as files change, so the nightly ingest
//! finds only what changed in its last minutes rather than a day's worth.
//!
//! It watches every source root with `notify` (inotify, FSEvents, ReadDirectoryChangesW), waits until
//! changes have been quiet for the debounce interval (an editor's save is several events; a `git
//! checkout` is thousands), then runs an ingest of the sources that changed — the same `ingest::run` the
//! nightly job runs, with the same journal, scrubber and dedup, so the two never disagree. Events under
//! `$PAI_HOME` are ignored (a source may contain it; pai's own writes must not wake it up). When the
//! watcher is not running, nothing is lost: the next ingest's scan finds the changes by size and mtime.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use notify::{RecursiveMode, Watcher};
use pai_datasets::ingest::{run, IngestOptions};
use pai_datasets::Source;

pub struct WatchArgs {
    pub sources: Vec<String>,
    pub model: Option<PathBuf>,
    pub debounce: Duration,
    /// Stop after this many ingests (tests); `None` runs until interrupted.
    pub max_runs: Option<usize>,
}

pub fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let home = crate::pai_home();
    let home_canonical = home.canonicalize().unwrap_or_else(|_| home.clone());
    let setup = crate::ingest::prepare(&home, &args.sources, args.model)?;
    let (tx, rx) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |event| {
        // The receiver lives as long as the loop below; a send error means it has ended.
        let _ = tx.send(event);
    })
    .context("cannot start the file watcher")?;
    for s in &setup.sources {
        watcher
            .watch(&s.root, RecursiveMode::Recursive)
            .with_context(|| format!("cannot watch {}", s.root.display()))?;
        tracing::info!(source = %s.name, root = %s.root.display(), "watching");
    }
    println!(
        "watching {} source(s); ingesting {}s after changes settle (Ctrl-C stops)",
        setup.sources.len(),
        args.debounce.as_secs_f64()
    );
    let mut runs = 0usize;
    loop {
        // Wait for a relevant change, then until changes are quiet for the debounce interval.
        let mut changed: Vec<usize> = Vec::new();
        let mut quiet_since = None::<Instant>;
        loop {
            let timeout = match quiet_since {
                None => Duration::from_secs(3600),
                Some(t) => args.debounce.saturating_sub(t.elapsed()),
            };
            match rx.recv_timeout(timeout) {
                Ok(Ok(event)) => {
                    let hit = sources_hit(&setup.sources, &event.paths, &home_canonical);
                    if !hit.is_empty() {
                        for i in hit {
                            if !changed.contains(&i) {
                                changed.push(i);
                            }
                        }
                        quiet_since = Some(Instant::now());
                    }
                }
                Ok(Err(e)) => {
                    // Overflow or a watch lost: ingest everything to be safe.
                    tracing::warn!(error = %e, "watcher error; rescanning every source");
                    changed = (0..setup.sources.len()).collect();
                    quiet_since = Some(Instant::now());
                }
                Err(mpsc::RecvTimeoutError::Timeout) if quiet_since.is_some() => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    anyhow::bail!("the file watcher stopped")
                }
            }
        }
        changed.sort_unstable();
        let sources: Vec<Source> = changed.iter().map(|&i| setup.sources[i].clone()).collect();
        let day = crate::ingest::today();
        let started = Instant::now();
        let summary = run(&IngestOptions {
            home: &home,
            sources: &sources,
            day: day.clone(),
            settings: setup.settings.clone(),
            dry_run: false,
            count_tokens: &setup.tokenizer,
            progress: &|_, _| {},
        });
        match summary {
            Ok(s) => println!(
                "{} ingest {day}: {} new, {} changed, {} moved, {} deleted file(s); {} example(s) added, {} retracted ({:.1?})",
                chrono::Local::now().format("%H:%M:%S"),
                s.files_new,
                s.files_changed,
                s.files_renamed,
                s.files_deleted,
                s.examples_added.values().sum::<usize>(),
                s.examples_retracted,
                started.elapsed()
            ),
            // A failed ingest (disk full, a source unmounted) is reported and retried on the next
            // change; the journal was not written, so nothing is lost.
            Err(e) => eprintln!("ingest failed: {e}"),
        }
        runs += 1;
        if args.max_runs.is_some_and(|m| runs >= m) {
            return Ok(());
        }
    }
}

/// The indexes of the sources whose roots contain one of `paths`, leaving out paths under `home`.
fn sources_hit(sources: &[Source], paths: &[PathBuf], home: &Path) -> Vec<usize> {
    let mut out = Vec::new();
    for p in paths {
        if p.starts_with(home) {
            continue;
        }
        for (i, s) in sources.iter().enumerate() {
            if p.starts_with(&s.root) && !out.contains(&i) {
                out.push(i);
            }
        }
    }
    out
}
