//! Whole-program speed of pai's runtime on a GGUF: prefill tokens/s (a prompt of `--prefill` tokens in
//! one pass) and decode tokens/s (`--decode` tokens, one at a time), `--reps` repetitions each, medians
//! reported. Each repetition records how much CPU other processes used meanwhile (from /proc/stat); a
//! repetition where they used more than a tenth of a core is marked contended and left out of the median.
//!
//! `cargo bench --bench generation -- [--model PATH] [--prefill 512] [--decode 128] [--reps 5]`
//! (benches/compare/speed.sh runs it beside llama.cpp and writes the comparison.)

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use pai_model::{generate, AdapterStack, BaseModel, GenerateOptions};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// (total jiffies busy on all cores, this process's own jiffies).
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let busy = stat
        .lines()
        .next()
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal
            v.iter().take(8).sum::<u64>()
                - v.get(3).copied().unwrap_or(0)
                - v.get(4).copied().unwrap_or(0)
        })
        .unwrap_or(0);
    let me = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let own = me
        .rsplit(')')
        .next()
        .map(|rest| {
            // After the name: state, ppid, pgrp, session, tty, tpgid, flags, 4 fault counts, utime, stime.
            let f: Vec<i64> = rest
                .split_whitespace()
                .skip(1)
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            (f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0)).max(0) as u64
        })
        .unwrap_or(0);
    (busy, own)
}

struct Rep {
    tokens_per_second: f64,
    others_cores: f64,
}

fn measure(mut f: impl FnMut() -> (usize, f64)) -> Rep {
    let (b0, o0) = cpu_jiffies();
    let wall = Instant::now();
    let (tokens, seconds) = f();
    let elapsed = wall.elapsed().as_secs_f64();
    let (b1, o1) = cpu_jiffies();
    let hz = 100.0;
    let others = ((b1 - b0) as f64 - (o1 - o0) as f64).max(0.0) / hz / elapsed;
    Rep {
        tokens_per_second: tokens as f64 / seconds,
        others_cores: others,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn main() {
    let model = arg("--model")
        .map(PathBuf::from)
        .unwrap_or_else(pai::default_model_path);
    let prefill: usize = arg("--prefill").and_then(|v| v.parse().ok()).unwrap_or(512);
    let decode: usize = arg("--decode").and_then(|v| v.parse().ok()).unwrap_or(128);
    let reps: usize = arg("--reps").and_then(|v| v.parse().ok()).unwrap_or(5);
    let base = BaseModel::load(&model, &pai_model::default_device()).unwrap_or_else(|e| {
        eprintln!("{e}\n(run scripts/fetch-model.sh, or pass --model PATH)");
        std::process::exit(1)
    });
    let text_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/perplexity.txt");
    let text = std::fs::read_to_string(&text_path).expect("tests/fixtures/perplexity.txt");
    let mut ids = base.tokenizer.encode(&text, false).expect("tokenize");
    while ids.len() < prefill {
        ids.extend_from_within(..);
    }
    ids.truncate(prefill);

    let mut results = serde_json::Map::new();
    for (name, prompt, max_tokens) in [
        ("prefill", ids.clone(), 1usize),
        ("decode", ids[..16].to_vec(), decode),
    ] {
        let mut clean = Vec::new();
        let mut all = Vec::new();
        for _ in 0..reps + 1 {
            let opts = GenerateOptions {
                max_tokens: Some(max_tokens),
                ignore_eos: true,
                ..Default::default()
            };
            let rep = measure(|| {
                let g = generate(
                    &base.model,
                    &base.tokenizer,
                    &AdapterStack::NONE,
                    &prompt,
                    &opts,
                    |_| ControlFlow::Continue(()),
                )
                .expect("generate");
                if name == "prefill" {
                    (g.prompt_tokens, g.prefill_seconds)
                } else {
                    (g.tokens.len().saturating_sub(1), g.decode_seconds)
                }
            });
            all.push(serde_json::json!({"tokens_per_second": rep.tokens_per_second, "others_cores": rep.others_cores}));
            if all.len() > 1 && rep.others_cores < 0.1 {
                clean.push(rep.tokens_per_second);
            }
        }
        results.insert(
            name.into(),
            serde_json::json!({"median_tokens_per_second": median(clean.clone()), "clean_reps": clean.len(), "reps": all}),
        );
    }
    let out = serde_json::json!({
        "runtime": "pai",
        "model": model,
        "prefill_tokens": prefill,
        "decode_tokens": decode,
        "results": results,
    });
    println!("{out}");
}
