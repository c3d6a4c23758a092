//! LoRA adapters in the PEFT format: their effect is exactly base + scale·B·A·x, merged weights give the
//! same model, and every kind of mismatch is refused naming the key at fault.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use pai_model::lora::{peft_key, proj_dims};
use pai_model::testing::{TinyModel, TinySpec};
use pai_model::{AdapterStack, LoraSite, ModelConfig, ModelError, Proj};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{all_logits, load, max_abs_diff};

const R: usize = 4;
const ALPHA: f64 = 8.0;

fn random(rng: &mut StdRng, shape: (usize, usize), scale: f32) -> Tensor {
    let data: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| scale * (rng.random::<f32>() * 2.0 - 1.0))
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Known A/B pairs for `targets` in every layer.
fn known_weights(
    cfg: &ModelConfig,
    targets: &[Proj],
    seed: u64,
    b_scale: f32,
) -> Vec<(LoraSite, Tensor, Tensor)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for layer in 0..cfg.num_layers {
        for &proj in targets {
            let (i, o) = proj_dims(cfg, proj);
            let a = random(&mut rng, (R, i), 0.3);
            let b = random(&mut rng, (o, R), b_scale);
            out.push((LoraSite { layer, proj }, a, b));
        }
    }
    out
}

fn write_peft(
    dir: &Path,
    weights: &[(LoraSite, Tensor, Tensor)],
    targets: &[&str],
    rslora: bool,
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": R,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.05,
        "bias": "none",
        "use_rslora": rslora,
        "target_modules": targets,
        "base_model_name_or_path": "tiny-random",
        "fan_in_fan_out": false,
        "modules_to_save": null,
        "layers_to_transform": null,
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let tensors: HashMap<String, Tensor> = weights
        .iter()
        .flat_map(|(site, a, b)| {
            [
                (peft_key(*site, true), a.clone()),
                (peft_key(*site, false), b.clone()),
            ]
        })
        .collect();
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    dir.to_path_buf()
}

fn scale(rslora: bool) -> f64 {
    if rslora {
        ALPHA / (R as f64).sqrt()
    } else {
        ALPHA / R as f64
    }
}

#[test]
fn lora_delta_is_exactly_scale_b_a_x() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyModel::new(TinySpec::default()).unwrap();
    let base = load(
        &tiny
            .write_gguf(&dir.path().join("m.gguf"), GgmlDType::Q8_0)
            .unwrap(),
    );
    let cfg = base.config().clone();
    let targets = [Proj::V, Proj::Down];
    let weights = known_weights(&cfg, &targets, 1, 0.5);
    for rslora in [false, true] {
        let adir = write_peft(
            &dir.path().join(format!("a{rslora}")),
            &weights,
            &["v_proj", "down_proj"],
            rslora,
        );
        let adapter = base.load_adapter(&adir).unwrap();
        let refs = [&adapter];
        let stack = AdapterStack::new(&refs);
        for (site, a, b) in &weights {
            let block = &base.model.blocks()[site.layer];
            let linear = match site.proj {
                Proj::V => &block.attn.v,
                Proj::Down => &block.mlp.down,
                _ => unreachable!(),
            };
            let in_dim = linear.base().in_dim();
            let mut rng = StdRng::seed_from_u64(9);
            let x = random(&mut rng, (5, in_dim), 1.0).unsqueeze(0).unwrap();
            let with = linear
                .forward(&x, &stack)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let without = linear
                .forward(&x, &AdapterStack::NONE)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            // Independent: scale · B · (A · x) in f64 loops.
            let (xa, aa, bb) = (
                x.squeeze(0).unwrap().to_vec2::<f32>().unwrap(),
                a.to_vec2::<f32>().unwrap(),
                b.to_vec2::<f32>().unwrap(),
            );
            for t in 0..5 {
                let ax: Vec<f64> = (0..R)
                    .map(|r| {
                        (0..in_dim)
                            .map(|i| f64::from(aa[r][i]) * f64::from(xa[t][i]))
                            .sum()
                    })
                    .collect();
                for o in 0..bb.len() {
                    let delta: f64 =
                        scale(rslora) * (0..R).map(|r| f64::from(bb[o][r]) * ax[r]).sum::<f64>();
                    let got = f64::from(with[t][o] - without[t][o]);
                    assert!(
                        (got - delta).abs() < 1e-4 * (1.0 + delta.abs()),
                        "{site:?} t{t} o{o}: {got} vs {delta}"
                    );
                }
            }
        }
    }
}

#[test]
fn adapter_on_base_equals_merged_weights() {
    let dir = tempfile::tempdir().unwrap();
    let mut tiny = TinyModel::new(TinySpec::default()).unwrap();
    let base = load(
        &tiny
            .write_gguf(&dir.path().join("m.gguf"), GgmlDType::F32)
            .unwrap(),
    );
    let cfg = base.config().clone();
    let weights = known_weights(&cfg, &Proj::ALL, 2, 0.2);
    let names: Vec<&str> = Proj::ALL.iter().map(|p| p.peft_name()).collect();
    let adir = write_peft(&dir.path().join("adapter"), &weights, &names, false);
    let adapter = base.load_adapter(&adir).unwrap();
    let refs = [&adapter];
    let ids: Vec<u32> = (3..30).collect();
    let with_adapter = all_logits(&base, &ids, &AdapterStack::new(&refs));
    let bare = all_logits(&base, &ids, &AdapterStack::NONE);
    assert!(
        max_abs_diff(&with_adapter, &bare) > 1e-2,
        "the adapter changed nothing"
    );

    // Merge W' = W + (alpha/r)·B·A into the Hugging Face weights and load that as a plain model.
    for (site, a, b) in &weights {
        let name = format!(
            "model.layers.{}.{}.{}.weight",
            site.layer,
            site.proj.hf_parent(),
            site.proj.peft_name()
        );
        let w = tiny.tensors[&name].clone();
        let merged = (w + (b.matmul(a).unwrap() * scale(false)).unwrap()).unwrap();
        tiny.tensors.insert(name, merged);
    }
    let merged = load(&tiny.write_hf_dir(&dir.path().join("merged")).unwrap());
    let d = max_abs_diff(
        &all_logits(&merged, &ids, &AdapterStack::NONE),
        &with_adapter,
    );
    assert!(d < 1e-3, "merged model and base+adapter differ by {d}");

    // PEFT's initialisation (B = 0) leaves the model unchanged.
    let zero: Vec<_> = weights
        .iter()
        .map(|(s, a, b)| (*s, a.clone(), b.zeros_like().unwrap()))
        .collect();
    let zdir = write_peft(&dir.path().join("zero"), &zero, &names, false);
    let z = base.load_adapter(&zdir).unwrap();
    let zr = [&z];
    assert_eq!(
        max_abs_diff(&all_logits(&base, &ids, &AdapterStack::new(&zr)), &bare),
        0.0
    );
}

#[test]
fn mismatched_adapters_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyModel::new(TinySpec::default()).unwrap();
    let base = load(
        &tiny
            .write_gguf(&dir.path().join("m.gguf"), GgmlDType::F32)
            .unwrap(),
    );
    let cfg = base.config().clone();
    let weights = known_weights(&cfg, &[Proj::Q, Proj::K], 3, 0.1);

    // A missing tensor.
    let missing: Vec<_> = weights.iter().skip(1).cloned().collect();
    let d = write_peft(
        &dir.path().join("missing"),
        &missing,
        &["q_proj", "k_proj"],
        false,
    );
    let err = base.load_adapter(&d).unwrap_err();
    assert!(matches!(err, ModelError::AdapterMissingKey { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
        "{err}"
    );

    // A wrong shape (an adapter made for a wider model).
    let mut rng = StdRng::seed_from_u64(4);
    let mut wrong = weights.clone();
    wrong[2].1 = random(&mut rng, (R, cfg.hidden_size * 2), 0.1);
    let d = write_peft(
        &dir.path().join("shape"),
        &wrong,
        &["q_proj", "k_proj"],
        false,
    );
    let err = base.load_adapter(&d).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ModelError::AdapterShape { .. }), "{msg}");
    assert!(
        msg.contains(&peft_key(weights[2].0, true)) && msg.contains("128"),
        "{msg}"
    );

    // A tensor for a module target_modules does not list.
    let d = write_peft(&dir.path().join("targets"), &weights, &["q_proj"], false);
    let msg = base.load_adapter(&d).unwrap_err().to_string();
    assert!(
        msg.contains("k_proj") && msg.contains("target_modules"),
        "{msg}"
    );

    // lm_head / embeddings are not supported targets.
    let d = write_peft(
        &dir.path().join("lmhead"),
        &weights,
        &["q_proj", "k_proj", "lm_head"],
        false,
    );
    let msg = base.load_adapter(&d).unwrap_err().to_string();
    assert!(msg.contains("lm_head"), "{msg}");

    // Trained on another base (pai.json records the base's sha256).
    let d = write_peft(
        &dir.path().join("base"),
        &weights,
        &["q_proj", "k_proj"],
        false,
    );
    std::fs::write(d.join("pai.json"), r#"{"base": {"sha256": "00ff"}}"#).unwrap();
    let err = base.load_adapter(&d).unwrap_err();
    assert!(
        matches!(err, ModelError::AdapterBaseMismatch { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("00ff"));
    // ...and accepted when it names this base.
    let sha = base.sha256().unwrap().to_string();
    std::fs::write(
        d.join("pai.json"),
        format!(r#"{{"base": {{"sha256": "{sha}"}}}}"#),
    )
    .unwrap();
    base.load_adapter(&d).unwrap();

    // DoRA and pickles are refused with the reason.
    let d = write_peft(
        &dir.path().join("dora"),
        &weights,
        &["q_proj", "k_proj"],
        false,
    );
    let cfg_text = std::fs::read_to_string(d.join("adapter_config.json")).unwrap();
    std::fs::write(
        d.join("adapter_config.json"),
        cfg_text.replace("\"peft_type\"", "\"use_dora\":true,\"peft_type\""),
    )
    .unwrap();
    assert!(base
        .load_adapter(&d)
        .unwrap_err()
        .to_string()
        .contains("use_dora"));
    let d = write_peft(
        &dir.path().join("pickle"),
        &weights,
        &["q_proj", "k_proj"],
        false,
    );
    std::fs::rename(
        d.join("adapter_model.safetensors"),
        d.join("adapter_model.bin"),
    )
    .unwrap();
    assert!(base
        .load_adapter(&d)
        .unwrap_err()
        .to_string()
        .contains("adapter_model.bin"));
}

/// `save_peft` writes what `load_peft` reads (same tensors, same config), and `save_gguf` writes
/// llama.cpp's LoRA layout: adapter metadata, `blk.N.<proj>.weight.lora_{a,b}`, q/k B rows in GGUF
/// order (the model's GGUF q/k permutation applied), every other tensor as it is.
#[test]
fn saved_adapters_read_back_as_peft_and_as_llama_cpp_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyModel::new(TinySpec::default()).unwrap();
    let cfg = tiny.config();
    let weights = known_weights(&cfg, &[Proj::Q, Proj::K, Proj::V, Proj::Down], 11, 0.5);
    let src = write_peft(
        &dir.path().join("src"),
        &weights,
        &["q_proj", "k_proj", "v_proj", "down_proj"],
        false,
    );
    let adapter =
        pai_model::Adapter::load_peft(&src, &cfg, None, &Device::Cpu).expect("load source");

    let again = dir.path().join("again");
    std::fs::create_dir_all(&again).unwrap();
    adapter.save_peft(&again).expect("save peft");
    let reread = pai_model::Adapter::load_peft(&again, &cfg, None, &Device::Cpu).expect("reload");
    assert_eq!(reread.config().r, R);
    assert_eq!(reread.config().alpha, ALPHA);
    assert_eq!(
        reread.config().target_modules,
        adapter.config().target_modules
    );
    for ((s1, w1), (s2, w2)) in adapter.iter().zip(reread.iter()) {
        assert_eq!(s1, s2);
        assert_eq!(tensor_diff(&w1.a, &w2.a), 0.0);
        assert_eq!(tensor_diff(&w1.b, &w2.b), 0.0);
    }

    let gguf = dir.path().join("adapter.gguf");
    adapter.save_gguf(&gguf, &cfg).expect("save gguf");
    let mut f = std::fs::File::open(&gguf).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let meta = |k: &str| content.metadata.get(k).cloned().expect(k);
    assert_eq!(meta("general.type").to_string().unwrap(), "adapter");
    assert_eq!(meta("adapter.type").to_string().unwrap(), "lora");
    assert_eq!(meta("general.architecture").to_string().unwrap(), "llama");
    assert_eq!(meta("adapter.lora.alpha").to_f32().unwrap(), ALPHA as f32);
    assert_eq!(content.tensor_infos.len(), weights.len() * 2);
    for (site, a, b) in &weights {
        let stem = format!("blk.{}.{}.weight", site.layer, site.proj.gguf_name());
        let mut read = |suffix: &str| {
            content
                .tensor(&mut f, &format!("{stem}.{suffix}"), &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap()
        };
        assert_eq!(tensor_diff(&read("lora_a"), a), 0.0, "{stem} A");
        let want_b = match site.proj {
            Proj::Q | Proj::K => {
                let heads = if site.proj == Proj::Q {
                    cfg.num_heads
                } else {
                    cfg.num_kv_heads
                };
                let order = pai_model::weights::permute_rows(b.dim(0).unwrap(), heads);
                b.index_select(&Tensor::new(order.as_slice(), &Device::Cpu).unwrap(), 0)
                    .unwrap()
            }
            _ => b.clone(),
        };
        assert_eq!(tensor_diff(&read("lora_b"), &want_b), 0.0, "{stem} B");
        if matches!(site.proj, Proj::Q | Proj::K) {
            assert!(
                tensor_diff(&want_b, b) > 0.0,
                "{stem}: the permutation moves rows"
            );
        }
    }
}

fn tensor_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
