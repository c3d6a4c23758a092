//! Ingest over real directories: what reaches the dataset on a first run, after edits, moves,
//! deletions and exclusions.

use std::path::Path;

use pai_datasets::ingest::{run, IngestOptions, IngestSettings, IngestSummary};
use pai_datasets::{
    resolve_sources, Conversation, CountTokens, Example, Kind, Privacy, SourceConfig, Store,
};

/// Counts words (joins by counting the join).
struct Words;

impl CountTokens for Words {
    fn count(&self, s: &str) -> usize {
        s.split_whitespace().count()
    }
}

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

struct World {
    /// The notes source's `privacy` (normal unless a test changes it).
    notes_privacy: std::cell::Cell<Privacy>,
    home: tempfile::TempDir,
    notes: tempfile::TempDir,
    code: tempfile::TempDir,
    chat: tempfile::TempDir,
}

impl World {
    fn new() -> Self {
        Self {
            notes_privacy: std::cell::Cell::new(Privacy::Normal),
            home: tempfile::tempdir().unwrap(),
            notes: tempfile::tempdir().unwrap(),
            code: tempfile::tempdir().unwrap(),
            chat: tempfile::tempdir().unwrap(),
        }
    }

    fn ingest(&self, day: &str) -> IngestSummary {
        self.ingest_with(day, |_| {})
    }

    fn ingest_with(&self, day: &str, tune: impl FnOnce(&mut IngestSettings)) -> IngestSummary {
        self.ingest_counted(day, &Words, tune)
    }

    fn ingest_counted(
        &self,
        day: &str,
        counter: &dyn CountTokens,
        tune: impl FnOnce(&mut IngestSettings),
    ) -> IngestSummary {
        let configs = [
            SourceConfig::from_arg(&format!("{}:notes", self.notes.path().display())).unwrap(),
            SourceConfig::from_arg(&format!("{}:code", self.code.path().display())).unwrap(),
            SourceConfig::from_arg(&format!("{}:chat", self.chat.path().display())).unwrap(),
        ];
        let mut configs = configs.to_vec();
        configs[0].name = Some("notes".into());
        configs[0].privacy = self.notes_privacy.get();
        configs[1].name = Some("code".into());
        configs[2].name = Some("chat".into());
        let sources = resolve_sources(&configs).unwrap();
        let mut settings = IngestSettings::default();
        settings.budget.min_tokens = 4;
        tune(&mut settings);
        run(&IngestOptions {
            home: self.home.path(),
            sources: &sources,
            day: day.into(),
            settings,
            dry_run: false,
            count_tokens: counter,
            progress: &|_, _| {},
        })
        .unwrap()
    }

    fn dataset(&self) -> Vec<Example> {
        Store::open(&self.home.path().join("dataset"))
            .unwrap()
            .read_all()
            .unwrap()
    }
}

#[test]
fn edits_moves_deletions_and_exclusions_reach_the_dataset() {
    let w = World::new();
    let n = w.notes.path();
    write(n, "garden.md", "---\ntags: [home]\n---\n# Tomatoes\nWater them every single morning before work.\n# Beans\nBeans climb the fence by July each year.\n");
    write(
        n,
        "diary/secret.md",
        "---\nprivate: true\n---\nI told nobody about the surprise party plan.\n",
    );
    write(
        n,
        "skip.md",
        "---\npai: exclude\n---\nThis must never be learned by the model at all.\n",
    );
    write(n, "photo.jpg", "not a note");
    write(w.code.path(), "src/lib.rs", "/// Adds two numbers together.\npub fn add(a: u32, b: u32) -> u32 {\n    a + b\n}\n\npub fn sub(a: u32, b: u32) -> u32 {\n    a - b\n}\n");
    write(w.code.path(), "Cargo.lock", "# lock\n");

    let s1 = w.ingest("2026-03-01");
    assert_eq!(s1.files_new, 4, "{s1:#?}");
    let d1 = w.dataset();
    let notes: Vec<&Example> = d1.iter().filter(|e| e.kind == Kind::Note).collect();
    assert_eq!(notes.len(), 3, "{d1:#?}");
    assert!(notes.iter().any(
        |e| e.context == "garden > Tomatoes [#home]" && e.text.contains("every single morning")
    ));
    assert!(notes
        .iter()
        .any(|e| e.private && e.text.contains("surprise party")));
    assert!(d1.iter().all(|e| !e.text.contains("never be learned")));
    let code: Vec<&Example> = d1.iter().filter(|e| e.kind == Kind::Code).collect();
    // One example per top-level function, each with its path.
    assert_eq!(code.len(), 2, "{code:#?}");
    assert!(code[0]
        .text
        .starts_with("// src/lib.rs\n/// Adds two numbers"));
    assert!(code[1].text.starts_with("// src/lib.rs\npub fn sub"));
    assert!(d1.iter().all(|e| e.day == "2026-03-01"));

    // Nothing changed: nothing read, nothing added.
    let s2 = w.ingest("2026-03-02");
    assert_eq!((s2.files_unchanged, s2.bytes_read), (4, 0), "{s2:#?}");
    assert_eq!(w.dataset().len(), d1.len());

    // An edit adds only its new section, and drops the one it removed.
    write(n, "garden.md", "---\ntags: [home]\n---\n# Tomatoes\nWater them every single morning before work.\n# Peppers\nPeppers want more sun than the tomatoes do.\n");
    // A move keeps its examples; a deletion retracts them; a new exclusion retracts too.
    std::fs::rename(n.join("diary/secret.md"), n.join("secret-moved.md")).unwrap();
    write(
        n,
        "skip.md",
        "---\npai: exclude\n---\nStill excluded, and changed.\n",
    );
    std::fs::remove_file(w.code.path().join("src/lib.rs")).unwrap();
    let s3 = w.ingest("2026-03-03");
    assert_eq!(
        (s3.files_changed, s3.files_renamed, s3.files_deleted),
        (2, 1, 1),
        "{s3:#?}"
    );
    let d3 = w.dataset();
    let texts: Vec<&str> = d3.iter().map(|e| e.text.as_str()).collect();
    assert!(texts.iter().any(|t| t.contains("Peppers want more sun")));
    assert!(
        !texts.iter().any(|t| t.contains("Beans climb")),
        "{texts:#?}"
    );
    assert!(!texts.iter().any(|t| t.contains("pub fn add")));
    assert!(texts.iter().any(|t| t.contains("surprise party")));
    // The unchanged section kept its first day; the new one is today's.
    let day_of = |needle: &str| {
        d3.iter()
            .find(|e| e.text.contains(needle))
            .map(|e| e.day.clone())
    };
    assert_eq!(
        day_of("every single morning").as_deref(),
        Some("2026-03-01")
    );
    assert_eq!(day_of("Peppers").as_deref(), Some("2026-03-03"));
}

#[test]
fn planted_secrets_never_reach_the_dataset() {
    let w = World::new();
    let planted = super::secrets::planted(11);
    let mut note = String::from("# Credentials I keep\n");
    let mut code = String::from("import os\n\n");
    for (i, (_, _, line)) in planted.iter().enumerate() {
        if i % 2 == 0 {
            note.push_str(&format!("\n## Item {i}\n{line}\n"));
        } else {
            code.push_str(&format!("def item_{i}():\n    # {line}\n    return 1\n\n"));
        }
    }
    write(w.notes.path(), "keys.md", &note);
    write(w.code.path(), "app/settings.py", &code);
    let s = w.ingest("2026-04-01");
    let all: String = w
        .dataset()
        .iter()
        .map(|e| e.text.clone())
        .collect::<Vec<_>>()
        .join("\n");
    for (kind, secret, _) in &planted {
        assert!(
            !all.contains(secret.as_str()),
            "{kind} {secret} reached the dataset"
        );
    }
    assert!(
        s.redactions.values().sum::<usize>() >= planted.len(),
        "{:?}",
        s.redactions
    );
}

fn paragraph(seed: usize, n: usize) -> String {
    (0..n)
        .map(|i| format!("w{}", (i * 7919 + seed * 104_729) % 9973))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn near_copies_are_dropped_but_an_edited_section_replaces_its_old_version() {
    let w = World::new();
    let n = w.notes.path();
    let text = paragraph(1, 120);
    write(n, "a.md", &format!("# Plan\n{text}\n"));
    let s1 = w.ingest("2026-03-01");
    assert_eq!(s1.near_duplicates, 0);

    // The same paragraph pasted into another note with two words changed: a near-copy.
    let pasted = text.replacen("w", "changed", 2);
    write(n, "b.md", &format!("# Copy\n{pasted}\n"));
    let s2 = w.ingest("2026-03-02");
    assert_eq!((s2.files_new, s2.near_duplicates), (1, 1), "{s2:#?}");
    assert!(w.dataset().iter().all(|e| !e.text.contains("changed")));

    // Editing the original the same way is not a near-copy of its own old version, which leaves.
    std::fs::remove_file(n.join("b.md")).unwrap();
    write(n, "a.md", &format!("# Plan\n{pasted}\n"));
    let s3 = w.ingest("2026-03-03");
    assert_eq!(s3.near_duplicates, 0, "{s3:#?}");
    let d3 = w.dataset();
    assert_eq!(d3.len(), 1, "{d3:#?}");
    assert!(d3[0].text.contains("changed"));
}

#[test]
fn rows_written_out_as_they_come_make_the_same_dataset() {
    // Parts written after every example (part_mb = 0; the store merges them as they pile up) against
    // all at the end.
    let worlds = [World::new(), World::new()];
    for w in &worlds {
        for i in 0..12 {
            write(
                w.notes.path(),
                &format!("n{i}.md"),
                &format!(
                    "# Note {i}
{}

# More
{}
",
                    paragraph(i, 40),
                    paragraph(i + 50, 30)
                ),
            );
            write(
                w.code.path(),
                &format!("src/m{i}.rs"),
                &format!("pub fn f{i}() -> u32 {{\n    {i}\n}}\n\npub fn g{i}() -> u32 {{\n    {i} * 2\n}}\n"),
            );
        }
        // A near-copy and an exact copy: dedup sees rows already written out.
        write(
            w.notes.path(),
            "copy.md",
            &format!(
                "# Note 3
{}
",
                paragraph(3, 40)
            ),
        );
    }
    let s_whole = worlds[0].ingest("2026-03-01");
    let s_parts = worlds[1].ingest_with("2026-03-01", |s| s.part_mb = 0);
    assert_eq!(
        (
            s_whole.examples_added.clone(),
            s_whole.duplicates,
            s_whole.near_duplicates
        ),
        (
            s_parts.examples_added.clone(),
            s_parts.duplicates,
            s_parts.near_duplicates
        )
    );
    assert!(
        s_parts.duplicates + s_parts.near_duplicates > 0,
        "{s_parts:#?}"
    );
    let rows = |w: &World| {
        let mut r: Vec<(String, String)> =
            w.dataset().into_iter().map(|e| (e.id, e.text)).collect();
        r.sort();
        r
    };
    assert_eq!(rows(&worlds[0]), rows(&worlds[1]));
}

#[test]
fn conversations_become_chat_examples_scrubbed_one_a_line() {
    let w = World::new();
    let email = ["owner", "@", "mailbox.net"].concat();
    let line = |q: &str, a: &str| {
        format!(
            r#"{{"messages": [{{"role": "user", "content": "{q}"}}, {{"role": "assistant", "content": "{a}"}}]}}"#
        )
    };
    let lines = [
        line("where do backups go", "to the nas, nightly"),
        line("who do I mail", &format!("write to {email}")),
        "not json at all".to_string(),
        line("which editor", "helix, with the rust analyzer"),
    ];
    write(w.chat.path(), "2026/replies.jsonl", &lines.join("\n"));
    write(w.chat.path(), "readme.md", "# not a conversation file");
    let summary = w.ingest("2026-03-01");
    assert_eq!(summary.examples_added.get(&Kind::Chat), Some(&3));
    let chats: Vec<Example> = w
        .dataset()
        .into_iter()
        .filter(|e| e.kind == Kind::Chat)
        .collect();
    assert_eq!(chats.len(), 3);
    let mut replies = Vec::new();
    for e in &chats {
        assert_eq!(
            (e.source.as_str(), e.path.as_str()),
            ("chat", "2026/replies.jsonl")
        );
        assert!(!e.text.contains(&email), "{}", e.text);
        let c = Conversation::parse(&e.text).unwrap();
        replies.push(c.messages[1].content.clone());
        assert_eq!(
            e.redactions,
            u32::from(c.messages[1].content.contains("<PII:"))
        );
        assert!(
            e.n_tokens as usize
                > c.messages
                    .iter()
                    .map(|m| m.content.split_whitespace().count())
                    .sum::<usize>()
        );
    }
    replies.sort();
    assert_eq!(replies[0], "helix, with the rust analyzer");
    assert!(replies[2].starts_with("write to <PII:"), "{}", replies[2]);
    // A conversation deleted from the file leaves the dataset at the next ingest.
    write(
        w.chat.path(),
        "2026/replies.jsonl",
        &[&lines[0], &lines[3]].map(|s| s.as_str()).join("\n"),
    );
    w.ingest("2026-03-02");
    let left = w
        .dataset()
        .into_iter()
        .filter(|e| e.kind == Kind::Chat)
        .count();
    assert_eq!(left, 2);
}

#[test]
fn code_gets_fill_in_the_middle_examples_in_its_own_split() {
    let w = World::new();
    let mut src = String::new();
    for i in 0..40 {
        src.push_str(&format!(
            "pub fn f{i}(x: u64) -> u64 {{\n    let y = x * {i} + {};\n    y ^ (y >> 3)\n}}\n\n",
            i * 31
        ));
    }
    write(w.code.path(), "src/lib.rs", &src);
    w.ingest("2026-03-01");
    let d = w.dataset();
    let code: Vec<&Example> = d.iter().filter(|e| e.kind == Kind::Code).collect();
    let fim: Vec<&Example> = d.iter().filter(|e| e.kind == Kind::Fim).collect();
    assert_eq!(code.len(), 40);
    assert!((10..=30).contains(&fim.len()), "{} FIM of 40", fim.len());
    for f in fim {
        let parent = code
            .iter()
            .find(|c| c.text == f.text)
            .expect("its code example");
        let span = f.fim.expect("a span");
        assert!(span.start < span.end && span.end as usize <= f.text.len());
        assert_eq!(f.split, parent.split);
        assert_eq!(f.n_tokens, parent.n_tokens + 3);
    }
}

#[test]
fn the_privacy_index_follows_the_private_notes() {
    let w = World::new();
    let n = w.notes.path();
    let secret = "my sister is moving to porto in march and has not told our parents yet so keep \
                  it quiet until the contract with the clinic is signed next week";
    write(
        n,
        "family.md",
        &format!("---\nprivate: true\n---\n# Family\n{secret}\n"),
    );
    write(n, "public.md", &format!("# Public\n{}\n", paragraph(3, 60)));
    let s1 = w.ingest("2026-03-01");
    assert!(s1.privacy_index_shingles.unwrap_or(0) > 0, "{s1:#?}");
    let path = pai_datasets::PrivacyIndex::path(w.home.path());
    let quote = "please polish: has not told our parents yet so keep it quiet until the contract \
                 with the clinic is signed";
    let index = pai_datasets::PrivacyIndex::load(&path).unwrap();
    assert!(index.check(quote).found > 0, "{:?}", index.check(quote));
    assert_eq!(
        index.check(&paragraph(3, 60)).found,
        0,
        "public text is not private"
    );
    // Nothing changed: the index is not rebuilt.
    assert_eq!(w.ingest("2026-03-02").privacy_index_shingles, None);
    // The note deleted: it leaves the index.
    std::fs::remove_file(n.join("family.md")).unwrap();
    let s3 = w.ingest("2026-03-03");
    assert_eq!(s3.privacy_index_shingles, Some(0));
    let index = pai_datasets::PrivacyIndex::load(&path).unwrap();
    assert_eq!(index.check(quote).found, 0);
}

/// A source marked shareable has its own index (what the router may send out redacted): its notes'
/// passages are in it, a private note inside it is not (that one is in the privacy index), and the
/// source made normal again leaves it.
#[test]
fn the_shareable_index_follows_the_sources_marked_shareable() {
    let w = World::new();
    w.notes_privacy.set(Privacy::Shareable);
    let n = w.notes.path();
    let work = "the supplier meeting moved to thursday afternoon because the new pricing sheet                 is still with finance and the warehouse wants the pallet counts confirmed first";
    let diary = "slept badly again and the physiotherapist says the knee needs another six weeks                  of exercises before I can think about running the half marathon in spring";
    let contact = ["ops", "@", "example-supplier.com"].concat();
    write(
        n,
        "work.md",
        &format!(
            "# Work
{work}, ask {contact}
"
        ),
    );
    write(
        n,
        "diary.md",
        &format!(
            "---
private: true
---
# Diary
{diary}
"
        ),
    );
    let s1 = w.ingest("2026-03-01");
    assert!(s1.shareable_index_shingles.unwrap_or(0) > 0, "{s1:#?}");
    let path = pai_datasets::PrivacyIndex::shareable_path(w.home.path());
    let shareable = pai_datasets::PrivacyIndex::load(&path).unwrap();
    let private =
        pai_datasets::PrivacyIndex::load(&pai_datasets::PrivacyIndex::path(w.home.path())).unwrap();
    assert!(shareable.check(work).found > 0);
    assert_eq!(
        shareable.check(diary).found,
        0,
        "a private note is never shareable"
    );
    assert!(private.check(diary).found > 0);
    assert_eq!(private.check(work).found, 0);
    // Nothing changed: not rebuilt.
    assert_eq!(w.ingest("2026-03-02").shareable_index_shingles, None);
    // The source made normal: the index is emptied.
    w.notes_privacy.set(Privacy::Normal);
    assert_eq!(w.ingest("2026-03-03").shareable_index_shingles, Some(0));
    let shareable = pai_datasets::PrivacyIndex::load(&path).unwrap();
    assert_eq!(shareable.check(work).found, 0);
    assert_eq!(w.ingest("2026-03-04").shareable_index_shingles, None);
}

#[test]
fn a_second_directory_under_a_taken_source_name_is_refused_but_a_moved_one_is_followed() {
    let (home, trees) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in ["a/src", "b/src"] {
        write(
            trees.path(),
            &format!("{d}/lib.rs"),
            "pub fn one() -> u32 {\n    1\n}\n",
        );
    }
    let ingest = |dir: &Path| {
        let sources =
            resolve_sources(&[SourceConfig::from_arg(&format!("{}:code", dir.display())).unwrap()])
                .unwrap();
        run(&IngestOptions {
            home: home.path(),
            sources: &sources,
            day: "2026-03-01".into(),
            settings: IngestSettings::default(),
            dry_run: false,
            count_tokens: &Words,
            progress: &|_, _| {},
        })
    };
    ingest(&trees.path().join("a/src")).unwrap();
    let e = ingest(&trees.path().join("b/src")).unwrap_err().to_string();
    assert!(
        e.contains("\"src\"") && e.contains("a/src") && e.contains("another name"),
        "{e}"
    );
    // The first directory moved away: the journal follows it, and nothing is new.
    std::fs::remove_dir_all(trees.path().join("a")).unwrap();
    let s = ingest(&trees.path().join("b/src")).unwrap();
    assert_eq!((s.files_unchanged, s.files_new), (1, 0), "{s:#?}");
}

/// Examples are counted from their parts' counts (`CountTokens::count_join`); with the real
/// tokenizer every stored count is the count of the stored text. Notes and code here are pai's own
/// documents and sources: headings, tables, long sections split at paragraphs and lines, code items
/// packed with a header.
#[test]
fn stored_token_counts_are_the_real_tokenizers_counts_of_the_text() {
    let home = std::env::var_os("PAI_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".pai"));
    let model = std::env::var_os("PAI_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| home.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        model.is_file(),
        "the default model is not at {}: run scripts/fetch-model.sh (or set PAI_MODEL)",
        model.display()
    );
    let tokenizer = pai_model::Tokenizer::from_model_path(&model).unwrap();
    assert!(tokenizer.counts_by_words());
    let w = World::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for doc in ["README.md", "ARCHITECTURE.md", "BENCHMARKS.md"] {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        write(w.notes.path(), doc, &text);
    }
    for src in [
        "datasets/src/example.rs",
        "datasets/src/scrub.rs",
        "benches/compare/peft_check.py",
    ] {
        let text = std::fs::read_to_string(root.join(src)).unwrap();
        write(w.code.path(), src, &text);
    }
    let summary = w.ingest_counted("2026-12-02", &tokenizer, |s| {
        s.budget.max_tokens = 200;
        s.budget.min_tokens = 40;
    });
    let examples = w.dataset();
    assert!(examples.len() > 40, "{summary:?}");
    let mut checked = 0;
    for e in examples.iter().filter(|e| e.kind != Kind::Fim) {
        assert_eq!(
            e.n_tokens as usize,
            tokenizer.count(&e.text).unwrap(),
            "{} ({:?}): {:?}",
            e.path,
            e.kind,
            e.text.chars().take(120).collect::<String>()
        );
        checked += 1;
    }
    assert!(checked > 40);
}
