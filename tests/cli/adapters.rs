//! pai-train train | adapters | promote | rollback: trained adapters become registry versions, the
//! owner promotes and rolls back, `continue` starts from a registered version, a changed file is
//! refused, gc keeps what rollback needs, and an adapter made elsewhere is imported.

use std::path::Path;

use crate::{json, text, World};

#[test]
fn trained_adapters_are_versions_that_are_promoted_rolled_back_and_collected() {
    let w = World::new(
        "[ingest]\nholdout_fraction = 0.3\n\n[train]\nseq_len = 32\nbatch_tokens = 64\neval_every = 50\neval_tokens = 64\n",
        (0..12).map(|i| {
            (
                format!("n{i}.md"),
                format!("# Note {i}\n\nThe heron by the pond number {i} waits for fish at dawn.\n"),
            )
        }),
    );
    let (dir, home, notes, model) = (w.dir.path(), &w.home, &w.notes, &w.model);
    let model_arg = w.model_arg();
    let pai = |args: &[&str]| w.pai(args);
    w.ingest("2026-12-01");
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--day",
            "2026-12-01",
            "--model",
            model_arg,
            "--max-steps",
            "2",
            "--json",
        ];
        args.extend_from_slice(extra);
        json(&pai(&args))
    };

    // Two nights: v1 and v2 of "personal"; neither is served until promoted.
    let first = train(&[]);
    assert_eq!(
        (&first["name"], &first["version"]),
        (&"personal".into(), &"v1".into()),
        "{first}"
    );
    let second = train(&[]);
    assert_eq!(second["version"], "v2", "{second}");
    let list = json(&pai(&["adapters", "list", "--json"]));
    assert_eq!(list[0]["name"], "personal", "{list}");
    assert_eq!(
        list[0]["versions"],
        serde_json::json!(["v1", "v2"]),
        "{list}"
    );
    assert!(list[0]["current"].is_null(), "{list}");
    let out = pai(&[
        "train",
        "--day",
        "2026-12-01",
        "--model",
        model_arg,
        "--max-steps",
        "2",
        "--strategy",
        "continue",
        "--from",
        "personal",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no current version"),
        "{}",
        text(&out.stderr)
    );

    // Promote by hand (the newest), then v1 by name; roll back to what it replaced.
    let out = pai(&["promote", "personal"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("serving v2"),
        "{}",
        text(&out.stdout)
    );
    let out = pai(&["promote", "personal@v1", "--reason", "v2 answers worse"]);
    assert!(
        text(&out.stdout).contains("v2 → v1"),
        "{}",
        text(&out.stdout)
    );
    let out = pai(&["rollback", "personal"]);
    assert!(
        text(&out.stdout).contains("v1 → v2"),
        "{}",
        text(&out.stdout)
    );
    let shown = json(&pai(&["adapters", "show", "personal", "--json"]));
    assert_eq!(shown["current"], "v2", "{shown}");
    let reasons: Vec<&str> = shown["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .collect();
    assert!(reasons.contains(&"v2 answers worse"), "{shown}");

    // `continue` from the current version records it as the parent.
    let third = train(&["--strategy", "continue", "--from", "personal"]);
    assert_eq!(third["version"], "v3", "{third}");
    let meta = json(&pai(&["adapters", "show", "personal@v3", "--json"]));
    assert_eq!(meta["parent"], "personal@v2", "{meta}");
    assert_eq!(meta["dataset"]["day"], "2026-12-01", "{meta}");
    assert_eq!(meta["current"], false, "{meta}");
    assert_eq!(
        meta["registry"]["files"].as_object().unwrap().len(),
        2,
        "{meta}"
    );

    // A version whose weights changed after it was added is never promoted or trained from.
    let weights = home.join("adapters/personal/v3/adapter_model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, &bytes).unwrap();
    let out = pai(&["promote", "personal@v3"]);
    assert!(!out.status.success());
    let said = text(&out.stderr);
    assert!(said.contains("sha256") && said.contains("v3"), "{said}");
    let out = pai(&[
        "train",
        "--day",
        "2026-12-01",
        "--model",
        model_arg,
        "--max-steps",
        "2",
        "--strategy",
        "continue",
        "--from",
        "personal@v3",
    ]);
    assert!(!out.status.success(), "trained from a changed adapter");

    // gc: the current v2 stays (promoted first, it replaced nothing: v1 is no rollback target), and
    // so does the newest with --keep 1.
    let out = pai(&["adapters", "gc", "--keep", "1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("personal: removed v1"),
        "{}",
        text(&out.stdout)
    );
    let out = pai(&["adapters", "gc", "personal", "--keep", "0"]);
    assert!(
        text(&out.stdout).contains("removed v3"),
        "{}",
        text(&out.stdout)
    );
    let list = json(&pai(&["adapters", "list", "--json"]));
    assert_eq!(list[0]["versions"], serde_json::json!(["v2"]), "{list}");
    assert_eq!(list[0]["current"], "v2", "{list}");

    // An adapter made elsewhere is loaded onto the base, then registered; junk is refused by name.
    let made_elsewhere = dir.join("elsewhere");
    let out = pai(&[
        "train",
        "--day",
        "2026-12-01",
        "--model",
        model_arg,
        "--max-steps",
        "2",
        "--out",
        made_elsewhere.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::remove_file(made_elsewhere.join("pai.json")).unwrap();
    let out = pai(&[
        "adapters",
        "import",
        made_elsewhere.to_str().unwrap(),
        "--name",
        "python",
        "--model",
        model_arg,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("python@v1"),
        "{}",
        text(&out.stdout)
    );
    let meta = json(&pai(&["adapters", "show", "python@v1", "--json"]));
    let sha = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(std::fs::read(model).unwrap()))
    };
    assert_eq!(meta["base"]["sha256"], sha.as_str(), "{meta}");
    assert_eq!(
        Path::new(meta["registry"]["imported_from"].as_str().unwrap()),
        made_elsewhere.as_path()
    );
    let out = pai(&[
        "adapters",
        "import",
        notes.to_str().unwrap(),
        "--name",
        "junk",
        "--model",
        model_arg,
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("adapter_config.json"),
        "{}",
        text(&out.stderr)
    );
    let out = pai(&["adapters", "show", "nobody"]);
    assert!(!out.status.success());
    let said = text(&out.stderr);
    assert!(
        said.contains("\"nobody\"") && said.contains("personal") && said.contains("python"),
        "{said}"
    );
}
