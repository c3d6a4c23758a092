//! A batched decode step gives every row the logits it would get decoding alone, whatever mix of
//! adapters, positions and cache lengths the rows bring.

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use pai_model::lora::proj_dims;
use pai_model::testing::TinySpec;
use pai_model::{
    Adapter, AdapterStack, BaseModel, BatchRow, LoraConfig, LoraSite, LoraWeights, Proj,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::tiny_gguf;

/// An adapter on every projection of every layer with random A and B.
fn random_adapter(base: &BaseModel, name: &str, seed: u64) -> Adapter {
    let cfg = base.model.config();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut random = |rows: usize, cols: usize, scale: f32| {
        let data: Vec<f32> = (0..rows * cols)
            .map(|_| scale * (rng.random::<f32>() * 2.0 - 1.0))
            .collect();
        Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap()
    };
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        use_rslora: false,
        dropout: 0.0,
        target_modules: Proj::ALL.to_vec(),
        layers: None,
        base_model_name_or_path: None,
    };
    let mut weights = Vec::new();
    for layer in 0..cfg.num_layers {
        for proj in Proj::ALL {
            let (i, o) = proj_dims(cfg, proj);
            let w = LoraWeights {
                a: random(4, i, 0.3),
                b: random(o, 4, 0.3),
                scale: config.scale(),
                dropout: None,
            };
            weights.push((LoraSite { layer, proj }, w));
        }
    }
    Adapter::new(name, config, cfg.num_layers, weights)
}

fn rows_of(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn a_batched_step_gives_each_row_its_own_logits() {
    for dtype in [GgmlDType::F32, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let (_dir, base) = tiny_gguf(TinySpec::default(), dtype);
        let model = &base.model;
        let (a, b) = (random_adapter(&base, "a", 1), random_adapter(&base, "b", 2));
        let (with_a, with_b) = ([&a], [&b]);
        let stacks = [
            AdapterStack::new(&with_a),
            AdapterStack::new(&with_b),
            AdapterStack::NONE,
            AdapterStack::new(&with_a),
            AdapterStack::new(&with_b),
        ];
        let prompts: Vec<Vec<u32>> = [5usize, 9, 13, 2, 7]
            .iter()
            .enumerate()
            .map(|(r, &n)| {
                (0..n)
                    .map(|i| (7 + r * 31 + i * 13) as u32 % 250 + 3)
                    .collect()
            })
            .collect();
        let steps = 4;

        // Each sequence alone: its logits at every step, fed its own greedy choices.
        let mut alone: Vec<Vec<Vec<f32>>> = Vec::new();
        let mut fed: Vec<Vec<u32>> = Vec::new();
        for (prompt, stack) in prompts.iter().zip(&stacks) {
            let mut cache = model.new_cache(64);
            let ids = Tensor::new(prompt.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let mut logits =
                rows_of(&model.forward_last(&ids, &mut cache, stack).unwrap())[0].clone();
            let (mut seen, mut tokens) = (Vec::new(), Vec::new());
            for _ in 0..steps {
                let token = argmax(&logits);
                tokens.push(token);
                let ids = Tensor::new(&[token], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                logits = rows_of(&model.forward_last(&ids, &mut cache, stack).unwrap())[0].clone();
                seen.push(logits.clone());
            }
            alone.push(seen);
            fed.push(tokens);
        }

        // All four in one batched step at a time, from caches of different lengths.
        let mut caches: Vec<_> = prompts
            .iter()
            .zip(&stacks)
            .map(|(prompt, stack)| {
                let mut cache = model.new_cache(64);
                let ids = Tensor::new(prompt.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                model.forward_last(&ids, &mut cache, stack).unwrap();
                cache
            })
            .collect();
        for step in 0..steps {
            let mut rows: Vec<BatchRow> = caches
                .iter_mut()
                .zip(&stacks)
                .enumerate()
                .map(|(r, (cache, stack))| BatchRow {
                    token: fed[r][step],
                    cache,
                    adapters: *stack,
                })
                .collect();
            let batched = rows_of(&model.decode_batch(&mut rows).unwrap());
            for (r, row) in batched.iter().enumerate() {
                let diff = row
                    .iter()
                    .zip(&alone[r][step])
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(
                    diff < 1e-3,
                    "{dtype:?} row {r} step {step}: differs by {diff}"
                );
            }
        }
        for (cache, prompt) in caches.iter().zip(&prompts) {
            assert_eq!(cache.len(), prompt.len() + steps);
        }
    }
    // Adapters do change the logits, so agreement above means each row got its own.
    let (_dir, base) = tiny_gguf(TinySpec::default(), GgmlDType::F32);
    let a = random_adapter(&base, "a", 1);
    let with_a = [&a];
    let ids = Tensor::new(&[5u32, 6, 7], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let plain = base
        .model
        .forward_last(&ids, &mut base.model.new_cache(8), &AdapterStack::NONE);
    let adapted = base.model.forward_last(
        &ids,
        &mut base.model.new_cache(8),
        &AdapterStack::new(&with_a),
    );
    let d = (plain.unwrap() - adapted.unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(d.to_scalar::<f32>().unwrap() > 1e-2);
}

/// Chunked prefill (what the serving engine does while other sequences decode) gives the logits of
/// one pass. Exactly, on a quantized model without adapters; within float rounding with an adapter
/// (its products sum in an order that depends on the number of rows; on an f16 KV cache such a
/// rounding difference can flip one cached value by an ulp, which a random tiny model amplifies, so
/// that case runs on an f32 model).
#[test]
fn a_prompt_prefilled_in_chunks_gives_the_logits_of_one_pass() {
    for (dtype, with_adapter, tolerance) in
        [(GgmlDType::Q8_0, false, 0.0), (GgmlDType::F32, true, 1e-4)]
    {
        let (_dir, base) = tiny_gguf(TinySpec::default(), dtype);
        let a = random_adapter(&base, "a", 3);
        let with_a = [&a];
        let stack = if with_adapter {
            AdapterStack::new(&with_a)
        } else {
            AdapterStack::NONE
        };
        let prompt: Vec<u32> = (0..23).map(|i| (11 + i * 17) % 250 + 3).collect();
        let opts = pai_model::GenerateOptions {
            max_tokens: Some(4),
            ..Default::default()
        };
        let mut whole =
            pai_model::Sequence::new(&base.model, &base.tokenizer, &prompt, opts.clone()).unwrap();
        let expected = rows_of(&whole.prefill(&base.model, &stack).unwrap());
        let mut chunked =
            pai_model::Sequence::new(&base.model, &base.tokenizer, &prompt, opts).unwrap();
        let mut runs = 0;
        let logits = loop {
            assert_eq!(chunked.prefill_left(), prompt.len() - runs * 5);
            runs += 1;
            if let Some(l) = chunked.prefill_chunk(&base.model, &stack, 5).unwrap() {
                break l;
            }
        };
        assert_eq!(runs, 5, "23 positions in chunks of 5");
        assert_eq!(chunked.prefill_left(), 0);
        let diff = rows_of(&logits)[0]
            .iter()
            .zip(&expected[0])
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            diff <= tolerance,
            "{dtype:?}: chunked prefill differs by {diff}"
        );
        assert_eq!(chunked.cache_mut().len(), prompt.len());
        assert!(
            chunked.prefill_chunk(&base.model, &stack, 5).is_err(),
            "nothing left to prefill"
        );
    }
}
