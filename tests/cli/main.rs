//! End to end: the `pai-serve` and `pai-train` binaries as a user runs them, on the real default model
//! (installed by scripts/fetch-model.sh) and on a tiny random model written here.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

mod adapters;
mod evals;
mod ingest;
mod model;
mod nightly;
mod nightly_default_model;
mod router;
mod serve;
mod train;

use candle_core::quantized::GgmlDType;
use pai_model::testing::{TinyModel, TinySpec};

pub fn pai_home() -> PathBuf {
    std::env::var_os("PAI_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".pai"))
}

pub fn run(bin: &str, args: &[&str], stdin: Option<&str>, env: &[(&str, &Path)]) -> Output {
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

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn tiny_model(dir: &Path) -> PathBuf {
    TinyModel::new(TinySpec::default())
        .unwrap()
        .write_gguf(&dir.join("tiny.gguf"), GgmlDType::Q8_0)
        .unwrap()
}

pub const SERVE: &str = env!("CARGO_BIN_EXE_pai-serve");

/// A temporary world for pai-train: a tiny model, a `PAI_HOME` whose pai.toml is `toml`, and a notes
/// folder holding `notes` (file name, text).
pub struct World {
    pub dir: tempfile::TempDir,
    pub model: PathBuf,
    pub home: PathBuf,
    pub notes: PathBuf,
}

impl World {
    pub fn new(toml: &str, notes: impl IntoIterator<Item = (String, String)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model(dir.path());
        let (home, notes_dir) = (dir.path().join("home"), dir.path().join("notes"));
        for d in [&home, &notes_dir] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(home.join("pai.toml"), toml).unwrap();
        for (name, text) in notes {
            std::fs::write(notes_dir.join(name), text).unwrap();
        }
        Self {
            dir,
            model,
            home,
            notes: notes_dir,
        }
    }

    /// `pai-train ARGS` with this world's `PAI_HOME`.
    pub fn pai(&self, args: &[&str]) -> Output {
        run(TRAIN, args, None, &[("PAI_HOME", self.home.as_path())])
    }

    pub fn model_arg(&self) -> &str {
        self.model.to_str().unwrap()
    }

    /// Ingest the notes folder for `day`.
    pub fn ingest(&self, day: &str) {
        let notes = format!("{}:notes", self.notes.display());
        let out = self.pai(&[
            "ingest",
            "--source",
            &notes,
            "--day",
            day,
            "--model",
            self.model_arg(),
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
}

/// Note `i` of a pond log: which bird came at dawn (a tiny model learns these within a minute).
pub fn pond_note(i: usize) -> (String, String) {
    let birds = [
        "heron",
        "egret",
        "kingfisher",
        "grebe",
        "coot",
        "moorhen",
        "teal",
        "swan",
    ];
    (
        format!("n{i}.md"),
        format!(
            "# Pond log {i}\n\nThe {} came to the pond at dawn and waited by the reeds for fish.\n",
            birds[i % birds.len()]
        ),
    )
}

/// A successful command's standard output as JSON.
pub fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_str(text(&out.stdout).trim()).unwrap()
}
pub const TRAIN: &str = env!("CARGO_BIN_EXE_pai-train");

/// A running `pai-serve serve` (killed when dropped).
pub struct Server {
    pub child: Child,
    pub addr: String,
    /// What it said on standard error up to listening.
    pub said: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pai-serve serve` on a free loopback port with `home`, once it listens.
pub fn start_serve(model: &Path, home: &Path) -> Server {
    let child = Command::new(SERVE)
        .args(["serve", "--port", "0", "--model", model.to_str().unwrap()])
        .env("PAI_HOME", home)
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Owned by the guard from here, so it is killed and waited for whatever happens.
    let mut server = Server {
        child,
        addr: String::new(),
        said: String::new(),
    };
    let mut stderr = BufReader::new(server.child.stderr.take().unwrap());
    loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "exited: {}",
            server.said
        );
        server.said.push_str(&line);
        if let Some(rest) = line.split("listening on http://").nth(1) {
            server.addr = rest.split_whitespace().next().unwrap().to_string();
            // Keep draining its log so it never blocks on a full pipe.
            std::thread::spawn(move || for _ in stderr.lines() {});
            return server;
        }
    }
}
