//! `pai-train ingest`, `pai-train dataset stats` and `pai-train dataset mix`: the command-line edge of
//! pai-datasets. Reads the `[[sources]]`, `[ingest]`, `[mix]` (and, for training, `[train]`) tables of `$PAI_HOME/pai.toml` (typed,
//! once, here), adds `--source` arguments, counts tokens with the default model's tokenizer, and prints
//! the summary.

use std::path::{Path, PathBuf};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use pai_datasets::ingest::{run, IngestOptions, IngestSettings, IngestSummary};
use pai_datasets::{resolve_sources, MixMode, MixSettings, SourceConfig, Store};
use serde::Deserialize;

/// The tables of `pai.toml` that ingest and training read; other tables belong to other stages.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct PaiToml {
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    #[serde(default)]
    pub ingest: IngestSettings,
    #[serde(default)]
    pub mix: MixSettings,
    #[serde(default)]
    pub train: pai_trainers::TrainConfig,
}

pub(crate) fn read_config(home: &Path) -> anyhow::Result<PaiToml> {
    let path = home.join("pai.toml");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(PaiToml::default()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let value: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    let mut wanted = toml::Table::new();
    for key in ["sources", "ingest", "mix", "train"] {
        if let Some(v) = value.get(key) {
            wanted.insert(key.into(), v.clone());
        }
    }
    wanted.try_into().with_context(|| {
        format!(
            "{}: [[sources]], [ingest], [mix] or [train]",
            path.display()
        )
    })
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
    let Setup {
        sources,
        settings,
        tokenizer,
    } = prepare(&home, &args.sources, args.model)?;
    // A one-shot run: its memory is bounded by `[ingest] part_mb` and returned when it exits.
    crate::keep_freed_memory();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} ingest {bar:30} {pos}/{len} files {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let started = std::time::Instant::now();
    let summary = run(&IngestOptions {
        home: &home,
        sources: &sources,
        day: day.clone(),
        settings,
        dry_run: args.dry_run,
        count_tokens: &tokenizer,
        progress: &progress,
    })?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_summary(&summary, &day, started.elapsed());
    }
    Ok(())
}

fn print_summary(s: &IngestSummary, day: &str, took: std::time::Duration) {
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
