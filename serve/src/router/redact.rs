//! Redact mode (`[router.privacy] redact = true`): a request whose only obstacle to leaving is a
//! secret or personal data may go out with each such value replaced by a numbered placeholder
//! (`<PII:email#1>`, `<SECRET:github_token#2>`), and the answer comes back with the values restored,
//! whole or streamed (a placeholder split across stream chunks is held back until it is complete).
//! Quotes of private notes and requests flagged private never leave, redacted or not. A redaction that
//! cannot be made exactly (the text already held a placeholder-looking string) is no redaction: the
//! request stays local.

use pai_datasets::scrub::{scrub, PiiPolicy};

/// Redact `text`: its secrets and the personal data `pii` names become numbered placeholders, counted
/// on from `next` across the texts of one request. None when the placeholders cannot be matched to
/// the values one to one.
pub fn redact(
    text: &str,
    pii: PiiPolicy,
    next: &mut usize,
    values: &mut Vec<(String, String)>,
) -> Option<String> {
    let s = scrub(text, pii);
    if s.removed.is_empty() {
        return Some(text.to_string());
    }
    let mut out = s.text;
    // Per placeholder kind, the values in the order its occurrences appear.
    let mut kinds: Vec<&String> = s.removed.iter().map(|(p, _)| p).collect();
    kinds.sort();
    kinds.dedup();
    for kind in kinds {
        let originals: Vec<&String> = s
            .removed
            .iter()
            .filter(|(p, _)| p == kind)
            .map(|(_, v)| v)
            .collect();
        if out.matches(kind.as_str()).count() != originals.len() {
            return None;
        }
        let mut numbered = String::with_capacity(out.len());
        let mut rest = out.as_str();
        for original in originals {
            let at = rest.find(kind.as_str())?;
            *next += 1;
            let placeholder = format!("{}#{}>", &kind[..kind.len() - 1], *next);
            numbered.push_str(&rest[..at]);
            numbered.push_str(&placeholder);
            values.push((placeholder, original.clone()));
            rest = &rest[at + kind.len()..];
        }
        numbered.push_str(rest);
        out = numbered;
    }
    Some(out)
}

/// Puts the values back into an answer, whole or piece by piece.
#[derive(Debug, Clone, Default)]
pub struct Restorer {
    values: Vec<(String, String)>,
    longest: usize,
    /// Streamed text held back because it may be the start of a placeholder.
    carry: String,
}

impl Restorer {
    pub fn new(values: Vec<(String, String)>) -> Self {
        let longest = values.iter().map(|(p, _)| p.len()).max().unwrap_or(0);
        Self {
            values,
            longest,
            carry: String::new(),
        }
    }

    /// How many values it restores.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// `text` with every placeholder replaced by its value.
    pub fn restore(&self, text: &str) -> String {
        let mut out = text.to_string();
        // Longest first, so `#12` is never taken for `#1` followed by `2`.
        let mut values: Vec<&(String, String)> = self.values.iter().collect();
        values.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        for (placeholder, value) in values {
            if out.contains(placeholder.as_str()) {
                out = out.replace(placeholder.as_str(), value);
            }
        }
        out
    }

    /// The next piece of a streamed answer: what can be given out now, restored.
    pub fn push(&mut self, piece: &str) -> String {
        self.carry.push_str(piece);
        // Hold back from an unclosed `<` that could still become a placeholder.
        let hold = self
            .carry
            .rfind('<')
            .filter(|&i| !self.carry[i..].contains('>') && self.carry.len() - i < self.longest);
        let ready = match hold {
            Some(i) => {
                let rest = self.carry.split_off(i);
                std::mem::replace(&mut self.carry, rest)
            }
            None => std::mem::take(&mut self.carry),
        };
        self.restore(&ready)
    }

    /// What is still held back, at the end of the stream.
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.carry);
        self.restore(&rest)
    }
}

/// A chat completion stream with its contents restored: complete lines are rewritten as they
/// arrive (each `data:` chunk's `delta.content` through the `Restorer`), and what is held back is
/// given out with the finish reason, or before `[DONE]`.
#[derive(Debug, Default)]
pub struct SseRestorer {
    restorer: Restorer,
    /// Bytes of a line not yet complete.
    pending: Vec<u8>,
}

impl SseRestorer {
    pub fn new(restorer: Restorer) -> Self {
        Self {
            restorer,
            pending: Vec::new(),
        }
    }

    /// The rewritten complete lines among what has arrived.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(chunk);
        let Some(end) = self.pending.iter().rposition(|&b| b == b'\n') else {
            return Vec::new();
        };
        let rest = self.pending.split_off(end + 1);
        let lines = std::mem::replace(&mut self.pending, rest);
        let mut out = Vec::with_capacity(lines.len());
        for line in String::from_utf8_lossy(&lines).split_inclusive('\n') {
            out.extend_from_slice(self.line(line).as_bytes());
        }
        out
    }

    /// The end of the stream: an incomplete last line and anything still held back.
    pub fn finish(&mut self) -> Vec<u8> {
        let rest = std::mem::take(&mut self.pending);
        let mut out = self.line(&String::from_utf8_lossy(&rest)).into_bytes();
        let carry = self.restorer.finish();
        if !carry.is_empty() {
            out.extend_from_slice(content_event(&carry).as_bytes());
        }
        out
    }

    fn line(&mut self, line: &str) -> String {
        let Some(data) = line.strip_prefix("data:") else {
            return line.to_string();
        };
        let data = data.trim();
        if data == "[DONE]" {
            let carry = self.restorer.finish();
            return if carry.is_empty() {
                line.to_string()
            } else {
                content_event(&carry) + line
            };
        }
        let Ok(mut v) = serde_json::from_str::<serde_json::Value>(data) else {
            return line.to_string();
        };
        if let Some(choices) = v["choices"].as_array_mut() {
            for choice in choices {
                let mut text = choice["delta"]["content"]
                    .as_str()
                    .map(|c| self.restorer.push(c));
                if choice["finish_reason"].is_string() {
                    let rest = self.restorer.finish();
                    if !rest.is_empty() {
                        text = Some(text.unwrap_or_default() + &rest);
                    }
                }
                if let Some(t) = text {
                    choice["delta"]["content"] = serde_json::Value::String(t);
                }
            }
        }
        let newline = if line.ends_with('\n') { "\n" } else { "" };
        format!("data: {v}{newline}")
    }
}

/// A chunk carrying only `text` as content.
fn content_event(text: &str) -> String {
    let chunk = serde_json::json!({
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}],
    });
    format!("data: {chunk}\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_go_out_as_numbered_placeholders_and_come_back_whole_or_streamed() {
        let email = ["ada", "@", "analytical-engines.co.uk"].concat();
        let other = ["charles", "@", "difference-engines.co.uk"].concat();
        let text = format!("Write to {email} and copy {other}; then {email} again.");
        let (mut next, mut values) = (0, Vec::new());
        let out = redact(&text, PiiPolicy::default(), &mut next, &mut values).unwrap();
        assert_eq!(
            out,
            "Write to <PII:email#1> and copy <PII:email#2>; then <PII:email#3> again."
        );
        assert_eq!(values.len(), 3);
        let r = Restorer::new(values);
        assert_eq!(r.restore(&out), text);

        // Streamed, a placeholder cut anywhere still comes back whole.
        for cut in 0..out.len() {
            let (a, b) = out.split_at(cut);
            let mut r = r.clone();
            let streamed = r.push(a) + &r.push(b) + &r.finish();
            assert_eq!(streamed, text, "cut at {cut}");
        }
        // An ordinary `<` passes once it cannot be a placeholder any more.
        let mut r = r.clone();
        assert_eq!(r.push("a < b and"), "a ");
        assert_eq!(r.push(" c > d"), "< b and c > d");

        // Through a stream's events, cut mid-placeholder and mid-line.
        let events = format!(
            "data: {}\n\ndata: {}\n\ndata: {}\n\ndata: [DONE]\n\n",
            serde_json::json!({"choices": [{"index": 0, "delta": {"content": &out[..15]}}]}),
            serde_json::json!({"choices": [{"index": 0, "delta": {"content": &out[15..]}}]}),
            serde_json::json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        );
        for cut in [1, 40, 97, events.len() - 3] {
            let mut sse = SseRestorer::new(r.clone());
            let mut bytes = sse.feed(&events.as_bytes()[..cut]);
            bytes.extend(sse.feed(&events.as_bytes()[cut..]));
            bytes.extend(sse.finish());
            let got: String = String::from_utf8(bytes)
                .unwrap()
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter(|d| *d != "[DONE]")
                .filter_map(|d| {
                    let v: serde_json::Value = serde_json::from_str(d).unwrap();
                    v["choices"][0]["delta"]["content"]
                        .as_str()
                        .map(String::from)
                })
                .collect();
            assert_eq!(got, text, "cut at {cut}");
        }

        // A text that already holds a placeholder-looking string cannot be redacted exactly.
        let tricky = format!("literally <PII:email> and {email}");
        assert!(redact(&tricky, PiiPolicy::default(), &mut next, &mut Vec::new()).is_none());
        // Nothing to redact: the text as it is.
        assert_eq!(
            redact("plain", PiiPolicy::default(), &mut next, &mut Vec::new()).as_deref(),
            Some("plain")
        );
    }
}
