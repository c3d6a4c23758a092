//! Finding a source's files and reading them safely.
//!
//! Walking uses the `ignore` crate, so `.gitignore`, `.ignore` and hidden files are honoured as git and
//! ripgrep honour them. Then each file passes the checks that keep junk and secrets out: the source's
//! globs, a size limit, known file types, no lockfiles, vendored, generated or minified code, no
//! secret-bearing files (`.env`, private keys). Reading checks for binary content and UTF-8, and that the
//! file did not change while it was read. Nothing here aborts an ingest: each refusal is a
//! `SkipReason`, counted in the summary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::Serialize;

use crate::source::{Source, SourceKind};

/// Why a file was not ingested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// Not a notes or code file type pai knows.
    FileType,
    /// Filtered out by the source's include/exclude globs.
    Glob,
    TooLarge,
    Binary,
    InvalidUtf8,
    Unreadable,
    /// A directory entry the walk could not follow (a symlink loop, a permission error).
    WalkError,
    /// Modified while being read; it is picked up by the next ingest.
    ChangedWhileReading,
    Lockfile,
    Vendored,
    Generated,
    Minified,
    /// `.env` files, private keys and other files that exist to hold secrets.
    SecretsFile,
    /// Frontmatter `pai: exclude`, or a source with privacy `exclude`.
    Excluded,
}

impl SkipReason {
    pub fn describe(self) -> &'static str {
        match self {
            SkipReason::FileType => "not a notes or code file type",
            SkipReason::Glob => "left out by include/exclude globs",
            SkipReason::TooLarge => "over the size limit",
            SkipReason::Binary => "binary",
            SkipReason::InvalidUtf8 => "not valid UTF-8",
            SkipReason::Unreadable => "unreadable",
            SkipReason::WalkError => "could not be walked (symlink loop, permissions)",
            SkipReason::ChangedWhileReading => "changed while being read",
            SkipReason::Lockfile => "lockfile",
            SkipReason::Vendored => "vendored or dependency directory",
            SkipReason::Generated => "generated code",
            SkipReason::Minified => "minified",
            SkipReason::SecretsFile => "holds secrets (.env, keys)",
            SkipReason::Excluded => "excluded by frontmatter or source privacy",
        }
    }
}

/// A file the walk found, before it is read.
#[derive(Debug, Clone)]
pub struct FoundFile {
    pub path: PathBuf,
    /// Relative to the source root, with `/` separators.
    pub relative: String,
    pub size: u64,
    /// Modification time in nanoseconds since the epoch (0 when the OS does not say).
    pub mtime_ns: u128,
}

/// What walking a source produced.
#[derive(Debug, Default)]
pub struct Walk {
    pub files: Vec<FoundFile>,
    pub skipped: BTreeMap<SkipReason, usize>,
}

const NOTE_EXTENSIONS: &[&str] = &["md", "markdown", "mdown", "txt", "org", "text"];
const LOCKFILES: &[&str] = &[
    "cargo.lock",
    "package-lock.json",
    "npm-shrinkwrap.json",
    "yarn.lock",
    "pnpm-lock.yaml",
    "poetry.lock",
    "pipfile.lock",
    "uv.lock",
    "gemfile.lock",
    "composer.lock",
    "go.sum",
    "flake.lock",
    "podfile.lock",
    "mix.lock",
    "pubspec.lock",
];
const VENDORED_DIRS: &[&str] = &[
    "node_modules",
    "vendor",
    "third_party",
    "third-party",
    "thirdparty",
    "external",
    "bower_components",
    "site-packages",
    "__pycache__",
    "target",
    "dist",
    "build",
    ".venv",
    "venv",
];
const SECRET_FILE_EXTENSIONS: &[&str] = &["pem", "key", "p12", "pfx", "jks", "keystore", "ppk"];
const SECRET_FILE_NAMES: &[&str] = &[
    "id_rsa",
    "id_dsa",
    "id_ecdsa",
    "id_ed25519",
    ".netrc",
    ".pgpass",
    ".npmrc",
    ".pypirc",
    "credentials",
    ".git-credentials",
    ".htpasswd",
];

/// Walk a source, applying every check that needs only the path and size.
pub fn walk(source: &Source) -> Walk {
    let mut out = Walk::default();
    let walker = ignore::WalkBuilder::new(&source.root)
        .hidden(true)
        .git_ignore(true)
        .git_exclude(true)
        .ignore(true)
        .parents(false)
        .require_git(false)
        .follow_links(true)
        .build();
    for entry in walker {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(source = %source.name, error = %e, "walk error");
                *out.skipped.entry(SkipReason::WalkError).or_default() += 1;
                continue;
            }
        };
        if !entry.file_type().is_some_and(|t| t.is_file()) {
            continue;
        }
        let path = entry.path();
        let Ok(rel) = path.strip_prefix(&source.root) else {
            continue;
        };
        let relative = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        if let Some(reason) = path_check(source, rel) {
            *out.skipped.entry(reason).or_default() += 1;
            continue;
        }
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(_) => {
                *out.skipped.entry(SkipReason::Unreadable).or_default() += 1;
                continue;
            }
        };
        if meta.len() > source.max_file_size {
            *out.skipped.entry(SkipReason::TooLarge).or_default() += 1;
            continue;
        }
        out.files.push(FoundFile {
            path: path.to_path_buf(),
            relative,
            size: meta.len(),
            mtime_ns: mtime_ns(&meta),
        });
    }
    out.files.sort_by(|a, b| a.relative.cmp(&b.relative));
    out
}

fn mtime_ns(meta: &std::fs::Metadata) -> u128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos())
}

/// The checks that need only the relative path: globs, secrets files, file type, lockfiles, vendored
/// directories, minified names.
fn path_check(source: &Source, rel: &Path) -> Option<SkipReason> {
    if !source.wants(rel) {
        return Some(SkipReason::Glob);
    }
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let ext = rel
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if name == ".env"
        || name.starts_with(".env.")
        || ext == "env"
        || SECRET_FILE_NAMES.contains(&name.as_str())
        || SECRET_FILE_EXTENSIONS.contains(&ext.as_str())
    {
        return Some(SkipReason::SecretsFile);
    }
    match source.kind {
        SourceKind::Notes => {
            (!NOTE_EXTENSIONS.contains(&ext.as_str())).then_some(SkipReason::FileType)
        }
        SourceKind::Chat => (ext != "jsonl").then_some(SkipReason::FileType),
        SourceKind::Code => {
            if LOCKFILES.contains(&name.as_str()) {
                return Some(SkipReason::Lockfile);
            }
            let parents = rel.parent().into_iter().flat_map(|p| p.components());
            if parents
                .map(|c| c.as_os_str().to_string_lossy().to_lowercase())
                .any(|c| VENDORED_DIRS.contains(&c.as_str()))
            {
                return Some(SkipReason::Vendored);
            }
            if name.contains(".min.") || name.ends_with(".bundle.js") || name.ends_with(".map") {
                return Some(SkipReason::Minified);
            }
            if crate::code::Language::from_path(rel).is_none() {
                return Some(SkipReason::FileType);
            }
            None
        }
    }
}

/// Read a found file as text, or say why not.
pub fn read_text(file: &FoundFile, kind: SourceKind) -> Result<String, SkipReason> {
    let bytes = std::fs::read(&file.path).map_err(|_| SkipReason::Unreadable)?;
    // Changed while read: the size or mtime now differ from what the walk saw.
    let now = std::fs::metadata(&file.path).map_err(|_| SkipReason::Unreadable)?;
    if bytes.len() as u64 != file.size || now.len() != file.size || mtime_ns(&now) != file.mtime_ns
    {
        return Err(SkipReason::ChangedWhileReading);
    }
    if bytes[..bytes.len().min(8192)].contains(&0) {
        return Err(SkipReason::Binary);
    }
    let text = String::from_utf8(bytes).map_err(|_| SkipReason::InvalidUtf8)?;
    if kind == SourceKind::Code {
        if is_generated(&text) {
            return Err(SkipReason::Generated);
        }
        if is_minified(&text) {
            return Err(SkipReason::Minified);
        }
    }
    Ok(text)
}

/// The markers code generators leave in their first lines.
fn is_generated(text: &str) -> bool {
    text.lines().take(8).any(|l| {
        let l = l.to_ascii_lowercase();
        l.contains("@generated")
            || l.contains("do not edit")
            || l.contains("auto-generated")
            || l.contains("autogenerated")
            || l.contains("generated by")
    })
}

/// Minified: long lines with little whitespace.
fn is_minified(text: &str) -> bool {
    let lines = text.lines().count().max(1);
    let longest = text.lines().map(str::len).max().unwrap_or(0);
    longest > 5000 || (text.len() / lines > 300 && text.len() > 2000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{resolve_sources, SourceConfig};

    fn source(dir: &Path, kind: &str) -> Source {
        let arg = format!("{}:{kind}", dir.display());
        resolve_sources(&[SourceConfig::from_arg(&arg).unwrap()])
            .unwrap()
            .remove(0)
    }

    #[test]
    fn junk_and_secrets_files_are_skipped_by_reason() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let write = |rel: &str, bytes: &[u8]| {
            let p = d.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
        };
        write("src/main.rs", b"fn main() {}\n");
        write("src/gen.rs", b"// @generated by build.rs\nfn x() {}\n");
        write("Cargo.lock", b"# lock\n");
        write("vendor/lib/x.c", b"int x;\n");
        write("web/app.min.js", b"var a=1;\n");
        write("web/big.js", &[b'a'; 6000]);
        write("key.pem", b"-----BEGIN PRIVATE KEY-----\n");
        write("config/.env.local", b"TOKEN=1\n");
        write("image.png", b"\x89PNG\0\0");
        write("data.bin.rs", b"fn a() {}\0\0");
        write("latin1.py", b"x = '\xe9'\n");
        write(".gitignore", b"ignored.rs\n");
        write("ignored.rs", b"fn ignored() {}\n");
        let s = source(d, "code");
        let w = walk(&s);
        let mut read = BTreeMap::<SkipReason, usize>::new();
        let mut ok = Vec::new();
        for f in &w.files {
            match read_text(f, s.kind) {
                Ok(_) => ok.push(f.relative.clone()),
                Err(r) => *read.entry(r).or_default() += 1,
            }
        }
        assert_eq!(ok, ["src/main.rs"]);
        let count = |m: &BTreeMap<SkipReason, usize>, r| m.get(&r).copied().unwrap_or(0);
        assert_eq!(count(&w.skipped, SkipReason::Lockfile), 1);
        assert_eq!(count(&w.skipped, SkipReason::Vendored), 1);
        assert_eq!(count(&w.skipped, SkipReason::Minified), 1);
        assert_eq!(
            count(&w.skipped, SkipReason::SecretsFile),
            1,
            "{:?}",
            w.skipped
        );
        assert_eq!(count(&w.skipped, SkipReason::FileType), 1);
        assert_eq!(count(&read, SkipReason::Generated), 1);
        assert_eq!(count(&read, SkipReason::Minified), 1);
        assert_eq!(count(&read, SkipReason::Binary), 1);
        assert_eq!(count(&read, SkipReason::InvalidUtf8), 1);
    }

    #[cfg(unix)]
    #[test]
    fn symlink_loops_are_counted_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("a")).unwrap();
        std::fs::write(d.join("a/note.md"), "# hi\n").unwrap();
        std::os::unix::fs::symlink(d.join("a"), d.join("a/loop")).unwrap();
        let w = walk(&source(d, "notes"));
        assert_eq!(w.files.len(), 1);
        assert_eq!(w.skipped.get(&SkipReason::WalkError), Some(&1));
    }
}
