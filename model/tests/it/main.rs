//! pai-model's integration tests: one binary, one module a concern. `tiny` uses random models the tests
//! write themselves; `reference` checks the real default model against llama.cpp's fixtures.

mod adapters;
mod batch;
mod reference;
mod tiny;

use std::path::Path;

use candle_core::{Device, Tensor};
use pai_model::{AdapterStack, BaseModel};

/// Logits of every position of `ids`, run in one pass.
pub fn all_logits(base: &BaseModel, ids: &[u32], adapters: &AdapterStack) -> Vec<Vec<f32>> {
    let mut cache = base.model.new_cache(ids.len());
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    base.model
        .forward(&input, &mut cache, adapters)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

/// A tiny random model written as GGUF with weights of `dtype`, loaded; the directory lives as long as
/// the returned guard.
pub fn tiny_gguf(
    spec: pai_model::testing::TinySpec,
    dtype: candle_core::quantized::GgmlDType,
) -> (tempfile::TempDir, BaseModel) {
    let dir = tempfile::tempdir().unwrap();
    let tiny = pai_model::testing::TinyModel::new(spec).unwrap();
    let base = load(&tiny.write_gguf(&dir.path().join("m.gguf"), dtype).unwrap());
    (dir, base)
}

pub fn load(path: &Path) -> BaseModel {
    BaseModel::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}
