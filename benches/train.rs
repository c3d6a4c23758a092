//! Training speed and memory of pai-trainers on a GGUF, in the shape of issue 6's comparison with
//! PyTorch + PEFT (benches/compare/peft_train_speed.py): LoRA r 16, alpha 32 on q, k, v, o, batches of
//! 4 × 256 tokens of a fixed text, AdamW. Prints one JSON line: median tokens/s over the steps after
//! the first, and peak RSS.
//! `cargo bench --bench train -- [--model PATH] [--steps 6] [--text FILE] [--threads N]`

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The allocator pai-train runs on, with the same options (see `pai::setup_allocator`, `pai::keep_freed_memory`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    pai::setup_allocator();
    pai::init_logging();
    pai::keep_freed_memory();
    let model = arg("--model")
        .map(PathBuf::from)
        .unwrap_or_else(pai::default_model_path);
    let steps: usize = arg("--steps").and_then(|v| v.parse().ok()).unwrap_or(6);
    let text = arg("--text").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/perplexity.txt")
    });
    if let Some(n) = arg("--threads") {
        std::env::set_var("PAI_NUM_THREADS", n);
    }
    let base = pai_model::BaseModel::load(&model, &pai_model::default_device())?;
    let ids = base
        .tokenizer
        .encode(&std::fs::read_to_string(&text)?, false)?;
    // Documents of 256 tokens (the text repeated as needed), so every row is one whole document.
    let docs: Vec<pai_trainers::TrainDoc> = ids
        .iter()
        .copied()
        .cycle()
        .take(256 * 4 * (steps + 1))
        .collect::<Vec<_>>()
        .chunks(256)
        .map(|c| pai_trainers::TrainDoc::plain(c.to_vec()))
        .collect();
    let cfg = pai_trainers::TrainConfig {
        target_modules: ["q", "k", "v", "o"].map(String::from).to_vec(),
        r: 16,
        alpha: 32.0,
        seq_len: 256,
        batch_tokens: 1024,
        max_steps: Some(steps),
        eval_tokens: 0,
        checkpoint_every: steps + 1,
        ..Default::default()
    };
    let run_dir = tempfile::tempdir()?;
    let stop = AtomicBool::new(false);
    let mut rates = Vec::new();
    pai_trainers::train(
        &pai_trainers::TrainJob {
            model: &base.model,
            config: &cfg,
            train: &docs,
            holdout: &[],
            retention: Vec::new(),
            init: None,
            base_name: None,
            run_dir: run_dir.path(),
            resume: false,
            stop: &stop,
            pad: 0,
        },
        &mut |m| rates.push(m.tokens_per_s),
    )?;
    let mut later: Vec<f64> = rates.iter().skip(1).copied().collect();
    later.sort_by(f64::total_cmp);
    let median = later.get(later.len() / 2).copied().unwrap_or(0.0);
    println!(
        "{}",
        serde_json::json!({
            "tool": "pai",
            "model": model,
            "steps": steps,
            "batch": "4x256",
            "tokens_per_s": rates,
            "median_tokens_per_s": median,
            "peak_rss_mb": peak_rss_mb(),
            "threads": pai_model::kernels::threads(),
        })
    );
    Ok(())
}
