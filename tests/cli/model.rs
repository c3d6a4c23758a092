//! pai-serve chat and bench, pai-train perplexity: the model commands on the default and a tiny model.

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use pai_model::testing::{TinyModel, TinySpec};

use crate::{pai_home, run, text, tiny_model, SERVE, TRAIN};

#[test]
fn chat_answers_one_prompt_with_the_default_model() {
    let model = pai_home().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        model.is_file(),
        "run scripts/fetch-model.sh first ({} missing)",
        model.display()
    );
    let args = [
        "chat",
        "--prompt",
        "Name three colours.",
        "--temperature",
        "0",
        "--max-tokens",
        "16",
        "--stats",
    ];
    let out = run(SERVE, &args, None, &[]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.split_whitespace().count() >= 3, "reply: {stdout:?}");
    assert!(
        stderr.contains("16 generated") && stderr.contains("tok/s"),
        "stats: {stderr:?}"
    );
    // Greedy decoding is deterministic across runs.
    let again = run(SERVE, &args, None, &[]);
    assert_eq!(text(&again.stdout), stdout);
}

#[test]
fn chat_repl_takes_turns_and_resets() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let out = run(
        SERVE,
        &[
            "chat",
            "--model",
            model.to_str().unwrap(),
            "--max-tokens",
            "5",
            "--temperature",
            "0",
        ],
        Some("hello there\n\n/reset\nsecond turn\n/exit\nnever read\n"),
        &[],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("(conversation cleared)"), "{stderr}");
    assert_eq!(
        stderr.matches("> ").count(),
        5,
        "one prompt per line read up to /exit: {stderr}"
    );
    assert!(
        text(&out.stdout).matches('\n').count() >= 2,
        "each of the two replies ends its line"
    );
}

#[test]
fn perplexity_reports_json() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let file = dir.path().join("note.md");
    std::fs::write(&file, "# A note\n\nthe cat sat on the mat, 12 times.\n").unwrap();
    let out = run(
        TRAIN,
        &[
            "perplexity",
            "--file",
            file.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--json",
        ],
        None,
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    let tokens = v["tokens"].as_u64().unwrap();
    assert_eq!(v["tokens_scored"].as_u64().unwrap(), tokens - 1);
    let (nll, ppl) = (
        v["mean_nll"].as_f64().unwrap(),
        v["perplexity"].as_f64().unwrap(),
    );
    assert!(nll > 0.0 && (ppl - nll.exp()).abs() < 1e-6 * ppl, "{v}");
}

#[test]
fn missing_default_model_says_how_to_fetch_it() {
    let home = tempfile::tempdir().unwrap();
    for (bin, args) in [
        (SERVE, vec!["chat", "--prompt", "hi"]),
        (TRAIN, vec!["perplexity", "--file", "Cargo.toml"]),
    ] {
        let out = run(bin, &args, None, &[("PAI_HOME", home.path())]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains("scripts/fetch-model.sh") && stderr.contains("--model"),
            "{bin}: {stderr}"
        );
    }
}

/// Run a command that must fail, and check its error names `culprit`.
fn assert_fails_naming(bin: &str, args: &[&str], culprit: &str) {
    let out = run(bin, args, None, &[]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(
        stderr.contains(culprit),
        "{args:?}: the error does not name {culprit}: {stderr}"
    );
}

#[test]
fn bad_inputs_are_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let m = model.to_str().unwrap();
    let missing = dir.path().join("no-such-adapter");
    let adapter = missing.to_str().unwrap();
    assert_fails_naming(
        SERVE,
        &["chat", "--model", m, "--prompt", "hi", "--adapter", adapter],
        "no-such-adapter",
    );
    assert_fails_naming(
        TRAIN,
        &[
            "perplexity",
            "--model",
            m,
            "--file",
            "/nonexistent/notes.md",
        ],
        "/nonexistent/notes.md",
    );
    assert_fails_naming(
        SERVE,
        &[
            "chat",
            "--model",
            "/nonexistent/model.gguf",
            "--prompt",
            "hi",
        ],
        "/nonexistent/model.gguf",
    );
}

#[test]
fn perplexity_with_an_adapter() {
    use candle_core::{Device, Tensor};
    use pai_model::lora::{peft_key, proj_dims};
    use pai_model::{LoraSite, Proj};

    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyModel::new(TinySpec::default()).unwrap();
    let model = tiny
        .write_gguf(&dir.path().join("tiny.gguf"), GgmlDType::Q8_0)
        .unwrap();
    let cfg = tiny.config();
    let file = dir.path().join("code.py");
    std::fs::write(&file, "def f(x):\n    return x * 2\n").unwrap();
    let write_adapter = |name: &str, b_value: f32| -> PathBuf {
        let adir = dir.path().join(name);
        std::fs::create_dir_all(&adir).unwrap();
        let config = serde_json::json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4,
            "target_modules": ["v_proj"], "bias": "none", "base_model_name_or_path": "tiny"});
        std::fs::write(adir.join("adapter_config.json"), config.to_string()).unwrap();
        let mut tensors = std::collections::HashMap::new();
        for layer in 0..cfg.num_layers {
            let site = LoraSite {
                layer,
                proj: Proj::V,
            };
            let (i, o) = proj_dims(&cfg, Proj::V);
            tensors.insert(
                peft_key(site, true),
                Tensor::ones((2, i), candle_core::DType::F32, &Device::Cpu).unwrap(),
            );
            tensors.insert(
                peft_key(site, false),
                (Tensor::ones((o, 2), candle_core::DType::F32, &Device::Cpu).unwrap()
                    * f64::from(b_value))
                .unwrap(),
            );
        }
        candle_core::safetensors::save(&tensors, adir.join("adapter_model.safetensors")).unwrap();
        adir
    };
    let ppl = |adapter: Option<&Path>| -> f64 {
        let mut args = vec![
            "perplexity",
            "--file",
            file.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--json",
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", a.to_str().unwrap()]);
        }
        let out = run(TRAIN, &args, None, &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
        v["perplexity"].as_f64().unwrap()
    };
    let bare = ppl(None);
    assert_eq!(
        ppl(Some(&write_adapter("zero", 0.0))),
        bare,
        "a zero adapter changes nothing"
    );
    assert_ne!(
        ppl(Some(&write_adapter("strong", 0.05))),
        bare,
        "a real adapter changes the score"
    );
}

#[test]
fn chat_repl_survives_a_conversation_longer_than_the_context() {
    // The tiny model's context is 256 tokens: a long message overflows it, the REPL says so and goes on.
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let long = "the cat sat on the mat ".repeat(60);
    let input = format!("{long}\n/reset\nhi\n/exit\n");
    let out = run(
        SERVE,
        &[
            "chat",
            "--model",
            model.to_str().unwrap(),
            "--max-tokens",
            "4",
            "--temperature",
            "0",
        ],
        Some(&input),
        &[],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("maximum context length is 256 tokens"),
        "{stderr}"
    );
    assert!(stderr.contains("/reset starts over"), "{stderr}");
    assert_eq!(
        stderr.matches("> ").count(),
        4,
        "the REPL kept reading: {stderr}"
    );
}

#[test]
fn bench_reports_speed_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let args = [
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--prompt-tokens",
        "32",
        "--gen-tokens",
        "8",
        "--reps",
        "2",
        "--threads",
        "1",
        "--json",
    ];
    let out = run(SERVE, &args, None, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(v["threads"], 1);
    assert_eq!(v["prefill_tokens"], 32);
    for phase in ["prefill", "decode"] {
        let reps = v["results"][phase]["reps"].as_array().unwrap();
        assert_eq!(reps.len(), 2, "{phase}");
        assert!(
            reps.iter()
                .all(|r| r["tokens_per_second"].as_f64().unwrap() > 0.0),
            "{phase}: {v}"
        );
    }
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 1 << 20);
    // The human-readable form.
    let out = run(SERVE, &args[..args.len() - 1], None, &[]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("prefill") && stdout.contains("decode") && stdout.contains("peak RSS"),
        "{stdout}"
    );
}
