//! Where notes, code and conversations come from: the `[[sources]]` of `pai.toml`, and
//! `--source DIR[:notes|code|chat]` on the command line. Parsed and checked once here; the rest of the
//! crate sees only `Source`.

use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

use crate::error::{DatasetError, Result};

/// What a source holds, which decides how its files are split into examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Markdown (Obsidian-style), org and plain-text notes.
    Notes,
    /// Source code in a git working tree.
    Code,
    /// Conversations to learn replies from: JSON Lines files, one `{"messages": [...]}` per line
    /// (OpenAI's fine-tuning format), the loss on assistant replies only.
    Chat,
}

/// How private a source is. A note's frontmatter can raise it (`private: true`, `pai: exclude`), never
/// lower it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Privacy {
    /// Trained on; a request quoting it may go to a cloud model with its secrets and personal data
    /// replaced by placeholders, restored in the answer (the router's redact mode `shareable`;
    /// recorded in the shareable index). Text from other sources that carries either stays local.
    Shareable,
    /// Trained on; may be quoted to a cloud model by the router when it carries no secret or
    /// personal data.
    #[default]
    Normal,
    /// Trained on; recorded in the privacy index, so requests that contain it stay local.
    Private,
    /// Never ingested.
    Exclude,
}

/// One `[[sources]]` entry as written in `pai.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub path: PathBuf,
    pub kind: SourceKind,
    /// A stable name for the journal and the dataset's `source` column; the directory's name by default.
    #[serde(default)]
    pub name: Option<String>,
    /// Globs (relative to `path`) a file must match to be read; everything when empty.
    #[serde(default)]
    pub include: Vec<String>,
    /// Globs (relative to `path`) of files to leave out.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Files larger than this many bytes are skipped.
    #[serde(default = "default_max_file_size")]
    pub max_file_size: u64,
    #[serde(default)]
    pub privacy: Privacy,
}

fn default_max_file_size() -> u64 {
    1 << 20
}

impl SourceConfig {
    /// `DIR`, `DIR:notes`, `DIR:code` or `DIR:chat` from the command line (notes when no kind is given).
    pub fn from_arg(arg: &str) -> Result<Self> {
        let (path, kind) = match arg.rsplit_once(':') {
            Some((p, "notes")) => (p, SourceKind::Notes),
            Some((p, "code")) => (p, SourceKind::Code),
            Some((p, "chat")) => (p, SourceKind::Chat),
            Some((_, other)) if !other.contains('/') && !other.contains('\\') => {
                return Err(DatasetError::BadSource {
                    index: 0,
                    field: "kind",
                    value: other.to_string(),
                    reason: "expected DIR, DIR:notes, DIR:code or DIR:chat".into(),
                })
            }
            _ => (arg, SourceKind::Notes),
        };
        Ok(Self {
            path: PathBuf::from(path),
            kind,
            name: None,
            include: Vec::new(),
            exclude: Vec::new(),
            max_file_size: default_max_file_size(),
            privacy: Privacy::Normal,
        })
    }
}

/// A checked source, ready to walk.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub root: PathBuf,
    pub kind: SourceKind,
    pub max_file_size: u64,
    pub privacy: Privacy,
    include: Option<GlobSet>,
    exclude: GlobSet,
}

impl Source {
    /// Whether a path relative to the root passes the include and exclude globs.
    pub fn wants(&self, relative: &Path) -> bool {
        self.include.as_ref().is_none_or(|g| g.is_match(relative))
            && !self.exclude.is_match(relative)
    }
}

/// `~` and `~/…` as a shell expands them (pai.toml is written by hand); other paths unchanged.
fn expand_home(path: &Path) -> PathBuf {
    let home = || std::env::var_os("HOME").map(PathBuf::from);
    match path.strip_prefix("~") {
        Ok(rest) => home().map_or_else(|| path.to_path_buf(), |h| h.join(rest)),
        Err(_) => path.to_path_buf(),
    }
}

/// Check a list of source configurations: directories exist, globs parse, names are distinct.
pub fn resolve_sources(configs: &[SourceConfig]) -> Result<Vec<Source>> {
    let mut sources = Vec::with_capacity(configs.len());
    for (index, c) in configs.iter().enumerate() {
        if c.max_file_size == 0 {
            return Err(DatasetError::BadSource {
                index,
                field: "max_file_size",
                value: "0".into(),
                reason: "must be at least 1 byte".into(),
            });
        }
        let path = expand_home(&c.path);
        if !path.is_dir() {
            return Err(DatasetError::MissingSource { path });
        }
        let root = path
            .canonicalize()
            .map_err(|e| DatasetError::io("resolve", &path, e))?;
        let name = match &c.name {
            Some(n) if n.trim().is_empty() || n.contains(['/', '\\']) => {
                return Err(DatasetError::BadSource {
                    index,
                    field: "name",
                    value: n.clone(),
                    reason: "must be non-empty and contain no path separator".into(),
                })
            }
            Some(n) => n.clone(),
            None => root
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "root".into()),
        };
        let globs = |patterns: &[String]| -> Result<GlobSet> {
            let mut b = GlobSetBuilder::new();
            for p in patterns {
                let glob = Glob::new(p).map_err(|source| DatasetError::BadGlob {
                    path: c.path.clone(),
                    pattern: p.clone(),
                    source,
                })?;
                b.add(glob);
            }
            b.build().map_err(|source| DatasetError::BadGlob {
                path: c.path.clone(),
                pattern: patterns.join(", "),
                source,
            })
        };
        sources.push(Source {
            name,
            root,
            kind: c.kind,
            max_file_size: c.max_file_size,
            privacy: c.privacy,
            include: (!c.include.is_empty())
                .then(|| globs(&c.include))
                .transpose()?,
            exclude: globs(&c.exclude)?,
        });
    }
    for s in &sources {
        let count = sources.iter().filter(|o| o.name == s.name).count();
        if count > 1 {
            return Err(DatasetError::DuplicateSourceName {
                count,
                name: s.name.clone(),
            });
        }
    }
    Ok(sources)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leading_tilde_is_the_home_directory() {
        let Some(home) = std::env::var_os("HOME").map(PathBuf::from) else {
            return;
        };
        assert_eq!(expand_home(Path::new("~/notes")), home.join("notes"));
        assert_eq!(expand_home(Path::new("~")), home);
        assert_eq!(expand_home(Path::new("/a/~b")), Path::new("/a/~b"));
        assert_eq!(expand_home(Path::new("~bob/x")), Path::new("~bob/x"));
    }

    #[test]
    fn command_line_sources_name_their_kind() {
        assert_eq!(
            SourceConfig::from_arg("notes").unwrap().kind,
            SourceKind::Notes
        );
        let c = SourceConfig::from_arg("/tmp/x:code").unwrap();
        assert_eq!(
            (c.path.as_path(), c.kind),
            (Path::new("/tmp/x"), SourceKind::Code)
        );
        assert_eq!(
            SourceConfig::from_arg("/tmp/x:chat").unwrap().kind,
            SourceKind::Chat
        );
        assert!(SourceConfig::from_arg("/tmp/x:pictures").is_err());
    }

    #[test]
    fn bad_configs_name_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = SourceConfig::from_arg(dir.path().to_str().unwrap()).unwrap();
        c.exclude = vec!["[".into()];
        let e = resolve_sources(&[c.clone()]).unwrap_err().to_string();
        assert!(e.contains("\"[\""), "{e}");
        c.exclude.clear();
        let e = resolve_sources(&[c.clone(), c.clone()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("distinct"), "{e}");
        c.path = dir.path().join("missing");
        assert!(resolve_sources(&[c])
            .unwrap_err()
            .to_string()
            .contains("does not exist"));
    }

    #[test]
    fn globs_select_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = SourceConfig::from_arg(dir.path().to_str().unwrap()).unwrap();
        c.include = vec!["**/*.md".into()];
        c.exclude = vec!["private/**".into()];
        let s = resolve_sources(&[c]).unwrap().remove(0);
        assert!(s.wants(Path::new("a/b.md")));
        assert!(!s.wants(Path::new("a/b.txt")));
        assert!(!s.wants(Path::new("private/b.md")));
    }
}
