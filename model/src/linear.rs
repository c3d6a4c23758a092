//! The linear layers of the model: a frozen base projection (quantized or dense, never trained) and the
//! LoRA layer that wraps it, adding the low-rank deltas of whichever adapters a forward pass is given.
//!
//! Training flows through the frozen projection without ever differentiating its weight: when the input
//! carries a gradient, the fast (quantized) product is wrapped in [`FrozenGrad`], whose backward returns
//! only `grad·W`, from W dequantized on the fly or from a kept copy (Wᵀ in Q8_0 for the blocks, so
//! their backward products run on the same int8 kernels as the forward; W in f32 for the output
//! projection; see [`FrozenLinear::keep_backward_copy`]).

use std::fmt;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Module, Shape, Storage, Tensor};

use crate::batch::RowGroups;
use crate::error::{ModelError, Result};
use crate::kernels::bf16::{self, Bf16Tiles};
use crate::kernels::{gemm, lora, QuantMatrix};
use crate::lora::{AdapterStack, LoraWeights};

/// The seven projections of a llama block; the places a LoRA adapter can attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// The module name PEFT and Hugging Face use (`q_proj`, …, `down_proj`).
    pub fn peft_name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    pub fn from_peft_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.peft_name() == name)
    }

    /// The parent module in Hugging Face naming (`self_attn` or `mlp`).
    pub fn hf_parent(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            Proj::Gate | Proj::Up | Proj::Down => "mlp",
        }
    }

    /// The tensor name stem in GGUF naming (`attn_q`, …, `ffn_down`).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Proj::Q => "attn_q",
            Proj::K => "attn_k",
            Proj::V => "attn_v",
            Proj::O => "attn_output",
            Proj::Gate => "ffn_gate",
            Proj::Up => "ffn_up",
            Proj::Down => "ffn_down",
        }
    }
}

impl fmt::Display for Proj {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.peft_name())
    }
}

/// Where a LoRA delta attaches: a projection of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LoraSite {
    pub layer: usize,
    pub proj: Proj,
}

/// How a base weight is stored and multiplied.
#[derive(Debug, Clone)]
enum BaseWeight {
    /// candle's matmul: dense weights, GPU devices, and formats pai has no kernel for.
    Candle(QMatMul),
    /// pai's own CPU kernels (`kernels/`).
    Own(Arc<QuantMatrix>),
}

/// A base projection `y = x·Wᵀ (+ b)`. The weight stays as loaded (quantized blocks from GGUF, or a dense
/// tensor) and is never updated.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weight: BaseWeight,
    bias: Option<Tensor>,
    in_dim: usize,
    out_dim: usize,
    /// The copy of a quantized weight that backward passes multiply by, when the trainer's memory
    /// budget keeps one (shared by clones).
    backward: Arc<Mutex<KeptCopy>>,
}

/// Which copy of a quantized weight a backward pass multiplies by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackwardCopyKind {
    /// Wᵀ in Q8_0 on pai's int8 kernels (CPU; 1.06 bytes a weight): for the blocks' projections,
    /// whose LoRA gradients it gives to within the forward's own int8 rounding.
    Int8,
    /// W in f32 (4 bytes a weight): for the output projection, whose gradient (softmax − one-hot over
    /// the vocabulary) int8 cannot carry — through an int8 head the default model's LoRA gradients
    /// turned up to 45–115° from the exact ones.
    Dense,
    /// W and Wᵀ in bf16 tiles (4 bytes a weight; CPUs with AMX or AVX-512 BF16, shapes in multiples
    /// of 32, `kernels::bf16`):
    /// a training step's forward (`forward_rows`) and backward products both run on them, several
    /// times faster than the int8 kernels. bf16 keeps 8 bits of mantissa with an exponent per value,
    /// so it carries the output projection's gradient too.
    Bf16Tiles,
}

#[derive(Debug, Default)]
struct KeptCopy {
    kind: Option<BackwardCopyKind>,
    copy: Option<BackwardCopy>,
}

#[derive(Debug, Clone)]
enum BackwardCopy {
    /// grad·W = grad·(Wᵀ)ᵀ: an ordinary quantized product with Wᵀ as the matrix.
    Transposed(Arc<QuantMatrix>),
    Dense(Tensor),
    /// W for x·Wᵀ and Wᵀ for grad·W, as bf16 tiles.
    Tiles {
        forward: Arc<Bf16Tiles>,
        backward: Arc<Bf16Tiles>,
    },
}

impl FrozenLinear {
    /// A quantized weight of shape [out, in]; F32/F16 GGUF tensors are dequantized by candle.
    pub fn from_qtensor(weight: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        let (out_dim, in_dim) = weight.shape().dims2()?;
        let own = match weight.device() {
            Device::Cpu => QuantMatrix::from_qtensor(&weight)?,
            _ => None,
        };
        let weight = match own {
            Some(m) => BaseWeight::Own(Arc::new(m)),
            None => BaseWeight::Candle(QMatMul::from_arc(weight)?),
        };
        Ok(Self {
            weight,
            bias,
            in_dim,
            out_dim,
            backward: Arc::default(),
        })
    }

    /// A dense weight of shape [out, in].
    pub fn from_dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        Ok(Self {
            weight: BaseWeight::Candle(QMatMul::Tensor(weight)),
            bias,
            in_dim,
            out_dim,
            backward: Arc::default(),
        })
    }

    /// Keep a copy of a quantized weight for backward passes (`None`: keep none and free it), made on
    /// the first one. Without it each backward dequantizes W again: slower, but nothing resident.
    /// Returns the bytes the copy takes (0 for dense weights, which need none). `Int8` falls back to
    /// `Dense` where pai's kernels cannot hold Wᵀ (GPU devices, an output dimension not a multiple of
    /// 32).
    pub fn keep_backward_copy(&self, kind: Option<BackwardCopyKind>) -> usize {
        if !self.is_quantized() {
            return 0;
        }
        let kind = kind.map(|k| match k {
            BackwardCopyKind::Int8 if !self.int8_transposable() => BackwardCopyKind::Dense,
            BackwardCopyKind::Bf16Tiles if !self.tileable() => BackwardCopyKind::Dense,
            k => k,
        });
        if let Ok(mut kept) = self.backward.lock() {
            if kept.kind != kind {
                *kept = KeptCopy { kind, copy: None };
            }
        }
        let n = self.in_dim * self.out_dim;
        match kind {
            None => 0,
            Some(BackwardCopyKind::Int8) => n * 34 / 32,
            Some(BackwardCopyKind::Dense) => n * std::mem::size_of::<f32>(),
            Some(BackwardCopyKind::Bf16Tiles) => n * 4,
        }
    }

    /// Make the kept copy now (a trainer prepares them all at once, in parallel, instead of on the
    /// first step).
    pub fn prepare_backward_copy(&self) -> Result<()> {
        self.backward_copy().map(|_| ())
    }

    fn tileable(&self) -> bool {
        bf16::engine().is_some()
            && Bf16Tiles::fits(self.out_dim, self.in_dim)
            && Bf16Tiles::fits(self.in_dim, self.out_dim)
    }

    fn int8_transposable(&self) -> bool {
        matches!(self.weight, BaseWeight::Own(_)) && self.out_dim.is_multiple_of(32)
    }

    /// grad·W for grad [.., out] → [.., in] (the input's gradient of a frozen product): through the
    /// kept copy, or W dequantized now.
    pub fn backward_product(&self, grad: &Tensor) -> Result<Tensor> {
        match self.backward_copy()? {
            Some(BackwardCopy::Transposed(m)) => m.matmul(&grad.contiguous()?),
            Some(BackwardCopy::Dense(w)) => Ok(grad.broadcast_matmul(&w.to_dtype(grad.dtype())?)?),
            Some(BackwardCopy::Tiles { backward, .. }) => {
                let mut dims = grad.dims().to_vec();
                let g = grad.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                if let Some(last) = dims.last_mut() {
                    *last = self.in_dim;
                }
                Ok(Tensor::from_vec(backward.matmul(&g), dims, &Device::Cpu)?)
            }
            None => {
                let w = self.dense_weight()?;
                Ok(grad.broadcast_matmul(&w.to_dtype(grad.dtype())?)?)
            }
        }
    }

    /// The kept copy for backward products, made now if the policy keeps one and it is not made yet.
    fn backward_copy(&self) -> Result<Option<BackwardCopy>> {
        Ok(match self.backward.lock() {
            Ok(mut kept) if self.is_quantized() => match (kept.kind, kept.copy.clone()) {
                (Some(_), Some(copy)) => Some(copy),
                (Some(kind), None) => {
                    let copy = self.make_backward_copy(kind)?;
                    kept.copy = Some(copy.clone());
                    Some(copy)
                }
                (None, _) => None,
            },
            _ => None,
        })
    }

    /// x·Wᵀ (+ b) for row-major x [n, in] given as a slice: [n, out]. On pai's kernels with no
    /// tensor round trip (a training step's frozen products); CPU only.
    pub fn forward_rows(&self, x: &[f32]) -> Result<Vec<f32>> {
        let n = x.len() / self.in_dim.max(1);
        let tiles = match self.backward_copy()? {
            Some(BackwardCopy::Tiles { forward, .. }) => Some(forward),
            _ => None,
        };
        let mut y = match (&self.weight, tiles) {
            (_, Some(tiles)) => tiles.matmul(x),
            (BaseWeight::Own(m), None) => m.matmul_rows(x),
            (BaseWeight::Candle(w), None) => w
                .forward(&Tensor::from_slice(x, (n, self.in_dim), &Device::Cpu)?)?
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?,
        };
        if let Some(bias) = &self.bias {
            let bias = bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            for row in y.chunks_mut(self.out_dim) {
                for (v, b) in row.iter_mut().zip(&bias) {
                    *v += b;
                }
            }
        }
        Ok(y)
    }

    /// gy·W for row-major gy [n, out] given as a slice: [n, in] (the input's gradient of a frozen
    /// product), through the kept copy or W dequantized now; CPU only.
    pub fn backward_rows(&self, gy: &[f32]) -> Result<Vec<f32>> {
        let n = gy.len() / self.out_dim.max(1);
        let dense = match self.backward_copy()? {
            Some(BackwardCopy::Transposed(m)) => return Ok(m.matmul_rows(gy)),
            Some(BackwardCopy::Tiles { backward, .. }) => return Ok(backward.matmul(gy)),
            Some(BackwardCopy::Dense(w)) => w,
            None => self.dense_weight()?,
        };
        let w = dense.to_dtype(DType::F32)?.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
            return Err(ModelError::InvalidRequest {
                field: "backward_rows",
                reason: "the weight is not an f32 tensor on the CPU".into(),
            });
        };
        let w = &data[layout.start_offset()..layout.start_offset() + self.out_dim * self.in_dim];
        let mut gx = vec![0f32; n * self.in_dim];
        gemm::matmul(
            &mut gx,
            self.in_dim,
            gemm::View::rows(gy, n, self.out_dim, self.out_dim),
            gemm::View::rows(w, self.out_dim, self.in_dim, self.in_dim),
            gemm::Out::Set(1.0),
            true,
        );
        Ok(gx)
    }

    fn make_backward_copy(&self, kind: BackwardCopyKind) -> Result<BackwardCopy> {
        let dense = self.dense_weight()?;
        if kind == BackwardCopyKind::Bf16Tiles && self.tileable() {
            let (out, inp) = (self.out_dim, self.in_dim);
            let w = dense
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let wt = dense
                .to_dtype(DType::F32)?
                .t()?
                .contiguous()?
                .flatten_all()?
                .to_vec1::<f32>()?;
            if let (Some(forward), Some(backward)) = (
                Bf16Tiles::pack(&w, out, inp),
                Bf16Tiles::pack(&wt, inp, out),
            ) {
                return Ok(BackwardCopy::Tiles {
                    forward: Arc::new(forward),
                    backward: Arc::new(backward),
                });
            }
        }
        if kind == BackwardCopyKind::Int8 && self.int8_transposable() {
            let transposed = dense.t()?.contiguous()?;
            let q = QTensor::quantize(&transposed, candle_core::quantized::GgmlDType::Q8_0)?;
            if let Some(m) = QuantMatrix::from_qtensor(&q)? {
                return Ok(BackwardCopy::Transposed(Arc::new(m)));
            }
        }
        Ok(BackwardCopy::Dense(dense))
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Whether the weight is stored quantized (blocks of a GGUF format), not dense.
    pub fn is_quantized(&self) -> bool {
        match &self.weight {
            BaseWeight::Own(_) => true,
            BaseWeight::Candle(QMatMul::QTensor(q)) => !matches!(
                q.dtype(),
                candle_core::quantized::GgmlDType::F32 | candle_core::quantized::GgmlDType::F16
            ),
            BaseWeight::Candle(_) => false,
        }
    }

    /// The quantized matrix, when pai's own kernels hold the weight.
    pub fn quant_matrix(&self) -> Option<&Arc<QuantMatrix>> {
        match &self.weight {
            BaseWeight::Own(m) => Some(m),
            BaseWeight::Candle(_) => None,
        }
    }

    /// The weight as a dense f32 tensor [out, in] (dequantized when stored quantized).
    pub fn dense_weight(&self) -> Result<Tensor> {
        Ok(match &self.weight {
            BaseWeight::Candle(QMatMul::QTensor(q)) => q.dequantize(&q.device())?,
            BaseWeight::Candle(QMatMul::Tensor(t)) => t.clone(),
            BaseWeight::Candle(QMatMul::TensorF16(t)) => t.to_dtype(candle_core::DType::F32)?,
            BaseWeight::Own(m) => m.dequantize()?,
        })
    }

    /// x: [..., in] → [..., out]. When x carries a gradient, so does the result (towards x only).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            BaseWeight::Candle(w) => w.forward(&x.detach())?,
            BaseWeight::Own(m) => m.matmul(x)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        if !x.track_op() {
            return Ok(y);
        }
        let y = if y.is_contiguous() && y.layout().start_offset() == 0 {
            y
        } else {
            y.copy()?
        };
        Ok(x.apply_op2(&y, FrozenGrad(self.clone()))?)
    }
}

/// Joins a frozen product `y = x·Wᵀ + b`, computed by the fast kernels, back into the graph: the
/// forward returns y unchanged, the backward gives x the gradient `grad·W` and nothing else (no weight
/// gradient is ever formed).
struct FrozenGrad(FrozenLinear);

impl CustomOp2 for FrozenGrad {
    fn name(&self) -> &'static str {
        "pai-frozen-linear"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _xl: &Layout,
        y: &CpuStorage,
        yl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((y.try_clone(yl)?, yl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _x: &candle_core::CudaStorage,
        _xl: &Layout,
        y: &candle_core::CudaStorage,
        yl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((y.try_clone(yl)?, yl.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        _x: &candle_core::MetalStorage,
        _xl: &Layout,
        y: &candle_core::MetalStorage,
        yl: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        Ok((y.try_clone(yl)?, yl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_x = self
            .0
            .backward_product(grad)
            .map_err(candle_core::Error::wrap)?;
        Ok((Some(grad_x), None))
    }
}

/// A base projection with LoRA deltas riding on it: `y = base(x) + Σ scaleᵢ · (x·Aᵢᵀ)·Bᵢᵀ` over the
/// adapters of the stack that have weights for this site.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    base: FrozenLinear,
    site: LoraSite,
}

impl LoraLinear {
    pub fn new(base: FrozenLinear, site: LoraSite) -> Self {
        Self { base, site }
    }

    pub fn base(&self) -> &FrozenLinear {
        &self.base
    }

    pub fn site(&self) -> LoraSite {
        self.site
    }

    pub fn forward(&self, x: &Tensor, adapters: &AdapterStack) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        let weights: Vec<&LoraWeights> = adapters.weights_at(self.site).collect();
        if weights.is_empty() {
            return Ok(y);
        }
        if let Some(y) = lora::add_deltas(x, &y, &[(weights.clone(), None)])? {
            return Ok(y);
        }
        let mut y = y;
        for lora in weights {
            y = (y + lora.delta(x)?)?;
        }
        Ok(y)
    }

    /// The projection of a batched decode step's rows (x: [rows, 1, in]): the base product once over
    /// all rows, then each group's LoRA deltas over that group's rows only.
    pub fn forward_grouped(&self, x: &Tensor, groups: &RowGroups) -> Result<Tensor> {
        if let Some(adapters) = groups.single() {
            return self.forward(x, adapters);
        }
        let y = self.base.forward(x)?;
        let per_group: Vec<lora::RowsOf> = groups
            .iter()
            .map(|g| {
                (
                    g.adapters.weights_at(self.site).collect::<Vec<_>>(),
                    Some(g.rows.as_slice()),
                )
            })
            .filter(|(w, _)| !w.is_empty())
            .collect();
        if per_group.is_empty() {
            return Ok(y);
        }
        if let Some(y) = lora::add_deltas(x, &y, &per_group)? {
            return Ok(y);
        }
        let mut y = y;
        for g in groups.iter() {
            let mut delta: Option<Tensor> = None;
            let mut picked: Option<Tensor> = None;
            for lora in g.adapters.weights_at(self.site) {
                let xs = match &picked {
                    Some(xs) => xs.clone(),
                    None => picked.insert(x.index_select(&g.index, 0)?).clone(),
                };
                let d = lora.delta(&xs)?;
                delta = Some(match delta {
                    Some(sum) => (sum + d)?,
                    None => d,
                });
            }
            if let Some(d) = delta {
                y = y.index_add(&g.index, &d.to_dtype(y.dtype())?, 0)?;
            }
        }
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;
    use candle_core::Var;

    /// The backward product through the kept Q8_0 copy of Wᵀ matches the one through W dequantized.
    #[test]
    fn kept_backward_copy_gives_the_dense_gradient() -> Result<()> {
        let dev = Device::Cpu;
        for (out, inp) in [(192, 576), (576, 576), (1536, 576), (576, 1536)] {
            let w = Tensor::randn(0f32, 0.1, (out, inp), &dev)?;
            let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q4_1)?);
            let lin = FrozenLinear::from_qtensor(q, None)?;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, inp), &dev)?)?;
            // A heavy-tailed upstream gradient, as a loss gives.
            let g = (Tensor::randn(0f32, 1.0, (2, 5, out), &dev)?.powf(3.0))?;
            let grad_of = |keep: bool| -> Result<Tensor> {
                lin.keep_backward_copy(keep.then_some(BackwardCopyKind::Int8));
                let y = lin.forward(x.as_tensor())?;
                let store = (y * &g)?.sum_all()?.backward()?;
                Ok(store.get(x.as_tensor()).expect("gradient").clone())
            };
            let dense = grad_of(false)?;
            let kept = grad_of(true)?;
            let cos = ((&dense * &kept)?.sum_all()?.to_scalar::<f32>()?)
                / (dense.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt()
                    * kept.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt());
            assert!(cos > 0.9999, "{out}x{inp}: cosine {cos}");
        }
        Ok(())
    }
}
