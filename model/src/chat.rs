//! Chat templates: the model's own Jinja template (`tokenizer.chat_template`) rendered with minijinja,
//! and turned into token ids so that what a user wrote is always tokenized as plain text: the template's
//! markup becomes control tokens, message contents never do.

use std::ops::Range;

use minijinja::{context, Environment, Error as JinjaError, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A compiled chat template with the special-token texts it may print.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

// Private-use characters mark where message contents go when rendering for tokenization.
const OPEN: char = '\u{F8F0}';
const CLOSE: char = '\u{F8F1}';

impl ChatTemplate {
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| -> String { format_now(&fmt) });
        env.add_template_owned("chat", source.to_owned())
            .map_err(|source| ModelError::ChatTemplate { source })?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default(),
            eos_token: eos_token.unwrap_or_default(),
        })
    }

    /// The prompt text for `messages`; with `add_generation_prompt`, ending where the assistant's
    /// reply begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|source| ModelError::ChatTemplate { source })?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|source| ModelError::ChatTemplate { source })
    }

    /// Token ids of the rendered conversation. The template's text is tokenized with control tokens
    /// recognised; each message's content as plain text, so `<|im_start|>` typed by a user stays text.
    pub fn encode(
        &self,
        tokenizer: &Tokenizer,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let rendered = self.render(&marked(messages), add_generation_prompt)?;
        Ok(self.tokenize(tokenizer, messages, &rendered, &[])?.ids)
    }

    /// A conversation to train on: its tokens (as [`ChatTemplate::encode`] gives them) and the token
    /// ranges the loss covers. Those are each assistant message whose `trained` flag is set, with the
    /// template text that closes its turn (`<|im_end|>\n`), so the model learns where a reply ends. A
    /// reply's text is what rendering the conversation through it adds to rendering the turns before it
    /// with the generation prompt. A template that renders earlier turns differently from the last (one
    /// that drops reasoning from history, say) can only train the last reply; one that cannot even do
    /// that is an error naming the message.
    pub fn encode_for_training(
        &self,
        tokenizer: &Tokenizer,
        messages: &[Message],
        trained: &[bool],
    ) -> Result<TrainingTokens> {
        let marked = marked(messages);
        let full = self.render(&marked, false)?;
        let last_reply = messages.iter().rposition(|m| m.role == "assistant");
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" || !trained.get(i).copied().unwrap_or(true) {
                continue;
            }
            let before = self.render(&marked[..i], true)?;
            let through = self.render(&marked[..=i], false)?;
            if full.starts_with(&through) && through.starts_with(&before) {
                spans.push(before.len()..through.len());
            } else if Some(i) == last_reply && full.starts_with(&before) {
                spans.push(before.len()..full.len());
            } else {
                return Err(ModelError::InvalidRequest {
                    field: "messages",
                    reason: format!(
                        "the chat template does not render message {i} (assistant) as it renders \
                         the conversation, so its reply cannot be told apart from the prompt"
                    ),
                });
            }
        }
        self.tokenize(tokenizer, messages, &full, &spans)
    }

    /// Tokens of a rendering of `marked(messages)`, with the tokens whose text starts inside one of
    /// `spans` (byte ranges of `rendered`) reported as trained.
    fn tokenize(
        &self,
        tokenizer: &Tokenizer,
        messages: &[Message],
        rendered: &str,
        spans: &[Range<usize>],
    ) -> Result<TrainingTokens> {
        let pieces =
            split_marked(rendered, messages.len()).ok_or_else(|| ModelError::InvalidRequest {
                field: "messages",
                reason:
                    "the chat template rewrites message contents, so pai cannot keep them apart \
                         from its markup"
                        .into(),
            })?;
        let mut out = TrainingTokens::default();
        if tokenizer.adds_bos() {
            if let Some(bos) = tokenizer.bos() {
                let starts_with_bos =
                    !self.bos_token.is_empty() && rendered.starts_with(&self.bos_token);
                if !starts_with_bos {
                    out.ids.push(bos);
                }
            }
        }
        let in_span = |at: usize| spans.iter().any(|s| s.contains(&at));
        let push = |out: &mut TrainingTokens, ids: Vec<u32>, trained: bool| {
            let start = out.ids.len();
            out.ids.extend(ids);
            if !trained || out.ids.len() == start {
                return;
            }
            match out.trained.last_mut() {
                Some(last) if last.end == start => last.end = out.ids.len(),
                _ => out.trained.push(start..out.ids.len()),
            }
        };
        let mut pos = 0;
        for piece in pieces {
            match piece {
                Piece::Template(text) => {
                    // Cut the markup where a trained span starts or ends, so each part is one or
                    // the other.
                    let end = pos + text.len();
                    let mut cuts: Vec<usize> = spans
                        .iter()
                        .flat_map(|s| [s.start, s.end])
                        .filter(|&c| c > pos && c < end)
                        .collect();
                    cuts.sort_unstable();
                    cuts.push(end);
                    let mut from = pos;
                    for cut in cuts {
                        if cut > from {
                            let ids = tokenizer.encode(&rendered[from..cut], true)?;
                            push(&mut out, ids, in_span(from));
                        }
                        from = cut;
                    }
                    pos = end;
                }
                Piece::Content(i) => {
                    let ids = tokenizer.encode(&messages[i].content, false)?;
                    push(&mut out, ids, in_span(pos));
                    pos += marker(i).len();
                }
            }
        }
        Ok(out)
    }
}

/// A conversation's tokens and the ranges of them the loss covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrainingTokens {
    pub ids: Vec<u32>,
    pub trained: Vec<Range<usize>>,
}

/// The conversation with each content replaced by its marker, for rendering.
fn marked(messages: &[Message]) -> Vec<Message> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| Message::new(m.role.clone(), marker(i)))
        .collect()
}

fn marker(i: usize) -> String {
    format!("{OPEN}{i}{CLOSE}")
}

enum Piece<'a> {
    Template(&'a str),
    Content(usize),
}

/// Split rendered text at the content markers; `None` unless each of the `n` markers appears once.
fn split_marked(text: &str, n: usize) -> Option<Vec<Piece<'_>>> {
    let mut pieces = Vec::new();
    let mut seen = vec![false; n];
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len_utf8()..];
        let end = after.find(CLOSE)?;
        let index: usize = after[..end].parse().ok()?;
        if index >= n || seen[index] {
            return None;
        }
        seen[index] = true;
        if start > 0 {
            pieces.push(Piece::Template(&rest[..start]));
        }
        pieces.push(Piece::Content(index));
        rest = &after[end + CLOSE.len_utf8()..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Template(rest));
    }
    if rest.contains(CLOSE) {
        return None;
    }
    // A template may drop messages (e.g. a system message it replaces); what it keeps must be whole.
    Some(pieces)
}

/// `strftime_now` for templates that print today's date (Llama 3.x); supports the common fields.
fn format_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month_name = MONTHS[(month - 1) as usize];
    fmt.replace("%Y", &year.to_string())
        .replace("%m", &format!("{month:02}"))
        .replace("%d", &format!("{day:02}"))
        .replace("%B", month_name)
        .replace("%b", &month_name[..3])
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_smollm_template_with_default_system_prompt() {
        let t = ChatTemplate::new(SMOL, None, None).unwrap();
        let out = t.render(&[Message::user("Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(&[Message::system("Be brief."), Message::user("Hi")], false)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn raise_exception_and_pycompat_methods() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0].content.strip() }}",
            None,
            None,
        )
        .unwrap();
        assert_eq!(t.render(&[Message::user("  x  ")], false).unwrap(), "x");
        let err = t.render(&[Message::system("x")], false).unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }

    #[test]
    fn markers_split_in_order() {
        let text = format!("a{OPEN}0{CLOSE}b{OPEN}1{CLOSE}");
        let pieces = split_marked(&text, 2).unwrap();
        assert_eq!(pieces.len(), 4);
        assert!(split_marked(&format!("{OPEN}0{CLOSE}{OPEN}0{CLOSE}"), 1).is_none());
    }

    #[test]
    fn dates() {
        let s = format_now("%d %B %Y");
        assert_eq!(s.split(' ').count(), 3);
    }
}
