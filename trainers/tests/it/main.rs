//! pai-trainers end to end on tiny random models: the packed forward computes each document as if it
//! were alone, the gradient is right (finite differences) and reaches every LoRA parameter through the
//! quantized base, training lowers the loss, and a run stopped and resumed ends where an uninterrupted
//! one does.

mod gradients;
mod real;
mod training;

use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use pai_model::testing::{TinyModel, TinySpec};
use pai_model::BaseModel;

/// A tiny model written as GGUF with `dtype` weights and loaded.
pub fn tiny(dir: &Path, dtype: GgmlDType, spec: TinySpec) -> BaseModel {
    let tiny = TinyModel::new(spec).expect("tiny model");
    std::fs::create_dir_all(dir).expect("model dir");
    let path = tiny
        .write_gguf(&dir.join("tiny.gguf"), dtype)
        .expect("write gguf");
    BaseModel::load(&path, &Device::Cpu).expect("load tiny model")
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff")
}
