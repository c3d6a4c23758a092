//! pai-train ingest and watch: sources from pai.toml and the command line, changes only, errors named.

use std::process::{Command, Stdio};

use crate::{run, text, tiny_model, TRAIN};

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
