//! One ingest run: sources → changed files → examples → scrubbed, deduplicated rows in today's
//! partition; examples of deleted or newly excluded files retracted; journals saved last.
//!
//! Order matters for crash safety: the dataset is written before the journals, so a crash in between
//! makes the next run redo the same examples, which exact dedup then drops — never a journal that
//! claims examples the dataset does not have.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::code::{split_items, Language};
use crate::error::{DatasetError, Result};
use crate::example::{content_id, pack, Budget, Example, Kind, Split};
use crate::fim::{fim_example, FimSettings};
use crate::journal::{Deletion, FileEntry, Journal};
use crate::minhash::{NearDupIndex, Signature};
use crate::notes::{parse, NoteFormat};
use crate::privacy_index::PrivacyIndex;
use crate::scrub::{scrub, PiiPolicy};
use crate::source::{Privacy, Source, SourceKind};
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
}

impl Default for IngestSettings {
    fn default() -> Self {
        Self {
            holdout_fraction: 0.05,
            budget: Budget::default(),
            pii: PiiPolicy::default(),
            near_duplicate_threshold: 0.8,
            fim: FimSettings::default(),
        }
    }
}

/// Tokens a FIM example adds to its code: the three markers, one token each.
const FIM_MARKER_TOKENS: u32 = 3;

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
    /// Token count of a text (the model's tokenizer).
    pub count_tokens: &'a (dyn Fn(&str) -> usize + Sync),
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
    let mut journals = Vec::with_capacity(opts.sources.len());
    let mut new_examples: Vec<Example> = Vec::new();
    let mut seen_now: HashSet<String> = HashSet::new();
    let mut retract_candidates: HashSet<String> = HashSet::new();
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
        ingest_source(
            opts,
            source,
            &mut journal,
            &existing,
            &mut seen_now,
            &mut new_examples,
            &mut retract_candidates,
            &mut summary,
        );
        journals.push((source.name.clone(), journal));
    }
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
    let new_examples = drop_near_duplicates(&store, new_examples, &retract, opts, &mut summary)?;
    for e in &new_examples {
        *summary.examples_added.entry(e.kind).or_default() += 1;
        summary.tokens_added += e.n_tokens as usize;
    }
    if !opts.dry_run {
        store.append(&opts.day, &new_examples)?;
        store.retract(&retract)?;
        let index_path = PrivacyIndex::path(opts.home);
        if new_examples.iter().any(|e| e.private) || !retract.is_empty() || !index_path.exists() {
            let texts = store.private_texts()?;
            let index = PrivacyIndex::build(texts.iter().map(String::as_str));
            index.save(&index_path)?;
            summary.privacy_index_shingles = Some(index.len());
        }
        for (name, j) in &journals {
            j.save(opts.home, name)?;
        }
    }
    Ok(summary)
}

/// Drop the new examples that nearly duplicate one in the dataset (other than those being retracted)
/// or an earlier new one, and the FIM examples of dropped code.
fn drop_near_duplicates(
    store: &Store,
    new_examples: Vec<Example>,
    retract: &HashSet<String>,
    opts: &IngestOptions,
    summary: &mut IngestSummary,
) -> Result<Vec<Example>> {
    let threshold = opts.settings.near_duplicate_threshold;
    if threshold > 1.0 || new_examples.is_empty() {
        return Ok(new_examples);
    }
    let mut index = NearDupIndex::new(threshold);
    for (id, signature) in store.signatures(retract)? {
        index.insert(id, signature);
    }
    let mut dropped: HashSet<String> = HashSet::new();
    let mut dropped_from: Vec<(String, String)> = Vec::new();
    let mut kept = Vec::with_capacity(new_examples.len());
    for e in new_examples {
        if e.kind == Kind::Fim {
            kept.push(e);
            continue;
        }
        if let Some(signature) = &e.minhash {
            if let Some((like, similarity)) = index.find(signature) {
                tracing::debug!(path = %e.path, like = %like, similarity, "near-duplicate dropped");
                summary.near_duplicates += 1;
                dropped_from.push((e.source.clone(), e.path.clone()));
                dropped.insert(e.id);
                continue;
            }
            index.insert(e.id.clone(), (**signature).clone());
        }
        kept.push(e);
    }
    // A FIM example's text is its code example's text (hashed only for files that lost one).
    if !dropped.is_empty() {
        let paths: HashSet<(String, String)> = dropped_from.into_iter().collect();
        kept.retain(|e| {
            e.kind != Kind::Fim
                || !paths.contains(&(e.source.clone(), e.path.clone()))
                || !dropped.contains(&content_id(&e.text))
        });
    }
    Ok(kept)
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

#[allow(clippy::too_many_arguments)]
fn ingest_source(
    opts: &IngestOptions,
    source: &Source,
    journal: &mut Journal,
    existing: &HashSet<String>,
    seen_now: &mut HashSet<String>,
    new_examples: &mut Vec<Example>,
    retract: &mut HashSet<String>,
    summary: &mut IngestSummary,
) {
    let found = walk(source);
    for (r, n) in &found.skipped {
        *summary.skipped.entry(*r).or_default() += n;
    }
    summary.files_seen += found.files.len();
    let present: HashSet<&str> = found.files.iter().map(|f| f.relative.as_str()).collect();
    // Files in the journal that are gone from disk: by content hash, for recognising moves.
    let mut vanished: HashMap<String, String> = journal
        .files
        .iter()
        .filter(|(p, _)| !present.contains(p.as_str()))
        .map(|(p, e)| (e.hash.clone(), p.clone()))
        .collect();
    let total = found.files.len();
    let vanished_hashes: HashSet<String> = vanished.keys().cloned().collect();
    let mut processed = process_files(opts, source, journal, &found.files, &vanished_hashes);
    for (file, done) in found.files.iter().zip(processed.iter_mut()) {
        let old = journal.files.get(&file.relative).cloned();
        let Some(done) = done.take() else {
            summary.files_unchanged += 1;
            continue;
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
                continue;
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
                continue;
            }
        } else if let Some(from) = vanished.remove(&hash) {
            // Moved or renamed: same content, same examples.
            summary.files_renamed += 1;
            if let Some(o) = journal.files.remove(&from) {
                journal
                    .files
                    .insert(file.relative.clone(), entry(o.examples));
            }
            continue;
        }
        if old.is_some() {
            summary.files_changed += 1;
        } else {
            summary.files_new += 1;
        }
        // Made in the parallel pass unless the content matched a vanished file there (a second copy
        // of a moved file).
        let (examples, excluded, redactions) = match examples {
            Some(made) => made,
            None => match read_text(file, source.kind) {
                Ok(text) => file_examples(opts, source, &file.relative, &text),
                Err(reason) => {
                    *summary.skipped.entry(reason).or_default() += 1;
                    continue;
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
            retract.extend(o.examples.into_iter().filter(|id| !ids.contains(id)));
        }
        for example in examples {
            if existing.contains(&example.id) || !seen_now.insert(example.id.clone()) {
                summary.duplicates += 1;
                continue;
            }
            new_examples.push(example);
        }
        journal.files.insert(file.relative.clone(), entry(ids));
    }
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
}

type FileExamples = (Vec<Example>, bool, BTreeMap<String, usize>);
/// What the parallel pass made of one file that needed reading: its length, content hash, and its
/// examples unless the content is known (unchanged, or a moved file's).
type Processed = std::result::Result<(usize, String, Option<FileExamples>), SkipReason>;

/// Read, hash and split, on every core, the files whose size or mtime differ from the journal's
/// (`None` for the others). This is where an ingest spends its time: tokenizing and scrubbing.
fn process_files(
    opts: &IngestOptions,
    source: &Source,
    journal: &Journal,
    files: &[FoundFile],
    vanished: &HashSet<String>,
) -> Vec<Option<Processed>> {
    let total = files.len();
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let one = |file: &FoundFile| -> Option<Processed> {
        let old = journal.files.get(&file.relative);
        if old.is_some_and(|o| o.size == file.size && o.mtime_ns == file.mtime_ns) {
            return None;
        }
        let text = match read_text(file, source.kind) {
            Ok(t) => t,
            Err(reason) => return Some(Err(reason)),
        };
        let hash = hex(&Sha256::digest(text.as_bytes()));
        let known =
            old.is_some_and(|o| o.hash == hash) || (old.is_none() && vanished.contains(&hash));
        let examples = (!known).then(|| file_examples(opts, source, &file.relative, &text));
        Some(Ok((text.len(), hash, examples)))
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(total.max(1));
    let mut results: Vec<Option<Processed>> = Vec::with_capacity(total);
    results.resize_with(total, || None);
    let parts: Vec<Vec<(usize, Option<Processed>)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(file) = files.get(i) else { break };
                        mine.push((i, one(file)));
                        (opts.progress)(done.fetch_add(1, Ordering::Relaxed) + 1, total);
                    }
                    mine
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    for (i, r) in parts.into_iter().flatten() {
        results[i] = r;
    }
    results
}

/// The examples of one file's text, whether its frontmatter excludes it, and the secrets and PII
/// removed. The whole file is scrubbed before it is split, so no secret can straddle two examples.
fn file_examples(
    opts: &IngestOptions,
    source: &Source,
    relative: &str,
    text: &str,
) -> FileExamples {
    let scrubbed = scrub(text, opts.settings.pii);
    let text = scrubbed.text.as_str();
    let count = opts.count_tokens;
    let budget = opts.settings.budget;
    let (kind, privacy, pieces): (Kind, Privacy, Vec<(String, String)>) = match source.kind {
        SourceKind::Notes => {
            let ext = relative.rsplit('.').next().unwrap_or("");
            let note = parse(text, NoteFormat::from_extension(ext));
            let privacy = source.privacy.max(note.frontmatter.privacy);
            if privacy == Privacy::Exclude {
                return (Vec::new(), true, BTreeMap::new());
            }
            let title = note.frontmatter.title.clone().unwrap_or_else(|| {
                let stem = relative.rsplit('/').next().unwrap_or(relative);
                stem.rsplit_once('.').map_or(stem, |(s, _)| s).to_string()
            });
            let tags = note
                .tags
                .iter()
                .map(|t| format!("#{t}"))
                .collect::<Vec<_>>()
                .join(" ");
            // Sections under one heading path pack together; each packed text gets its context.
            let mut out = Vec::new();
            for s in &note.sections {
                let mut path = vec![title.clone()];
                path.extend(s.headings.iter().cloned());
                let context = if tags.is_empty() {
                    path.join(" > ")
                } else {
                    format!("{} [{tags}]", path.join(" > "))
                };
                for (body, tokens) in pack(std::slice::from_ref(&s.body), budget, count) {
                    out.push((context.clone(), body, tokens));
                }
            }
            (Kind::Note, privacy, merge_short(out, budget))
        }
        SourceKind::Code => {
            if source.privacy == Privacy::Exclude {
                return (Vec::new(), true, BTreeMap::new());
            }
            let Some(lang) = Language::from_path(Path::new(relative)) else {
                return (Vec::new(), false, BTreeMap::new());
            };
            let lines: Vec<&str> = text.lines().collect();
            let items: Vec<String> = split_items(text, lang)
                .into_iter()
                .map(|it| lines[it.start..it.end].join("\n"))
                .collect();
            let context = format!("{relative} ({})", lang.name());
            let header = format!("{} {relative}\n", lang.line_comment());
            let packed = pack(&items, budget, count)
                .into_iter()
                .map(|(body, _)| (context.clone(), format!("{header}{body}")))
                .collect();
            (Kind::Code, source.privacy, packed)
        }
    };
    let mut examples: Vec<Example> = pieces
        .into_iter()
        .map(|(context, body)| {
            let text = match kind {
                Kind::Note => format!("# {context}\n\n{body}"),
                _ => body,
            };
            let id = content_id(&text);
            let redactions = text.matches("<SECRET:").count() + text.matches("<PII:").count();
            Example {
                split: Split::of(&id, opts.settings.holdout_fraction),
                id,
                day: opts.day.clone(),
                source: source.name.clone(),
                path: relative.to_string(),
                kind,
                context,
                n_tokens: count(&text) as u32,
                redactions: redactions as u32,
                private: privacy == Privacy::Private,
                fim: None,
                minhash: Signature::of(&text).map(Box::new),
                text,
            }
        })
        .collect();
    let fims: Vec<Example> = examples
        .iter()
        .filter_map(|e| fim_example(e, opts.settings.fim, FIM_MARKER_TOKENS))
        .collect();
    examples.extend(fims);
    (examples, false, scrubbed.redactions)
}

/// Short note sections merge with the next section of the same note (their contexts joined), by the
/// token counts `pack` gave them.
fn merge_short(pieces: Vec<(String, String, usize)>, budget: Budget) -> Vec<(String, String)> {
    let mut out: Vec<(String, String, usize)> = Vec::new();
    for (context, body, t) in pieces {
        match out.last_mut() {
            Some((c, b, n)) if *n < budget.min_tokens && *n + t <= budget.max_tokens => {
                if *c != context {
                    b.push_str(&format!(
                        "\n\n## {}\n\n",
                        context.rsplit(" > ").next().unwrap_or(&context)
                    ));
                } else {
                    b.push_str("\n\n");
                }
                b.push_str(&body);
                *n += t;
            }
            _ => out.push((context, body, t)),
        }
    }
    out.into_iter().map(|(c, b, _)| (c, b)).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
