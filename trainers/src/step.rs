//! One micro-batch's loss and LoRA gradients, two ways:
//!
//! - on the CPU, pai's own step (`block_grad.rs`): the blocks forward on pai's quantized kernels
//!   keeping the activations their backward needs, the head and the loss with no graph, then each
//!   block's backward written out by hand; no graph, no second forward;
//! - elsewhere (and as the reference the tests compare the first to), candle's autograd with
//!   activation checkpointing: the blocks run forward once without a graph, keeping only each block's
//!   input, and the backward rebuilds one block's graph at a time from its input. Memory holds one
//!   block's graph instead of all of them (candle keeps every intermediate of a graph until its
//!   backward ends: 8 GB for 4 × 256 tokens of a 135M model), for the price of a second forward.

use candle_core::{Tensor, Var};

use pai_model::{AdapterStack, Model, PackedRow};

use crate::attention_grad::{Doc, Heads};
use crate::block_grad::{self, SiteGrad, SiteLora, StepBatch};
use crate::data::Row;
use crate::elementwise_grad::{rms_norm, rms_norm_backward};
use crate::error::Result;
use crate::loss::{cross_entropy_with_grad, weighted_cross_entropy};
use crate::optim::{accumulate, Grads};
use crate::params::LoraParams;

/// Positions a chunk of the head takes at once (their logits: 25 MB at a 49,152-token vocabulary).
const HEAD_CHUNK: usize = 128;

/// Every position's target and loss weight (times `norm`), rows after one another.
fn targets_and_weights(rows: &[Row], norm: f32) -> (Vec<u32>, Vec<f32>) {
    let targets = rows
        .iter()
        .flat_map(|r| r.targets.iter().copied())
        .collect();
    let weights = rows
        .iter()
        .flat_map(|r| r.weights.iter().map(|w| w * norm))
        .collect();
    (targets, weights)
}

/// Σ weighted token losses of `rows` (weights times `norm`) from their final hidden states [rows, seq,
/// hidden]: the output projection and the fused loss.
pub(crate) fn head_loss(model: &Model, hidden: &Tensor, rows: &[Row], norm: f32) -> Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    let logits = model.logits(&hidden.reshape((b * t, h))?)?;
    let (targets, weights) = targets_and_weights(rows, norm);
    weighted_cross_entropy(&logits, &targets, &weights)
}

/// Σ weighted token losses of `rows` (weights times `norm`), and its gradients towards `params`'
/// variables added into `grads` (in `params.named_vars()` order). `dropout_seed` draws the LoRA
/// dropout masks; `None` applies no dropout. pai's own step on the CPU, candle's autograd elsewhere.
pub fn loss_and_grads(
    model: &Model,
    rows: &[Row],
    params: &LoraParams,
    norm: f32,
    dropout_seed: Option<u64>,
    grads: &mut Grads,
) -> Result<f64> {
    if model.device().is_cpu() && std::env::var_os("PAI_TRAIN_AUTOGRAD").is_none() {
        own_loss_and_grads(model, rows, params, norm, dropout_seed, grads)
    } else {
        autograd_loss_and_grads(model, rows, params, norm, dropout_seed, grads)
    }
}

/// The documents of packed rows (each row `seq` tokens, one after the other).
fn documents(rows: &[PackedRow]) -> Vec<Doc> {
    let mut docs = Vec::new();
    let mut start = 0;
    for row in rows {
        for &len in &row.doc_lens {
            docs.push(Doc { start, len });
            start += len;
        }
    }
    docs
}

/// [`loss_and_grads`] by pai's own step (CPU): see the module doc.
pub fn own_loss_and_grads(
    model: &Model,
    rows: &[Row],
    params: &LoraParams,
    norm: f32,
    dropout_seed: Option<u64>,
    grads: &mut Grads,
) -> Result<f64> {
    let cfg = model.config();
    let packed_rows: Vec<PackedRow> = rows.iter().map(|r| r.row.clone()).collect();
    // The model's packing checks the rows (equal lengths, documents within the context) and gives
    // each token's RoPE angles.
    let packed = model.pack(&packed_rows)?;
    let (cos, sin) = packed.rope_tables();
    let docs = documents(&packed_rows);
    let ids: Vec<u32> = packed_rows
        .iter()
        .flat_map(|r| r.ids.iter().copied())
        .collect();
    let n = ids.len();
    let batch = StepBatch {
        tokens: n,
        docs,
        cos: cos.flatten_all()?.to_vec1::<f32>()?,
        sin: sin.flatten_all()?.to_vec1::<f32>()?,
        heads: Heads {
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        },
    };

    // 1. The LoRA pairs as slices, with this step's dropout masks (as the adapter view draws them).
    let view = params.frozen("step", dropout_seed);
    let mut sites = Vec::with_capacity(params.sites().len());
    for (index, s) in params.sites().iter().enumerate() {
        let (r, fan_in) = s.a.as_tensor().dims2()?;
        let out = s.b.as_tensor().dim(0)?;
        let w = view.get(s.site);
        sites.push((
            s.site,
            SiteLora {
                a: s.a.as_tensor().flatten_all()?.to_vec1::<f32>()?,
                b: s.b.as_tensor().flatten_all()?.to_vec1::<f32>()?,
                r,
                fan_in,
                out,
                scale: w.map_or(params.config().scale(), |w| w.scale) as f32,
                dropout: w.and_then(|w| w.dropout),
                index,
            },
        ));
    }
    let mut layer_loras = vec![[None; 7]; cfg.num_layers];
    for (site, lora) in &sites {
        if let Some(slots) = layer_loras.get_mut(site.layer) {
            slots[site.proj as usize] = Some(lora);
        }
    }
    let mut site_grads: Vec<SiteGrad> = (0..sites.len()).map(|_| SiteGrad::default()).collect();

    // 2. The blocks forward, keeping what each backward needs.
    let started = std::time::Instant::now();
    let mut x = model
        .embed_tokens(&ids)?
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?;
    let mut kept = Vec::with_capacity(cfg.num_layers);
    for (block, loras) in model.blocks().iter().zip(&layer_loras) {
        let (next, acts) = block_grad::forward(block, loras, x, &batch)?;
        kept.push(acts);
        x = next;
    }

    let forward_s = started.elapsed().as_secs_f64();

    // 3. The head: final norm, logits, loss, and the gradient back to the last block's output. Only
    // for positions that carry loss (a masked prompt's need no logits: their gradient is zero), in
    // chunks: the logits of 1,024 positions over a 49,152-token vocabulary would be 200 MB.
    let final_norm = model.output_norm();
    let final_w = final_norm
        .weight()
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?;
    let (xf, rstd) = rms_norm(&x, &final_w, final_norm.eps());
    let output = model.output();
    let (targets, weights) = targets_and_weights(rows, norm);
    let vocab = output.out_dim();
    let hidden = cfg.hidden_size;
    let live: Vec<usize> = (0..n).filter(|&i| weights[i] != 0.0).collect();
    let mut dxf = vec![0f32; xf.len()];
    let mut value = 0.0;
    for chunk in live.chunks(HEAD_CHUNK) {
        let row = |i: usize| i * hidden..(i + 1) * hidden;
        let xs: Vec<f32> = chunk.iter().flat_map(|&i| &xf[row(i)]).copied().collect();
        let ts: Vec<u32> = chunk.iter().map(|&i| targets[i]).collect();
        let ws: Vec<f32> = chunk.iter().map(|&i| weights[i]).collect();
        let mut logits = output.forward_rows(&xs)?;
        value += cross_entropy_with_grad(&mut logits, vocab, &ts, &ws)?;
        let grad = output.backward_rows(&logits)?;
        for (g, &i) in grad.chunks(hidden).zip(chunk) {
            dxf[row(i)].copy_from_slice(g);
        }
    }
    drop(xf);
    let mut dx = vec![0f32; x.len()];
    rms_norm_backward(&x, &final_w, &rstd, &dxf, &mut dx);
    drop((x, dxf));
    let head_s = started.elapsed().as_secs_f64() - forward_s;

    // 4. The blocks backward, last first.
    for (layer, acts) in kept.into_iter().enumerate().rev() {
        let block = &model.blocks()[layer];
        let upstream = block_grad::backward(
            block,
            &layer_loras[layer],
            acts,
            dx,
            &batch,
            layer > 0,
            &mut site_grads,
        )?;
        dx = upstream.unwrap_or_default();
    }
    tracing::debug!(
        tokens = n,
        forward_s,
        head_s,
        backward_s = started.elapsed().as_secs_f64() - forward_s - head_s,
        "own training step"
    );

    // 5. Into the optimizer's list: A then B per site.
    grads.resize(2 * sites.len(), None);
    for ((_, lora), g) in sites.iter().zip(site_grads) {
        let pairs = [
            (2 * lora.index, g.a, (lora.r, lora.fan_in)),
            (2 * lora.index + 1, g.b, (lora.out, lora.r)),
        ];
        for (slot, values, shape) in pairs {
            if values.is_empty() {
                continue;
            }
            let t = Tensor::from_vec(values, shape, model.device())?;
            grads[slot] = Some(match grads[slot].take() {
                Some(prev) => (prev + t)?,
                None => t,
            });
        }
    }
    Ok(value)
}

/// [`loss_and_grads`] by candle's autograd with activation checkpointing (see the module doc).
pub fn autograd_loss_and_grads(
    model: &Model,
    rows: &[Row],
    params: &LoraParams,
    norm: f32,
    dropout_seed: Option<u64>,
    grads: &mut Grads,
) -> Result<f64> {
    let vars: Vec<Var> = params.named_vars().map(|(_, v)| v.clone()).collect();
    let packed_rows: Vec<_> = rows.iter().map(|r| r.row.clone()).collect();
    let packed = model.pack(&packed_rows)?;
    let frozen = params.frozen("step", dropout_seed);
    let trainable = params.trainable("step", dropout_seed);
    let (frozen_list, trainable_list) = ([&frozen], [&trainable]);
    let (frozen_stack, trainable_stack) = (
        AdapterStack::new(&frozen_list),
        AdapterStack::new(&trainable_list),
    );
    let layers = model.config().num_layers;

    // 1. Forward without a graph, keeping each block's input.
    let mut inputs = Vec::with_capacity(layers);
    let mut x = model.embed_packed(&packed)?;
    for layer in 0..layers {
        let next = model.block_packed(layer, &x, &packed, &frozen_stack)?;
        inputs.push(x);
        x = next;
    }

    // 2. The head (final norm, output projection, loss) with a graph from the last hidden state.
    let last = Var::from_tensor(&x)?;
    let loss = head_loss(model, &model.final_norm(last.as_tensor())?, rows, norm)?;
    let value = f64::from(loss.to_scalar::<f32>()?);
    let store = loss.backward()?;
    let mut upstream = match store.get(last.as_tensor()) {
        Some(g) => g.clone(),
        None => return Ok(value),
    };
    drop(store);

    // 3. Each block again, last first, with its graph: the gradient of Σ out·upstream.
    for layer in (0..layers).rev() {
        let input = Var::from_tensor(&inputs[layer])?;
        let out = model.block_packed(layer, input.as_tensor(), &packed, &trainable_stack)?;
        let store = (out * &upstream)?.sum_all()?.backward()?;
        if layer > 0 {
            upstream = match store.get(input.as_tensor()) {
                Some(g) => g.clone(),
                None => Tensor::zeros_like(&upstream)?,
            };
        }
        accumulate(grads, store, &vars)?;
    }
    Ok(value)
}
