//! Generation speed, measured the way llama-bench does: prefill tokens/s (a prompt in one pass) and
//! decode tokens/s (one token at a time), several repetitions after a warm-up, medians and spread, peak
//! RSS. Each repetition records how much CPU other processes used meanwhile (from /proc/stat); one where
//! they used more than a tenth of a core is marked contended and left out of the medians (unless every
//! repetition was: then the figures are over all of them and say so).
//! Used by `pai-serve bench` and `benches/generation.rs`.

use std::ops::ControlFlow;
use std::time::Instant;

use pai_model::{generate, AdapterStack, BaseModel, GenerateOptions};
use serde_json::json;

/// The fixed text prompts are cut from (repeated as needed).
const PROMPT_TEXT: &str = include_str!("../tests/fixtures/perplexity.txt");

/// Other processes' CPU use (in cores) from which a repetition counts as contended.
pub const CONTENDED_CORES: f64 = 0.1;

pub struct Phase {
    pub tokens_per_second: Vec<f64>,
    pub others_cores: Vec<f64>,
}

/// The figures of one phase: over the uncontended repetitions, or over all of them when every one was
/// contended (a benchmark run under load on purpose), which `contended` then says.
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Repetitions the figures are taken over.
    pub used: usize,
    pub contended: bool,
    /// The most CPU (in cores) other processes used during any repetition.
    pub max_others_cores: f64,
}

impl Phase {
    /// One repetition: its tokens/s, and the CPU other processes used since `before` (from
    /// [`cpu_jiffies`]) over its `elapsed` seconds.
    fn record(&mut self, tokens_per_second: f64, before: (u64, u64), elapsed: f64) {
        let ((b0, o0), (b1, o1)) = (before, cpu_jiffies());
        let others = (b1.saturating_sub(b0) as f64 - o1.saturating_sub(o0) as f64).max(0.0)
            / 100.0
            / elapsed.max(1e-9);
        self.tokens_per_second.push(tokens_per_second);
        self.others_cores.push(others);
    }

    pub fn summary(&self) -> Summary {
        let pick = |keep: &dyn Fn(f64) -> bool| {
            let mut v: Vec<f64> = self
                .tokens_per_second
                .iter()
                .zip(&self.others_cores)
                .filter(|(_, &o)| keep(o))
                .map(|(&t, _)| t)
                .collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let clean = pick(&|o| o < CONTENDED_CORES);
        let contended = clean.is_empty();
        let v = if contended { pick(&|_| true) } else { clean };
        Summary {
            median: v.get(v.len() / 2).copied().unwrap_or(f64::NAN),
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
            used: v.len(),
            contended,
            max_others_cores: self.others_cores.iter().copied().fold(0.0, f64::max),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        let s = self.summary();
        json!({
            "median_tokens_per_second": s.median,
            "min_tokens_per_second": s.min,
            "max_tokens_per_second": s.max,
            "reps_used": s.used,
            "contended": s.contended,
            "reps": self.tokens_per_second.iter().zip(&self.others_cores)
                .map(|(t, o)| json!({"tokens_per_second": t, "others_cores": o})).collect::<Vec<_>>(),
        })
    }
}

pub struct Report {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub prefill: Phase,
    pub decode: Phase,
    pub peak_rss_bytes: Option<u64>,
}

impl Report {
    pub fn to_json(&self, base: &BaseModel) -> serde_json::Value {
        json!({
            "runtime": "pai",
            "model": base.path(),
            "kernels": pai_model::kernels::kernel_name(),
            "threads": pai_model::kernels::threads(),
            "prefill_tokens": self.prompt_tokens,
            "decode_tokens": self.gen_tokens,
            "peak_rss_bytes": self.peak_rss_bytes,
            "results": {"prefill": self.prefill.to_json(), "decode": self.decode.to_json()},
        })
    }
}

/// (busy jiffies of all cores, this process's own jiffies).
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
            let total: u64 = v.iter().take(8).sum();
            total - v.get(3).copied().unwrap_or(0) - v.get(4).copied().unwrap_or(0)
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

/// Peak resident set size of this process (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Measure `reps` repetitions (after one warm-up) of a prefill of `prompt_tokens` and a decode of
/// `gen_tokens` after a 16-token prompt.
pub fn run(
    base: &BaseModel,
    prompt_tokens: usize,
    gen_tokens: usize,
    reps: usize,
) -> pai_model::Result<Report> {
    let mut ids = base.tokenizer.encode(PROMPT_TEXT, false)?;
    while ids.len() < prompt_tokens.max(17) {
        ids.extend_from_within(..);
    }
    ids.truncate(prompt_tokens.max(17));
    let mut phases = Vec::new();
    for (prompt, max_tokens, is_prefill) in [
        (ids[..prompt_tokens].to_vec(), 1usize, true),
        (ids[..16].to_vec(), gen_tokens, false),
    ] {
        let mut phase = Phase {
            tokens_per_second: Vec::new(),
            others_cores: Vec::new(),
        };
        for rep in 0..=reps {
            let opts = GenerateOptions {
                max_tokens: Some(max_tokens),
                ignore_eos: true,
                ..Default::default()
            };
            let (b0, o0) = cpu_jiffies();
            let wall = Instant::now();
            let g = generate(
                &base.model,
                &base.tokenizer,
                &AdapterStack::NONE,
                &prompt,
                &opts,
                |_| ControlFlow::Continue(()),
            )?;
            let elapsed = wall.elapsed().as_secs_f64();
            let (tokens, seconds) = if is_prefill {
                (g.prompt_tokens, g.prefill_seconds)
            } else {
                // The first generated token comes from the prefill's logits.
                (g.tokens.len().saturating_sub(1), g.decode_seconds)
            };
            if rep > 0 {
                phase.record(tokens as f64 / seconds.max(1e-9), (b0, o0), elapsed);
            }
        }
        phases.push(phase);
    }
    let decode = phases.pop().expect("two phases");
    let prefill = phases.pop().expect("two phases");
    Ok(Report {
        prompt_tokens,
        gen_tokens,
        prefill,
        decode,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// Decode tokens/s of `rows` sequences advancing together in batched steps (continuous batching's
/// inner loop), each row with the adapter `adapters[row % len]` (none when empty): `reps`
/// repetitions after a warm-up of `gen_tokens` steps after a 16-token prompt per row.
pub fn batched(
    base: &BaseModel,
    adapters: &[pai_model::Adapter],
    rows: usize,
    gen_tokens: usize,
    reps: usize,
) -> pai_model::Result<Phase> {
    let ids = base.tokenizer.encode(PROMPT_TEXT, false)?;
    let stacks: Vec<Vec<&pai_model::Adapter>> = (0..rows)
        .map(|r| {
            adapters
                .get(r % adapters.len().max(1))
                .into_iter()
                .collect()
        })
        .collect();
    let mut phase = Phase {
        tokens_per_second: Vec::new(),
        others_cores: Vec::new(),
    };
    for rep in 0..=reps {
        // Each row its own prompt (a different window of the text) and cache.
        let mut caches = Vec::with_capacity(rows);
        let mut next = Vec::with_capacity(rows);
        for (r, stack) in stacks.iter().enumerate() {
            let prompt = &ids[r * 7 % (ids.len() - 16)..][..16];
            let mut cache = base.model.new_cache(16 + gen_tokens + 1);
            let t = pai_model::Tensor::new(prompt, base.model.device())?.unsqueeze(0)?;
            base.model
                .forward_last(&t, &mut cache, &AdapterStack::new(stack))?;
            caches.push(cache);
            next.push(prompt[15]);
        }
        let (b0, o0) = cpu_jiffies();
        let wall = Instant::now();
        for _ in 0..gen_tokens {
            let mut batch: Vec<pai_model::BatchRow> = caches
                .iter_mut()
                .zip(&stacks)
                .zip(&next)
                .map(|((cache, stack), &token)| pai_model::BatchRow {
                    token,
                    cache,
                    adapters: AdapterStack::new(stack),
                })
                .collect();
            let logits = base.model.decode_batch(&mut batch)?;
            next = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
        }
        let elapsed = wall.elapsed().as_secs_f64();
        if rep > 0 {
            phase.record((rows * gen_tokens) as f64 / elapsed, (b0, o0), elapsed);
        }
    }
    Ok(phase)
}
