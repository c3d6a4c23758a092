//! The OpenAI API's request and response bodies, as clients send and expect them. Requests refuse
//! fields this server does not honour (an unsupported parameter is an error, not silently ignored).

use serde::{Deserialize, Serialize};

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// A message's content: a string, or parts of which only text is accepted.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    pub content: Content,
    #[serde(default)]
    pub name: Option<String>,
}

/// Sampling and length fields both endpoints take (written out in each request, since serde cannot
/// refuse unknown fields through a flattened struct).
#[derive(Debug, Clone, Default)]
pub struct Sampling {
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<usize>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
}

macro_rules! sampling_fields {
    ($(#[$m:meta])* pub struct $name:ident { $($body:tt)* }) => {
        $(#[$m])*
        pub struct $name {
            $($body)*
            #[serde(default)]
            pub max_tokens: Option<usize>,
            #[serde(default)]
            pub temperature: Option<f32>,
            #[serde(default)]
            pub top_p: Option<f32>,
            #[serde(default)]
            pub seed: Option<u64>,
            #[serde(default)]
            pub stop: Option<Stop>,
            #[serde(default)]
            pub n: Option<usize>,
            #[serde(default)]
            pub presence_penalty: Option<f32>,
            #[serde(default)]
            pub frequency_penalty: Option<f32>,
        }

        impl $name {
            pub fn sampling(&self) -> Sampling {
                Sampling {
                    max_tokens: self.max_tokens,
                    temperature: self.temperature,
                    top_p: self.top_p,
                    seed: self.seed,
                    stop: self.stop.clone(),
                    n: self.n,
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                }
            }
        }
    };
}

sampling_fields! {
/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    /// pai: the adapter, when `model` names the base.
    #[serde(default)]
    pub adapter: Option<String>,
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub logprobs: bool,
    #[serde(default)]
    pub top_logprobs: Option<usize>,
    /// Accepted and logged (OpenAI's end-user id).
    #[serde(default)]
    pub user: Option<String>,
    /// pai, with `"model": "auto"`: the tier to answer (`local`, `L2`, `L3`, or a deployment's name).
    #[serde(default)]
    pub tier: Option<String>,
    /// pai: this request must not leave the machine.
    #[serde(default)]
    pub private: bool,
}
}

sampling_fields! {
/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    #[serde(default)]
    pub adapter: Option<String>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// The legacy API's integer: how many alternatives per token.
    #[serde(default)]
    pub logprobs: Option<usize>,
    #[serde(default)]
    pub user: Option<String>,
}
}

/// A completion prompt: one string (or a list holding one).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// Which adapter answered, and where it came from: a bad answer traces to the night that made it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Lineage {
    /// The adapter name, or null for the bare base.
    pub adapter: Option<String>,
    pub version: Option<String>,
    /// The load that answered (a new one each time an adapter is loaded).
    pub generation: Option<u64>,
    /// The hash of the dataset the adapter was trained on.
    pub dataset_hash: Option<String>,
    /// The eval report that promoted it.
    pub report: Option<String>,
}

impl Lineage {
    /// `personal@v3`, or `base`: the `x-pai-adapter` header.
    pub fn header(&self) -> String {
        match (&self.adapter, &self.version) {
            (Some(a), Some(v)) => format!("{a}@{v}"),
            (Some(a), None) => a.clone(),
            _ => "base".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}
