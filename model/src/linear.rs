//! The linear layers of the model: a frozen base projection (quantized or dense, never trained) and the
//! LoRA layer that wraps it, adding the low-rank deltas of whichever adapters a forward pass is given.

use std::fmt;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::error::Result;
use crate::kernels::QuantMatrix;
use crate::lora::AdapterStack;

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
        })
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

    /// x: [..., in] → [..., out].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            BaseWeight::Candle(w) => w.forward(x)?,
            BaseWeight::Own(m) => m.matmul(x)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
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
        let mut y = self.base.forward(x)?;
        for lora in adapters.weights_at(self.site) {
            y = (y + lora.delta(x)?)?;
        }
        Ok(y)
    }
}
