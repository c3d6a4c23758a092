//! The nightly loop on the real default model with the quick start's settings (examples/notes.env):
//! the story of `nightly` — promote, nothing new, promote over the incumbent, reject, kill and
//! resume, rollback, a server following along — with the model and the corpus a new user starts with.

use std::path::Path;
use std::process::Command;

use crate::nightly::{
    assert_rejected, assert_taken_up, kill_after_first_checkpoint, served_by, wait_served,
};
use crate::{json, start_serve, text, TRAIN};

fn json_file(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A note of `sections` dated log entries about the pond, varied enough that ingest keeps each one
/// (no near-duplicates) and alike enough that an adapter trained on some predicts the rest.
fn pond_log(title: &str, seed: usize, sections: usize) -> String {
    let birds = [
        "heron",
        "kingfisher",
        "moorhen",
        "little grebe",
        "mallard",
        "coot",
        "grey wagtail",
    ];
    let places = [
        "east bank",
        "reed bed",
        "willow stump",
        "shallows by the sluice",
        "island",
    ];
    let weather = [
        "mist",
        "light rain",
        "a hard frost",
        "low sun",
        "a north wind",
        "drizzle",
    ];
    let doing = [
        "fishing without moving for ten minutes",
        "chasing another off the territory",
        "preening on a half-sunk branch",
        "diving twice and coming up empty",
        "calling from cover",
    ];
    let mut text = format!("# {title}\n\n");
    for i in 0..sections {
        let k = seed * 31 + i * 7;
        text += &format!(
            "## {:02} November\n\nAt {:02}:{:02}, in {}, a {} on the {}, {}. The gauge read {} cm and \
             the water was {}. Counted {} {}s and {} {}s before the path flooded near the {}. \
             Feeder refilled with {} scoops; next check on day {}.\n\n",
            1 + i % 28,
            6 + k % 3,
            (k * 13) % 60,
            weather[k % weather.len()],
            birds[k % birds.len()],
            places[(k / 2) % places.len()],
            doing[(k / 3) % doing.len()],
            10 + (k * 7) % 25,
            ["clear", "cloudy", "green", "brown after the rain"][k % 4],
            2 + k % 9,
            birds[(k + 2) % birds.len()],
            1 + k % 4,
            birds[(k + 4) % birds.len()],
            places[(k + 1) % places.len()],
            1 + k % 3,
            1 + (i + 5) % 28,
        );
    }
    text
}

/// The nightly loop on the real default model, with the quick start's settings (examples/notes.env)
/// over a copy of the ten example notes: a server started before the first night serves each
/// promoted version with no restart; night 1 learns the notes and is promoted against the bare base;
/// the same night again finds nothing new; night 2, with new logs and an edited note, promotes a
/// candidate that beats v1; night 3's candidate, trained one step, is rejected while the server keeps
/// v2; night 4, killed after its first checkpoint, is taken up and finished by the next invocation;
/// `rollback` serves the version before.
#[test]
fn the_default_model_nights_promote_reject_resume_and_roll_back() {
    let model = crate::pai_home().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let notes = dir.path().join("notes");
    std::fs::create_dir_all(&notes).unwrap();
    for entry in std::fs::read_dir(root.join("examples/notes")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, notes.join(path.file_name().unwrap())).unwrap();
    }
    let settings = std::fs::read_to_string(root.join("examples/notes.env")).unwrap();
    let quick_start: Vec<(String, String)> = settings
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let command = |args: &[&str], extra: &[(&str, &str)]| {
        let mut cmd = Command::new(TRAIN);
        cmd.args(args)
            .env("PAI_HOME", &home)
            .env_remove("PAI_MODEL")
            .env("RUST_BACKTRACE", "0");
        for (k, v) in &quick_start {
            cmd.env(k, v);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd
    };
    let pai = |args: &[&str]| command(args, &[]).output().unwrap();
    let m = model.to_str().unwrap();
    let night_cmd = |day: &str, extra: &[(&str, &str)]| {
        command(&["nightly", "--day", day, "--model", m], extra)
    };
    let night = |day: &str, extra: &[(&str, &str)]| night_cmd(day, extra).output().unwrap();
    let out = pai(&["init", "--source", &format!("{}:notes", notes.display())]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let mut server = start_serve(&model, &home);
    let addr = server.addr.clone();
    assert!(served_by(&addr, "personal").contains("404"));

    // Night 1: the quick start's night. No incumbent: against the bare base.
    let out = night("2026-12-01", &[]);
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}\n{}", text(&out.stderr));
    assert!(said.contains("promoted v1"), "{said}");
    let state: serde_json::Value = json(&pai(&["status", "--json"]));
    let run = &state["runs"][0];
    assert_eq!(run["stages"][2]["result"]["incumbent"], "base", "{run}");
    assert_eq!(run["stages"][2]["result"]["pass"], true, "{run}");
    wait_served(&addr, "personal", "personal@v1");
    let out = night("2026-12-01", &[]);
    assert!(
        text(&out.stdout).contains("nothing new to learn"),
        "{}",
        text(&out.stdout)
    );

    // Night 2: six new logs of the pond and an edited note. The owner has switched to the
    // `continue` strategy (v1 goes on learning: the bare-base `fresh` candidate, diluted over old and
    // new notes, loses on the old ones what it gains on the new) at a gentler learning rate. v1 has
    // never seen the logs: the candidate is better on them, promoted, and the server swaps it in.
    for n in 1..=6 {
        std::fs::write(
            notes.join(format!("pond-log-{n}.md")),
            pond_log(&format!("Pond log {n}"), n, 4),
        )
        .unwrap();
    }
    let mut bees = std::fs::read_to_string(notes.join("bees.md")).unwrap();
    bees += "\n## Autumn\n\nHive A went into winter on 21 kg of stores; Hive B on 17 kg, fed 2 kg of fondant.\n";
    std::fs::write(notes.join("bees.md"), bees).unwrap();
    let out = night(
        "2026-12-02",
        &[
            ("PAI_TRAIN_STRATEGY", "continue"),
            ("PAI_TRAIN_LEARNING_RATE", "0.0002"),
            ("PAI_TRAIN_EPOCHS", "2"),
        ],
    );
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}\n{}", text(&out.stderr));
    assert!(said.contains("promoted v2"), "{said}");
    assert!(said.contains("against personal@v1"), "{said}");
    wait_served(&addr, "personal", "personal@v2");
    // The trainer measured forgetting exactly as the gate's retention guards (prose and code) then
    // did: the same losses under v1 and under the candidate it shipped.
    let trained = json_file(&home.join("adapters/personal/v2/pai.json"));
    let state: serde_json::Value = json(&pai(&["status", "--json"]));
    let eval_run = state["runs"][0]["stages"][2]["result"]["run"]
        .as_str()
        .expect("the eval stage's run")
        .to_string();
    let gate = json_file(&home.join("runs").join(eval_run).join("eval.json"));
    let m = &trained["metrics"];
    for suite in ["retention", "retention-code"] {
        let guard = gate["decision"]["suites"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["suite"] == suite))
            .unwrap_or_else(|| panic!("the {suite} guard's verdict"))["comparison"]
            .clone();
        for (trainer, gate) in [
            (&m["reference_retention_loss"][suite], &guard["incumbent"]),
            (&m["best_retention_loss"][suite], &guard["candidate"]),
        ] {
            let (t, g) = (trainer.as_f64().unwrap(), -gate.as_f64().unwrap());
            assert!(
                (t - g).abs() < 1e-6,
                "{suite}: trainer {t} vs gate {g}: {m} / {guard}"
            );
        }
    }

    // Night 3: more of the log, but a candidate trained a single step: rejected (exit code 3), and
    // the server keeps v2.
    std::fs::write(notes.join("pond-log-7.md"), pond_log("Pond log 7", 7, 14)).unwrap();
    assert_rejected(&night("2026-12-03", &[("PAI_TRAIN_MAX_STEPS", "1")]), "v3");
    assert_eq!(served_by(&addr, "personal"), "personal@v2");

    // Night 4, killed after its first checkpoint; the next invocation takes it up and finishes it.
    std::fs::write(notes.join("pond-log-8.md"), pond_log("Pond log 8", 8, 14)).unwrap();
    let four = [
        ("PAI_TRAIN_MAX_STEPS", "8"),
        ("PAI_TRAIN_CHECKPOINT_EVERY", "2"),
    ];
    let run_id = kill_after_first_checkpoint(night_cmd("2026-12-04", &four), &home, "2026-12-04");
    assert_taken_up(&home, &run_id, &night("2026-12-04", &four), 8, 5);

    // Rollback serves the version the current one replaced.
    let status = json(&pai(&["status", "--json"]));
    let current = status["adapters"][0]["current"]
        .as_str()
        .unwrap()
        .to_string();
    let previous = if current == "v2" { "v1" } else { "v2" };
    let out = pai(&["rollback", "personal"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_served(&addr, "personal", &format!("personal@{previous}"));

    let _ = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status();
    assert!(server.child.wait().unwrap().success());
}
