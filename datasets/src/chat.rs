//! Conversations as training examples. A chat source holds JSON Lines files in OpenAI's fine-tuning
//! format, one conversation a line:
//!
//! ```json
//! {"messages": [{"role": "system", "content": "…"}, {"role": "user", "content": "…"},
//!               {"role": "assistant", "content": "…", "weight": 0}, …]}
//! ```
//!
//! Each valid line becomes one `chat` example whose text is the conversation written back as one
//! canonical JSON object ([`Conversation::to_text`]), its contents scrubbed. The trainer renders it
//! with the model's own chat template and puts the loss on the assistant replies only, skipping those
//! with `weight: 0`. A line that is not such a conversation is skipped with a reason that names it.

use serde::{Deserialize, Serialize};

use crate::scrub::{scrub, PiiPolicy};

/// One conversation of a chat example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    pub messages: Vec<ChatMessage>,
}

/// One message: its role (`system`, `user` or `assistant`), its text, and for assistant replies
/// whether the loss covers it (`weight`: 1 by default, 0 to keep a reply as context only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
}

impl ChatMessage {
    /// Whether the loss covers this message: an assistant reply not weighted 0.
    pub fn trained(&self) -> bool {
        self.role == "assistant" && self.weight != Some(0)
    }
}

/// A line as written: contents may be a string or OpenAI's list of text parts; other fields of a
/// message (`name`) or of the line (`tools`, `metadata`) are allowed and dropped.
#[derive(Deserialize)]
struct Line {
    messages: Vec<LineMessage>,
}

#[derive(Deserialize)]
struct LineMessage {
    role: String,
    content: Option<Content>,
    weight: Option<serde_json::Value>,
    tool_calls: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

impl Conversation {
    /// A conversation from one line of a chat file, or why the line is not one.
    pub fn parse(line: &str) -> Result<Self, String> {
        let line: Line = serde_json::from_str(line)
            .map_err(|e| format!("not a JSON object with `messages`: {e}"))?;
        let mut messages = Vec::with_capacity(line.messages.len());
        for (i, m) in line.messages.into_iter().enumerate() {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                return Err(format!(
                    "message {i} has role `{}`; only system, user and assistant are supported",
                    m.role
                ));
            }
            if m.tool_calls.is_some() {
                return Err(format!(
                    "message {i} has tool calls, which are not supported"
                ));
            }
            let content = match m.content {
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(format!(
                                    "message {i} has a `{kind}` part; only text is supported"
                                ))
                            }
                        }
                    }
                    text
                }
                None => return Err(format!("message {i} has no content")),
            };
            let weight = match m.weight {
                None => None,
                Some(w) if m.role != "assistant" => {
                    return Err(format!(
                        "message {i} ({}) has weight {w}; only assistant replies are weighted",
                        m.role
                    ))
                }
                Some(w) => match w.as_u64() {
                    Some(0) => Some(0),
                    Some(1) => Some(1),
                    _ => return Err(format!("message {i} has weight {w}; expected 0 or 1")),
                },
            };
            messages.push(ChatMessage {
                role: m.role,
                content,
                weight,
            });
        }
        if !messages.iter().any(ChatMessage::trained) {
            return Err("no assistant reply to learn (none, or all weighted 0)".into());
        }
        Ok(Self { messages })
    }

    /// The conversation as an example's text: one JSON object, the form [`Conversation::parse`] reads.
    pub fn to_text(&self) -> String {
        // Serialising strings and small integers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The conversation with secrets and PII replaced in every content, and the redactions by kind.
    pub fn scrubbed(mut self, pii: PiiPolicy) -> (Self, Vec<(String, usize)>) {
        let mut redactions = Vec::new();
        for m in &mut self.messages {
            let s = scrub(&m.content, pii);
            redactions.extend(s.redactions);
            m.content = s.text;
        }
        (self, redactions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_openai_fine_tuning_lines() {
        let c = Conversation::parse(
            r#"{"messages": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}], "name": "me"},
                {"role": "assistant", "content": "Hello.", "weight": 0},
                {"role": "user", "content": "Again"},
                {"role": "assistant", "content": "Hello again."}], "metadata": {"a": 1}}"#,
        )
        .unwrap();
        assert_eq!(c.messages.len(), 5);
        assert_eq!(c.messages[1].content, "Hi there");
        let trained: Vec<bool> = c.messages.iter().map(ChatMessage::trained).collect();
        assert_eq!(trained, [false, false, false, false, true]);
        // The stored text reads back to the same conversation.
        assert_eq!(Conversation::parse(&c.to_text()).unwrap(), c);
    }

    #[test]
    fn lines_that_are_not_conversations_say_why() {
        let cases = [
            ("{\"text\": \"x\"}", "messages"),
            (
                r#"{"messages": [{"role": "user", "content": "q"}]}"#,
                "no assistant reply",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}"#,
                "no assistant reply",
            ),
            (
                r#"{"messages": [{"role": "tool", "content": "q"}]}"#,
                "role `tool`",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]}"#,
                "only assistant replies are weighted",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]}"#,
                "expected 0 or 1",
            ),
            (
                r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}"#,
                "`image_url` part",
            ),
        ];
        for (line, reason) in cases {
            let err = Conversation::parse(line).unwrap_err();
            assert!(err.contains(reason), "{line}: {err}");
        }
    }

    #[test]
    fn scrubbing_reaches_every_message() {
        let email = ["someone", "@", "mailbox.net"].concat();
        let c = Conversation::parse(&format!(
            r#"{{"messages": [{{"role": "user", "content": "mail {email}"}}, {{"role": "assistant", "content": "ok, {email}"}}]}}"#
        ))
        .unwrap();
        let (c, redactions) = c.scrubbed(PiiPolicy::default());
        assert!(c.messages.iter().all(|m| !m.content.contains(&email)));
        assert_eq!(redactions.iter().map(|(_, n)| n).sum::<usize>(), 2);
    }
}
