//! One micro-batch's loss and LoRA gradients, with activation checkpointing: the blocks run forward
//! once without a graph (pai's fast kernels), keeping only each block's input; the backward pass then
//! rebuilds one block's graph at a time from its input and pushes the gradient through it. Memory
//! holds one block's graph instead of all of them (candle keeps every intermediate and every
//! gradient of a graph until its backward ends: 8 GB for 4 × 256 tokens of a 135M model), for the
//! price of a second forward of the blocks.

use candle_core::{Tensor, Var};

use pai_model::{AdapterStack, Model};

use crate::data::Row;
use crate::error::Result;
use crate::loss::weighted_cross_entropy;
use crate::optim::{accumulate, Grads};
use crate::params::LoraParams;

/// Σ weighted token losses of `rows` (weights times `norm`) from their final hidden states [rows, seq,
/// hidden]: the output projection and the fused loss.
pub(crate) fn head_loss(model: &Model, hidden: &Tensor, rows: &[Row], norm: f32) -> Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    let logits = model.logits(&hidden.reshape((b * t, h))?)?;
    let targets: Vec<u32> = rows
        .iter()
        .flat_map(|r| r.targets.iter().copied())
        .collect();
    let weights: Vec<f32> = rows
        .iter()
        .flat_map(|r| r.weights.iter().map(|w| w * norm))
        .collect();
    weighted_cross_entropy(&logits, &targets, &weights)
}

/// Σ weighted token losses of `rows` (weights times `norm`), and its gradients towards `params`'
/// variables added into `grads` (in `params.named_vars()` order). `dropout_seed` draws the LoRA
/// dropout masks (both passes over a block draw the same ones); `None` applies no dropout.
pub fn loss_and_grads(
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
