//! Eval scoring speed on the default model (issue 7): up to `--items` continuation items —
//! paragraphs of pai's own documents and sources, like a holdout of notes and code — plus the
//! built-in retention corpus, scored with the bare base three ways: each through the serving forward
//! (pai's int8 kernels; what `pai-train eval` does on CPU), packed into rows of `--row-tokens`, and
//! packed one item per row (the first `--single`). Prints one JSON line: items/s and tokens/s of each,
//! the largest score difference between them, and the time for three contenders (candidate,
//! incumbent, base) with nothing cached.
//! `cargo bench --bench eval -- [--model PATH] [--items 500] [--row-tokens 512] [--single 60]`

use std::path::PathBuf;
use std::time::Instant;

use pai_evals::{Item, Scorer, Task};
use pai_model::AdapterStack;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Paragraphs of at least 12 words (prose) or 3 lines (code) from the repository's own files.
fn holdout_like(root: &std::path::Path, n: usize) -> Vec<Item> {
    let files = [
        "README.md",
        "ARCHITECTURE.md",
        "BENCHMARKS.md",
        "datasets/src/ingest.rs",
        "datasets/src/store.rs",
        "datasets/src/scrub.rs",
        "model/src/lora.rs",
        "model/src/generate.rs",
        "trainers/src/trainer.rs",
        "adapters/src/registry.rs",
        "evals/src/gate.rs",
        "evals/src/suite.rs",
        "model/src/base.rs",
        "model/src/tokenizer/mod.rs",
        "datasets/src/notes.rs",
        "datasets/src/code.rs",
        "datasets/src/mix.rs",
        "trainers/src/data.rs",
        "src/train.rs",
        "src/ingest.rs",
        "tests/cli/ingest.rs",
    ];
    let mut items = Vec::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(root.join(f)) else {
            continue;
        };
        for (k, block) in text.split("\n\n").enumerate() {
            let words = block.split_whitespace().count();
            if words >= 12 && items.len() < n {
                items.push(Item {
                    id: format!("{f}#{k}"),
                    group: f.to_string(),
                    domain: "notes".into(),
                    task: Task::Continuation {
                        context: String::new(),
                        text: block.to_string(),
                    },
                });
            }
        }
    }
    items
}

fn main() -> anyhow::Result<()> {
    pai::setup_allocator();
    pai::keep_freed_memory();
    let model = arg("--model")
        .map(PathBuf::from)
        .unwrap_or_else(pai::default_model_path);
    let n: usize = arg("--items").and_then(|v| v.parse().ok()).unwrap_or(500);
    let row_tokens: usize = arg("--row-tokens")
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let single_n: usize = arg("--single").and_then(|v| v.parse().ok()).unwrap_or(60);
    let (base, _) = pai::load_model(Some(model), &[], pai_model::LoadOptions::default())?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut items = holdout_like(&root, n);
    let retention = pai_evals::sources::corpus_items(pai_evals::suite::RETENTION_CORPUS, "general");
    let holdout_items = items.len();
    items.extend(retention.iter().cloned());
    let tokens: usize = items
        .iter()
        .map(|i| match &i.task {
            Task::Continuation { text, .. } => base.tokenizer.count(text).unwrap_or(0),
            _ => 0,
        })
        .sum();
    let scorer = |pack| Scorer {
        model: &base.model,
        tokenizer: &base.tokenizer,
        adapters: AdapterStack::NONE,
        row_tokens,
        pack,
    };
    let t = Instant::now();
    let served = scorer(false).score(&items)?;
    let served_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let packed = scorer(true).score(&items)?;
    let packed_s = t.elapsed().as_secs_f64();
    // One at a time, on the first `single_n` items (the same items, each its own pass).
    let some = &items[..single_n.min(items.len())];
    let some_tokens: usize = some
        .iter()
        .map(|i| match &i.task {
            Task::Continuation { text, .. } => base.tokenizer.count(text).unwrap_or(0),
            _ => 0,
        })
        .sum();
    let t = Instant::now();
    let mut single = Vec::new();
    for item in some {
        single.extend(scorer(true).score(std::slice::from_ref(item))?);
    }
    let single_s = t.elapsed().as_secs_f64();
    let max_diff = |a: &[pai_evals::ItemResult], b: &[pai_evals::ItemResult]| {
        a.iter()
            .zip(b)
            .map(|(a, b)| (a.score - b.score).abs())
            .fold(0.0, f64::max)
    };
    println!(
        "{}",
        serde_json::json!({
            "items": items.len(),
            "holdout_items": holdout_items,
            "retention_items": retention.len(),
            "tokens": tokens,
            "row_tokens": row_tokens,
            "served_forward": {"seconds": served_s, "items_per_s": items.len() as f64 / served_s, "tokens_per_s": tokens as f64 / served_s},
            "packed": {"seconds": packed_s, "items_per_s": items.len() as f64 / packed_s, "tokens_per_s": tokens as f64 / packed_s},
            "packed_one_per_row": {"items": some.len(), "seconds": single_s, "items_per_s": some.len() as f64 / single_s, "tokens_per_s": some_tokens as f64 / single_s},
            "max_score_difference_packed_vs_served": max_diff(&packed, &served),
            "max_score_difference_packed_vs_one_per_row": max_diff(&packed[..single.len()], &single),
            "three_contenders_s": 3.0 * served_s,
        })
    );
    Ok(())
}
