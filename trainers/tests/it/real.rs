//! On the real default model (scripts/fetch-model.sh): the gradient through the quantized base (int8
//! forward, Q8_0 Wᵀ backward, blocks recomputed) points where the exact f32 gradient of the same
//! weights dequantized does, and a small step against it lowers the loss.

use std::path::PathBuf;

use pai_model::{BackwardCopyKind, BaseModel, LoadOptions};
use pai_trainers::step::loss_and_grads;
use pai_trainers::{LoraParams, Packer, TrainConfig, TrainDoc};

fn default_model() -> PathBuf {
    let home = std::env::var_os("PAI_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".pai")
        });
    let path = home.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "run scripts/fetch-model.sh first ({} missing)",
        path.display()
    );
    path
}

fn rows(base: &BaseModel) -> Vec<pai_trainers::Row> {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/perplexity.txt"),
    )
    .expect("fixture text");
    let ids = base.tokenizer.encode(&text, false).expect("encode");
    let docs: Vec<TrainDoc> = ids
        .chunks(128)
        .take(2)
        .map(|c| TrainDoc::plain(c.to_vec()))
        .collect();
    let mut packer = Packer::new(&docs, 128, 0, false, 0).expect("packer");
    (0..2).filter_map(|_| packer.next_row(true)).collect()
}

#[test]
fn quantized_gradient_agrees_with_the_exact_one_on_the_default_model() {
    let path = default_model();
    let device = pai_model::Device::Cpu;
    let quant = BaseModel::load(&path, &device).expect("load");
    let exact =
        BaseModel::load_with(&path, &device, LoadOptions { dequantize: true }).expect("load f32");
    let rows = rows(&quant);
    let counted: usize = rows.iter().map(|r| r.counted()).sum();
    let cfg = TrainConfig::default();
    let params = LoraParams::init(
        quant.model.config(),
        cfg.lora(None).expect("lora"),
        1,
        &device,
    )
    .expect("init");
    // B away from zero, so A has a gradient too.
    for (k, s) in params.sites().iter().enumerate() {
        let n = s.b.elem_count();
        let v: Vec<f32> = (0..n)
            .map(|i| 0.01 * ((i as f32) * 0.37 + k as f32).sin())
            .collect();
        s.b.set(&candle_core::Tensor::from_vec(v, s.b.dims(), &device).expect("b"))
            .expect("set");
    }
    let norm = 1.0 / counted as f32;
    let mut ge = Vec::new();
    let le = loss_and_grads(&exact.model, &rows, &params, norm, None, &mut ge).expect("exact step");
    // The trainer's two policies: the output projection's copy in f32 and the blocks' as int8 Wᵀ;
    // or, on a CPU with a bf16 engine (AMX or AVX-512 BF16), bf16 tiles of W and Wᵀ for every
    // projection (forward products too).
    let n_lin = quant.model.frozen_linears().count();
    let int8 = |i: usize| {
        if i + 1 == n_lin {
            BackwardCopyKind::Dense
        } else {
            BackwardCopyKind::Int8
        }
    };
    let tiles = |_| BackwardCopyKind::Bf16Tiles;
    // (label, kind per linear, the worst cosine allowed: bf16 carries more than int8)
    type Kind<'a> = &'a dyn Fn(usize) -> BackwardCopyKind;
    let mut policies: Vec<(&str, Kind, f32)> = vec![("int8", &int8, 0.9)];
    if pai_model::kernels::bf16::engine().is_some() {
        policies.push(("bf16 tiles", &tiles, 0.99));
    }
    let mut gq = Vec::new();
    let mut lq = 0.0;
    for (label, kind, floor) in policies {
        for (i, l) in quant.model.frozen_linears().enumerate() {
            l.keep_backward_copy(Some(kind(i)));
        }
        gq.clear();
        lq = loss_and_grads(&quant.model, &rows, &params, norm, None, &mut gq)
            .expect("quantized step");
        assert!((lq - le).abs() < 0.05 * le, "{label}: loss {lq} vs {le}");
        let mut worst = 1.0f32;
        for ((name, _), (a, b)) in params.named_vars().zip(gq.iter().zip(&ge)) {
            let (a, b) = (a.as_ref().expect("grad"), b.as_ref().expect("grad"));
            let dot = (a * b)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.to_scalar::<f32>())
                .expect("dot");
            let n = |t: &candle_core::Tensor| {
                t.sqr()
                    .and_then(|t| t.sum_all())
                    .and_then(|t| t.to_scalar::<f32>())
                    .expect("n")
                    .sqrt()
            };
            let cos = dot / (n(a) * n(b));
            worst = worst.min(cos);
            assert!(
                cos > floor,
                "{label}, {name}: cosine {cos} between the quantized and the exact gradient"
            );
        }
        eprintln!(
            "{label}: loss quantized {lq:.4}, exact {le:.4}; worst gradient cosine {worst:.4}"
        );
    }

    // A small step against the gradient lowers the loss.
    let total: f32 = ge
        .iter()
        .flatten()
        .map(|g| {
            g.sqr()
                .and_then(|t| t.sum_all())
                .and_then(|t| t.to_scalar::<f32>())
                .expect("n")
        })
        .sum::<f32>()
        .sqrt();
    for ((_, var), g) in params.named_vars().zip(&gq) {
        let g = g.as_ref().expect("grad");
        let moved = (var.as_tensor().detach() - (g * (1e-2 / f64::from(total))).expect("scale"))
            .expect("step");
        var.set(&moved).expect("set");
    }
    let mut again = Vec::new();
    let after =
        loss_and_grads(&quant.model, &rows, &params, norm, None, &mut again).expect("after");
    assert!(
        after < lq,
        "loss {lq} → {after} after a step against the gradient"
    );
}

/// Learning for real, on a small budget: this project's own sources (text the base model has never
/// seen) get a lower holdout loss after a short run, and a text the base knew (the perplexity fixture)
/// barely moves. BENCHMARKS.md has the full-budget figures.
#[test]
fn learns_this_projects_code_without_forgetting_general_text() {
    use std::sync::atomic::AtomicBool;

    let path = default_model();
    let base = BaseModel::load(&path, &pai_model::Device::Cpu).expect("load");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files: Vec<PathBuf> = ["datasets/src", "trainers/src"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root.join(d)).expect("sources").flatten())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    files.sort();
    // Documents of ~200 tokens; every fifth is held out.
    let mut train_docs = Vec::new();
    let mut holdout = Vec::new();
    for f in &files {
        let ids = base
            .tokenizer
            .encode(&std::fs::read_to_string(f).expect("read"), false)
            .expect("encode");
        for c in ids.chunks(200) {
            let doc = TrainDoc::plain(c.to_vec());
            if (train_docs.len() + holdout.len()) % 5 == 4 {
                holdout.push(doc);
            } else {
                train_docs.push(doc);
            }
        }
    }
    let cfg = TrainConfig {
        learning_rate: 7e-4,
        warmup_steps: 2,
        seq_len: 256,
        batch_tokens: 512,
        max_steps: Some(12),
        eval_every: 0,
        eval_tokens: 2048,
        ..Default::default()
    };
    let general =
        std::fs::read_to_string(root.join("tests/fixtures/perplexity.txt")).expect("text");
    let general_ids = base.tokenizer.encode(&general, false).expect("encode");
    let general_nll = |adapter: Option<&pai_model::Adapter>| {
        let list: Vec<&pai_model::Adapter> = adapter.into_iter().collect();
        pai_model::perplexity(
            &base.model,
            &pai_model::AdapterStack::new(&list),
            &general_ids,
            2048,
            |_, _| {},
        )
        .expect("perplexity")
        .mean_nll
    };
    let before_general = general_nll(None);
    let run = tempfile::tempdir().expect("tempdir");
    let stop = AtomicBool::new(false);
    let out = pai_trainers::train(
        &pai_trainers::TrainJob {
            model: &base.model,
            config: &cfg,
            train: &train_docs,
            holdout: &holdout,
            retention: Vec::new(),
            init: None,
            base_name: None,
            run_dir: run.path(),
            resume: false,
            stop: &stop,
            pad: 0,
        },
        &mut |_| {},
    )
    .expect("train");
    let (before, after) = (
        out.initial_holdout.expect("holdout"),
        out.best_holdout.expect("holdout"),
    );
    let after_general = general_nll(Some(&out.adapter));
    eprintln!(
        "holdout perplexity {:.2} → {:.2} ({:+.1}%), general {:.3} → {:.3} ({:+.1}%)",
        before.exp(),
        after.exp(),
        100.0 * ((after - before).exp() - 1.0),
        before_general.exp(),
        after_general.exp(),
        100.0 * ((after_general - before_general).exp() - 1.0)
    );
    assert!(
        (after - before).exp() < 0.95,
        "holdout perplexity fell only from {:.2} to {:.2}",
        before.exp(),
        after.exp()
    );
    assert!(
        (after_general - before_general).exp() < 1.03,
        "general perplexity rose from {:.3} to {:.3}",
        before_general.exp(),
        after_general.exp()
    );
}
