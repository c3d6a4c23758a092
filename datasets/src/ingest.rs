//! One ingest run: sources → changed files → examples → scrubbed, deduplicated rows in today's
//! partition; examples of deleted or newly excluded files retracted; journals saved last.
//!
//! Order matters for crash safety: the dataset is written before the journals, so a crash in between
//! makes the next run redo the same examples, which exact dedup then drops — never a journal that
//! claims examples the dataset does not have.

use std::collections::BTreeMap;

use hashbrown::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{DatasetError, Result};
use crate::example::{content_id, hex, Budget, CountTokens, Example, Kind};
use crate::file_examples::{file_examples, FileExamples};
use crate::fim::FimSettings;
use crate::journal::{Deletion, FileEntry, Journal};
use crate::minhash::NearDupIndex;
use crate::privacy_index::PrivacyIndex;
use crate::scrub::PiiPolicy;
use crate::source::{Privacy, Source};
use crate::store::Store;
use crate::walk::{read_text, walk, FoundFile, SkipReason};

/// The `[ingest]` table of `pai.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestSettings {
    /// Share of examples held out for evaluation, by content hash.
    pub holdout_fraction: f64,
    pub budget: Budget,
    pub pii: PiiPolicy,
    /// Estimated Jaccard similarity (of 5-word shingles) from which a new example is a near-duplicate
    /// of one already in the dataset or earlier in the run, and is dropped. Above 1 turns it off.
    pub near_duplicate_threshold: f64,
    pub fim: FimSettings,
    /// Megabytes of new examples' text held in memory before they are written out as parts of the
    /// day: memory stays bounded whatever the size of the run, and the parquet encoding overlaps the
    /// reading of later files. Smaller means less memory and more part files.
    pub part_mb: usize,
}

impl Default for IngestSettings {
    fn default() -> Self {
        Self {
            holdout_fraction: 0.05,
            budget: Budget::default(),
            pii: PiiPolicy::default(),
            near_duplicate_threshold: 0.8,
            fim: FimSettings::default(),
            part_mb: 96,
        }
    }
}

/// What one run is asked to do.
pub struct IngestOptions<'a> {
    /// `$PAI_HOME`: the journal and dataset live under it.
    pub home: &'a Path,
    pub sources: &'a [Source],
    /// The day the new examples belong to, YYYY-MM-DD.
    pub day: String,
    pub settings: IngestSettings,
    /// Count, read and report, but write nothing.
    pub dry_run: bool,
    /// Token counts (the model's tokenizer).
    pub count_tokens: &'a dyn CountTokens,
    /// Called after each file with (files done, files in all).
    pub progress: &'a (dyn Fn(usize, usize) + Sync),
}

/// What a run did, for the summary.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IngestSummary {
    pub files_seen: usize,
    pub files_unchanged: usize,
    pub files_new: usize,
    pub files_changed: usize,
    pub files_renamed: usize,
    pub files_deleted: usize,
    pub bytes_read: u64,
    pub skipped: BTreeMap<SkipReason, usize>,
    pub examples_added: BTreeMap<Kind, usize>,
    pub tokens_added: usize,
    /// Examples already in the dataset (the same text elsewhere, or from an earlier day).
    pub duplicates: usize,
    /// Examples dropped as near-duplicates of one in the dataset or earlier in the run.
    pub near_duplicates: usize,
    /// Sampled shingles in the privacy index, when this run rebuilt it.
    pub privacy_index_shingles: Option<usize>,
    /// Sampled shingles in the shareable index, when it was rebuilt.
    pub shareable_index_shingles: Option<usize>,
    pub examples_retracted: usize,
    pub redactions: BTreeMap<String, usize>,
    pub dry_run: bool,
}

/// Run an ingest.
pub fn run(opts: &IngestOptions) -> Result<IngestSummary> {
    let store = Store::open(&opts.home.join("dataset"))?;
    let existing: HashSet<String> = store.ids()?.into_keys().collect();
    let mut summary = IngestSummary {
        dry_run: opts.dry_run,
        ..Default::default()
    };
    // Every source's journal and walk first: the examples that may leave the dataset in this run
    // (those of files changed or gone) are then known before any file is read.
    let mut walked = Vec::with_capacity(opts.sources.len());
    let mut may_leave: HashSet<String> = HashSet::new();
    for source in opts.sources {
        let mut journal = Journal::load(opts.home, &source.name)?;
        match &journal.root {
            Some(was) if *was != source.root && was.exists() => {
                return Err(DatasetError::SourceNameTaken {
                    name: source.name.clone(),
                    was: was.clone(),
                    now: source.root.clone(),
                });
            }
            Some(was) if *was != source.root => {
                tracing::info!(source = %source.name, from = %was.display(), to = %source.root.display(), "source moved");
            }
            _ => {}
        }
        journal.root = Some(source.root.clone());
        let found = walk(source);
        for (r, n) in &found.skipped {
            *summary.skipped.entry(*r).or_default() += n;
        }
        summary.files_seen += found.files.len();
        may_leave.extend(changed_or_gone(&journal, &found.files));
        walked.push((source, journal, found));
    }
    let mut dedup = Dedup {
        existing: &existing,
        seen_now: HashSet::new(),
        near: NearDups::NotLoaded {
            store: &store,
            may_leave,
            threshold: opts.settings.near_duplicate_threshold,
        },
    };
    let mut sink = Sink {
        store: &store,
        day: &opts.day,
        dry_run: opts.dry_run,
        buffered: Vec::new(),
        bytes: 0,
        flush_bytes: opts.settings.part_mb << 20,
        any_private: false,
        added_from: HashSet::new(),
    };
    let mut journals = Vec::with_capacity(walked.len());
    let mut retract_candidates: HashSet<String> = HashSet::new();
    for (source, mut journal, found) in walked {
        ingest_source(
            opts,
            source,
            &mut journal,
            &found.files,
            &mut dedup,
            &mut sink,
            &mut retract_candidates,
            &mut summary,
        )?;
        journals.push((source.name.clone(), journal));
    }
    sink.flush()?;
    // Ids still produced by some file of some source stay; the rest leave the dataset. Journals of
    // sources not in this run count too (a source left out of one run is not a deletion).
    let mut referenced: HashSet<String> = HashSet::new();
    for (_, j) in &journals {
        referenced.extend(j.files.values().flat_map(|f| f.examples.iter().cloned()));
    }
    for other in other_journals(opts.home, opts.sources)? {
        referenced.extend(
            other
                .files
                .values()
                .flat_map(|f| f.examples.iter().cloned()),
        );
    }
    let retract: HashSet<String> = retract_candidates
        .into_iter()
        .filter(|id| !referenced.contains(id) && existing.contains(id))
        .collect();
    summary.examples_retracted = retract.len();
    if !opts.dry_run {
        store.retract(&retract)?;
        let index_path = PrivacyIndex::path(opts.home);
        if sink.any_private || !retract.is_empty() || !PrivacyIndex::is_current(&index_path) {
            let texts = store.private_texts()?;
            let index = PrivacyIndex::build(texts.iter().map(String::as_str));
            index.save(&index_path)?;
            summary.privacy_index_shingles = Some(index.len());
        }
        summary.shareable_index_shingles =
            update_shareable_index(opts, &store, &sink.added_from, !retract.is_empty())?;
        for (name, j) in &journals {
            j.save(opts.home, name)?;
        }
    }
    Ok(summary)
}

/// Rebuild the shareable index (the privacy index's shingles of the examples of sources marked
/// `shareable`, private notes in them left out) when what it should hold may have changed: a
/// shareable source added examples, examples were retracted, the file is missing or in another
/// format, or a source became or stopped being shareable. The sources it was built from are kept
/// beside it; sources not in this run keep their standing. Returns its size when rebuilt.
fn update_shareable_index(
    opts: &IngestOptions,
    store: &Store,
    added_from: &HashSet<String>,
    retracted: bool,
) -> Result<Option<usize>> {
    let recorded = PrivacyIndex::shareable_sources(opts.home)?;
    let mut names = recorded.clone();
    for source in opts.sources {
        if source.privacy == Privacy::Shareable {
            names.insert(source.name.clone());
        } else {
            names.remove(&source.name);
        }
    }
    let path = PrivacyIndex::shareable_path(opts.home);
    let stale = names != recorded
        || (!names.is_empty()
            && (retracted
                || names.iter().any(|n| added_from.contains(n))
                || !PrivacyIndex::is_current(&path)));
    if !stale {
        return Ok(None);
    }
    let texts = store.shareable_texts(&names)?;
    let index = PrivacyIndex::build(texts.iter().map(String::as_str));
    index.save(&path)?;
    PrivacyIndex::save_shareable_sources(opts.home, &names)?;
    Ok(Some(index.len()))
}

/// The example ids of journal entries whose file is gone or changed size or mtime.
fn changed_or_gone(journal: &Journal, files: &[FoundFile]) -> Vec<String> {
    let now: HashMap<&str, (u64, u128)> = files
        .iter()
        .map(|f| (f.relative.as_str(), (f.size, f.mtime_ns)))
        .collect();
    journal
        .files
        .iter()
        .filter(|(path, e)| now.get(path.as_str()) != Some(&(e.size, e.mtime_ns)))
        .flat_map(|(_, e)| e.examples.iter().cloned())
        .collect()
}

/// What decides whether a new example is new: its id against the dataset and the run so far, its
/// MinHash signature against those of both (in file order, so the first of two near-copies stays).
struct Dedup<'a> {
    existing: &'a HashSet<String>,
    seen_now: HashSet<String>,
    near: NearDups<'a>,
}

/// The near-duplicate index, read from the dataset when the first new example needs it (a run with
/// nothing new never reads the signatures).
enum NearDups<'a> {
    NotLoaded {
        store: &'a Store,
        /// Examples of files changed or gone, left out: an edited note is not a near-copy of its own
        /// old version.
        may_leave: HashSet<String>,
        threshold: f64,
    },
    Loaded(NearDupIndex<String>),
    Off,
}

impl NearDups<'_> {
    fn index(&mut self) -> Result<Option<&mut NearDupIndex<String>>> {
        if let NearDups::NotLoaded {
            store,
            may_leave,
            threshold,
        } = self
        {
            *self = if *threshold > 1.0 {
                NearDups::Off
            } else {
                let mut index = NearDupIndex::new(*threshold);
                for (id, signature) in store.signatures(may_leave)? {
                    index.insert(id, signature);
                }
                NearDups::Loaded(index)
            };
        }
        Ok(match self {
            NearDups::Loaded(index) => Some(index),
            _ => None,
        })
    }
}

impl Dedup<'_> {
    /// The examples of one file that are new, counting the others in `summary`. A FIM example goes
    /// with its code example (same text): it is dropped when that is a near-duplicate.
    fn keep(
        &mut self,
        examples: Vec<Example>,
        summary: &mut IngestSummary,
    ) -> Result<Vec<Example>> {
        let mut kept = Vec::with_capacity(examples.len());
        let mut dropped: Vec<String> = Vec::new();
        for e in examples {
            if self.existing.contains(&e.id) || !self.seen_now.insert(e.id.clone()) {
                summary.duplicates += 1;
                continue;
            }
            if let (Some(signature), false) = (&e.minhash, e.kind == Kind::Fim) {
                if let Some(index) = self.near.index()? {
                    if let Some((like, similarity)) = index.find(signature) {
                        tracing::debug!(path = %e.path, like = %like, similarity, "near-duplicate dropped");
                        summary.near_duplicates += 1;
                        dropped.push(e.id);
                        continue;
                    }
                    index.insert(e.id.clone(), (**signature).clone());
                }
            }
            kept.push(e);
        }
        if !dropped.is_empty() {
            kept.retain(|e| e.kind != Kind::Fim || !dropped.contains(&content_id(&e.text)));
        }
        Ok(kept)
    }
}

/// New examples on their way to the day's parts: written out every `part_mb` of text and at the
/// end. Rows written before a crash have no journal entry yet; the next run makes them again and
/// finds them already there (exact duplicates), so nothing is lost or doubled.
struct Sink<'a> {
    store: &'a Store,
    day: &'a str,
    dry_run: bool,
    buffered: Vec<Example>,
    bytes: usize,
    flush_bytes: usize,
    /// Whether a private example was added (the privacy index is then rebuilt).
    any_private: bool,
    /// The sources that added examples (a shareable one's rebuilds the shareable index).
    added_from: HashSet<String>,
}

impl Sink<'_> {
    fn push(&mut self, e: Example, summary: &mut IngestSummary) -> Result<()> {
        *summary.examples_added.entry(e.kind).or_default() += 1;
        summary.tokens_added += e.n_tokens as usize;
        self.any_private |= e.private;
        if !self.added_from.contains(&e.source) {
            self.added_from.insert(e.source.clone());
        }
        self.bytes += e.text.len() + e.context.len();
        self.buffered.push(e);
        if self.bytes >= self.flush_bytes {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if !self.dry_run && !self.buffered.is_empty() {
            self.store.append_new(self.day, &self.buffered)?;
        }
        self.buffered.clear();
        self.bytes = 0;
        Ok(())
    }
}

fn other_journals(home: &Path, sources: &[Source]) -> Result<Vec<Journal>> {
    let dir = home.join("journal");
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(out);
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(source) = name.strip_suffix(".json") {
            if !sources.iter().any(|s| s.name == source) {
                out.push(Journal::load(home, source)?);
            }
        }
    }
    Ok(out)
}

/// One source's files against its journal: each file's result, in file order, updates the journal
/// and sends its new examples on; what vanished is recorded as deleted.
#[allow(clippy::too_many_arguments)]
fn ingest_source(
    opts: &IngestOptions,
    source: &Source,
    journal: &mut Journal,
    files: &[FoundFile],
    dedup: &mut Dedup,
    sink: &mut Sink,
    retract: &mut HashSet<String>,
    summary: &mut IngestSummary,
) -> Result<()> {
    let present: HashSet<&str> = files.iter().map(|f| f.relative.as_str()).collect();
    // Files in the journal that are gone from disk: by content hash, for recognising moves.
    let mut vanished: HashMap<String, String> = journal
        .files
        .iter()
        .filter(|(p, _)| !present.contains(p.as_str()))
        .map(|(p, e)| (e.hash.clone(), p.clone()))
        .collect();
    let total = files.len();
    let vanished_hashes: HashSet<String> = vanished.keys().cloned().collect();
    // What the workers need of the journal, copied: the journal itself changes as results arrive.
    let before: Vec<Option<(u64, u128, String)>> = files
        .iter()
        .map(|f| {
            journal
                .files
                .get(&f.relative)
                .map(|o| (o.size, o.mtime_ns, o.hash.clone()))
        })
        .collect();
    process_files(opts, source, &before, files, &vanished_hashes, |i, done| {
        let file = &files[i];
        let old = journal.files.get(&file.relative).cloned();
        let Some(done) = done else {
            summary.files_unchanged += 1;
            return Ok(());
        };
        let (text_len, hash, examples) = match done {
            Ok(read) => read,
            Err(reason) => {
                *summary.skipped.entry(reason).or_default() += 1;
                // A file that became junk leaves; one that was busy or unreadable keeps its examples.
                if !matches!(
                    reason,
                    SkipReason::ChangedWhileReading | SkipReason::Unreadable
                ) {
                    if let Some(o) = journal.files.remove(&file.relative) {
                        retract.extend(o.examples);
                    }
                }
                return Ok(());
            }
        };
        summary.bytes_read += text_len as u64;
        let entry = |examples| FileEntry {
            size: file.size,
            mtime_ns: file.mtime_ns,
            hash: hash.clone(),
            examples,
        };
        if let Some(o) = &old {
            if o.hash == hash {
                // Touched, not changed.
                summary.files_unchanged += 1;
                journal
                    .files
                    .insert(file.relative.clone(), entry(o.examples.clone()));
                return Ok(());
            }
        } else if let Some(from) = vanished.remove(&hash) {
            // Moved or renamed: same content, same examples.
            summary.files_renamed += 1;
            if let Some(o) = journal.files.remove(&from) {
                journal
                    .files
                    .insert(file.relative.clone(), entry(o.examples));
            }
            return Ok(());
        }
        if old.is_some() {
            summary.files_changed += 1;
        } else {
            summary.files_new += 1;
        }
        // Made by the workers unless the content matched a vanished file there (a second copy of a
        // moved file).
        let (examples, excluded, redactions) = match examples {
            Some(made) => made,
            None => match read_text(file, source.kind) {
                Ok(text) => file_examples(opts, source, &file.relative, &text),
                Err(reason) => {
                    *summary.skipped.entry(reason).or_default() += 1;
                    return Ok(());
                }
            },
        };
        if excluded {
            *summary.skipped.entry(SkipReason::Excluded).or_default() += 1;
        }
        for (k, n) in redactions {
            *summary.redactions.entry(k).or_default() += n;
        }
        let ids: Vec<String> = examples.iter().map(|e| e.id.clone()).collect();
        if let Some(o) = old {
            let now: HashSet<&String> = ids.iter().collect();
            retract.extend(o.examples.into_iter().filter(|id| !now.contains(id)));
        }
        journal.files.insert(file.relative.clone(), entry(ids));
        for e in dedup.keep(examples, summary)? {
            sink.push(e, summary)?;
        }
        Ok(())
    })?;
    (opts.progress)(total, total);
    // What vanished and was not found elsewhere was deleted.
    for (hash, path) in vanished {
        if let Some(o) = journal.files.remove(&path) {
            summary.files_deleted += 1;
            retract.extend(o.examples);
            journal.deleted.push(Deletion {
                day: opts.day.clone(),
                path,
                hash,
            });
        }
    }
    Ok(())
}

/// What the workers made of one file that needed reading: its length, content hash, and its examples
/// unless the content is known (unchanged, or a moved file's).
type Processed = std::result::Result<(usize, String, Option<FileExamples>), SkipReason>;

/// Read, hash and split, on every core, the files whose size or mtime differ from the journal's
/// (`before`, per file), handing each result to `consume` in file order as it is ready (`None` for a
/// file that needed no reading). The workers do what an ingest spends its time on (tokenizing,
/// scrubbing, signing) while this thread keeps the journal, dedups and writes. The first error from
/// `consume` stops the run.
fn process_files(
    opts: &IngestOptions,
    source: &Source,
    before: &[Option<(u64, u128, String)>],
    files: &[FoundFile],
    vanished: &HashSet<String>,
    mut consume: impl FnMut(usize, Option<Processed>) -> Result<()>,
) -> Result<()> {
    let total = files.len();
    let (next, done, stop) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicBool::new(false),
    );
    let one = |i: usize, file: &FoundFile| -> Option<Processed> {
        let old = before[i].as_ref();
        if old.is_some_and(|(size, mtime, _)| *size == file.size && *mtime == file.mtime_ns) {
            return None;
        }
        let text = match read_text(file, source.kind) {
            Ok(t) => t,
            Err(reason) => return Some(Err(reason)),
        };
        let hash = hex(&Sha256::digest(text.as_bytes()));
        let known =
            old.is_some_and(|(_, _, h)| *h == hash) || (old.is_none() && vanished.contains(&hash));
        let examples = (!known).then(|| file_examples(opts, source, &file.relative, &text));
        Some(Ok((text.len(), hash, examples)))
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(total.max(1));
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel::<(usize, Option<Processed>)>();
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, done, stop, one) = (&next, &done, &stop, &one);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(file) = files.get(i) else { break };
                    let result = one(i, file);
                    (opts.progress)(done.fetch_add(1, Ordering::Relaxed) + 1, total);
                    if tx.send((i, result)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        // Results arrive in any order; they are consumed in file order.
        let mut waiting: BTreeMap<usize, Option<Processed>> = BTreeMap::new();
        let mut at = 0;
        let mut outcome = Ok(());
        for (i, result) in rx {
            waiting.insert(i, result);
            while let Some(result) = waiting.remove(&at) {
                if outcome.is_ok() {
                    outcome = consume(at, result);
                    if outcome.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
                at += 1;
            }
        }
        outcome
    })
}
