//! pai-evals on a tiny random model: packed scoring equals scoring each text alone, choices and
//! generations are what the model does, and the gate on real scores.

mod cache;
mod score;

use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use pai_model::testing::{TinyModel, TinySpec};
use pai_model::BaseModel;

/// A tiny random model written as GGUF with `dtype` weights (F32: every forward path computes the
/// same numbers; a quantized one quantizes activations in the cached forward only) and loaded.
pub fn tiny(dir: &Path, dtype: GgmlDType) -> BaseModel {
    let path = TinyModel::new(TinySpec::default())
        .expect("tiny model")
        .write_gguf(&dir.join("tiny.gguf"), dtype)
        .expect("write gguf");
    BaseModel::load(&path, &Device::Cpu).expect("load tiny model")
}
