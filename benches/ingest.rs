//! Ingest speed on a generated tree of notes and code (issue 5's benchmark): first-ingest throughput in
//! MB/s, tokenizing with the default model's tokenizer included, and the time of a second ingest with
//! nothing changed. Prints one JSON line.
//!
//! `cargo bench --bench ingest -- [--files 10000] [--mb 200] [--model PATH] [--keep DIR]`
//!
//! The tree is 60% Markdown notes (frontmatter, headings, tags, wikilinks, lists, fenced code) and 40%
//! code in six languages, made of English-like words and identifiers from a fixed seed, so two runs
//! measure the same bytes. `--keep DIR` writes it there (and reuses it when it is already there).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use pai_datasets::ingest::{run, IngestOptions, IngestSettings, IngestSummary};
use pai_datasets::{resolve_sources, SourceConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "by",
    "this",
    "are",
    "or",
    "from",
    "at",
    "which",
    "but",
    "not",
    "have",
    "an",
    "they",
    "one",
    "all",
    "were",
    "their",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "model",
    "data",
    "notes",
    "garden",
    "meeting",
    "project",
    "deadline",
    "review",
    "budget",
    "tomatoes",
    "Tuesday",
    "morning",
    "because",
    "through",
    "however",
    "between",
    "question",
    "answer",
    "memory",
    "server",
    "latency",
    "training",
    "adapter",
    "evening",
    "research",
    "paper",
    "library",
    "kitchen",
    "bicycle",
    "weather",
    "holiday",
    "invoice",
    "client",
    "design",
    "sketch",
    "interface",
    "migration",
    "database",
    "schema",
    "quarterly",
    "roadmap",
    "hypothesis",
    "result",
    "experiment",
    "compiler",
    "benchmark",
    "throughput",
    "shouldn't",
    "it's",
    "we'll",
    "2026",
    "42",
    "3.14",
    "e.g.",
    "i.e.",
    "Berlin",
    "Lisbon",
    "Ada",
    "Grace",
    "Linus",
    "Margaret",
];
const IDENTS: &[&str] = &[
    "count",
    "total",
    "buffer",
    "index",
    "config",
    "path",
    "items",
    "result",
    "value",
    "cache",
    "request",
    "response",
    "parse",
    "render",
    "tokens",
    "weights",
    "offset",
    "length",
    "sum",
    "user_id",
    "max_len",
    "is_ready",
    "next_page",
    "retries",
    "timeout_ms",
    "row",
    "col",
    "scale",
];

/// Between `n.start` and `n.end` words, with some punctuation and line breaks.
fn words(rng: &mut StdRng, n: std::ops::Range<usize>, out: &mut String) {
    let n = rng.random_range(n);
    for i in 0..n {
        if i > 0 {
            out.push(if rng.random_ratio(1, 14) { '\n' } else { ' ' });
        }
        out.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        if rng.random_ratio(1, 12) {
            out.push_str(if rng.random_bool(0.7) { "," } else { "." });
        }
    }
}

fn note(rng: &mut StdRng, target: usize) -> String {
    let mut s = String::with_capacity(target + 512);
    let _ = writeln!(
        s,
        "---\ntitle: Note {}\ntags: [{}, {}]\n---\n",
        rng.random::<u32>(),
        WORDS[rng.random_range(40..WORDS.len())],
        WORDS[rng.random_range(40..WORDS.len())]
    );
    while s.len() < target {
        let level = rng.random_range(1..=3);
        let _ = write!(s, "{} ", "#".repeat(level));
        words(rng, 2..6, &mut s);
        s.push_str("\n\n");
        for _ in 0..rng.random_range(1..5) {
            match rng.random_range(0..10) {
                0 => {
                    for _ in 0..rng.random_range(2..6) {
                        s.push_str("- ");
                        words(rng, 4..14, &mut s);
                        s.push('\n');
                    }
                }
                1 => {
                    s.push_str("```python\n");
                    code_body(rng, "python", 2, &mut s);
                    s.push_str("```\n");
                }
                _ => {
                    words(rng, 30..120, &mut s);
                    let _ = write!(
                        s,
                        " see [[{}]] #{}",
                        WORDS[rng.random_range(40..WORDS.len())],
                        WORDS[rng.random_range(40..80)]
                    );
                }
            }
            s.push_str("\n\n");
        }
    }
    s
}

fn ident(rng: &mut StdRng) -> &'static str {
    IDENTS[rng.random_range(0..IDENTS.len())]
}

/// `n` top-level items of `lang`.
fn code_body(rng: &mut StdRng, lang: &str, n: usize, s: &mut String) {
    for _ in 0..n {
        let (name, a, b) = (ident(rng), ident(rng), ident(rng));
        let lines = rng.random_range(3..25);
        let mut body = String::new();
        for _ in 0..lines {
            let (x, y) = (ident(rng), ident(rng));
            let k = rng.random_range(0..1000);
            let _ = match lang {
                "rust" => writeln!(
                    body,
                    "    let {x} = {y}.saturating_add({k}); // {}",
                    WORDS[k % WORDS.len()]
                ),
                "python" => writeln!(body, "    {x} = {y} + {k}  # {}", WORDS[k % WORDS.len()]),
                "go" => writeln!(body, "\t{x} := {y} + {k} // {}", WORDS[k % WORDS.len()]),
                "c" => writeln!(
                    body,
                    "    int {x} = {y} + {k}; /* {} */",
                    WORDS[k % WORDS.len()]
                ),
                "sh" => writeln!(body, "  {x}=$(( {y} + {k} ))  # {}", WORDS[k % WORDS.len()]),
                _ => writeln!(
                    body,
                    "  const {x} = {y} + {k}; // {}",
                    WORDS[k % WORDS.len()]
                ),
            };
        }
        let _ = match lang {
            "rust" => write!(s, "/// {}\npub fn {name}_{}({a}: u64, {b}: &str) -> u64 {{\n{body}    {a}\n}}\n\n", WORDS[rng.random_range(0..WORDS.len())], rng.random::<u16>()),
            "python" => write!(s, "def {name}_{}({a}, {b}):\n    \"\"\"{}.\"\"\"\n{body}    return {a}\n\n\n", rng.random::<u16>(), WORDS[rng.random_range(0..WORDS.len())]),
            "go" => write!(s, "// {name} does {}.\nfunc {name}{}({a} int, {b} string) int {{\n{body}\treturn {a}\n}}\n\n", WORDS[rng.random_range(0..WORDS.len())], rng.random::<u16>()),
            "c" => write!(s, "static int {name}_{}(int {a}, const char *{b}) {{\n{body}    return {a};\n}}\n\n", rng.random::<u16>()),
            "sh" => write!(s, "{name}_{}() {{\n{body}  echo \"${a}\"\n}}\n\n", rng.random::<u16>()),
            _ => write!(s, "export function {name}{}({a}: number, {b}: string): number {{\n{body}  return {a};\n}}\n\n", rng.random::<u16>()),
        };
    }
}

fn code(rng: &mut StdRng, lang: &str, target: usize) -> String {
    let mut s = String::with_capacity(target + 1024);
    let _ = match lang {
        "rust" => writeln!(s, "//! A module.\n\nuse std::collections::HashMap;\n"),
        "python" => writeln!(s, "\"\"\"A module.\"\"\"\n\nimport os\nimport sys\n"),
        "go" => writeln!(s, "package main\n\nimport \"fmt\"\n"),
        "c" => writeln!(s, "#include <stdio.h>\n"),
        "sh" => writeln!(s, "#!/bin/sh\nset -eu\n"),
        _ => writeln!(s, "import {{ readFile }} from \"fs\";\n"),
    };
    while s.len() < target {
        code_body(rng, lang, 1, &mut s);
    }
    s
}

/// Write the tree (notes/ and code/) unless `dir` already holds one; returns its size in bytes.
fn generate(dir: &Path, files: usize, bytes: usize) -> u64 {
    let marker = dir.join(".generated");
    if marker.is_file() {
        return std::fs::read_to_string(&marker)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
    }
    let mut rng = StdRng::seed_from_u64(5);
    let mean = bytes / files.max(1);
    let mut total = 0u64;
    let langs = [
        ("rust", "rs"),
        ("python", "py"),
        ("go", "go"),
        ("c", "c"),
        ("sh", "sh"),
        ("ts", "ts"),
    ];
    for i in 0..files {
        // Sizes from 0.25× to 1.75× the mean.
        let target = mean / 4 + rng.random_range(0..mean * 3 / 2 + 1);
        let (path, text) = if i % 5 < 3 {
            (
                dir.join(format!("notes/area{}/note{i}.md", i % 37)),
                note(&mut rng, target),
            )
        } else {
            let (lang, ext) = langs[i % langs.len()];
            (
                dir.join(format!("code/pkg{}/file{i}.{ext}", i % 23)),
                code(&mut rng, lang, target),
            )
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create the tree");
        }
        std::fs::write(&path, &text).expect("write the tree");
        total += text.len() as u64;
    }
    std::fs::write(&marker, total.to_string()).expect("write the marker");
    total
}

/// The allocator pai-train uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // As `pai-train ingest` runs.
    pai::setup_allocator();
    pai::keep_freed_memory();
    let files: usize = arg("--files")
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mb: usize = arg("--mb").and_then(|v| v.parse().ok()).unwrap_or(200);
    let model = arg("--model")
        .map(PathBuf::from)
        .unwrap_or_else(pai::default_model_path);
    let scratch = tempfile::tempdir().expect("a temporary directory");
    let tree = arg("--keep")
        .map(PathBuf::from)
        .unwrap_or_else(|| scratch.path().join("tree"));
    let started = Instant::now();
    let tree_bytes = generate(&tree, files, mb * 1_000_000);
    eprintln!(
        "tree: {files} files, {:.1} MB in {:.1?}",
        tree_bytes as f64 / 1e6,
        started.elapsed()
    );

    let tokenizer = pai_model::Tokenizer::from_model_path(&model).unwrap_or_else(|e| {
        eprintln!("{e}\n(run scripts/fetch-model.sh, or pass --model PATH)");
        std::process::exit(1)
    });
    let sources = resolve_sources(&[
        SourceConfig::from_arg(&format!("{}:notes", tree.join("notes").display())).expect("notes"),
        SourceConfig::from_arg(&format!("{}:code", tree.join("code").display())).expect("code"),
    ])
    .expect("the generated sources");
    let home = scratch.path().join("home");
    let ingest = || -> (IngestSummary, f64) {
        let t = Instant::now();
        let summary = run(&IngestOptions {
            home: &home,
            sources: &sources,
            day: "2026-11-22".into(),
            settings: IngestSettings::default(),
            dry_run: false,
            count_tokens: &tokenizer,
            progress: &|_, _| {},
        })
        .expect("ingest");
        (summary, t.elapsed().as_secs_f64())
    };
    let (first, first_s) = ingest();
    let (second, second_s) = ingest();
    let report = serde_json::json!({
        "files": files,
        "tree_mb": tree_bytes as f64 / 1e6,
        "first": {
            "seconds": first_s,
            "mb_per_second": first.bytes_read as f64 / 1e6 / first_s,
            "examples": first.examples_added.values().sum::<usize>(),
            "tokens": first.tokens_added,
            "duplicates": first.duplicates,
            "files_new": first.files_new,
        },
        "unchanged": {
            "seconds": second_s,
            "files_unchanged": second.files_unchanged,
            "examples": second.examples_added.values().sum::<usize>(),
        },
        "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
    });
    println!("{report}");
}
