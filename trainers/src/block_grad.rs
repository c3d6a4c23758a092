//! One transformer block's forward and backward, written out by hand for pai's own CPU training step
//! (`step.rs`): the frozen projections run on pai-model's quantized kernels both ways (x·Wᵀ forward,
//! grad·W backward through the kept Wᵀ copy), LoRA, attention and the elementwise pieces run on plain
//! f32 slices, and no graph is built. The forward keeps what the backward needs (the block's input,
//! q, k, v, the attention output and its log-sum-exps, the residual after attention, gate and up);
//! the norms and SiLU·up are cheap and recomputed.
//!
//! candle's autograd over the same block (`Model::block_packed` with trainable adapters) is the
//! reference the tests compare this against.

use pai_model::block::Block;
use pai_model::{FrozenLinear, LoraDropout, Proj};

use crate::attention_grad::{self, Doc, Heads};
use crate::elementwise_grad::{rms_norm, rms_norm_backward, rope, silu_mul, silu_mul_backward};
use crate::error::Result;
use pai_model::kernels::gemm::{matmul, Out, View};

/// What every block of a step shares: the documents and each token's RoPE angles.
#[derive(Debug)]
pub(crate) struct StepBatch {
    pub tokens: usize,
    pub docs: Vec<Doc>,
    /// cos and sin of each token's position in its document, [tokens, head_dim / 2].
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub heads: Heads,
}

/// One LoRA site's trainable pair as plain slices, and where its gradients go.
#[derive(Debug)]
pub(crate) struct SiteLora {
    /// A [r, in], B [out, r].
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub r: usize,
    pub fan_in: usize,
    pub out: usize,
    pub scale: f32,
    pub dropout: Option<LoraDropout>,
    /// Index of this site in the step's gradient list.
    pub index: usize,
}

/// Gradients of A and B of one site.
#[derive(Debug, Default)]
pub(crate) struct SiteGrad {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

impl SiteLora {
    /// This step's dropout mask for an input of `len` values (`None`: no dropout).
    fn mask(&self, len: usize) -> Option<Vec<f32>> {
        self.dropout
            .filter(|d| d.p > 0.0)
            .map(|d| d.mask_values(len))
    }

    /// y += scale · (dropout(x)·Aᵀ)·Bᵀ for x [n, in]; returns u = dropout(x)·Aᵀ [n, r] (kept for the
    /// backward).
    fn forward(&self, x: &[f32], n: usize, y: &mut [f32]) -> Vec<f32> {
        let mask = self.mask(x.len());
        let xd = dropped(x, mask.as_deref());
        let mut u = vec![0f32; n * self.r];
        let a = View::rows(&self.a, self.r, self.fan_in, self.fan_in);
        let b = View::rows(&self.b, self.out, self.r, self.r);
        let xv = View::rows(&xd, n, self.fan_in, self.fan_in);
        matmul(&mut u, self.r, xv, a.t(), Out::Set(1.0), true);
        let uv = View::rows(&u, n, self.r, self.r);
        matmul(y, self.out, uv, b.t(), Out::Add(self.scale), true);
        u
    }

    /// From gy [n, out]: ∂B = scale·gyᵀ·u, ∂A = (scale·gy·B)ᵀ·dropout(x), added into `grad`; and
    /// gx += dropout′((scale·gy·B)·A) when the input's gradient is wanted.
    fn backward(
        &self,
        x: &[f32],
        u: &[f32],
        gy: &[f32],
        n: usize,
        gx: Option<&mut [f32]>,
        grad: &mut SiteGrad,
    ) {
        let (r, fan_in, out) = (self.r, self.fan_in, self.out);
        let a = View::rows(&self.a, r, fan_in, fan_in);
        let b = View::rows(&self.b, out, r, r);
        let gyv = View::rows(gy, n, out, out);
        let uv = View::rows(u, n, r, r);
        grad.b.resize(out * r, 0.0);
        matmul(&mut grad.b, r, gyv.t(), uv, Out::Add(self.scale), true);
        let mut gu = vec![0f32; n * r];
        matmul(&mut gu, r, gyv, b, Out::Set(self.scale), true);
        let guv = View::rows(&gu, n, r, r);
        let mask = self.mask(x.len());
        let xd = dropped(x, mask.as_deref());
        grad.a.resize(r * fan_in, 0.0);
        let xv = View::rows(&xd, n, fan_in, fan_in);
        matmul(&mut grad.a, fan_in, guv.t(), xv, Out::Add(1.0), true);
        if let Some(gx) = gx {
            match &mask {
                Some(mask) => {
                    let mut through = vec![0f32; n * fan_in];
                    matmul(&mut through, fan_in, guv, a, Out::Set(1.0), true);
                    for ((g, t), m) in gx.iter_mut().zip(&through).zip(mask) {
                        *g += t * m;
                    }
                }
                None => matmul(gx, fan_in, guv, a, Out::Add(1.0), true),
            }
        }
    }
}

/// The input as the LoRA branch sees it: with the dropout mask applied, if any.
fn dropped<'x>(x: &'x [f32], mask: Option<&[f32]>) -> std::borrow::Cow<'x, [f32]> {
    match mask {
        Some(mask) => std::borrow::Cow::Owned(x.iter().zip(mask).map(|(x, m)| x * m).collect()),
        None => std::borrow::Cow::Borrowed(x),
    }
}

/// The LoRA sites of one layer, by projection (`Proj as usize`).
pub(crate) type LayerLoras<'a> = [Option<&'a SiteLora>; 7];

/// A projection with its LoRA site: base(x) + lora(x), and the LoRA's u.
fn project(
    lin: &FrozenLinear,
    lora: Option<&SiteLora>,
    x: &[f32],
    n: usize,
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let mut y = lin.forward_rows(x)?;
    let u = lora.map(|l| l.forward(x, n, &mut y));
    Ok((y, u))
}

/// The backward of [`project`]: LoRA gradients into `grads`; with `gx`, the input gradient added.
fn project_backward(
    lin: &FrozenLinear,
    lora: Option<&SiteLora>,
    u: Option<&[f32]>,
    x: &[f32],
    gy: &[f32],
    mut gx: Option<&mut [f32]>,
    grads: &mut [SiteGrad],
) -> Result<()> {
    let n = gy.len() / lin.out_dim().max(1);
    if let (Some(l), Some(u)) = (lora, u) {
        l.backward(x, u, gy, n, gx.as_deref_mut(), &mut grads[l.index]);
    }
    if let Some(gx) = gx {
        let base = lin.backward_rows(gy)?;
        for (g, b) in gx.iter_mut().zip(&base) {
            *g += b;
        }
    }
    Ok(())
}

fn norm_weight(norm: &pai_model::block::RmsNorm) -> Result<Vec<f32>> {
    Ok(norm
        .weight()
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?)
}

/// What the block's forward keeps for its backward.
#[derive(Debug)]
pub(crate) struct BlockActs {
    x: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    lse: Vec<f32>,
    x2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// Each LoRA site's u = x·Aᵀ, by projection.
    u: [Option<Vec<f32>>; 7],
}

/// The block over x [tokens, hidden]: its output, and what its backward needs.
pub(crate) fn forward(
    block: &Block,
    loras: &LayerLoras,
    x: Vec<f32>,
    batch: &StepBatch,
) -> Result<(Vec<f32>, BlockActs)> {
    let n = batch.tokens;
    let hd = batch.heads.head_dim;
    let mut u: [Option<Vec<f32>>; 7] = Default::default();
    let (attn, mlp) = (&block.attn, &block.mlp);
    let mut run = |lin: &pai_model::LoraLinear, p: Proj, input: &[f32]| -> Result<Vec<f32>> {
        let (y, lu) = project(lin.base(), loras[p as usize], input, n)?;
        u[p as usize] = lu;
        Ok(y)
    };

    // 1. Attention: norm, q/k/v, RoPE, attention inside each document, o, residual.
    let (xn, _) = rms_norm(&x, &norm_weight(&block.attn_norm)?, block.attn_norm.eps());
    let mut q = run(&attn.q, Proj::Q, &xn)?;
    let mut k = run(&attn.k, Proj::K, &xn)?;
    let v = run(&attn.v, Proj::V, &xn)?;
    drop(xn);
    rope(&mut q, hd, &batch.cos, &batch.sin, false);
    rope(&mut k, hd, &batch.cos, &batch.sin, false);
    let (ao, lse) = attention_grad::forward(&q, &k, &v, &batch.docs, batch.heads);
    let mut x2 = run(&attn.o, Proj::O, &ao)?;
    for (y, x) in x2.iter_mut().zip(&x) {
        *y += x;
    }

    // 2. MLP: norm, gate and up, SiLU(gate)·up, down, residual.
    let (xn, _) = rms_norm(&x2, &norm_weight(&block.mlp_norm)?, block.mlp_norm.eps());
    let gate = run(&mlp.gate, Proj::Gate, &xn)?;
    let up = run(&mlp.up, Proj::Up, &xn)?;
    drop(xn);
    let h = silu_mul(&gate, &up);
    let mut out = run(&mlp.down, Proj::Down, &h)?;
    for (y, x) in out.iter_mut().zip(&x2) {
        *y += x;
    }
    let acts = BlockActs {
        x,
        q,
        k,
        v,
        attn: ao,
        lse,
        x2,
        gate,
        up,
        u,
    };
    Ok((out, acts))
}

/// The block's backward from dy (the gradient of its output): LoRA gradients added into `grads`, and
/// the gradient of its input returned when `input_grad` (the first block's is not needed).
pub(crate) fn backward(
    block: &Block,
    loras: &LayerLoras,
    acts: BlockActs,
    dy: Vec<f32>,
    batch: &StepBatch,
    input_grad: bool,
    grads: &mut [SiteGrad],
) -> Result<Option<Vec<f32>>> {
    let hd = batch.heads.head_dim;
    let BlockActs {
        x,
        q,
        k,
        v,
        attn: ao,
        lse,
        x2,
        mut gate,
        mut up,
        u,
    } = acts;
    let (attn, mlp) = (&block.attn, &block.mlp);
    let lora = |p: Proj| loras[p as usize];
    let u_of = |p: Proj| u[p as usize].as_deref();

    // 1. MLP, from the output back to the residual after attention.
    let h = silu_mul(&gate, &up);
    let mut dh = vec![0f32; h.len()];
    let down = &mlp.down;
    project_backward(
        down.base(),
        lora(Proj::Down),
        u_of(Proj::Down),
        &h,
        &dy,
        Some(&mut dh),
        grads,
    )?;
    drop(h);
    let mlp_w = norm_weight(&block.mlp_norm)?;
    let (xn, rstd) = rms_norm(&x2, &mlp_w, block.mlp_norm.eps());
    silu_mul_backward(&mut gate, &mut up, &dh);
    drop(dh);
    let mut dxn = vec![0f32; xn.len()];
    for (lin, p, g) in [(&mlp.gate, Proj::Gate, &gate), (&mlp.up, Proj::Up, &up)] {
        project_backward(lin.base(), lora(p), u_of(p), &xn, g, Some(&mut dxn), grads)?;
    }
    drop((gate, up, xn));
    let mut dx2 = dy;
    rms_norm_backward(&x2, &mlp_w, &rstd, &dxn, &mut dx2);
    drop((x2, dxn));

    // 2. Attention, back to the block's input.
    let mut dao = vec![0f32; ao.len()];
    let o = &attn.o;
    project_backward(
        o.base(),
        lora(Proj::O),
        u_of(Proj::O),
        &ao,
        &dx2,
        Some(&mut dao),
        grads,
    )?;
    let (mut dq, mut dk, dv) =
        attention_grad::backward(&q, &k, &v, &ao, &lse, &dao, &batch.docs, batch.heads);
    drop((q, k, v, ao, lse, dao));
    rope(&mut dq, hd, &batch.cos, &batch.sin, true);
    rope(&mut dk, hd, &batch.cos, &batch.sin, true);
    let attn_w = norm_weight(&block.attn_norm)?;
    let (xn, rstd) = rms_norm(&x, &attn_w, block.attn_norm.eps());
    let mut dxn = input_grad.then(|| vec![0f32; xn.len()]);
    for (lin, p, g) in [
        (&attn.q, Proj::Q, &dq),
        (&attn.k, Proj::K, &dk),
        (&attn.v, Proj::V, &dv),
    ] {
        project_backward(
            lin.base(),
            lora(p),
            u_of(p),
            &xn,
            g,
            dxn.as_deref_mut(),
            grads,
        )?;
    }
    Ok(dxn.map(|dxn| {
        let mut dx = dx2;
        rms_norm_backward(&x, &attn_w, &rstd, &dxn, &mut dx);
        dx
    }))
}
