//! Splitting source files into examples at top-level items (functions, classes, impl blocks…).
//!
//! No parser per language: two rules cover the languages people write most. Brace languages (Rust,
//! JS/TS, Go, C/C++, Java, shell functions…) — an item starts on a line at column 0 and ends where the
//! braces it opened close (or at its `;`), with the comments and attributes just above it attached.
//! Indentation languages (Python) — an item is a column-0 `def`/`class` (with its decorators and
//! comments) and everything indented under it. Lines between items (imports, module constants) form
//! their own chunks. Chunks are then packed to a token budget by `pack`.

use std::path::Path;

/// A language pai splits by rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    Rust,
    Python,
    JavaScript,
    TypeScript,
    Go,
    C,
    Cpp,
    Java,
    Kotlin,
    CSharp,
    Swift,
    Shell,
    Ruby,
    Lua,
    Sql,
    Toml,
    Yaml,
}

impl Language {
    pub fn from_path(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_string_lossy().to_lowercase();
        if matches!(name.as_str(), "makefile" | "dockerfile" | "justfile") {
            return Some(Language::Shell);
        }
        let ext = path.extension()?.to_string_lossy().to_lowercase();
        Some(match ext.as_str() {
            "rs" => Language::Rust,
            "py" | "pyi" => Language::Python,
            "js" | "jsx" | "mjs" | "cjs" => Language::JavaScript,
            "ts" | "tsx" | "mts" | "cts" => Language::TypeScript,
            "go" => Language::Go,
            "c" | "h" => Language::C,
            "cc" | "cpp" | "cxx" | "hpp" | "hh" | "hxx" | "cu" => Language::Cpp,
            "java" => Language::Java,
            "kt" | "kts" => Language::Kotlin,
            "cs" => Language::CSharp,
            "swift" => Language::Swift,
            "sh" | "bash" | "zsh" | "fish" => Language::Shell,
            "rb" => Language::Ruby,
            "lua" => Language::Lua,
            "sql" => Language::Sql,
            "toml" => Language::Toml,
            "yaml" | "yml" => Language::Yaml,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Language::Rust => "rust",
            Language::Python => "python",
            Language::JavaScript => "javascript",
            Language::TypeScript => "typescript",
            Language::Go => "go",
            Language::C => "c",
            Language::Cpp => "cpp",
            Language::Java => "java",
            Language::Kotlin => "kotlin",
            Language::CSharp => "csharp",
            Language::Swift => "swift",
            Language::Shell => "shell",
            Language::Ruby => "ruby",
            Language::Lua => "lua",
            Language::Sql => "sql",
            Language::Toml => "toml",
            Language::Yaml => "yaml",
        }
    }

    /// The line comment that introduces a file-path header in an example.
    pub fn line_comment(self) -> &'static str {
        match self {
            Language::Python
            | Language::Shell
            | Language::Ruby
            | Language::Toml
            | Language::Yaml => "#",
            Language::Lua | Language::Sql => "--",
            _ => "//",
        }
    }

    fn rule(self) -> Rule {
        match self {
            Language::Python => Rule::Indentation,
            Language::Ruby | Language::Lua | Language::Sql | Language::Toml | Language::Yaml => {
                Rule::Blank
            }
            _ => Rule::Braces,
        }
    }
}

enum Rule {
    Braces,
    Indentation,
    /// Only blank-line-separated paragraphs at column 0 (languages without braces or a simple
    /// indentation rule).
    Blank,
}

/// A piece of a file: consecutive lines `start..end` (0-based, end exclusive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub start: usize,
    pub end: usize,
}

/// Split a file's lines into top-level items and the stretches between them.
pub fn split_items(text: &str, lang: Language) -> Vec<Item> {
    let lines: Vec<&str> = text.lines().collect();
    let starts = match lang.rule() {
        Rule::Braces => brace_item_starts(&lines),
        Rule::Indentation => indentation_item_starts(&lines),
        Rule::Blank => blank_item_starts(&lines),
    };
    let mut items = Vec::new();
    for (i, &s) in starts.iter().enumerate() {
        let e = starts.get(i + 1).copied().unwrap_or(lines.len());
        if lines[s..e].iter().any(|l| !l.trim().is_empty()) {
            items.push(Item { start: s, end: e });
        }
    }
    items
}

/// Whether a line continues the "preamble" of the item below it (comments, attributes, decorators).
fn is_preamble(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with("//")
        || t.starts_with("/*")
        || t.starts_with('*')
        || t.starts_with("#[")
        || t.starts_with("#!")
        || t.starts_with('@')
        || (t.starts_with('#') && !t.starts_with("#include") && !t.starts_with("#define"))
}

/// Pull an item start up over the comments and attributes directly above it.
fn attach_preamble(lines: &[&str], mut start: usize, floor: usize) -> usize {
    while start > floor && !lines[start - 1].trim().is_empty() && is_preamble(lines[start - 1]) {
        start -= 1;
    }
    start
}

fn brace_item_starts(lines: &[&str]) -> Vec<usize> {
    let mut starts = vec![0];
    let mut depth: i64 = 0;
    let mut in_block_comment = false;
    let mut last_end = 0;
    for (i, line) in lines.iter().enumerate() {
        let at_top = depth == 0;
        let first = line.chars().next();
        let opens_item = at_top
            && !in_block_comment
            && first.is_some_and(|c| !c.is_whitespace() && !matches!(c, '{' | '}' | ')'))
            && !is_preamble(line);
        if opens_item && i > 0 {
            let s = attach_preamble(lines, i, last_end);
            if s > *starts.last().unwrap_or(&0) {
                starts.push(s);
            }
        }
        depth += brace_delta(line, &mut in_block_comment);
        if depth < 0 {
            depth = 0;
        }
        if depth == 0 && !line.trim().is_empty() && !is_preamble(line) {
            last_end = i + 1;
        }
    }
    starts
}

/// Net `{` minus `}` on a line, ignoring string and char literals and comments (roughly: enough for
/// well-formed code; a wrong count only moves a chunk boundary).
fn brace_delta(line: &str, in_block_comment: &mut bool) -> i64 {
    let b = line.as_bytes();
    let mut d = 0;
    let mut i = 0;
    let mut quote: Option<u8> = None;
    while i < b.len() {
        let c = b[i];
        if *in_block_comment {
            if c == b'*' && b.get(i + 1) == Some(&b'/') {
                *in_block_comment = false;
                i += 1;
            }
        } else if let Some(q) = quote {
            if c == b'\\' {
                i += 1;
            } else if c == q {
                quote = None;
            }
        } else {
            match c {
                b'/' if b.get(i + 1) == Some(&b'/') => break,
                b'/' if b.get(i + 1) == Some(&b'*') => {
                    *in_block_comment = true;
                    i += 1;
                }
                b'"' | b'`' => quote = Some(c),
                // A quote that closes within three bytes is a char literal; otherwise a Rust lifetime.
                b'\'' if b.get(i + 2) == Some(&b'\'') || b.get(i + 3) == Some(&b'\'') => {
                    quote = Some(c)
                }
                b'{' => d += 1,
                b'}' => d -= 1,
                _ => {}
            }
        }
        i += 1;
    }
    d
}

fn indentation_item_starts(lines: &[&str]) -> Vec<usize> {
    let mut starts = vec![0];
    // Inside a def/class body; just after a decorator (the def below belongs to it); the end of the
    // last top-level code, which bounds how far up comments attach.
    let (mut in_item, mut after_decorator, mut last_end) = (false, false, 0);
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_end();
        if t.is_empty() {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if in_item {
                last_end = i + 1;
            }
            continue;
        }
        if t.starts_with('#') {
            // A comment attaches to what follows it.
            continue;
        }
        let decorator = t.starts_with('@');
        let def = decorator
            || t.starts_with("def ")
            || t.starts_with("async def ")
            || t.starts_with("class ");
        if (def || in_item) && !after_decorator && i > 0 {
            let s = attach_preamble(lines, i, last_end);
            if s > *starts.last().unwrap_or(&0) {
                starts.push(s);
            }
        }
        after_decorator = decorator;
        in_item = def;
        last_end = i + 1;
    }
    starts
}

fn blank_item_starts(lines: &[&str]) -> Vec<usize> {
    let mut starts = vec![0];
    for i in 1..lines.len() {
        if lines[i - 1].trim().is_empty()
            && !lines[i].trim().is_empty()
            && !lines[i].starts_with([' ', '\t'])
        {
            starts.push(i);
        }
    }
    starts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(text: &str, lang: Language) -> Vec<String> {
        let lines: Vec<&str> = text.lines().collect();
        split_items(text, lang)
            .into_iter()
            .map(|it| lines[it.start..it.end].join("\n").trim().to_string())
            .collect()
    }

    #[test]
    fn rust_items_keep_their_docs_and_attributes() {
        let src = "use std::io;\n\n/// Adds.\n#[inline]\npub fn add(a: u8, b: u8) -> u8 {\n    let s = \"}\";\n    a + b\n}\n\nstruct P { x: u8 }\n\nimpl P {\n    fn f(&self) -> char { '{' }\n}\nconst N: usize = 3;\n";
        let c = chunks(src, Language::Rust);
        assert_eq!(c.len(), 5, "{c:#?}");
        assert!(c[1].starts_with("/// Adds.") && c[1].ends_with('}'));
        assert!(c[3].starts_with("impl P") && c[3].ends_with('}'));
        assert_eq!(c[4], "const N: usize = 3;");
    }

    #[test]
    fn python_defs_and_classes_with_decorators() {
        let src = "import os\nX = 1\n\n# helper\n@cache\n@other\ndef f(x):\n    if x:\n        return 1\n\n    return 2\n\nclass A:\n    def g(self):\n        pass\n\nprint(f(1))\n";
        let c = chunks(src, Language::Python);
        assert_eq!(c.len(), 4, "{c:#?}");
        assert!(c[1].starts_with("# helper\n@cache\n@other\ndef f") && c[1].ends_with("return 2"));
        assert!(c[2].starts_with("class A:"));
        assert_eq!(c[3], "print(f(1))");
    }

    #[test]
    fn go_js_c_and_shell_split_at_top_level_braces() {
        let go = "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"{\")\n}\n\n// T is a thing.\ntype T struct {\n\tA int\n}\n";
        assert_eq!(chunks(go, Language::Go).len(), 4);
        let js = "const a = 1;\nfunction f() {\n  return `}`;\n}\nexport class B {\n  m() {}\n}\n";
        assert_eq!(chunks(js, Language::JavaScript).len(), 3);
        let c = "#include <stdio.h>\n\nint main(void)\n{\n  /* { */\n  return 0;\n}\n";
        let got = chunks(c, Language::C);
        assert_eq!(got.len(), 2, "{got:#?}");
        let sh = "#!/bin/sh\nset -e\n\nbuild() {\n  make\n}\n\nbuild\n";
        assert_eq!(chunks(sh, Language::Shell).len(), 3);
    }
}
