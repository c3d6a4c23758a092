//! Add, promote, rollback, gc, verify and import on a registry in a temporary home, including
//! concurrent writers and tampered files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pai_adapters::{
    Action, AdapterError, AdapterMeta, BaseFingerprint, Registry, Version, ADAPTER_WEIGHTS,
};

/// A PEFT LoRA directory with `weights` as its safetensors bytes (the registry never parses them).
fn peft_dir(root: &Path, tag: &str, weights: &[u8]) -> PathBuf {
    let dir = root.join(tag);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}"#,
    )
    .unwrap();
    std::fs::write(dir.join(ADAPTER_WEIGHTS), weights).unwrap();
    dir
}

fn meta(parent: Option<&str>) -> AdapterMeta {
    AdapterMeta {
        base: BaseFingerprint {
            sha256: "b179c952".into(),
            name: Some("SmolLM2".into()),
            path: None,
        },
        parent: parent.map(String::from),
        created: "2026-12-02T01:00:00Z".into(),
        ..AdapterMeta::default()
    }
}

#[test]
fn add_promote_rollback_and_history() {
    let home = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let reg = Registry::new(home.path());
    assert!(reg.list().unwrap().is_empty());

    let v1 = reg
        .add("personal", &peft_dir(src.path(), "a", b"one"), meta(None))
        .unwrap();
    assert_eq!(v1, Version(1));
    // Adding does not serve it.
    assert_eq!(reg.current("personal").unwrap(), None);
    let e = reg.resolve("personal").unwrap_err();
    assert!(matches!(e, AdapterError::NoCurrent { .. }), "{e}");
    assert_eq!(reg.promote("personal", v1, "first adapter").unwrap(), None);
    assert_eq!(reg.current("personal").unwrap(), Some(v1));
    assert_eq!(
        std::fs::read_to_string(reg.current_file("personal")).unwrap(),
        "v1\n"
    );

    let v2 = reg
        .add("personal", &peft_dir(src.path(), "b", b"two"), meta(None))
        .unwrap();
    let v3 = reg
        .add(
            "personal",
            &peft_dir(src.path(), "c", b"three"),
            meta(Some("personal@v2")),
        )
        .unwrap();
    assert_eq!((v2, v3), (Version(2), Version(3)));
    assert_eq!(reg.promote("personal", v2, "gate").unwrap(), Some(v1));
    assert_eq!(reg.promote("personal", v3, "gate").unwrap(), Some(v2));
    assert_eq!(reg.resolve("personal").unwrap(), ("personal".into(), v3));
    assert_eq!(reg.resolve("personal@v1").unwrap(), ("personal".into(), v1));

    // Rollback goes to what the current one replaced, and again to what that one replaced: never
    // back and forth between two.
    assert_eq!(reg.rollback("personal", None).unwrap(), (v3, v2));
    assert_eq!(reg.rollback("personal", None).unwrap(), (v2, v1));
    let e = reg.rollback("personal", None).unwrap_err().to_string();
    assert!(e.contains("nothing to roll back to"), "{e}");
    assert_eq!(reg.rollback("personal", Some(v3)).unwrap(), (v1, v3));
    let e = reg.rollback("personal", Some(v3)).unwrap_err().to_string();
    assert!(e.contains("already the current"), "{e}");

    let actions: Vec<Action> = reg
        .history("personal")
        .unwrap()
        .iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(
        actions,
        [
            Action::Added,
            Action::Promoted,
            Action::Added,
            Action::Added,
            Action::Promoted,
            Action::Promoted,
            Action::RolledBack,
            Action::RolledBack,
            Action::RolledBack,
        ]
    );
    let history = reg.history("personal").unwrap();
    assert_eq!(history[1].reason, "first adapter");
    assert_eq!(history[6].previous, Some(v3));

    // Lineage and digests are in pai.json; the source's own pai.json is never copied over it.
    let m = reg.meta("personal", v3).unwrap();
    assert_eq!(m.parent.as_deref(), Some("personal@v2"));
    let record = m.registry.unwrap();
    assert_eq!(
        (record.name.as_str(), record.version.as_str()),
        ("personal", "v3")
    );
    assert_eq!(record.files.len(), 2);
    assert_eq!(
        record.files[ADAPTER_WEIGHTS],
        pai_adapters::sha256_file(&src.path().join("c").join(ADAPTER_WEIGHTS)).unwrap()
    );
    // The gate's decision goes into pai.json, which the digests do not cover.
    reg.record_gate(
        "personal",
        v3,
        serde_json::json!({"promote": false, "reasons": ["x"]}),
    )
    .unwrap();
    assert_eq!(
        reg.verify("personal", v3).unwrap().meta.gate.unwrap()["promote"],
        false
    );
    let listed = reg.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].versions, [v1, v2, v3]);
    assert_eq!(listed[0].current, Some(v3));
}

#[test]
fn a_changed_file_is_refused_on_load_and_on_promote() {
    let home = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let reg = Registry::new(home.path());
    let v1 = reg
        .add("notes", &peft_dir(src.path(), "a", b"weights"), meta(None))
        .unwrap();
    reg.verify("notes", v1).unwrap();
    std::fs::write(reg.dir("notes", v1).join(ADAPTER_WEIGHTS), b"weightz").unwrap();
    let e = reg.verify("notes", v1).unwrap_err();
    assert!(matches!(e, AdapterError::Tampered { .. }), "{e}");
    assert!(e.to_string().contains(ADAPTER_WEIGHTS), "{e}");
    assert!(reg.promote("notes", v1, "").is_err());
    assert_eq!(reg.current("notes").unwrap(), None);
    // A missing file too.
    std::fs::remove_file(reg.dir("notes", v1).join(ADAPTER_WEIGHTS)).unwrap();
    assert!(reg.verify("notes", v1).is_err());
}

#[test]
fn gc_keeps_the_newest_the_current_what_it_replaced_and_its_parent() {
    let home = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let reg = Registry::new(home.path());
    let dir = peft_dir(src.path(), "a", b"w");
    let mut versions = Vec::new();
    for i in 1..=7 {
        let parent = (i == 3).then_some("personal@v1");
        versions.push(reg.add("personal", &dir, meta(parent)).unwrap());
    }
    reg.promote("personal", Version(2), "").unwrap();
    reg.promote("personal", Version(3), "").unwrap();
    // Current v3, it replaced v2, its parent is v1; the newest two are v6 and v7.
    let removed = reg.gc("personal", 2).unwrap();
    assert_eq!(removed, [Version(4), Version(5)]);
    assert_eq!(
        reg.versions("personal").unwrap(),
        [Version(1), Version(2), Version(3), Version(6), Version(7)]
    );
    // Numbers are never reused, even when the newest was removed.
    reg.promote("personal", Version(7), "").unwrap();
    std::fs::remove_dir_all(reg.dir("personal", Version(6))).unwrap();
    let removed = reg.gc("personal", 0).unwrap();
    assert_eq!(removed, [Version(1), Version(2)]);
    assert_eq!(reg.versions("personal").unwrap(), [Version(3), Version(7)]);
    reg.rollback("personal", Some(Version(3))).unwrap();
    assert_eq!(reg.gc("personal", 0).unwrap(), [Version(7)]);
    assert_eq!(reg.add("personal", &dir, meta(None)).unwrap(), Version(8));
}

#[test]
fn bad_names_directories_and_versions_are_named_in_the_error() {
    let home = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let reg = Registry::new(home.path());
    let good = peft_dir(src.path(), "a", b"w");
    let e = reg
        .add("../escape", &good, meta(None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("../escape") && e.contains("not allowed"), "{e}");

    let not_lora = peft_dir(src.path(), "b", b"w");
    std::fs::write(
        not_lora.join("adapter_config.json"),
        r#"{"peft_type": "IA3", "r": 8}"#,
    )
    .unwrap();
    let e = reg.add("x", &not_lora, meta(None)).unwrap_err().to_string();
    assert!(
        e.contains("IA3") && e.contains(&not_lora.display().to_string()),
        "{e}"
    );
    let no_weights = peft_dir(src.path(), "c", b"w");
    std::fs::remove_file(no_weights.join(ADAPTER_WEIGHTS)).unwrap();
    let e = reg
        .add("x", &no_weights, meta(None))
        .unwrap_err()
        .to_string();
    assert!(e.contains(ADAPTER_WEIGHTS), "{e}");
    let e = reg
        .add("x", &src.path().join("nowhere"), meta(None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("adapter_config.json"), "{e}");
    assert!(reg.list().unwrap().is_empty(), "nothing half-added");

    reg.add("personal", &good, meta(None)).unwrap();
    let e = reg.resolve("work").unwrap_err().to_string();
    assert!(e.contains("\"work\"") && e.contains("personal"), "{e}");
    let e = reg.resolve("personal@v9").unwrap_err().to_string();
    assert!(e.contains("v9") && e.contains("v1"), "{e}");
    let e = reg.resolve("personal@latest").unwrap_err().to_string();
    assert!(e.contains("latest"), "{e}");
}

#[test]
fn import_records_where_the_adapter_came_from() {
    let home = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let reg = Registry::new(home.path());
    let from_python = peft_dir(src.path(), "peft-out", b"w");
    let v = reg.import("python", &from_python, meta(None)).unwrap();
    let record = reg.meta("python", v).unwrap().registry.unwrap();
    assert_eq!(record.imported_from.as_deref(), Some(from_python.as_path()));
    assert_eq!(reg.history("python").unwrap()[0].action, Action::Imported);
}

#[test]
fn concurrent_writers_get_distinct_versions_and_a_blocked_one_fails_clearly() {
    let home = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let dir = peft_dir(src.path(), "a", &vec![7u8; 1 << 20]);
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (home, dir) = (home.path().to_path_buf(), dir.clone());
            std::thread::spawn(move || {
                let reg = Registry::new(&home);
                (0..3)
                    .map(|_| reg.add("personal", &dir, meta(None)).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all: Vec<Version> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    all.sort();
    assert_eq!(all, (1..=12).map(Version).collect::<Vec<_>>());
    let reg = Registry::new(home.path());
    assert_eq!(reg.versions("personal").unwrap().len(), 12);
    for v in all {
        reg.verify("personal", v).unwrap();
    }

    // A writer that cannot get the lock in time says so and changes nothing.
    let held =
        pai_adapters::RegistryLock::acquire(&home.path().join("adapters/.lock"), Duration::ZERO)
            .unwrap();
    let impatient = Registry::new(home.path()).with_lock_wait(Duration::from_millis(100));
    let e = impatient
        .promote("personal", Version(1), "")
        .unwrap_err()
        .to_string();
    assert!(e.contains("locked by another pai process"), "{e}");
    drop(held);
    assert_eq!(reg.current("personal").unwrap(), None);
    impatient.promote("personal", Version(1), "").unwrap();
}

/// A gate record as `pai-train eval` writes it: a primary suite over notes and code, guards over
/// general text and general code, an info suite (which does not count).
fn gate_with(
    incumbent: &str,
    notes: &str,
    code: &str,
    general: &str,
    general_code: &str,
) -> serde_json::Value {
    let domain =
        |d: &str, s: &str| serde_json::json!({"domain": d, "standing": s, "comparison": {}});
    serde_json::json!({
        "incumbent": incumbent,
        "day": "2026-12-02",
        "decision": {"promote": true, "reasons": [], "suites": [
            {"suite": "perplexity", "role": "primary", "domains": [domain("code", code), domain("notes", notes)]},
            {"suite": "retention", "role": "guard", "domains": [domain("general", general)]},
            {"suite": "retention-code", "role": "guard", "domains": [domain("code", general_code)]},
            {"suite": "recall", "role": "info", "domains": [domain("notes", "worse")]},
        ]},
    })
}

/// `gate_with`, the general-code guard holding.
fn gate(incumbent: &str, notes: &str, code: &str, general: &str) -> serde_json::Value {
    gate_with(incumbent, notes, code, general, "same")
}

/// Two suites measuring one domain (the owner's code in the holdout, general code in a guard):
/// forgetting in either makes it worse; the owner's code improving while general code holds makes it
/// better.
#[test]
fn a_domain_two_suites_measure_is_worse_if_either_forgets_else_better_if_either_gains() {
    use pai_adapters::Standing::{Better, Same, Worse};
    let home = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let reg = Registry::new(home.path());
    for (tag, own, general, expected) in [
        ("a", "better", "same", Better),
        ("b", "better", "worse", Worse),
        ("c", "same", "worse", Worse),
        ("d", "same", "same", Same),
        ("e", "same", "better", Better),
    ] {
        let v = reg
            .add(tag, &peft_dir(src.path(), tag, tag.as_bytes()), meta(None))
            .unwrap();
        reg.record_gate(tag, v, gate_with("base", "same", own, "same", general))
            .unwrap();
        assert_eq!(
            reg.standings(tag, v)["code"],
            expected,
            "{own} and {general}"
        );
    }
}

#[test]
fn standings_follow_the_chain_of_gates_back_to_the_base() {
    use pai_adapters::Standing::{Better, Same, Worse};
    let home = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let reg = Registry::new(home.path());
    let add = |tag: &str| {
        reg.add(
            "personal",
            &peft_dir(src.path(), tag, tag.as_bytes()),
            meta(None),
        )
        .unwrap()
    };
    let (v1, v2, v3) = (add("a"), add("b"), add("c"));
    // Never gated: nothing known.
    assert!(reg.standings("personal", v1).is_empty());
    // v1 against the base: notes better, code the same, general the same.
    reg.record_gate("personal", v1, gate("base", "better", "same", "same"))
        .unwrap();
    let s = reg.standings("personal", v1);
    assert_eq!(
        s.into_iter().collect::<Vec<_>>(),
        [
            ("code".to_string(), Same),
            ("general".to_string(), Same),
            ("notes".to_string(), Better)
        ]
    );
    // v2 against v1: notes the same (so still better than the base), code worse.
    reg.record_gate("personal", v2, gate("personal@v1", "same", "worse", "same"))
        .unwrap();
    let s = reg.standings("personal", v2);
    assert_eq!((s["notes"], s["code"], s["general"]), (Better, Worse, Same));
    // v3 against v2: code better than a worse one says nothing; general worse.
    reg.record_gate(
        "personal",
        v3,
        gate("personal@v2", "better", "better", "worse"),
    )
    .unwrap();
    let s = reg.standings("personal", v3);
    assert_eq!((s["notes"], s["code"], s["general"]), (Better, Same, Worse));
    // A record written before domains were kept reads as nothing known.
    let (v4,) = (add("d"),);
    reg.record_gate(
        "personal",
        v4,
        serde_json::json!({"promote": false, "reasons": ["x"]}),
    )
    .unwrap();
    assert!(reg.standings("personal", v4).is_empty());
}
