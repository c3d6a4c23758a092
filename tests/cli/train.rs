//! pai-train train: a PEFT adapter with its pai.json, and Ctrl-C then --resume.

use std::process::{Command, Stdio};

use crate::{run, text, tiny_model, TRAIN};

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
    // Without --out, the adapter is the next version of "personal" in the registry.
    assert_eq!(summary["name"], "personal", "{summary}");
    assert_eq!(summary["version"], "v1", "{summary}");
    assert!(home.join("adapters/personal/v1/pai.json").is_file());
    assert!(std::path::Path::new(summary["adapter"].as_str().unwrap())
        .join("pai.json")
        .is_file());
}
