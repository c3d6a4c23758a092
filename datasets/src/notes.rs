//! Notes into sections: Markdown (Obsidian-style: YAML frontmatter, `[[wikilinks]]`, `#tags`), org and
//! plain text.
//!
//! A note is split at its headings; each section keeps its heading path ("Project > Design > Open
//! questions") and the note's tags as context, because "what is this paragraph about" is what lets a
//! small model learn from a fragment. Wikilinks become their visible text (`[[Page|alias]]` → `alias`),
//! embeds (`![[image.png]]`) are dropped, fenced code stays as it is (a `#` inside it is not a heading
//! or a tag). Frontmatter `private: true` and `pai: exclude` are read here and travel with the note.

use std::sync::LazyLock;

use regex::Regex;

use crate::source::Privacy;

/// A note's frontmatter fields pai acts on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Frontmatter {
    pub title: Option<String>,
    pub tags: Vec<String>,
    /// The privacy the note asks for (`private: true` → Private, `pai: exclude` → Exclude).
    pub privacy: Privacy,
}

/// One section of a note: its heading path and body (wikilinks resolved, frontmatter removed).
#[derive(Debug, Clone, PartialEq)]
pub struct Section {
    pub headings: Vec<String>,
    pub body: String,
}

/// A parsed note.
#[derive(Debug, Clone)]
pub struct Note {
    pub frontmatter: Frontmatter,
    /// Frontmatter tags and inline `#tags`, deduplicated, in order of appearance.
    pub tags: Vec<String>,
    pub sections: Vec<Section>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoteFormat {
    Markdown,
    Org,
    Plain,
}

impl NoteFormat {
    pub fn from_extension(ext: &str) -> Self {
        match ext.to_ascii_lowercase().as_str() {
            "md" | "markdown" | "mdown" => NoteFormat::Markdown,
            "org" => NoteFormat::Org,
            _ => NoteFormat::Plain,
        }
    }
}

static WIKILINK: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(!?)\[\[([^\]|#]*)(?:#[^\]|]*)?(?:\|([^\]]*))?\]\]").expect("static regex")
});
static TAG: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?:^|[\s(])#([\p{L}_][\p{L}\p{N}_/-]*)").expect("static regex"));

/// Parse a note.
pub fn parse(text: &str, format: NoteFormat) -> Note {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let (frontmatter, body) = match format {
        NoteFormat::Markdown => split_frontmatter(text),
        _ => (Frontmatter::default(), text),
    };
    let mut tags = frontmatter.tags.clone();
    let mut sections = Vec::new();
    let mut headings: Vec<(usize, String)> = Vec::new();
    let mut current = String::new();
    let mut fence: Option<&str> = None;
    let flush =
        |headings: &[(usize, String)], current: &mut String, sections: &mut Vec<Section>| {
            let body = std::mem::take(current);
            if !body.trim().is_empty() || !headings.is_empty() {
                sections.push(Section {
                    headings: headings.iter().map(|(_, h)| h.clone()).collect(),
                    body: body.trim_matches('\n').to_string(),
                });
            }
        };
    for line in body.lines() {
        let trimmed = line.trim_start();
        if format == NoteFormat::Markdown {
            if let Some(f) = fence {
                if trimmed.starts_with(f) {
                    fence = None;
                }
                current.push_str(line);
                current.push('\n');
                continue;
            }
            if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
                fence = Some(&trimmed[..3]);
                current.push_str(line);
                current.push('\n');
                continue;
            }
        }
        if let Some((level, title)) = heading(line, format) {
            flush(&headings, &mut current, &mut sections);
            headings.retain(|(l, _)| *l < level);
            headings.push((level, resolve_links(title)));
            continue;
        }
        for c in TAG.captures_iter(line) {
            let t = c[1].to_string();
            if !tags.contains(&t) && !t.chars().all(|c| c.is_ascii_digit()) {
                tags.push(t);
            }
        }
        current.push_str(&resolve_links(line));
        current.push('\n');
    }
    flush(&headings, &mut current, &mut sections);
    // A heading with nothing under it but subsections carries no text of its own.
    sections.retain(|s| !s.body.trim().is_empty());
    Note {
        frontmatter,
        tags,
        sections,
    }
}

/// `# Title` (Markdown ATX) or `* Title` (org) → (level, title).
fn heading(line: &str, format: NoteFormat) -> Option<(usize, &str)> {
    let marker = match format {
        NoteFormat::Markdown => '#',
        NoteFormat::Org => '*',
        NoteFormat::Plain => return None,
    };
    let level = line.chars().take_while(|&c| c == marker).count();
    if level == 0 || level > 6 {
        return None;
    }
    let rest = &line[level..];
    if !rest.starts_with(' ') {
        return None;
    }
    let title = rest.trim().trim_end_matches(marker).trim();
    (!title.is_empty()).then_some((level, title))
}

/// Wikilinks to their visible text; embeds removed.
fn resolve_links(line: &str) -> String {
    WIKILINK
        .replace_all(line, |c: &regex::Captures| {
            if &c[1] == "!" {
                String::new()
            } else if let Some(alias) = c.get(3) {
                alias.as_str().to_string()
            } else {
                c[2].to_string()
            }
        })
        .into_owned()
}

/// Split off `---`-fenced YAML frontmatter and read the fields pai acts on. Frontmatter that does not
/// parse is kept out of the text but otherwise ignored.
fn split_frontmatter(text: &str) -> (Frontmatter, &str) {
    let Some(rest) = text
        .strip_prefix("---\n")
        .or_else(|| text.strip_prefix("---\r\n"))
    else {
        return (Frontmatter::default(), text);
    };
    let mut offset = 0;
    let mut end = None;
    for line in rest.split_inclusive('\n') {
        if line.trim_end() == "---" || line.trim_end() == "..." {
            end = Some((offset, offset + line.len()));
            break;
        }
        offset += line.len();
    }
    let Some((yaml_end, body_start)) = end else {
        return (Frontmatter::default(), text);
    };
    let fm = match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&rest[..yaml_end]) {
        Ok(v) => frontmatter_fields(&v),
        Err(e) => {
            tracing::debug!(error = %e, "frontmatter is not valid YAML");
            Frontmatter::default()
        }
    };
    (fm, &rest[body_start..])
}

fn frontmatter_fields(v: &serde_yaml_ng::Value) -> Frontmatter {
    use serde_yaml_ng::Value;
    let get = |k: &str| v.get(k);
    let truthy = |x: Option<&Value>| match x {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => matches!(s.to_ascii_lowercase().as_str(), "true" | "yes"),
        _ => false,
    };
    let mut tags = Vec::new();
    for key in ["tags", "tag"] {
        match get(key) {
            Some(Value::Sequence(items)) => {
                tags.extend(items.iter().filter_map(|t| t.as_str()).map(str::to_string))
            }
            Some(Value::String(s)) => tags.extend(
                s.split([',', ' '])
                    .filter(|t| !t.is_empty())
                    .map(str::to_string),
            ),
            _ => {}
        }
    }
    let tags = tags
        .into_iter()
        .map(|t| t.trim_start_matches('#').to_string())
        .collect();
    let exclude = match get("pai") {
        Some(Value::String(s)) => s.eq_ignore_ascii_case("exclude"),
        Some(Value::Sequence(items)) => items.iter().any(|i| {
            i.as_str()
                .is_some_and(|s| s.eq_ignore_ascii_case("exclude"))
        }),
        _ => false,
    };
    let privacy = if exclude {
        Privacy::Exclude
    } else if truthy(get("private")) {
        Privacy::Private
    } else {
        Privacy::Normal
    };
    Frontmatter {
        title: get("title").and_then(|t| t.as_str()).map(str::to_string),
        tags,
        privacy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn obsidian_note_splits_by_heading_with_paths_tags_and_links() {
        let text = "---\ntitle: Garden\ntags: [plants, home]\n---\nIntro with [[Soil|good soil]] and #compost.\n\n# Beds\n## Tomatoes\nWater daily. See [[Watering]] ![[pic.png]]\n```sh\n# not a heading #nottag\n```\n## Beans\nClimb.\n# Tools\nSpade.\n";
        let n = parse(text, NoteFormat::Markdown);
        assert_eq!(n.frontmatter.title.as_deref(), Some("Garden"));
        assert_eq!(n.tags, ["plants", "home", "compost"]);
        let got: Vec<(String, &str)> = n
            .sections
            .iter()
            .map(|s| (s.headings.join(" > "), s.body.as_str()))
            .collect();
        assert_eq!(got[0], ("".into(), "Intro with good soil and #compost."));
        assert_eq!(got[1].0, "Beds > Tomatoes");
        assert!(got[1]
            .1
            .starts_with("Water daily. See Watering \n```sh\n# not a heading"));
        assert_eq!(got[2], ("Beds > Beans".into(), "Climb."));
        assert_eq!(got[3], ("Tools".into(), "Spade."));
        assert_eq!(got.len(), 4);
    }

    #[test]
    fn frontmatter_privacy_flags() {
        let p = |t: &str| parse(t, NoteFormat::Markdown).frontmatter.privacy;
        assert_eq!(p("---\nprivate: true\n---\nx"), Privacy::Private);
        assert_eq!(
            p("---\npai: exclude\nprivate: true\n---\nx"),
            Privacy::Exclude
        );
        assert_eq!(p("---\npai: [exclude]\n---\nx"), Privacy::Exclude);
        assert_eq!(p("---\nprivate: no\n---\nx"), Privacy::Normal);
        // Not YAML: ignored, and not mistaken for text either.
        let n = parse("---\n: : [\n---\nbody", NoteFormat::Markdown);
        assert_eq!(n.sections[0].body, "body");
    }

    #[test]
    fn org_headings() {
        let n = parse("* Work\n** Meeting\nNotes here.\n", NoteFormat::Org);
        assert_eq!(n.sections[0].headings, ["Work", "Meeting"]);
    }
}
