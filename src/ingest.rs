//! `pai-train ingest`, `pai-train dataset stats` and `pai-train dataset mix`: the command-line edge of
//! pai-datasets. Reads the `[[sources]]`, `[ingest]`, `[mix]` (and, for training, `[train]`) tables of the configuration
//! (`pai_pipeline::LoadedConfig`), adds `--source` arguments, counts tokens with the default model's tokenizer, and prints
//! the summary.

use std::path::{Path, PathBuf};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use pai_datasets::ingest::{run, IngestOptions, IngestSettings, IngestSummary};
use pai_datasets::{resolve_sources, MixMode, SourceConfig, Store};

/// The configuration: `$PAI_HOME/pai.toml` over the embedded defaults, under `PAI_*` variables.
pub(crate) fn read_config(home: &Path) -> anyhow::Result<pai_pipeline::Config> {
    Ok(pai_pipeline::LoadedConfig::load(home, None)?.config)
}

pub struct IngestArgs {
    pub sources: Vec<String>,
    pub day: Option<String>,
    pub dry_run: bool,
    pub model: Option<PathBuf>,
    pub json: bool,
}

/// What an ingest needs, read once: the sources (pai.toml's and `--source`'s), `[ingest]`, and the
/// tokenizer that counts.
pub(crate) struct Setup {
    pub sources: Vec<pai_datasets::Source>,
    pub settings: IngestSettings,
    pub tokenizer: pai_model::Tokenizer,
}

pub(crate) fn prepare(
    home: &Path,
    extra_sources: &[String],
    model: Option<PathBuf>,
) -> anyhow::Result<Setup> {
    let mut config = read_config(home)?;
    for s in extra_sources {
        config.sources.push(SourceConfig::from_arg(s)?);
    }
    anyhow::ensure!(
        !config.sources.is_empty(),
        "no sources: add [[sources]] to {} or pass --source DIR[:notes|code|chat]",
        home.join("pai.toml").display()
    );
    let sources = resolve_sources(&config.sources)?;
    let model = crate::resolve_model(model)?;
    let tokenizer = pai_model::Tokenizer::from_model_path(&model)?;
    Ok(Setup {
        sources,
        settings: config.ingest,
        tokenizer,
    })
}

/// Today's local date, YYYY-MM-DD: the day new examples belong to.
pub(crate) fn today() -> String {
    chrono::Local::now().format("%Y-%m-%d").to_string()
}

pub fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    let home = crate::pai_home();
    let day = match args.day {
        Some(d) => {
            chrono::NaiveDate::parse_from_str(&d, "%Y-%m-%d")
                .with_context(|| format!("--day {d:?} is not a date like 2026-11-22"))?;
            d
        }
        None => today(),
    };
    let started = std::time::Instant::now();
    let summary = ingest_day(
        &home,
        &args.sources,
        &day,
        args.model,
        args.dry_run,
        !args.json,
    )?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_summary(&summary, &day, started.elapsed());
    }
    Ok(())
}

/// Ingest the sources (pai.toml's and `extra_sources`) as `day`'s, with a progress bar when `bar`.
pub(crate) fn ingest_day(
    home: &Path,
    extra_sources: &[String],
    day: &str,
    model: Option<PathBuf>,
    dry_run: bool,
    bar: bool,
) -> anyhow::Result<IngestSummary> {
    let Setup {
        sources,
        settings,
        tokenizer,
    } = prepare(home, extra_sources, model)?;
    // A one-shot run: its memory is bounded by `[ingest] part_mb` and returned when it exits.
    crate::keep_freed_memory();
    let progress_bar = ProgressBar::new(0);
    progress_bar.set_style(
        ProgressStyle::with_template("{spinner} ingest {bar:30} {pos}/{len} files {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if !bar {
        progress_bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let progress = |done: usize, total: usize| {
        progress_bar.set_length(total as u64);
        progress_bar.set_position(done as u64);
    };
    let summary = run(&IngestOptions {
        home,
        sources: &sources,
        day: day.to_string(),
        settings,
        dry_run,
        count_tokens: &tokenizer,
        progress: &progress,
    })?;
    progress_bar.finish_and_clear();
    Ok(summary)
}

pub(crate) fn print_summary(s: &IngestSummary, day: &str, took: std::time::Duration) {
    let verb = if s.dry_run { "would add" } else { "added" };
    println!(
        "ingest {day}{}: {} files seen, {} new, {} changed, {} moved, {} deleted, {} unchanged ({:.1} MB read in {:.1?})",
        if s.dry_run { " (dry run)" } else { "" },
        s.files_seen, s.files_new, s.files_changed, s.files_renamed, s.files_deleted, s.files_unchanged,
        s.bytes_read as f64 / 1e6, took
    );
    let kinds: Vec<String> = s
        .examples_added
        .iter()
        .map(|(k, n)| format!("{n} {}", k.as_str()))
        .collect();
    println!(
        "{verb} {} examples ({}), {} tokens; {} duplicates and {} near-duplicates dropped; {} examples retracted",
        s.examples_added.values().sum::<usize>(),
        if kinds.is_empty() {
            "none".into()
        } else {
            kinds.join(", ")
        },
        s.tokens_added,
        s.duplicates,
        s.near_duplicates,
        s.examples_retracted
    );
    if let Some(n) = s.privacy_index_shingles {
        println!("privacy index rebuilt: {n} sampled shingles of private text");
    }
    if let Some(n) = s.shareable_index_shingles {
        println!("shareable index rebuilt: {n} sampled shingles of shareable sources' text");
    }
    if !s.redactions.is_empty() {
        let r: Vec<String> = s
            .redactions
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        println!("redacted: {}", r.join(", "));
    }
    for (reason, n) in &s.skipped {
        println!("skipped {n:>6}  {}", reason.describe());
    }
}

pub fn dataset_stats(json: bool) -> anyhow::Result<()> {
    let home = crate::pai_home();
    let rows = Store::open(&home.join("dataset"))?.stats()?;
    if json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("the dataset in {} is empty", home.join("dataset").display());
        return Ok(());
    }
    println!(
        "{:<10}  {:<16}  {:<6}  {:<7}  {:>8}  {:>10}  {:>10}  {:>7}",
        "day", "source", "kind", "split", "examples", "tokens", "redactions", "private"
    );
    let mut total = pai_datasets::StatsRow::default();
    for r in &rows {
        println!(
            "{:<10}  {:<16}  {:<6}  {:<7}  {:>8}  {:>10}  {:>10}  {:>7}",
            r.day, r.source, r.kind, r.split, r.examples, r.tokens, r.redactions, r.private
        );
        total.examples += r.examples;
        total.tokens += r.tokens;
        total.redactions += r.redactions;
        total.private += r.private;
    }
    println!(
        "{:<10}  {:<16}  {:<6}  {:<7}  {:>8}  {:>10}  {:>10}  {:>7}",
        "total", "", "", "", total.examples, total.tokens, total.redactions, total.private
    );
    Ok(())
}

/// `pai-train dataset mix`: what a night's training would read, by day, without training.
pub fn dataset_mix(day: Option<String>, mode: MixMode, json: bool) -> anyhow::Result<()> {
    let home = crate::pai_home();
    let config = read_config(&home)?;
    let day = day.unwrap_or_else(today);
    let store = Store::open(&home.join("dataset"))?;
    let mix = pai_datasets::training_mix(
        &store,
        &day,
        mode,
        &config.mix,
        &std::collections::HashSet::new(),
    )?;
    if json {
        let out = serde_json::json!({
            "day": day,
            "mode": mode,
            "settings": config.mix,
            "examples": mix.examples.len(),
            "new_tokens": mix.new_tokens,
            "replay_tokens": mix.replay_tokens,
            "by_day": mix.by_day,
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "training mix for {day} ({}): {} examples, {} tokens from {day}, {} replayed",
        match mode {
            MixMode::Continue => "continue",
            MixMode::Cumulative => "cumulative",
        },
        mix.examples.len(),
        mix.new_tokens,
        mix.replay_tokens
    );
    for (d, n) in &mix.by_day {
        println!("  {d}  {n:>8} examples");
    }
    Ok(())
}
