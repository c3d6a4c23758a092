//! The privacy promise: planted secrets of every kind, in notes and in code, never reach the dataset;
//! ordinary code comes through unchanged.

use std::path::Path;

use pai_datasets::scrub::{scrub, PiiPolicy};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const UPPER_DIGITS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
const HEX: &[u8] = b"0123456789abcdef";
const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn random(rng: &mut StdRng, alphabet: &[u8], n: usize) -> String {
    (0..n)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())] as char)
        .collect()
}

/// (kind, secret value, line that carries it) — generated, so no real-looking secret is committed.
pub fn planted(seed: u64) -> Vec<(&'static str, String, String)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let r = &mut rng;
    let mut v: Vec<(&'static str, String, String)> = Vec::new();
    let mut add = |kind: &'static str, secret: String, line: String| v.push((kind, secret, line));
    for _ in 0..3 {
        let k = format!("AKIA{}", random(r, UPPER_DIGITS, 16));
        add("aws_key", k.clone(), format!("aws_access_key_id = {k}"));
        let s = random(r, B64, 40);
        add(
            "aws_secret",
            s.clone(),
            format!("aws_secret_access_key = {s}"),
        );
        let g = format!("AIza{}", random(r, ALNUM, 35));
        add(
            "gcp_api_key",
            g.clone(),
            format!("const MAPS_KEY = \"{g}\";"),
        );
        let gh = format!("ghp_{}", random(r, ALNUM, 36));
        add(
            "github_token",
            gh.clone(),
            format!("git clone https://{gh}@github.com/me/repo"),
        );
        let gl = format!("glpat-{}", random(r, ALNUM, 20));
        add("gitlab_token", gl.clone(), format!("GITLAB_TOKEN={gl}"));
        let sl = format!(
            "xoxb-{}-{}",
            random(r, b"0123456789", 12),
            random(r, ALNUM, 24)
        );
        add("slack_token", sl.clone(), format!("slack: {sl}"));
        let st = format!("sk_live_{}", random(r, ALNUM, 24));
        add(
            "stripe_key",
            st.clone(),
            format!("stripe.api_key = \"{st}\""),
        );
        let oa = format!("sk-proj-{}", random(r, ALNUM, 48));
        add("openai_key", oa.clone(), format!("OPENAI_API_KEY={oa}"));
        let an = format!("sk-ant-api03-{}", random(r, ALNUM, 90));
        add(
            "anthropic_key",
            an.clone(),
            format!("client = Anthropic(api_key=\"{an}\")"),
        );
        let jwt = format!(
            "eyJ{}.eyJ{}.{}",
            random(r, ALNUM, 20),
            random(r, ALNUM, 40),
            random(r, ALNUM, 43)
        );
        add("jwt", jwt.clone(), format!("Authorization: Bearer {jwt}"));
        let pw = format!("{}!{}", random(r, ALNUM, 8), random(r, b"0123456789", 3));
        add(
            "url_password",
            pw.clone(),
            format!("DATABASE_URL=postgres://admin:{pw}@db.internal:5432/app"),
        );
        let pw2 = format!("{}{}", random(r, ALNUM, 10), random(r, b"0123456789", 2));
        add("password", pw2.clone(), format!("db_password = \"{pw2}\""));
        let pw3 = format!("{}{}", random(r, ALNUM, 9), random(r, b"0123456789", 3));
        add("password", pw3.clone(), format!("- wifi password: {pw3}"));
        let he = random(r, ALNUM, 40);
        add(
            "high_entropy",
            he.clone(),
            format!("webhook_signing = \"{he}\""),
        );
        let hf = format!("hf_{}", random(r, ALNUM, 34));
        add("huggingface_token", hf.clone(), format!("HF_TOKEN={hf}"));
        let npm = format!("npm_{}", random(r, ALNUM, 36));
        add(
            "npm_token",
            npm.clone(),
            format!("//registry.npmjs.org/:_authToken={npm}"),
        );
        let key = random(r, B64, 64 * 5);
        let pem = format!(
            "-----BEGIN RSA PRIVATE KEY-----\n{}\n-----END RSA PRIVATE KEY-----",
            key.as_bytes()
                .chunks(64)
                .map(|c| std::str::from_utf8(c).unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n")
        );
        add("private_key", key[..64].to_string(), pem);
        let wh = format!(
            "https://hooks.slack.com/services/T{}/B{}/{}",
            random(r, UPPER_DIGITS, 8),
            random(r, UPPER_DIGITS, 8),
            random(r, ALNUM, 24)
        );
        add("slack_webhook", wh.clone(), format!("notify({wh:?})"));
        let hexsecret = random(r, HEX, 64);
        add(
            "high_entropy",
            hexsecret.clone(),
            format!("SESSION_SIGNING_KEY = '{hexsecret}'"),
        );
    }
    // PII, by policy on.
    add(
        "email",
        "jane.doe@acme-corp.io".into(),
        "Mail jane.doe@acme-corp.io about it".into(),
    );
    add(
        "phone",
        "+1 415 555 0132".into(),
        "Call +1 415 555 0132 after 5".into(),
    );
    add(
        "card",
        "4539 1488 0343 6467".into(),
        "card 4539 1488 0343 6467 exp 04/29".into(),
    );
    add(
        "iban",
        "DE89 3704 0044 0532 0130 00".into(),
        "IBAN DE89 3704 0044 0532 0130 00".into(),
    );
    v
}

#[test]
fn every_planted_secret_is_removed() {
    let planted = planted(7);
    assert!(planted.len() >= 50, "{} planted", planted.len());
    let kinds: std::collections::BTreeSet<_> = planted.iter().map(|p| p.0).collect();
    assert!(kinds.len() >= 15, "{kinds:?}");
    for (kind, secret, line) in &planted {
        let out = scrub(line, PiiPolicy::default());
        assert!(
            !out.text.contains(secret.as_str()),
            "{kind} survived: {line:?} -> {:?}",
            out.text
        );
        assert!(out.total() >= 1, "{kind}: nothing counted for {line:?}");
    }
}

/// Scrub every source file of a tree and return the files the scrubber changed, with what it removed.
fn changed_files(root: &Path) -> Vec<(String, Vec<String>)> {
    let mut changed = Vec::new();
    for entry in ignore::WalkBuilder::new(root).build().flatten() {
        let p = entry.path();
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !["rs", "py", "sh", "toml", "md"].contains(&ext)
            || p.to_string_lossy().contains("fixtures")
        {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(p) else {
            continue;
        };
        let out = scrub(&text, PiiPolicy::default());
        if out.text != text {
            let diff = text
                .lines()
                .zip(out.text.lines())
                .filter(|(a, b)| a != b)
                .map(|(a, _)| a.trim().to_string())
                .take(3)
                .collect();
            changed.push((p.display().to_string(), diff));
        }
    }
    changed
}

#[test]
fn ordinary_code_comes_through_unchanged() {
    // pai's own tree is ordinary code (its tests that plant secrets excepted).
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let changed: Vec<_> = changed_files(&root)
        .into_iter()
        .filter(|(p, _)| !p.ends_with("secrets.rs") && !p.ends_with("scrub.rs"))
        .collect();
    assert!(changed.is_empty(), "false positives: {changed:#?}");
}
