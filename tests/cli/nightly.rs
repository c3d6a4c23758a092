//! `pai-train nightly` end to end: a server started before the first night picks up what the night
//! promotes with no restart; a night with nothing new ends at once; a night with new notes promotes a
//! better candidate over the first; a worse candidate is rejected and the server keeps the version it had; a night killed in training is taken up where it stopped;
//! `rollback` restores; `status`, `history`, `config` and `init` say what happened — on the tiny
//! model, every detail and fast (the same story on the real default model: `nightly_default_model`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{json, pond_note as note, start_serve, text, World, TRAIN};

/// The `x-pai-adapter` header of a completion for `model`, or the status line when it failed.
pub(crate) fn served_by(addr: &str, model: &str) -> String {
    let body = format!(r#"{{"model": "{model}", "prompt": "The heron", "max_tokens": 2}}"#);
    let Ok(mut s) = TcpStream::connect(addr) else {
        return "no connection".into();
    };
    let _ = write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines()
        .find_map(|l| l.strip_prefix("x-pai-adapter: "))
        .map(str::to_string)
        .unwrap_or_else(|| out.lines().next().unwrap_or_default().to_string())
}

/// Wait until `model` is served by `want` (the server swaps a promoted version in the background).
pub(crate) fn wait_served(addr: &str, model: &str, want: &str) {
    let started = Instant::now();
    loop {
        let got = served_by(addr, model);
        if got == want {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{model} served by {got}, not {want}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub(crate) fn state_of(home: &Path, id: &str) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(home.join("runs").join(id).join("state.json")).unwrap(),
    )
    .unwrap()
}

/// Start the night `cmd` for `day` and kill it once its training has written a checkpoint; the
/// run's id, its state showing only the ingest stage finished.
pub(crate) fn kill_after_first_checkpoint(mut cmd: Command, home: &Path, day: &str) -> String {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let run_id = loop {
        let runs = pai_pipeline::nightly::runs(&home.join("runs")).unwrap();
        if let Some(r) = runs.iter().find(|r| r.day == day) {
            let ckpt = home
                .join("runs")
                .join(format!("{}-train", r.id))
                .join("checkpoint")
                .join("state.json");
            if ckpt.is_file() {
                break r.id.clone();
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the night ended before it could be killed"
        );
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = state_of(home, &run_id);
    assert_eq!(killed["stages"].as_array().unwrap().len(), 1, "{killed}");
    assert!(killed["finished"].is_null());
    run_id
}

/// A night the gate rejected: exit code 3 for the cron job, and the summary names the version.
pub(crate) fn assert_rejected(out: &Output, version: &str) {
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains(&format!("rejected {version}")),
        "{}",
        text(&out.stdout)
    );
}

/// The killed run `run_id` was taken up by the night that printed `out` (promoted or rejected) and
/// finished its `steps`, with no new run started: `runs` in all.
pub(crate) fn assert_taken_up(home: &Path, run_id: &str, out: &Output, steps: u64, runs: usize) {
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let resumed = state_of(home, run_id);
    assert_eq!(resumed["resumed"], 1, "{resumed}");
    assert!(resumed["finished"].is_string(), "{resumed}");
    assert_eq!(resumed["stages"][1]["result"]["steps"], steps, "{resumed}");
    assert_eq!(
        pai_pipeline::nightly::runs(&home.join("runs"))
            .unwrap()
            .len(),
        runs,
        "taken up, not started anew"
    );
}

#[test]
fn nights_promote_reject_resume_and_the_server_follows() {
    let w = World::new(
        "[ingest]\nholdout_fraction = 0.3\n\n\
         [train]\nseq_len = 64\nbatch_tokens = 128\neval_every = 1000\neval_tokens = 64\n\
         learning_rate = 0.003\nmax_steps = 60\ncheckpoint_every = 5\n\n\
         [nightly]\nmin_new_tokens = 200\nnice = 0\n",
        (0..48).map(note),
    );
    let home = &w.home;
    let source = format!("{}:notes", w.notes.display());
    // And a small code repository beside the notes.
    let repo = w.dir.path().join("pond-tools");
    std::fs::create_dir_all(repo.join("src")).unwrap();
    std::fs::write(
        repo.join("src/count.py"),
        "\"\"\"Count the birds seen at the pond each morning.\"\"\"\n\n\ndef tally(sightings):\n    counts = {}\n    for bird in sightings:\n        counts[bird] = counts.get(bird, 0) + 1\n    return counts\n\n\ndef busiest(counts):\n    return max(counts, key=counts.get)\n",
    )
    .unwrap();
    std::fs::write(repo.join(".gitignore"), "*.pyc\n").unwrap();
    let code = format!("{}:code", repo.display());
    // `pai-train nightly` for `day` over both sources, with `env` on top.
    let night_cmd = |day: &str, env: &[(&str, &str)]| {
        let mut cmd = Command::new(TRAIN);
        cmd.args([
            "nightly", "--source", &source, "--source", &code, "--day", day,
        ])
        .args(["--model", w.model_arg()])
        .env("PAI_HOME", home)
        .env("RUST_BACKTRACE", "0")
        .env_remove("PAI_MODEL");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    };
    let nightly = |day: &str, env: &[(&str, &str)]| night_cmd(day, env).output().unwrap();

    // A server running before the first night, with no adapter yet.
    let mut server = start_serve(&w.model, home);
    let addr = server.addr.clone();
    assert!(served_by(&addr, "personal").contains("404"));

    // Night 1: no incumbent, so the candidate faces the bare base; it learnt the notes: promoted,
    // and the running server serves it.
    let out = nightly("2026-12-01", &[]);
    let said1 = text(&out.stdout);
    assert!(out.status.success(), "{said1}\n{}", text(&out.stderr));
    assert!(said1.contains("promoted v1"), "{said1}");
    assert!(
        said1.contains(" code"),
        "the code repository was ingested too: {said1}"
    );
    wait_served(&addr, "personal", "personal@v1");
    let status = json(&w.pai(&["status", "--json"]));
    assert_eq!(status["adapters"][0]["current"], "v1", "{status}");
    let first = &status["runs"][0];
    assert_eq!(first["outcome"]["kind"], "promoted", "{status}");
    let stages: Vec<&str> = first["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["ingest", "train", "eval", "gate", "report"]);
    let page = first["stages"][4]["result"]["page"].as_str().unwrap();
    assert!(Path::new(page).is_file(), "{page}");

    // The same night again: nothing new, ended at once.
    let out = nightly("2026-12-01", &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("nothing new to learn"),
        "{}",
        text(&out.stdout)
    );

    // Night 2: notes of a new kind (the garden at dusk) and an edited pond note: the candidate knows
    // both (and trained longer, on more), v1 only the pond: promoted, and the server swaps it in.
    for i in 0..48 {
        let animals = ["fox", "badger", "hedgehog", "owl"];
        std::fs::write(
            w.notes.join(format!("g{i}.md")),
            format!(
                "# Garden log {i}\n\nAt dusk the {} crossed the lawn and slipped under the hedge.\n",
                animals[i % animals.len()]
            ),
        )
        .unwrap();
    }
    std::fs::write(
        w.notes.join("n0.md"),
        "# Pond log 0\n\nThe heron stood in the shallows all morning.\n",
    )
    .unwrap();
    let out = nightly(
        "2026-12-02",
        &[
            ("PAI_TRAIN_MAX_STEPS", "150"),
            ("PAI_TRAIN_LEARNING_RATE", "0.0015"),
        ],
    );
    let said2 = text(&out.stdout);
    assert!(out.status.success(), "{said2}\n{}", text(&out.stderr));
    assert!(said2.contains("promoted v2"), "{said2}");
    assert!(said2.contains("against personal@v1"), "{said2}");
    wait_served(&addr, "personal", "personal@v2");

    // Night 3: new notes, but a candidate trained 2 steps against v2's 60: the gate rejects it, the
    // server keeps v2 (exit code 3 for the cron job).
    for i in 48..64 {
        let (name, body) = note(i);
        std::fs::write(w.notes.join(name), body).unwrap();
    }
    assert_rejected(
        &nightly("2026-12-03", &[("PAI_TRAIN_MAX_STEPS", "2")]),
        "v3",
    );
    assert_eq!(served_by(&addr, "personal"), "personal@v2");

    // Night 4, killed while training (after its first checkpoint); the next invocation takes the
    // same run up where it stopped and finishes it.
    for i in 64..80 {
        let (name, body) = note(i);
        std::fs::write(w.notes.join(name), body).unwrap();
    }
    let run_id = kill_after_first_checkpoint(
        night_cmd("2026-12-04", &[("PAI_TRAIN_MAX_STEPS", "2000")]),
        home,
        "2026-12-04",
    );
    assert_taken_up(home, &run_id, &nightly("2026-12-04", &[]), 2000, 5);
    let metrics = std::fs::read_to_string(
        home.join("runs")
            .join(format!("{run_id}-train"))
            .join("metrics.jsonl"),
    )
    .unwrap();
    assert!(metrics.lines().count() > 1);

    // Rollback serves the version the current one replaced: v1 when night 4 was rejected, v2 when it
    // was promoted.
    let status = json(&w.pai(&["status", "--json"]));
    let current = status["adapters"][0]["current"]
        .as_str()
        .unwrap()
        .to_string();
    let previous = if current == "v2" { "v1" } else { "v2" };
    let out = w.pai(&["rollback", "personal"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_served(&addr, "personal", &format!("personal@{previous}"));

    // Night 5 with a training time budget of 2 s: training stops at a checkpoint, and the run still
    // evaluates and decides.
    std::fs::write(
        w.notes.join("g0.md"),
        "# Garden log 0\n\nAt dusk the fox sat by the pond.\n",
    )
    .unwrap();
    let out = nightly(
        "2026-12-05",
        &[
            ("PAI_TRAIN_MAX_STEPS", "100000"),
            ("PAI_TRAIN_TIME_BUDGET_S", "2"),
        ],
    );
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{}",
        text(&out.stderr)
    );
    let status = json(&w.pai(&["status", "--json"]));
    let fifth = &status["runs"][0];
    assert_eq!(fifth["day"], "2026-12-05", "{fifth}");
    assert_eq!(
        fifth["stages"][1]["result"]["stop"], "time_budget",
        "{fifth}"
    );
    assert_eq!(fifth["stages"].as_array().unwrap().len(), 5, "{fifth}");
    assert!(fifth["finished"].is_string(), "{fifth}");

    // History: every night, newest first.
    let history = text(&w.pai(&["history"]).stdout);
    assert_eq!(
        history
            .lines()
            .filter(|l| l.starts_with("nightly-"))
            .count(),
        6,
        "{history}"
    );
    assert!(history.contains("6 runs, "), "{history}");

    let _ = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status();
    assert!(server.child.wait().unwrap().success());
}

#[test]
fn config_show_check_and_init() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let notes = dir.path().join("notes");
    std::fs::create_dir_all(&notes).unwrap();
    let pai = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(TRAIN);
        cmd.args(args)
            .env("PAI_HOME", &home)
            .env_remove("PAI_MODEL")
            .env("RUST_BACKTRACE", "0");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let source = format!("{}:notes", notes.display());
    let out = pai(&["init", "--source", &source], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let written = std::fs::read_to_string(home.join("pai.toml")).unwrap();
    assert!(
        written.contains("[[sources]]") && written.contains("# Projections"),
        "{written}"
    );
    let again = pai(&["init"], &[]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("--force"),
        "{}",
        text(&again.stderr)
    );

    let shown = text(&pai(&["config", "show"], &[("PAI_TRAIN_R", "8")]).stdout);
    assert!(shown.contains("r = 8  # $PAI_TRAIN_R"), "{shown}");
    assert!(
        shown.contains(&format!("path = \"{}\"", notes.display())),
        "{shown}"
    );
    let ok = pai(&["config", "check"], &[]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));

    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(home.join("pai.toml"))
        .unwrap();
    writeln!(f, "\n[schedule]\ncron = \"whenever\"").unwrap();
    // A table given twice is a TOML error that names the file.
    let bad = pai(&["config", "check"], &[]);
    assert!(!bad.status.success());
    let e = text(&bad.stderr);
    assert!(e.contains("pai.toml"), "{e}");
    std::fs::write(
        home.join("pai.toml"),
        format!(
            "[mix]\nreplay_share = 2.0\n\n[[sources]]\npath = \"{}\"\nkind = \"notes\"\n",
            notes.display()
        ),
    )
    .unwrap();
    let bad = pai(&["config", "check"], &[("PAI_SCHEDULE_CRON", "whenever")]);
    assert!(!bad.status.success());
    let e = text(&bad.stderr);
    assert!(
        e.contains("mix.replay_share = 2")
            && e.contains("schedule.cron")
            && e.contains("$PAI_SCHEDULE_CRON"),
        "{e}"
    );
    let nightly = pai(&["nightly"], &[("PAI_SCHEDULE_CRON", "whenever")]);
    assert_eq!(nightly.status.code(), Some(2), "{}", text(&nightly.stderr));

    let crontab = text(&pai(&["schedule", "--print-crontab"], &[]).stdout);
    assert!(crontab.starts_with("30 2 * * * PAI_HOME="), "{crontab}");
    assert!(crontab.contains("pai-train nightly"), "{crontab}");
}

#[test]
fn a_busy_machine_is_waited_for_then_the_night_is_given_up() {
    // The one-minute load while the test binaries run is above this (if the machine were somehow
    // perfectly idle, the night would start: say so and stop rather than run a whole night).
    let load: f64 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    if load == 0.0 {
        eprintln!("load average 0 (or no /proc/loadavg): nothing to check");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let notes = dir.path().join("notes");
    std::fs::create_dir_all(&notes).unwrap();
    let home = dir.path().join("home");
    let out = Command::new(TRAIN)
        .args(["nightly", "--source", &format!("{}:notes", notes.display())])
        .env("PAI_HOME", &home)
        .env("PAI_NIGHTLY_IDLE_MAX_LOAD", "0.000001")
        .env("PAI_NIGHTLY_IDLE_WAIT_MIN", "0")
        .env("RUST_BACKTRACE", "0")
        .env_remove("PAI_MODEL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains("the machine is busy"), "{said}");
    // No run was started.
    let runs: Vec<_> = std::fs::read_dir(home.join("runs"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        !runs
            .iter()
            .any(|n| n.to_string_lossy().starts_with("nightly-")),
        "{runs:?}"
    );
}

#[test]
fn the_scheduler_runs_the_night_as_a_process_when_its_time_comes() {
    let w = World::new("", (0..3).map(note));
    // A schedule every two seconds, the tiny model and the notes from pai.toml.
    std::fs::write(
        w.home.join("pai.toml"),
        format!(
            "model = {:?}\n\n[nightly]\nnice = 0\n\n[schedule]\ncron = \"*/2 * * * * *\"\n\n\
             [[sources]]\npath = {:?}\nkind = \"notes\"\n",
            w.model_arg(),
            w.notes.to_str().unwrap()
        ),
    )
    .unwrap();
    let mut child = Command::new(TRAIN)
        .arg("schedule")
        .env("PAI_HOME", &w.home)
        .env("RUST_BACKTRACE", "0")
        .env_remove("PAI_MODEL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let ended = loop {
        let mut line = String::new();
        if said.read_line(&mut line).unwrap_or(0) == 0 || Instant::now() > deadline {
            break None;
        }
        log.push_str(&line);
        if let Some(code) = line.split("the nightly run ended with exit code ").nth(1) {
            break Some(code.trim().to_string());
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    // Three short notes are less than [nightly] min_new_tokens: the night ingests, trains nothing,
    // and ends well (exit 0).
    assert_eq!(ended.as_deref(), Some("0"), "{log}");
    assert!(
        log.contains("next run at") && log.contains("starting the nightly run"),
        "{log}"
    );
    let history = w.pai(&["history", "--json"]);
    assert!(history.status.success(), "{}", text(&history.stderr));
    let runs = json(&history);
    assert_eq!(runs.as_array().map(Vec::len), Some(1), "{runs}");
    assert!(!runs[0]["outcome"].is_null(), "the night finished: {runs}");
    let schedule: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.home.join("runs").join("schedule.json")).unwrap())
            .unwrap();
    assert!(!schedule.as_object().unwrap().is_empty(), "{schedule}");
}
