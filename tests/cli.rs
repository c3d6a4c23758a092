//! End to end: the `pai-serve` and `pai-train` binaries as a user runs them, on the real default model
//! (installed by scripts/fetch-model.sh) and on a tiny random model written here.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use candle_core::quantized::GgmlDType;
use pai_model::testing::{TinyModel, TinySpec};

fn pai_home() -> PathBuf {
    std::env::var_os("PAI_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".pai"))
}

fn run(bin: &str, args: &[&str], stdin: Option<&str>, env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env_remove("PAI_MODEL")
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("the binary starts");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn tiny_model(dir: &Path) -> PathBuf {
    TinyModel::new(TinySpec::default())
        .unwrap()
        .write_gguf(&dir.join("tiny.gguf"), GgmlDType::Q8_0)
        .unwrap()
}

const SERVE: &str = env!("CARGO_BIN_EXE_pai-serve");
const TRAIN: &str = env!("CARGO_BIN_EXE_pai-train");

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

#[test]
fn ingest_reads_pai_toml_and_command_line_sources_then_only_changes() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let (home, notes, code) = (
        dir.path().join("home"),
        dir.path().join("notes"),
        dir.path().join("code"),
    );
    for d in [&home, &notes, &code] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(
        home.join("pai.toml"),
        format!(
            "[[sources]]\npath = {:?}\nkind = \"notes\"\nname = \"vault\"\n\n[ingest]\nholdout_fraction = 0.0\n",
            notes.to_str().unwrap()
        ),
    )
    .unwrap();
    std::fs::write(
        notes.join("garden.md"),
        // Assembled here so that pai's own tree stays free of secrets (datasets' clean-corpus test).
        format!(
            "# Tomatoes\n\nWater daily in July; the key is AKIA{}.\n",
            "IOSFODNN7EXAMPLE"
        ),
    )
    .unwrap();
    std::fs::write(
        code.join("lib.rs"),
        "fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n",
    )
    .unwrap();
    let ingest = |day: &str| {
        let code_arg = format!("{}:code", code.display());
        let out = run(
            TRAIN,
            &[
                "ingest",
                "--source",
                &code_arg,
                "--day",
                day,
                "--model",
                model.to_str().unwrap(),
                "--json",
            ],
            None,
            &[("PAI_HOME", &home)],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_str::<serde_json::Value>(text(&out.stdout).trim()).unwrap()
    };
    let first = ingest("2026-11-21");
    assert_eq!(first["files_new"], 2, "{first}");
    assert_eq!(first["redactions"]["aws_key"], 1, "{first}");
    assert_eq!(first["examples_added"]["note"], 1, "{first}");
    assert_eq!(first["examples_added"]["code"], 1, "{first}");
    let again = ingest("2026-11-22");
    assert_eq!(again["files_unchanged"], 2, "{again}");
    assert_eq!(again["tokens_added"], 0, "{again}");

    let out = run(
        TRAIN,
        &["dataset", "stats", "--json"],
        None,
        &[("PAI_HOME", &home)],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let vault = rows.iter().find(|r| r["source"] == "vault").unwrap();
    assert_eq!(
        (&vault["day"], &vault["split"], &vault["redactions"]),
        (&"2026-11-21".into(), &"train".into(), &1.into())
    );
    let stored = std::fs::read_dir(home.join("dataset")).unwrap().count();
    assert!(stored >= 2, "a day directory and schema.json");

    // A new note on a later day; the mix for that night replays the earlier day, and the mix for the
    // earlier night never sees the later one.
    std::fs::write(
        notes.join("bees.md"),
        "# Bees\n\nThe hive by the apple tree swarmed in May; keep the spare box ready.\n",
    )
    .unwrap();
    let third = ingest("2026-11-23");
    assert_eq!(third["examples_added"]["note"], 1, "{third}");
    let mix = |day: &str, mode: &str| {
        let out = run(
            TRAIN,
            &["dataset", "mix", "--day", day, "--mode", mode, "--json"],
            None,
            &[("PAI_HOME", &home)],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_str::<serde_json::Value>(text(&out.stdout).trim()).unwrap()
    };
    let later = mix("2026-11-23", "cumulative");
    assert_eq!(later["by_day"]["2026-11-23"], 1, "{later}");
    assert!(
        later["by_day"]["2026-11-21"].as_u64().unwrap() >= 2,
        "{later}"
    );
    let earlier = mix("2026-11-21", "continue");
    assert!(earlier["by_day"].get("2026-11-23").is_none(), "{earlier}");
    assert_eq!(earlier["replay_tokens"], 0, "{earlier}");
}

#[test]
fn ingest_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let missing = dir.path().join("no-such-dir");
    let out = run(
        TRAIN,
        &["ingest", "--source", missing.to_str().unwrap()],
        None,
        &[("PAI_HOME", &home)],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no-such-dir"),
        "{}",
        text(&out.stderr)
    );

    let out = run(
        TRAIN,
        &["ingest", "--source", ".", "--day", "22/11/2026"],
        None,
        &[("PAI_HOME", &home)],
    );
    assert!(
        text(&out.stderr).contains("22/11/2026"),
        "{}",
        text(&out.stderr)
    );

    std::fs::write(
        home.join("pai.toml"),
        "[[sources]]\npath = \".\"\nkind = \"poems\"\n",
    )
    .unwrap();
    let out = run(TRAIN, &["ingest"], None, &[("PAI_HOME", &home)]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("poems"), "{}", text(&out.stderr));

    std::fs::write(home.join("pai.toml"), "").unwrap();
    let out = run(TRAIN, &["ingest"], None, &[("PAI_HOME", &home)]);
    assert!(
        text(&out.stderr).contains("no sources"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn watch_ingests_a_note_soon_after_it_is_saved() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let (home, notes) = (dir.path().join("home"), dir.path().join("notes"));
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(&notes).unwrap();
    let source = format!("{}:notes", notes.display());
    let mut child = Command::new(TRAIN)
        .args([
            "watch",
            "--source",
            &source,
            "--model",
            model.to_str().unwrap(),
            "--debounce",
            "0.3",
            "--max-runs",
            "1",
        ])
        .env("PAI_HOME", &home)
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("a first line").unwrap();
    assert!(first.starts_with("watching 1 source"), "{first}");
    // Saved in two writes, as editors do: one ingest after they settle.
    let note = notes.join("hives.md");
    std::fs::write(&note, "# Hives\n\nThe north hive needs a new queen").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    std::fs::write(
        &note,
        "# Hives\n\nThe north hive needs a new queen before May.\n",
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("watch did not ingest within 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let report: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(status.success(), "{report:?}");
    assert!(
        report
            .iter()
            .any(|l| l.contains("1 new") && l.contains("1 example(s) added")),
        "{report:?}"
    );
    let out = run(
        TRAIN,
        &["dataset", "stats", "--json"],
        None,
        &[("PAI_HOME", &home)],
    );
    let rows: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(rows[0]["examples"], 1, "{rows}");
    // The journal is current: an ingest now finds nothing to do.
    let out = run(
        TRAIN,
        &[
            "ingest",
            "--source",
            &source,
            "--model",
            model.to_str().unwrap(),
            "--json",
        ],
        None,
        &[("PAI_HOME", &home)],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let again: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(
        (&again["files_unchanged"], &again["tokens_added"]),
        (&1.into(), &0.into()),
        "{again}"
    );
}

#[test]
fn train_writes_a_peft_adapter_and_resumes_after_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let (home, notes) = (dir.path().join("home"), dir.path().join("notes"));
    for d in [&home, &notes] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(
        home.join("pai.toml"),
        "[ingest]\nholdout_fraction = 0.3\n\n[train]\nseq_len = 32\nbatch_tokens = 64\neval_every = 50\neval_tokens = 64\ncheckpoint_every = 25\n",
    )
    .unwrap();
    for i in 0..12 {
        std::fs::write(
            notes.join(format!("n{i}.md")),
            format!("# Note {i}\n\nThe heron by the pond number {i} waits for fish at dawn, then flies north.\n"),
        )
        .unwrap();
    }
    let env = [("PAI_HOME", home.as_path())];
    let model_arg = model.to_str().unwrap();
    let notes_arg = format!("{}:notes", notes.display());
    let out = run(
        TRAIN,
        &[
            "ingest",
            "--source",
            &notes_arg,
            "--day",
            "2026-11-30",
            "--model",
            model_arg,
        ],
        None,
        &env,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A short run writes the PEFT directory with its pai.json.
    let adapter = dir.path().join("adapter");
    let out = run(
        TRAIN,
        &[
            "train",
            "--day",
            "2026-11-30",
            "--model",
            model_arg,
            "--max-steps",
            "4",
            "--out",
            adapter.to_str().unwrap(),
            "--json",
        ],
        None,
        &env,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(summary["metrics"]["steps"], 4, "{summary}");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "pai.json",
    ] {
        assert!(adapter.join(f).is_file(), "{f} missing");
    }
    let pai: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("pai.json")).unwrap()).unwrap();
    let sha = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(std::fs::read(&model).unwrap()))
    };
    assert_eq!(pai["base"]["sha256"], sha.as_str(), "{pai}");
    assert_eq!(pai["dataset"]["days"][0], "2026-11-30", "{pai}");
    assert_eq!(pai["training"]["config"]["r"], 16, "{pai}");
    let note = notes.join("n0.md");
    let out = run(
        TRAIN,
        &[
            "perplexity",
            "--model",
            model_arg,
            "--adapter",
            adapter.to_str().unwrap(),
            "--file",
            note.to_str().unwrap(),
            "--json",
        ],
        None,
        &env,
    );
    assert!(
        out.status.success(),
        "the adapter loads back: {}",
        text(&out.stderr)
    );

    // Ctrl-C stops at a checkpoint; --resume finishes the run.
    let child = Command::new(TRAIN)
        .args([
            "train",
            "--day",
            "2026-11-30",
            "--model",
            model_arg,
            "--max-steps",
            "3000",
        ])
        .env("PAI_HOME", &home)
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let runs = home.join("runs");
    let started = std::time::Instant::now();
    let steps_logged = || -> usize {
        std::fs::read_dir(&runs)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("metrics.jsonl")).ok())
            .map(|m| m.lines().count())
            .max()
            .unwrap_or(0)
    };
    while steps_logged() < 30 && started.elapsed() < std::time::Duration::from_secs(120) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains("pai-train train --resume"), "{said}");
    let out = run(TRAIN, &["train", "--resume", "--json"], None, &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(summary["metrics"]["steps"], 3000, "{summary}");
    assert!(std::path::Path::new(summary["adapter"].as_str().unwrap())
        .join("pai.json")
        .is_file());
}
