//! The generation routes: `POST /v1/chat/completions` and `POST /v1/completions`, answered whole or
//! streamed as server-sent events ending in `data: [DONE]` (usage last when asked), with
//! log-probabilities when asked and the lineage of the adapter that answered in the body (`pai`) and
//! the headers (`x-pai-adapter`, `x-pai-generation`). Generation itself runs in the engine.

use std::convert::Infallible;
use std::ops::ControlFlow;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use pai_model::{FinishReason, GenerateOptions, Generation, Message, TokenLogprob};
use serde_json::{json, Value};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

use crate::error::ApiError;
use crate::metrics::AdapterLabel;
use crate::openai::{
    ChatRequest, ChatTokenLogprob, CompletionRequest, Content, Lineage, Prompt, Sampling,
    TopLogprob, Usage,
};
use crate::routes::{parse, ApiKeyIndex};
use crate::state::{LoadedAdapter, ServeState};

/// The generation options a request asks for, checked against the model's context.
fn options(
    s: &ServeState,
    sampling: &Sampling,
    max_tokens: Option<usize>,
    prompt_tokens: usize,
    logprobs: Option<usize>,
) -> Result<GenerateOptions, ApiError> {
    if sampling.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(
            Some("n"),
            "unsupported_parameter",
            "n must be 1: this server returns one choice",
        ));
    }
    if logprobs.is_some_and(|k| k > 20) {
        return Err(ApiError::invalid(
            Some("top_logprobs"),
            "invalid_value",
            "at most 20 alternatives per token",
        ));
    }
    let context = s.base.model.config().context_length;
    let room = context.saturating_sub(prompt_tokens);
    let max_tokens = max_tokens.or(sampling.max_tokens);
    if max_tokens == Some(0) {
        return Err(ApiError::invalid(
            Some("max_tokens"),
            "invalid_value",
            "max_tokens must be at least 1",
        ));
    }
    if let Some(m) = max_tokens.filter(|&m| m > s.max_tokens_limit) {
        return Err(ApiError::invalid(
            Some("max_tokens"),
            "invalid_value",
            format!(
                "max_tokens is {m}; this server allows at most {}",
                s.max_tokens_limit
            ),
        ));
    }
    let wanted = max_tokens.unwrap_or(room.min(s.max_tokens_limit));
    if room == 0 || prompt_tokens + wanted > context {
        return Err(ApiError::invalid(
            Some("messages"),
            "context_length_exceeded",
            format!(
                "This model's maximum context length is {context} tokens. However, you requested \
                 {} tokens ({prompt_tokens} in the prompt, {wanted} in the completion).",
                prompt_tokens + wanted
            ),
        ));
    }
    let mut params = pai_model::SamplingParams {
        // OpenAI's default temperature is 1.
        temperature: sampling.temperature.unwrap_or(1.0),
        top_p: sampling.top_p.unwrap_or(1.0),
        presence_penalty: sampling.presence_penalty.unwrap_or(0.0),
        frequency_penalty: sampling.frequency_penalty.unwrap_or(0.0),
        ..Default::default()
    };
    if let Some(seed) = sampling.seed {
        params.seed = seed;
    }
    let opts = GenerateOptions {
        max_tokens: Some(wanted),
        sampling: params,
        stop: sampling
            .stop
            .clone()
            .map(|s| s.into_vec())
            .unwrap_or_default(),
        ignore_eos: false,
        logprobs,
    };
    pai_model::Sampler::new(opts.sampling.clone())?;
    if opts.stop.len() > 4 {
        return Err(ApiError::invalid(
            Some("stop"),
            "invalid_value",
            "at most 4 stop sequences",
        ));
    }
    Ok(opts)
}

fn lineage(adapter: &Option<Arc<LoadedAdapter>>) -> Lineage {
    adapter.as_ref().map_or(
        Lineage {
            adapter: None,
            version: None,
            generation: None,
            dataset_hash: None,
            report: None,
        },
        |a| a.lineage(),
    )
}

fn finish(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "stop",
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The response with the lineage headers.
fn with_lineage(body: Value, lineage: &Lineage) -> Response {
    let mut resp = Json(body).into_response();
    lineage_headers(&mut resp, lineage);
    resp
}

/// `x-pai-adapter` (`name@vN` or `base`) and, for an adapter, `x-pai-generation`.
fn lineage_headers(resp: &mut Response, lineage: &Lineage) {
    if let Ok(v) = HeaderValue::from_str(&lineage.header()) {
        resp.headers_mut()
            .insert(HeaderName::from_static("x-pai-adapter"), v);
    }
    if let Some(g) = lineage.generation {
        resp.headers_mut().insert(
            HeaderName::from_static("x-pai-generation"),
            HeaderValue::from(g),
        );
    }
}

/// Who a request comes from, for taking turns: its API key (when keys are configured), then
/// OpenAI's `user` field, else the model it asks for.
fn client_of(key: Option<Extension<ApiKeyIndex>>, user: Option<&str>, model: &str) -> String {
    let key = key.map_or(String::new(), |Extension(ApiKeyIndex(i))| {
        format!("key {i}")
    });
    match user {
        Some(user) => format!("{key}/user {user}"),
        None => format!("{key}/model {model}"),
    }
}

/// Generate through the engine, batched with whatever else is running.
async fn run(
    s: Arc<ServeState>,
    client: String,
    adapter: Option<Arc<LoadedAdapter>>,
    prompt: Vec<u32>,
    opts: GenerateOptions,
    on_text: impl FnMut(&str, &[TokenLogprob]) -> ControlFlow<()> + Send + 'static,
) -> Result<Generation, ApiError> {
    let label = AdapterLabel::from_header(&lineage(&adapter).header());
    let (done, answer) = tokio::sync::oneshot::channel();
    s.engine()?.submit(
        &s,
        crate::engine::Request {
            client,
            adapter,
            prompt,
            opts,
            on_text: Box::new(on_text),
            done,
            arrived: std::time::Instant::now(),
            label,
        },
    )?;
    answer
        .await
        .map_err(|_| ApiError::internal("the engine dropped the request"))?
}

/// One accepted request, ready to generate: who answers, what, and how the reply is labelled.
struct Job {
    s: Arc<ServeState>,
    /// Who asks (`client_of`): the engine takes turns between clients.
    client: String,
    adapter: Option<Arc<LoadedAdapter>>,
    prompt: Vec<u32>,
    /// Bytes of the prompt's text where completions' `text_offset` starts (0 for chat).
    prompt_text_len: usize,
    opts: GenerateOptions,
    lineage: Lineage,
    id: String,
    model: String,
}

impl Job {
    /// The whole generation, with the job's labels for the reply: (generation, prompt tokens,
    /// lineage, id, model).
    async fn complete(self) -> Result<(Generation, usize, Lineage, String, String), ApiError> {
        let prompt_tokens = self.prompt.len();
        let g = run(
            self.s,
            self.client,
            self.adapter,
            self.prompt,
            self.opts,
            |_, _| ControlFlow::Continue(()),
        )
        .await?;
        Ok((g, prompt_tokens, self.lineage, self.id, self.model))
    }
}

pub(crate) fn chat_messages(req: &ChatRequest) -> Result<Vec<Message>, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            Some("messages"),
            "invalid_value",
            "messages is empty",
        ));
    }
    req.messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !matches!(
                m.role.as_str(),
                "system" | "developer" | "user" | "assistant"
            ) {
                return Err(ApiError::invalid(
                    Some(&format!("messages[{i}].role")),
                    "invalid_value",
                    format!(
                        "role {:?} is not one of system, developer, user, assistant",
                        m.role
                    ),
                ));
            }
            let text = match &m.content {
                Content::Text(t) => t.clone(),
                Content::Parts(parts) => {
                    let mut text = String::new();
                    for (k, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            _ => {
                                return Err(ApiError::invalid(
                                    Some(&format!("messages[{i}].content[{k}]")),
                                    "unsupported_parameter",
                                    format!(
                                        "content of type {:?} is not supported (text only)",
                                        p.kind
                                    ),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            let role = if m.role == "developer" {
                "system"
            } else {
                m.role.as_str()
            };
            Ok(Message::new(role, text))
        })
        .collect()
}

pub async fn chat_completions(
    State(s): State<Arc<ServeState>>,
    key: Option<Extension<ApiKeyIndex>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse(&body)?;
    if req.model == "auto" {
        return crate::router::dispatch::auto_chat(s, key, headers, req, body).await;
    }
    chat_local(s, key, req).await
}

/// A chat request answered by this server's model (the base or an adapter).
pub(crate) async fn chat_local(
    s: Arc<ServeState>,
    key: Option<Extension<ApiKeyIndex>>,
    req: ChatRequest,
) -> Result<Response, ApiError> {
    let adapter = s.resolve(&req.model, req.adapter.as_deref())?;
    let messages = chat_messages(&req)?;
    let template = s.base.chat_template()?;
    let prompt = template.encode(&s.base.tokenizer, &messages, true)?;
    let logprobs = req.logprobs.then(|| req.top_logprobs.unwrap_or(0));
    if req.top_logprobs.is_some() && !req.logprobs {
        return Err(ApiError::invalid(
            Some("top_logprobs"),
            "invalid_value",
            "top_logprobs needs logprobs: true",
        ));
    }
    let opts = options(
        &s,
        &req.sampling(),
        req.max_completion_tokens,
        prompt.len(),
        logprobs,
    )?;
    let job = Job {
        lineage: lineage(&adapter),
        id: format!("chatcmpl-{}", s.next_id()),
        model: req.model.clone(),
        s: s.clone(),
        client: client_of(key, req.user.as_deref(), &req.model),
        adapter,
        prompt,
        prompt_text_len: 0,
        opts,
    };
    let usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    if req.stream {
        return Ok(stream(job, usage, true));
    }
    let (g, prompt_tokens, lineage, id, model) = job.complete().await?;
    let logprobs = req
        .logprobs
        .then(|| chat_logprobs(&s.base.tokenizer, &g.logprobs));
    let body = json!({
        "id": id, "object": "chat.completion", "created": now(), "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": g.text},
            "logprobs": logprobs,
            "finish_reason": finish(g.finish_reason),
        }],
        "usage": Usage::new(prompt_tokens, g.tokens.len()),
        "pai": lineage,
    });
    Ok(with_lineage(body, &lineage))
}

pub async fn completions(
    State(s): State<Arc<ServeState>>,
    key: Option<Extension<ApiKeyIndex>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(&body)?;
    if req.model == "auto" {
        return Err(ApiError::invalid(
            Some("model"),
            "invalid_value",
            "\"model\": \"auto\" (the router) answers /v1/chat/completions only",
        ));
    }
    let adapter = s.resolve(&req.model, req.adapter.as_deref())?;
    let text = match &req.prompt {
        Prompt::One(t) => t.clone(),
        Prompt::Many(v) if v.len() == 1 => v[0].clone(),
        Prompt::Many(v) => {
            return Err(ApiError::invalid(
                Some("prompt"),
                "unsupported_parameter",
                format!("one prompt per request (got {})", v.len()),
            ))
        }
    };
    let prompt = s.base.tokenizer.encode_prompt(&text, false)?;
    if prompt.is_empty() {
        return Err(ApiError::invalid(
            Some("prompt"),
            "invalid_value",
            "prompt is empty",
        ));
    }
    let opts = options(&s, &req.sampling(), None, prompt.len(), req.logprobs)?;
    let job = Job {
        lineage: lineage(&adapter),
        id: format!("cmpl-{}", s.next_id()),
        model: req.model.clone(),
        s: s.clone(),
        client: client_of(key, req.user.as_deref(), &req.model),
        adapter,
        prompt,
        prompt_text_len: text.len(),
        opts,
    };
    let usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    if req.stream {
        return Ok(stream(job, usage, false));
    }
    let (g, prompt_tokens, lineage, id, model) = job.complete().await?;
    let logprobs = req
        .logprobs
        .map(|_| completion_logprobs(&s.base.tokenizer, &g.logprobs, &mut text.len()));
    let body = json!({
        "id": id, "object": "text_completion", "created": now(), "model": model,
        "choices": [{"index": 0, "text": g.text, "logprobs": logprobs, "finish_reason": finish(g.finish_reason)}],
        "usage": Usage::new(prompt_tokens, g.tokens.len()),
        "pai": lineage,
    });
    Ok(with_lineage(body, &lineage))
}

/// Chat's `logprobs` object for these tokens.
fn chat_logprobs(tokenizer: &pai_model::Tokenizer, logprobs: &[TokenLogprob]) -> Value {
    // `token` is the token's text alone (lossy for part of a character); `bytes` are exact.
    let piece = |id: u32| tokenizer.decode(&[id], false).unwrap_or_default();
    let content: Vec<ChatTokenLogprob> = logprobs
        .iter()
        .map(|t| ChatTokenLogprob {
            bytes: tokenizer.token_bytes(t.token),
            token: piece(t.token),
            logprob: t.logprob,
            top_logprobs: t
                .top
                .iter()
                .map(|&(id, lp)| TopLogprob {
                    bytes: tokenizer.token_bytes(id),
                    token: piece(id),
                    logprob: lp,
                })
                .collect(),
        })
        .collect();
    json!({ "content": content })
}

/// Completions' `logprobs` object for these tokens; `offset` is where the first one's text starts in
/// prompt + completion, and moves past the last.
fn completion_logprobs(
    tokenizer: &pai_model::Tokenizer,
    logprobs: &[TokenLogprob],
    offset: &mut usize,
) -> Value {
    let piece = |id: u32| tokenizer.decode(&[id], false).unwrap_or_default();
    let tokens: Vec<String> = logprobs.iter().map(|t| piece(t.token)).collect();
    let offsets: Vec<usize> = tokens
        .iter()
        .map(|t| {
            let at = *offset;
            *offset += t.len();
            at
        })
        .collect();
    let top: Vec<serde_json::Map<String, Value>> = logprobs
        .iter()
        .map(|t| {
            t.top
                .iter()
                .map(|&(id, lp)| (piece(id), json!(lp)))
                .collect()
        })
        .collect();
    json!({
        "tokens": tokens,
        "token_logprobs": logprobs.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": offsets,
    })
}

/// Server-sent events: a chunk per piece of text as soon as it is final, a last chunk with the
/// finish reason, one with the usage when asked, then `data: [DONE]`. A client that goes away
/// cancels the generation.
fn stream(job: Job, include_usage: bool, chat: bool) -> Response {
    let Job {
        s,
        client,
        adapter,
        prompt,
        prompt_text_len,
        opts,
        lineage,
        id,
        model,
    } = job;
    // Unbounded: the engine thread must never wait on a slow client (the text is bounded by
    // max_tokens).
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let created = now();
    let chunk = {
        let (id, model, lineage) = (id.clone(), model.clone(), lineage.clone());
        move |delta: Value, finish: Option<&str>, logprobs: Value| -> Value {
            let choice = if chat {
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            } else {
                json!({"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")), "logprobs": logprobs, "finish_reason": finish})
            };
            json!({
                "id": id, "object": if chat { "chat.completion.chunk" } else { "text_completion" },
                "created": created, "model": model, "choices": [choice], "pai": lineage,
            })
        }
    };
    let event = |v: Value| Event::default().data(v.to_string());
    let prompt_tokens = prompt.len();
    let first = chunk(
        json!({"role": "assistant", "content": ""}),
        None,
        Value::Null,
    );
    let tx_text = tx.clone();
    let piece_chunk = chunk.clone();
    // Log-probabilities go with the text of the tokens they belong to.
    let with_logprobs = opts.logprobs.is_some();
    let state = s.clone();
    let mut offset = prompt_text_len;
    let mut logprobs_of = move |lps: &[TokenLogprob]| -> Value {
        match (with_logprobs, chat) {
            (false, _) => Value::Null,
            (true, true) => chat_logprobs(&state.base.tokenizer, lps),
            (true, false) => completion_logprobs(&state.base.tokenizer, lps, &mut offset),
        }
    };
    tokio::spawn(async move {
        if chat && tx.send(event(first)).is_err() {
            return;
        }
        let result = run(s, client, adapter, prompt, opts, move |text, lps| {
            let ev = event(piece_chunk(
                json!({"content": text}),
                None,
                logprobs_of(lps),
            ));
            match tx_text.send(ev) {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            }
        })
        .await;
        match result {
            Ok(g) => {
                let _ = tx.send(event(chunk(
                    json!({}),
                    Some(finish(g.finish_reason)),
                    Value::Null,
                )));
                if include_usage {
                    let mut last = chunk(json!({}), None, Value::Null);
                    last["choices"] = json!([]);
                    last["usage"] = json!(Usage::new(prompt_tokens, g.tokens.len()));
                    let _ = tx.send(event(last));
                }
            }
            Err(e) => {
                let _ = tx.send(event(
                    json!({"error": {"message": e.message, "type": e.kind, "code": e.code}}),
                ));
            }
        }
        let _ = tx.send(Event::default().data("[DONE]"));
    });
    let mut resp =
        Sse::new(UnboundedReceiverStream::new(rx).map(Ok::<_, Infallible>)).into_response();
    lineage_headers(&mut resp, &lineage);
    resp
}
