//! Secrets and personal data out of text before anything reaches the dataset.
//!
//! Secrets (always removed): private key blocks, cloud and VCS tokens (AWS, GCP, GitHub, GitLab, Slack,
//! Stripe, OpenAI, Anthropic, npm, PyPI, Hugging Face…), JWTs, passwords in URLs, and secret-looking
//! values assigned to secret-sounding names or with high entropy. PII (by policy): emails, phone
//! numbers, card numbers (Luhn-checked), IBANs (mod-97-checked). Each match becomes a typed placeholder
//! (`<SECRET:aws_key>`, `<PII:email>`) and is counted, so the summary says what was removed and the
//! model learns that a value goes there without learning the value.
//!
//! False positives matter too: a scrubber that mangles ordinary code teaches the model mangled code.
//! Hence the checks beyond the patterns: entropy, Luhn, mod-97, placeholders and hash-named variables
//! left alone. A test runs the scrubber over pai's own source tree and expects no change.
//!
//! Speed: every byte ingested passes through here. One `RegexSet` pass says which rules match at all
//! (most texts match none), and only those run; word boundaries and digits are ASCII (`(?-u:\b)`,
//! `[0-9]`), which keeps the regex engine on its lazy DFA for text in any script (a Unicode `\b`
//! makes it fall back to a much slower engine on the first non-ASCII byte).

use std::collections::BTreeMap;
use std::sync::LazyLock;

use regex::{Captures, Regex, RegexSet};
use serde::{Deserialize, Serialize};

/// Which kinds of personal data to redact (secrets are always removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PiiPolicy {
    pub email: bool,
    pub phone: bool,
    pub card: bool,
    pub iban: bool,
}

impl Default for PiiPolicy {
    fn default() -> Self {
        Self {
            email: true,
            phone: true,
            card: true,
            iban: true,
        }
    }
}

/// Text with secrets and PII replaced, and what was replaced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrubbed {
    pub text: String,
    /// Placeholder kind (e.g. `aws_key`, `email`) → count.
    pub redactions: BTreeMap<String, usize>,
    /// What each placeholder replaced, rule by rule and left to right within a rule: (placeholder,
    /// value). What a reversible redaction restores from (the router's redact mode).
    pub removed: Vec<(String, String)>,
}

impl Scrubbed {
    pub fn total(&self) -> usize {
        self.redactions.values().sum()
    }
}

/// A pattern whose whole match (or the named group `v`) is the secret.
struct Rule {
    kind: &'static str,
    re: Regex,
    /// Extra check on the secret value; `None` accepts every match.
    check: Option<fn(&str) -> bool>,
}

fn rule(kind: &'static str, pattern: &str, check: Option<fn(&str) -> bool>) -> Rule {
    Rule {
        kind,
        re: Regex::new(pattern).expect("static regex"),
        check,
    }
}

/// Secret patterns, most specific first (a token matched by one is a placeholder for the next).
static SECRETS: LazyLock<Vec<Rule>> = LazyLock::new(|| {
    vec![
        rule(
            "private_key",
            r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----",
            None,
        ),
        rule(
            "anthropic_key",
            r"(?-u:\b)sk-ant-[a-z0-9]{2,10}-[A-Za-z0-9_\-]{32,}",
            None,
        ),
        rule(
            "openai_key",
            r"(?-u:\b)sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}T3BlbkFJ[A-Za-z0-9_\-]{20,}",
            None,
        ),
        rule(
            "openai_key",
            r"(?-u:\b)sk-(?:proj|svcacct|admin)-[A-Za-z0-9_\-]{40,}",
            None,
        ),
        rule(
            "stripe_key",
            r"(?-u:\b)(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}",
            None,
        ),
        rule(
            "aws_key",
            r"(?-u:\b)(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|ANPA|AIPA)[0-9A-Z]{16}(?-u:\b)",
            None,
        ),
        rule(
            "aws_secret",
            r#"(?i)aws_?secret_?(?:access_?)?key["']?\s*[:=]\s*["']?(?P<v>[A-Za-z0-9/+=]{40})(?-u:\b)"#,
            None,
        ),
        rule(
            "gcp_api_key",
            r"(?-u:\b)AIza[0-9A-Za-z_\-]{35}(?-u:\b)",
            None,
        ),
        rule(
            "gcp_oauth_secret",
            r"(?-u:\b)GOCSPX-[A-Za-z0-9_\-]{28}(?-u:\b)",
            None,
        ),
        rule(
            "github_token",
            r"(?-u:\b)(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,255}(?-u:\b)",
            None,
        ),
        rule(
            "github_token",
            r"(?-u:\b)github_pat_[A-Za-z0-9_]{60,255}(?-u:\b)",
            None,
        ),
        rule(
            "gitlab_token",
            r"(?-u:\b)gl(?:pat|dt|ptt|rt|cbt|oas)-[A-Za-z0-9_\-]{20,}(?-u:\b)",
            None,
        ),
        rule(
            "slack_token",
            r"(?-u:\b)xox[abposr]-[A-Za-z0-9\-]{10,}(?-u:\b)",
            None,
        ),
        rule(
            "slack_webhook",
            r"https://hooks\.slack\.com/(?:services|workflows)/[A-Za-z0-9/_\-]{20,}",
            None,
        ),
        rule("npm_token", r"(?-u:\b)npm_[A-Za-z0-9]{36}(?-u:\b)", None),
        rule(
            "pypi_token",
            r"(?-u:\b)pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_\-]{50,}",
            None,
        ),
        rule(
            "huggingface_token",
            r"(?-u:\b)hf_[A-Za-z0-9]{34,}(?-u:\b)",
            None,
        ),
        rule(
            "sendgrid_key",
            r"(?-u:\b)SG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}(?-u:\b)",
            None,
        ),
        rule("twilio_key", r"(?-u:\b)SK[0-9a-f]{32}(?-u:\b)", None),
        rule(
            "discord_webhook",
            r"https://(?:ptb\.|canary\.)?discord(?:app)?\.com/api/webhooks/[0-9]+/[A-Za-z0-9_\-]+",
            None,
        ),
        rule(
            "jwt",
            r"(?-u:\b)eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{16,}",
            None,
        ),
        // user:password@ in a URL: only the password goes.
        rule(
            "url_password",
            r"(?-u:\b)[a-zA-Z][a-zA-Z0-9+.\-]{1,20}://[^/\s:@]{1,64}:(?P<v>[^@\s/]{3,128})@[A-Za-z0-9.\-]+",
            Some(not_placeholder),
        ),
        // A quoted literal assigned to a secret-sounding name: `password = "…"`, `"api_key": "…"`.
        rule(
            "password",
            r#"(?i)(?-u:\b)[a-z0-9_.\-]*(?:passw(?:or)?d|passphrase|pwd|secret|api[_\-]?key|apikey|access[_\-]?key|auth[_\-]?token|access[_\-]?token|refresh[_\-]?token|private[_\-]?key|client[_\-]?secret|token)[a-z0-9_]*["']?\s*(?::|=|:=|=>)\s*(?:[a-z]+\()?["'](?P<v>[^"'\s]{6,200})["']"#,
            Some(secret_value),
        ),
        // The same in config or note style, unquoted: `PASSWORD=…`, `password: …` as a whole line.
        rule(
            "password",
            r#"(?im)^[ \t\-*#/;>]*(?:export\s+)?(?:[a-z0-9_.\-]+[ \t]+){0,3}[a-z0-9_.\-]*(?:passw(?:or)?d|passphrase|pwd|secret|api[_\-]?key|apikey|access[_\-]?key|auth[_\-]?token|access[_\-]?token|private[_\-]?key|client[_\-]?secret|token)[a-z0-9_]*[ \t]*(?::|=)[ \t]*(?P<v>[^\s"'`]{8,200})[ \t]*$"#,
            Some(unquoted_secret_value),
        ),
        // High-entropy quoted literals assigned to any name (long random strings are credentials more
        // often than anything else; hashes and ids are recognised by their variable name).
        rule(
            "high_entropy",
            r#"(?i)(?-u:\b)(?P<name>[a-z_][a-z0-9_]*)["']?\s*(?::|=|:=)\s*["'](?P<v>[A-Za-z0-9+/_\-]{24,}={0,2})["']"#,
            None,
        ),
    ]
});

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?-u:\b)[A-Za-z0-9._%+\-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9\-]{0,62}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,62}[A-Za-z0-9])?)*\.[A-Za-z]{2,24}(?-u:\b)")
        .expect("static regex")
});
static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?:\+[0-9]{1,3}[ .\-]?)?(?:\([0-9]{2,4}\)[ .\-]?|(?-u:\b)[0-9]{2,4}[ .\-])[0-9]{3,4}[ .\-][0-9]{3,4}(?-u:\b)|\+[0-9]{1,3}(?:[ .\-][0-9]{1,4}){2,5}(?-u:\b)")
        .expect("static regex")
});
static CARD: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?-u:\b)[0-9]{4}(?:[ \-]?[0-9]{4}){2}[ \-]?[0-9]{1,7}(?-u:\b)")
        .expect("static regex")
});
static IBAN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?-u:\b)[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?-u:\b)")
        .expect("static regex")
});

/// Every rule's pattern, secrets then email, card, IBAN and phone: which of them match a text at all.
static ANY_RULE: LazyLock<RegexSet> = LazyLock::new(|| {
    let pii = [&*EMAIL, &*CARD, &*IBAN, &*PHONE];
    RegexSet::new(
        SECRETS
            .iter()
            .map(|r| r.re.as_str())
            .chain(pii.iter().map(|re| re.as_str())),
    )
    .expect("static regex set")
});

/// Remove secrets and the PII the policy names.
pub fn scrub(text: &str, pii: PiiPolicy) -> Scrubbed {
    let mut out = Scrubbed {
        text: text.to_string(),
        redactions: BTreeMap::new(),
        removed: Vec::new(),
    };
    // Rules run in order on the text as earlier rules left it; a rule that matched nothing in the
    // original cannot match there either, except on a placeholder, which every rule refuses.
    let hits = ANY_RULE.matches(text);
    if !hits.matched_any() {
        return out;
    }
    let n = SECRETS.len();
    for (i, r) in SECRETS.iter().enumerate() {
        if !hits.matched(i) {
            continue;
        }
        replace(&mut out, &r.re, r.kind, "SECRET", |c| {
            let v = c.name("v").map_or(&c[0], |m| m.as_str());
            if v.starts_with("<SECRET:") || v.starts_with("<PII:") {
                return false;
            }
            if r.kind == "high_entropy" {
                return high_entropy(v) && !names_a_non_secret(&c["name"]);
            }
            r.check.is_none_or(|check| check(v))
        });
    }
    if pii.email && hits.matched(n) {
        replace(&mut out, &EMAIL, "email", "PII", |c| {
            !is_example_address(&c[0])
        });
    }
    if pii.card && hits.matched(n + 1) {
        replace(&mut out, &CARD, "card", "PII", |c| luhn(&c[0]));
    }
    if pii.iban && hits.matched(n + 2) {
        replace(&mut out, &IBAN, "iban", "PII", |c| iban_valid(&c[0]));
    }
    if pii.phone && hits.matched(n + 3) {
        replace(&mut out, &PHONE, "phone", "PII", |c| plausible_phone(&c[0]));
    }
    out
}

/// Replace each accepted match (its `v` group when there is one) by `<CLASS:kind>`.
fn replace(
    out: &mut Scrubbed,
    re: &Regex,
    kind: &str,
    class: &str,
    accept: impl Fn(&Captures) -> bool,
) {
    if !re.is_match(&out.text) {
        return;
    }
    let mut count = 0;
    let placeholder = format!("<{class}:{kind}>");
    let mut removed = Vec::new();
    let replaced = re.replace_all(&out.text, |c: &Captures| {
        if !accept(c) {
            return c[0].to_string();
        }
        count += 1;
        removed.push((
            placeholder.clone(),
            c.name("v").map_or(&c[0], |m| m.as_str()).to_string(),
        ));
        match c.name("v") {
            Some(v) => {
                let whole = c.get(0).expect("group 0 always matches");
                let (a, b) = (v.start() - whole.start(), v.end() - whole.start());
                format!("{}{placeholder}{}", &c[0][..a], &c[0][b..])
            }
            None => placeholder.clone(),
        }
    });
    let replaced = replaced.into_owned();
    if count > 0 {
        out.text = replaced;
        *out.redactions.entry(kind.to_string()).or_default() += count;
        out.removed.append(&mut removed);
    }
}

/// Shannon entropy in bits per character.
fn entropy(s: &str) -> f64 {
    let mut counts = [0usize; 256];
    for b in s.bytes() {
        counts[b as usize] += 1;
    }
    let n = s.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// Random-looking: mixed character classes and high entropy for its alphabet. Hex needs less
/// entropy per character (its alphabet has 16 symbols) but more length.
fn high_entropy(v: &str) -> bool {
    let hex = v.bytes().all(|b| b.is_ascii_hexdigit());
    if hex {
        return v.len() >= 32 && entropy(v) > 3.5;
    }
    let has = |f: fn(&u8) -> bool| v.as_bytes().iter().any(f);
    let classes = [
        has(u8::is_ascii_lowercase),
        has(u8::is_ascii_uppercase),
        has(u8::is_ascii_digit),
    ]
    .iter()
    .filter(|&&b| b)
    .count();
    classes >= 3 && entropy(v) > 4.2 && !v.contains("__") && !looks_like_identifier_path(v)
}

/// `some/path/to/file_name`, `CamelCaseWordsJoined`: long but made of words.
fn looks_like_identifier_path(v: &str) -> bool {
    v.split(['/', '_', '-', '.'])
        .filter(|p| !p.is_empty())
        .all(|p| p.len() <= 12 && p.chars().filter(|c| c.is_ascii_digit()).count() <= 2)
}

/// Variable names that hold hashes, ids and other non-secrets.
fn names_a_non_secret(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "sha",
        "hash",
        "digest",
        "checksum",
        "commit",
        "uuid",
        "guid",
        "integrity",
        "etag",
        "rev",
        "fingerprint",
        "_id",
        "nonce_",
        "hex",
        "b64",
        "base64",
        "encoded",
        "expected",
        "test",
        "example",
        "sample",
        "fixture",
    ]
    .iter()
    .any(|w| n.contains(w))
        || n == "id"
}

/// Values that stand for a secret rather than being one.
fn not_placeholder(v: &str) -> bool {
    let l = v.to_ascii_lowercase();
    !(v.starts_with('<')
        || v.starts_with('$')
        || v.starts_with('{')
        || v.starts_with('%')
        || v.starts_with('*')
        || l.chars().all(|c| c == 'x' || c == '*' || c == '.')
        || [
            "password",
            "changeme",
            "change_me",
            "example",
            "placeholder",
            "your_",
            "your-",
            "dummy",
            "redacted",
            "secret",
            "pass",
            "none",
            "null",
            "todo",
            "xxx",
            "env(",
            "getenv",
            "environ",
        ]
        .iter()
        .any(|w| l.contains(w)))
}

/// A quoted literal next to a secret-sounding name.
fn secret_value(v: &str) -> bool {
    not_placeholder(v)
        && !names_an_environment_variable(v)
        && !v.contains(' ')
        && v.len() >= 6
        && !v.ends_with(".txt")
        && !v.ends_with(".json")
}

/// `OPENAI_API_KEY`, `CLOUD_MEDIUM_KEY`: where a secret is kept (`api_key_env = "…"`), not a secret.
fn names_an_environment_variable(v: &str) -> bool {
    v.contains('_')
        && v.starts_with(|c: char| c.is_ascii_uppercase())
        && v.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// An unquoted value in `KEY=value` / `key: value` lines: secret-looking only (letters and digits
/// mixed, not a word or a path or a code expression).
fn unquoted_secret_value(v: &str) -> bool {
    let has_digit = v.bytes().any(|b| b.is_ascii_digit());
    let has_alpha = v.bytes().any(|b| b.is_ascii_alphabetic());
    let code = v.contains('(')
        || v.contains('[')
        || v.contains('.')
            && v.split('.')
                .all(|p| p.chars().all(|c| c.is_alphanumeric() || c == '_'));
    let punctuation = v.contains([
        '<', '>', ',', ';', '(', ')', '{', '}', '[', ']', '&', '|', '"',
    ]);
    not_placeholder(v)
        && has_digit
        && has_alpha
        && !code
        && !punctuation
        && !v.starts_with('/')
        && !v.contains("::")
}

fn is_example_address(e: &str) -> bool {
    let domain = e.rsplit('@').next().unwrap_or("").to_ascii_lowercase();
    domain == "example.com"
        || domain == "example.org"
        || domain == "example.net"
        || domain.ends_with(".example")
        || domain.ends_with(".invalid")
        || domain.ends_with(".test")
        || domain == "localhost"
}

fn luhn(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) || digits.iter().all(|&d| d == digits[0]) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn iban_valid(s: &str) -> bool {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&s.len()) {
        return false;
    }
    let rearranged = format!("{}{}", &s[4..], &s[..4]);
    let mut rem: u64 = 0;
    for c in rearranged.chars() {
        let v = match c.to_digit(36) {
            Some(v) => v as u64,
            None => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

/// A phone number has 9–15 digits and is not a date, a version or a number range.
fn plausible_phone(s: &str) -> bool {
    let digits = s.chars().filter(|c| c.is_ascii_digit()).count();
    (9..=15).contains(&digits)
        && (s.starts_with('+') || s.starts_with('(') || s.contains(' ') || s.contains('-'))
        && !s.contains('.')
        || s.starts_with('+') && (9..=15).contains(&digits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_on_numbers() {
        assert!(luhn("4111 1111 1111 1111"));
        assert!(!luhn("4111 1111 1111 1112"));
        assert!(iban_valid("GB82 WEST 1234 5698 7654 32"));
        assert!(!iban_valid("GB82 WEST 1234 5698 7654 33"));
        assert!(entropy("aaaa") < 0.1 && entropy("abcd") == 2.0);
    }

    #[test]
    fn placeholders_are_typed_and_counted() {
        let s = scrub(
            "key AKIAIOSFODNN7EXAMPL3 and mail bob@corp.io, call +44 20 7946 0958",
            PiiPolicy::default(),
        );
        assert_eq!(
            s.text,
            "key <SECRET:aws_key> and mail <PII:email>, call <PII:phone>"
        );
        assert_eq!(s.total(), 3);
        let off = PiiPolicy {
            email: false,
            ..PiiPolicy::default()
        };
        assert!(scrub("bob@corp.io", off).text.contains("bob@corp.io"));
    }

    #[test]
    fn ordinary_code_is_left_alone() {
        let code = r#"
password = request.form["password"]
token = get_token(user)
let api_key = std::env::var("OPENAI_API_KEY")?;
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
const PATH: &str = "model/src/kernels/attention_kernel_tests.rs";
version = "1.2.3"; date = "2024-01-15"; port = 8080
url = "https://example.com/a/b?c=1"
password_hash: String,
secret_key = os.environ["SECRET_KEY"]
api_key_env = "CLOUD_MEDIUM_KEY"
"#;
        let s = scrub(code, PiiPolicy::default());
        assert_eq!(s.text, code, "{:?}", s.redactions);
    }
}
