//! The differentiable path: packed rows, the frozen-linear op (only grad·W), differentiable norm,
//! RoPE, softmax and the fused loss.

use candle_core::quantized::GgmlDType;
use candle_core::Tensor;
use pai_model::testing::TinySpec;
use pai_model::{AdapterStack, Model, PackedRow, Proj};
use pai_trainers::{weighted_cross_entropy, LoraParams, TrainConfig};

use crate::{max_abs_diff, tiny};

fn all_targets() -> TrainConfig {
    TrainConfig {
        target_modules: ["q", "k", "v", "o", "gate", "up", "down"]
            .map(String::from)
            .to_vec(),
        r: 4,
        alpha: 8.0,
        ..Default::default()
    }
}

/// LoRA pairs with non-zero B (at PEFT's initialisation B = 0, so A's gradient is exactly zero).
fn params_with_random_b(model: &Model, cfg: &TrainConfig, seed: u64) -> LoraParams {
    let params = LoraParams::init(
        model.config(),
        cfg.lora(None).expect("lora"),
        seed,
        model.device(),
    )
    .expect("init");
    for (k, s) in params.sites().iter().enumerate() {
        // Deterministic values in ±0.2 (candle's randn is not seeded on the CPU).
        let n = s.b.elem_count();
        let v: Vec<f32> = (0..n)
            .map(|i| 0.2 * ((i as f32) * 1.7 + (k as f32) * 0.3 + seed as f32).sin())
            .collect();
        let b = Tensor::from_vec(v, s.b.dims(), model.device()).expect("tensor");
        s.b.set(&b).expect("set");
    }
    params
}

/// Two rows, three documents (one cut across the rows): Σ loss over every next-token target.
fn rows() -> (Vec<PackedRow>, Vec<u32>, Vec<f32>) {
    let a: Vec<u32> = (0..9).map(|i| 40 + i * 7).collect();
    let b: Vec<u32> = (0..7).map(|i| 100 + i * 5).collect();
    let rows = vec![
        PackedRow {
            ids: [&a[..], &b[..3]].concat(),
            doc_lens: vec![9, 3],
        },
        PackedRow {
            ids: [&b[3..], &a[..8]].concat(),
            doc_lens: vec![4, 8],
        },
    ];
    let mut targets = Vec::new();
    let mut weights = Vec::new();
    for row in &rows {
        let mut start = 0;
        for &len in &row.doc_lens {
            for i in 0..len {
                let next = (i + 1 < len).then(|| row.ids[start + i + 1]);
                targets.push(next.unwrap_or(0));
                weights.push(if next.is_some() { 1.0 } else { 0.0 });
            }
            start += len;
        }
    }
    (rows, targets, weights)
}

fn loss(model: &Model, params: &LoraParams, trainable: bool) -> Tensor {
    loss_with_dropout(model, params, trainable, None)
}

fn loss_with_dropout(
    model: &Model,
    params: &LoraParams,
    trainable: bool,
    dropout_seed: Option<u64>,
) -> Tensor {
    let (rows, targets, weights) = rows();
    let adapter = if trainable {
        params.trainable("t", dropout_seed)
    } else {
        params.frozen("t", dropout_seed)
    };
    let list = [&adapter];
    let packed = model.pack(&rows).expect("pack");
    let hidden = model
        .forward_packed(&packed, &AdapterStack::new(&list))
        .expect("forward");
    let (b, t, h) = hidden.dims3().expect("dims");
    let logits = model
        .logits(&hidden.reshape((b * t, h)).expect("reshape"))
        .expect("logits");
    weighted_cross_entropy(&logits, &targets, &weights).expect("loss")
}

#[test]
fn packed_documents_compute_as_if_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = tiny(dir.path(), GgmlDType::F32, TinySpec::default());
    let model = &base.model;
    let docs: [Vec<u32>; 3] = [vec![5, 9, 44, 3, 120], vec![7, 8], vec![200, 201, 202, 17]];
    let packed = model
        .pack(&[PackedRow {
            ids: docs.concat(),
            doc_lens: docs.iter().map(Vec::len).collect(),
        }])
        .expect("pack");
    let hidden = model
        .forward_packed(&packed, &AdapterStack::NONE)
        .expect("packed forward");
    let mut start = 0;
    for doc in &docs {
        let ids = Tensor::new(doc.as_slice(), model.device())
            .and_then(|t| t.unsqueeze(0))
            .expect("ids");
        let mut cache = model.new_cache(16);
        let alone = model
            .forward_hidden(&ids, &mut cache, &AdapterStack::NONE)
            .expect("forward");
        let part = hidden.narrow(1, start, doc.len()).expect("narrow");
        let diff = max_abs_diff(&part, &alone);
        assert!(diff < 1e-4, "document at {start}: {diff}");
        start += doc.len();
    }
}

/// Central differences of the loss against the analytic gradient, on a dense f32 model (a quantized
/// forward is piecewise constant in its input, so finite differences mean nothing there).
#[test]
fn lora_gradients_match_finite_differences() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = tiny(dir.path(), GgmlDType::F32, TinySpec::default());
    let model = &base.model;
    let cfg = all_targets();
    let params = params_with_random_b(model, &cfg, 3);
    let grads = loss(model, &params, true).backward().expect("backward");
    // Large enough steps that f32 rounding of the loss (~1e-4) stays small against the difference.
    let eps = 4e-2f32;
    let mut checked = 0;
    for s in params
        .sites()
        .iter()
        .filter(|s| s.site.layer == 1 || s.site.proj == Proj::Q)
    {
        for var in [&s.a, &s.b] {
            let g = grads
                .get(var.as_tensor())
                .expect("gradient")
                .flatten_all()
                .expect("flat");
            let g: Vec<f32> = g.to_vec1().expect("vec");
            // The entry with the largest gradient, and one in the middle.
            let top = (0..g.len())
                .max_by(|&i, &j| g[i].abs().total_cmp(&g[j].abs()))
                .expect("entries");
            for idx in [top, g.len() / 2] {
                let original: Vec<f32> = var
                    .as_tensor()
                    .flatten_all()
                    .and_then(|t| t.to_vec1())
                    .expect("vec");
                let at = |delta: f32| -> f64 {
                    let mut v = original.clone();
                    v[idx] += delta;
                    let t = Tensor::from_vec(v, var.dims(), model.device()).expect("tensor");
                    var.set(&t).expect("set");
                    f64::from(
                        loss(model, &params, false)
                            .to_scalar::<f32>()
                            .expect("scalar"),
                    )
                };
                // Central differences at h and h/2, Richardson-extrapolated (the h² error cancels).
                let central = |h: f32| (at(h) - at(-h)) / (2.0 * f64::from(h));
                let fd = (4.0 * central(eps / 2.0) - central(eps)) / 3.0;
                var.set(&Tensor::from_vec(original, var.dims(), model.device()).expect("t"))
                    .expect("restore");
                let an = f64::from(g[idx]);
                let tol = 2e-2 * an.abs() + 3e-3;
                assert!(
                    (fd - an).abs() <= tol,
                    "{:?} {} entry {idx}: finite difference {fd}, analytic {an}",
                    s.site,
                    if std::ptr::eq(var, &s.a) { "A" } else { "B" }
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 28, "{checked} entries checked");
}

/// Through the quantized base (pai's Q8_0 kernels forward, dequantized weights backward) every LoRA
/// tensor gets a gradient, and it points where the dense model's does.
#[test]
fn every_lora_parameter_gets_a_gradient_through_the_quantized_base() {
    let dir = tempfile::tempdir().expect("tempdir");
    let quant = tiny(&dir.path().join("q"), GgmlDType::Q8_0, TinySpec::default());
    let dense = tiny(&dir.path().join("f"), GgmlDType::F32, TinySpec::default());
    let cfg = all_targets();
    let params = params_with_random_b(&quant.model, &cfg, 5);
    let grads_q = loss(&quant.model, &params, true)
        .backward()
        .expect("backward");
    let grads_f = loss(&dense.model, &params, true)
        .backward()
        .expect("backward");
    assert_eq!(params.sites().len(), 2 * 7);
    for s in params.sites() {
        for (name, var) in [("A", &s.a), ("B", &s.b)] {
            let gq = grads_q.get(var.as_tensor()).expect("quantized gradient");
            let gf = grads_f.get(var.as_tensor()).expect("dense gradient");
            let norm = |t: &Tensor| {
                t.sqr()
                    .and_then(|t| t.sum_all())
                    .and_then(|t| t.to_scalar::<f32>())
                    .expect("norm")
                    .sqrt()
            };
            let (nq, nf) = (norm(gq), norm(gf));
            assert!(
                nq > 1e-6,
                "{:?} {name}: zero gradient through the quantized base",
                s.site
            );
            let cos = (gq * gf)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.to_scalar::<f32>())
                .expect("dot")
                / (nq * nf);
            assert!(
                cos > 0.95,
                "{:?} {name}: cosine {cos} with the dense gradient",
                s.site
            );
        }
    }
}

/// Both step implementations (pai's own, with its hand-written backward; candle's autograd with the
/// blocks recomputed one at a time) give the gradients of the whole graph.
#[test]
fn checkpointed_step_gives_the_whole_graph_gradients() {
    checkpointed_step_matches(None);
}

/// With LoRA dropout too: both passes over a block draw the same masks, a seed always draws the same
/// ones, and they change the loss.
#[test]
fn checkpointed_step_with_dropout_gives_the_whole_graph_gradients() {
    checkpointed_step_matches(Some(77));
}

fn checkpointed_step_matches(dropout_seed: Option<u64>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = tiny(dir.path(), GgmlDType::F32, TinySpec::default());
    let model = &base.model;
    let cfg = TrainConfig {
        dropout: if dropout_seed.is_some() { 0.2 } else { 0.0 },
        ..all_targets()
    };
    let params = params_with_random_b(model, &cfg, 9);
    let whole = loss_with_dropout(model, &params, true, dropout_seed)
        .backward()
        .expect("backward");
    if let Some(seed) = dropout_seed {
        let value = |s| {
            loss_with_dropout(model, &params, false, s)
                .to_scalar::<f32>()
                .expect("loss")
        };
        assert_eq!(
            value(Some(seed)),
            value(Some(seed)),
            "same seed, same masks"
        );
        assert_ne!(value(Some(seed)), value(None), "dropout drops something");
        assert_ne!(
            value(Some(seed)),
            value(Some(seed + 1)),
            "another seed, other masks"
        );
    }
    let (rows, targets, weights) = rows();
    let rows: Vec<pai_trainers::Row> = {
        let mut at = 0;
        rows.into_iter()
            .map(|row| {
                let n = row.ids.len();
                let r = pai_trainers::Row {
                    row,
                    targets: targets[at..at + n].to_vec(),
                    weights: weights[at..at + n].to_vec(),
                };
                at += n;
                r
            })
            .collect()
    };
    type Step = fn(
        &Model,
        &[pai_trainers::Row],
        &LoraParams,
        f32,
        Option<u64>,
        &mut pai_trainers::optim::Grads,
    ) -> pai_trainers::Result<f64>;
    let steps: [(&str, Step); 2] = [
        ("pai's own step", pai_trainers::step::own_loss_and_grads),
        (
            "checkpointed autograd",
            pai_trainers::step::autograd_loss_and_grads,
        ),
    ];
    for (label, step) in steps {
        let mut grads = Vec::new();
        let value = step(model, &rows, &params, 1.0, dropout_seed, &mut grads).expect("step");
        let want = f64::from(
            loss_with_dropout(model, &params, false, dropout_seed)
                .to_scalar::<f32>()
                .expect("loss"),
        );
        assert!(
            (value - want).abs() < 1e-3 * want,
            "{label}: {value} vs {want}"
        );
        for ((name, var), got) in params.named_vars().zip(&grads) {
            let got = got.as_ref().expect("gradient");
            let want = whole.get(var.as_tensor()).expect("gradient");
            let scale = want
                .abs()
                .and_then(|t| t.max_keepdim(0))
                .and_then(|t| t.max_keepdim(1))
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .expect("max")[0];
            let diff = max_abs_diff(got, want);
            assert!(
                diff <= 1e-3 * scale.max(1e-3),
                "{label}, {name}: {diff} (largest {scale})"
            );
        }
    }
}
