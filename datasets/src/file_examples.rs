//! One file's text → its examples: scrubbed whole, then split (notes by heading, code by top-level
//! item), packed to the token budget, counted, signed for near-dup detection, plus the FIM examples
//! of its code; a chat file's conversations one example a line. What ingest's workers run for every
//! new or changed file.

use std::collections::BTreeMap;
use std::path::Path;

use crate::chat::Conversation;
use crate::code::{split_items, Language};
use crate::example::{content_id, pack, Budget, CountTokens, Example, Kind, Split};
use crate::fim::fim_example;
use crate::ingest::IngestOptions;
use crate::minhash::Signature;
use crate::notes::{parse, NoteFormat};
use crate::scrub::scrub;
use crate::source::{Privacy, Source, SourceKind};

/// Tokens a FIM example adds to its code: the three markers, one token each.
const FIM_MARKER_TOKENS: u32 = 3;

/// A file's examples, whether its frontmatter excludes it, and the redactions by kind.
pub(crate) type FileExamples = (Vec<Example>, bool, BTreeMap<String, usize>);

/// The examples of one file's text, whether its frontmatter excludes it, and the secrets and PII
/// removed. The whole file is scrubbed before it is split, so no secret can straddle two examples.
pub(crate) fn file_examples(
    opts: &IngestOptions,
    source: &Source,
    relative: &str,
    text: &str,
) -> FileExamples {
    if source.kind == SourceKind::Chat {
        return chat_examples(opts, source, relative, text);
    }
    let scrubbed = scrub(text, opts.settings.pii);
    let text = scrubbed.text.as_str();
    let counter = opts.count_tokens;
    let budget = opts.settings.budget;
    // Each example's context, text and token count.
    let (kind, privacy, pieces): (Kind, Privacy, Vec<(String, String, usize)>) = match source.kind {
        SourceKind::Notes => {
            let ext = relative.rsplit('.').next().unwrap_or("");
            let note = parse(text, NoteFormat::from_extension(ext));
            // The note's frontmatter only raises its source's privacy (its `Normal` says nothing).
            let privacy = match note.frontmatter.privacy {
                Privacy::Normal => source.privacy,
                raised => source.privacy.max(raised),
            };
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
                for (body, tokens) in pack(std::slice::from_ref(&s.body), budget, counter) {
                    out.push((context.clone(), body, tokens));
                }
            }
            let titled = merge_short(out, budget, counter)
                .into_iter()
                .map(|(context, body, n)| {
                    let title = format!("# {context}");
                    let n = counter.count_join(&title, counter.count(&title), "\n\n", &body, n);
                    (context, format!("{title}\n\n{body}"), n)
                })
                .collect();
            (Kind::Note, privacy, titled)
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
            let header = format!("{} {relative}", lang.line_comment());
            let header_tokens = counter.count(&header);
            let packed = pack(&items, budget, counter)
                .into_iter()
                .map(|(body, n)| {
                    let n = counter.count_join(&header, header_tokens, "\n", &body, n);
                    (context.clone(), format!("{header}\n{body}"), n)
                })
                .collect();
            (Kind::Code, source.privacy, packed)
        }
        SourceKind::Chat => unreachable!("chat files are read by chat_examples"),
    };
    let mut examples: Vec<Example> = pieces
        .into_iter()
        .map(|(context, text, n_tokens)| {
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
                n_tokens: n_tokens as u32,
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

/// Tokens a chat template adds around each message (ChatML: `<|im_start|>`, the role, a newline,
/// `<|im_end|>`, a newline); a chat example's count is its contents plus this per message, an estimate
/// until a model's own template renders it.
const CHAT_TOKENS_PER_MESSAGE: usize = 5;

/// A chat file's examples: one per conversation line, contents scrubbed one by one (a JSON line cannot
/// be scrubbed whole without risking its quoting). Lines that are not conversations are skipped with a
/// warning naming the file and line.
fn chat_examples(
    opts: &IngestOptions,
    source: &Source,
    relative: &str,
    text: &str,
) -> FileExamples {
    if source.privacy == Privacy::Exclude {
        return (Vec::new(), true, BTreeMap::new());
    }
    let mut examples = Vec::new();
    let mut redactions: BTreeMap<String, usize> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let conversation = match Conversation::parse(line) {
            Ok(c) => c,
            Err(reason) => {
                tracing::warn!("{}/{relative}:{}: skipped: {reason}", source.name, n + 1);
                continue;
            }
        };
        let (conversation, removed) = conversation.scrubbed(opts.settings.pii);
        let mut redacted = 0;
        for (kind, count) in removed {
            redacted += count;
            *redactions.entry(kind).or_default() += count;
        }
        let n_tokens: usize = conversation
            .messages
            .iter()
            .map(|m| opts.count_tokens.count(&m.content) + CHAT_TOKENS_PER_MESSAGE)
            .sum();
        let text = conversation.to_text();
        let id = content_id(&text);
        examples.push(Example {
            split: Split::of(&id, opts.settings.holdout_fraction),
            id,
            day: opts.day.clone(),
            source: source.name.clone(),
            path: relative.to_string(),
            kind: Kind::Chat,
            context: format!("{relative}:{}", n + 1),
            n_tokens: n_tokens as u32,
            redactions: redacted as u32,
            private: source.privacy == Privacy::Private,
            fim: None,
            minhash: Signature::of(&text).map(Box::new),
            text,
        });
    }
    (examples, false, redactions)
}

/// Short note sections merge with the next section of the same note (the next one's heading kept
/// in the text), by the token counts `pack` gave them.
fn merge_short(
    pieces: Vec<(String, String, usize)>,
    budget: Budget,
    counter: &dyn CountTokens,
) -> Vec<(String, String, usize)> {
    let mut out: Vec<(String, String, usize)> = Vec::new();
    for (context, body, t) in pieces {
        match out.last_mut() {
            Some((c, b, n)) if *n < budget.min_tokens && *n + t <= budget.max_tokens => {
                let sep = if *c != context {
                    format!(
                        "\n\n## {}\n\n",
                        context.rsplit(" > ").next().unwrap_or(&context)
                    )
                } else {
                    "\n\n".to_string()
                };
                *n = counter.count_join(b, *n, &sep, &body, t);
                b.push_str(&sep);
                b.push_str(&body);
            }
            _ => out.push((context, body, t)),
        }
    }
    out
}
