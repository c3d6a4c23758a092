//! The router over HTTP: `POST /v1/chat/completions` with `"model": "auto"` (decide, then try the
//! plan's targets in order until one answers) and `POST /v1/route` (the decision alone, nothing run).
//! Every answer says which tier and deployment served it and why, in headers (`x-pai-tier`,
//! `x-pai-tier-level`, `x-pai-route-rule`, `x-pai-fallbacks`) and, for a whole answer, in the body's
//! `pai.route`. A cloud stream is passed through as it comes; one that fails before its first token
//! falls back, one that breaks after it ends with an error event saying so.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::redact::{redact, Restorer, SseRestorer};
use super::upstream::{backoff, Answer, Failure, SseWatch};
use super::{Decision, EgressRecord, RouteInput, Target};
use crate::error::ApiError;
use crate::openai::{ChatRequest, Content};
use crate::routes::{parse, ApiKeyIndex};
use crate::state::ServeState;

/// Fields never forwarded to a cloud tier: pai's own, and OpenAI's `user` (the owner's end-user id
/// stays on this machine).
const PAI_FIELDS: [&str; 4] = ["adapter", "tier", "private", "user"];

/// One target of the plan that did not answer, and why.
#[derive(Debug, Clone, serde::Serialize)]
struct Fallback {
    target: String,
    cause: &'static str,
    error: String,
}

/// The texts the privacy gate reads: every message's content (and name), and the stop sequences
/// (everything of the request that is forwarded and written by a person).
fn gate_texts(req: &ChatRequest) -> Vec<String> {
    let mut out = contents(req);
    out.extend(req.stop.clone().map(|s| s.into_vec()).unwrap_or_default());
    out
}

/// Every message's content (and name).
fn contents(req: &ChatRequest) -> Vec<String> {
    req.messages
        .iter()
        .flat_map(|m| {
            let content = match &m.content {
                Content::Text(t) => t.clone(),
                Content::Parts(parts) => parts
                    .iter()
                    .filter_map(|p| p.text.clone())
                    .collect::<Vec<_>>()
                    .join("\n"),
            };
            [Some(content), m.name.clone()]
        })
        .flatten()
        .collect()
}

/// `x-pai-private: true|1|yes` marks a request private as the body's `private` does.
fn flagged(req: &ChatRequest, headers: &HeaderMap) -> bool {
    req.private
        || headers
            .get("x-pai-private")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

/// The model id L1 answers with: the configured adapter when it has a current version, else the base
/// (an adapter that exists but fails to load is still asked for, and its error makes L1 fail).
fn local_model(s: &Arc<ServeState>) -> String {
    let name = &s.router.config.local_model;
    let missing = |e: ApiError| e.status == StatusCode::NOT_FOUND;
    if name == "base" || name == &s.base_id || s.resolve(name, None).is_err_and(missing) {
        s.base_id.clone()
    } else {
        name.clone()
    }
}

/// The local model's confidence on `text` (`probe::confidence`, off the async threads).
async fn probe(s: &Arc<ServeState>, text: String) -> Option<super::probe::Probe> {
    let local = local_model(s);
    let adapter = if local == s.base_id {
        None
    } else {
        s.resolve(&local, None).ok().flatten()
    };
    let s = s.clone();
    tokio::task::spawn_blocking(move || {
        let adapter = adapter.as_ref().map(|a| &a.adapter);
        super::probe::probe(&s.base, adapter, &text, s.router.config.probe_tokens)
    })
    .await
    .ok()
    .flatten()
}

/// The decision for a parsed chat request (running the confidence probe when it matters).
async fn decide(
    s: &Arc<ServeState>,
    req: &ChatRequest,
    headers: &HeaderMap,
) -> Result<Decision, ApiError> {
    let router = &s.router;
    let verdict = router.gate.check(
        gate_texts(req).iter().map(String::as_str),
        flagged(req, headers),
    );
    let messages = crate::generation::chat_messages(req)?;
    let prompt_tokens = s
        .base
        .chat_template()?
        .encode(&s.base.tokenizer, &messages, true)?
        .len();
    let tier = req.tier.clone().or_else(|| {
        headers
            .get("x-pai-tier")
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    });
    let input = RouteInput {
        tier: tier.filter(|t| !t.is_empty() && t != "auto"),
        prompt_tokens,
        local_context: s.base.model.config().context_length,
    };
    let confidence = if router.needs_probe(&input, &verdict) {
        let texts = contents(req);
        probe(
            s,
            super::probe::probe_text(texts.iter().map(String::as_str)),
        )
        .await
    } else {
        None
    };
    let decision = router.decide(&input, verdict, confidence);
    if !decision.egress_allowed {
        for detector in decision.privacy.detectors() {
            s.metrics.router_kept_local(detector);
        }
    }
    tracing::info!(
        tier = %decision.tier, level = decision.level, rule = decision.rule,
        reasons = ?decision.reasons, "routed"
    );
    Ok(decision)
}

/// `POST /v1/route`: the decision for a chat request, without running it.
pub async fn route(
    State(s): State<Arc<ServeState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: ChatRequest = parse(&body)?;
    let d = decide(&s, &req, &headers).await?;
    let plan: Vec<String> = d.plan.iter().map(|t| target_name(&s, *t)).collect();
    let mut v = serde_json::to_value(&d).map_err(|e| ApiError::internal(e.to_string()))?;
    v["plan"] = json!(plan);
    v["privacy"]["may_leave"] = json!(d.privacy.may_leave());
    Ok(Json(v))
}

fn target_name(s: &ServeState, t: Target) -> String {
    match t {
        Target::Local => "local".into(),
        Target::Cloud(i) => s.router.deployment(i).config.name.clone(),
    }
}

/// `POST /v1/chat/completions` with `"model": "auto"`.
pub async fn auto_chat(
    s: Arc<ServeState>,
    key: Option<Extension<ApiKeyIndex>>,
    headers: HeaderMap,
    req: ChatRequest,
    body: Bytes,
) -> Result<Response, ApiError> {
    let decision = decide(&s, &req, &headers).await?;
    s.metrics.router_decision(decision.rule, decision.level);
    let mut original: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(None, "invalid_json", e.to_string()))?;
    if let Some(o) = original.as_object_mut() {
        for f in PAI_FIELDS {
            o.remove(f);
        }
    }
    // What an escalation would be saved as: the request's messages (a cloud answer to a request the
    // local model was not trusted with becomes tomorrow's training example, when opted in).
    // A redacted request is never saved (it held secrets or personal data).
    let escalated: Vec<(String, String)> =
        if decision.level >= 2 && decision.egress_allowed && !decision.redact {
            crate::generation::chat_messages(&req)?
                .into_iter()
                .map(|m| (m.role, m.content))
                .collect()
        } else {
            Vec::new()
        };
    let mut fallbacks: Vec<Fallback> = Vec::new();
    let mut local_error: Option<ApiError> = None;
    for &target in &decision.plan {
        let answered = match target {
            Target::Local => match local(&s, key, &original).await {
                Ok(resp) => Ok(resp),
                // The request's own fault: no tier would take it better.
                Err(e) if !e.status.is_server_error() => return Err(e),
                Err(e) => {
                    local_error = Some(e.clone());
                    Err(("local".to_string(), "local", e.message))
                }
            },
            Target::Cloud(i) => cloud(&s, i, &decision, &original, req.stream, &escalated).await,
        };
        match answered {
            Ok(Reply::Answer(resp)) => {
                return Ok(labelled(&s, resp, target, &decision, &fallbacks).await)
            }
            // A cloud tier refused the request itself (a 4xx other than 429): no other tier
            // would take it better.
            Ok(Reply::Refused(resp)) => {
                return Ok(labelled(&s, resp, target, &decision, &fallbacks).await)
            }
            Err((target, cause, error)) => {
                s.metrics.router_fallback(&target, cause);
                tracing::warn!(%target, cause, %error, "tier failed; falling back");
                fallbacks.push(Fallback {
                    target,
                    cause,
                    error,
                });
            }
        }
    }
    let tried: Vec<String> = fallbacks
        .iter()
        .map(|f| format!("{}: {}", f.target, f.error))
        .collect();
    if !decision.egress_allowed {
        return Err(ApiError {
            status: local_error
                .as_ref()
                .map_or(StatusCode::SERVICE_UNAVAILABLE, |e| e.status),
            message: format!(
                "this request stays on this machine ({}) and the local model cannot answer it now \
                 ({}); it was not sent to any cloud tier",
                decision.privacy.reasons().join("; "),
                tried.join("; ")
            ),
            kind: "server_error",
            param: None,
            code: "local_unavailable",
        });
    }
    Err(ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: format!("no tier could answer: {}", tried.join("; ")),
        kind: "server_error",
        param: None,
        code: "all_tiers_failed",
    })
}

/// A target's answer: one to pass on, or a refusal of the request itself to pass on as well.
enum Reply {
    Answer(Response),
    Refused(Response),
}

/// The local model answers, through the ordinary generation route.
async fn local(
    s: &Arc<ServeState>,
    key: Option<Extension<ApiKeyIndex>>,
    original: &Value,
) -> Result<Reply, ApiError> {
    let mut body = original.clone();
    body["model"] = json!(local_model(s));
    let req: ChatRequest = serde_json::from_value(body)
        .map_err(|e| ApiError::invalid(None, "invalid_json", e.to_string()))?;
    let resp = crate::generation::chat_local(s.clone(), key, req).await?;
    Ok(Reply::Answer(resp))
}

/// Deployment `i` answers, with its retries. Err: (deployment, cause, what happened).
async fn cloud(
    s: &Arc<ServeState>,
    i: usize,
    decision: &Decision,
    original: &Value,
    stream: bool,
    escalated: &[(String, String)],
) -> Result<Reply, (String, &'static str, String)> {
    let router = &s.router;
    let dep = router.deployment(i);
    let name = dep.config.name.clone();
    // The gate is asked again here, at the only place that sends: no plan or fallback reaches a
    // cloud tier with a request that may not leave.
    if !decision.egress_allowed || !(decision.privacy.may_leave() || decision.redact) {
        return Err((
            name,
            "private",
            "the request may not leave this machine".into(),
        ));
    }
    // Redact mode: the values go out as placeholders (checked again on what would be sent).
    let (original, restorer) = if decision.redact {
        match redacted(router, original) {
            Some((body, restorer)) => (body, Some(restorer)),
            None => {
                return Err((
                    name,
                    "private",
                    "the request cannot be redacted exactly, so it may not leave".into(),
                ))
            }
        }
    } else {
        (original.clone(), None)
    };
    if !dep.admit(Instant::now()) {
        return Err((
            name,
            "breaker",
            "cooling down after failures (circuit breaker open)".into(),
        ));
    }
    let mut body = original;
    body["model"] = json!(dep.config.model);
    let body = Bytes::from(body.to_string());
    let c = &router.config;
    let redacted_values = restorer.as_ref().map_or(0, |r| r.len());
    let mut attempt = 0u32;
    loop {
        let result = dep.send(router.client(), body.clone(), stream).await;
        let mut record = EgressRecord::new(dep.config.level, &name, &body, &decision.privacy);
        if decision.redact {
            // What left held placeholders, not the values.
            (record.secrets, record.pii, record.redacted) = (0, 0, redacted_values);
        }
        let failure = match result {
            Ok(Answer::Whole(bytes)) => {
                dep.succeeded();
                let usage = serde_json::from_slice::<Value>(&bytes)
                    .ok()
                    .and_then(|v| {
                        let u = v.get("usage")?;
                        Some((
                            u["prompt_tokens"].as_u64()?,
                            u["completion_tokens"].as_u64()?,
                        ))
                    })
                    .unwrap_or((decision.prompt_tokens as u64, 0));
                record.outcome = "ok".into();
                account(s, i, &mut record, usage);
                if !escalated.is_empty() {
                    let answer = serde_json::from_slice::<Value>(&bytes)
                        .ok()
                        .and_then(|v| {
                            v["choices"][0]["message"]["content"]
                                .as_str()
                                .map(String::from)
                        })
                        .unwrap_or_default();
                    router.save_escalation(escalated, &answer);
                }
                let bytes = match &restorer {
                    Some(r) => restore_whole(r, &bytes),
                    None => bytes,
                };
                let resp = (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    bytes,
                )
                    .into_response();
                return Ok(Reply::Answer(resp));
            }
            Ok(Answer::Stream { head, rest }) => {
                dep.succeeded();
                record.outcome = "ok".into();
                return Ok(Reply::Answer(pass_through(
                    s,
                    i,
                    record,
                    decision,
                    escalated.to_vec(),
                    (head, rest),
                    restorer.map(SseRestorer::new),
                )));
            }
            Err(f) => f,
        };
        if failure.sent() {
            record.outcome = failure.cause().into();
            if let Some(l) = router.ledger() {
                l.append(&record);
            }
        }
        if let (false, Failure::Status { code, body, .. }) = (failure.retryable(), &failure) {
            // The request's own fault: passed on as the deployment answered.
            let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::BAD_GATEWAY);
            let resp = (
                status,
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                body.clone(),
            )
                .into_response();
            return Ok(Reply::Refused(resp));
        }
        let retry_after = match &failure {
            Failure::Status { retry_after, .. } => *retry_after,
            _ => None,
        };
        let too_long = retry_after.filter(|r| r.as_secs() > c.max_retry_after_s);
        if too_long.is_some() || attempt >= c.retries {
            dep.failed(
                c.breaker_failures,
                std::time::Duration::from_secs(c.cooldown_s),
                too_long.map(|r| Instant::now() + r),
            );
            return Err((name, failure.cause(), failure.to_string()));
        }
        attempt += 1;
        s.metrics.router_retry(&name, failure.cause());
        tokio::time::sleep(backoff(
            attempt,
            c.backoff_ms,
            c.max_backoff_ms,
            retry_after,
        ))
        .await;
    }
}

/// `original` with every message's text redacted (numbered placeholders across the request), and the
/// restorer for the answer; None when a text cannot be redacted exactly or something would still be
/// found in what is sent.
fn redacted(router: &super::Router, original: &Value) -> Option<(Value, Restorer)> {
    let pii = router.gate.pii();
    let (mut next, mut values) = (0usize, Vec::new());
    let mut body = original.clone();
    let mut sent: Vec<String> = Vec::new();
    for m in body["messages"].as_array_mut()? {
        match &mut m["content"] {
            Value::String(t) => {
                *t = redact(t, pii, &mut next, &mut values)?;
                sent.push(t.clone());
            }
            Value::Array(parts) => {
                for p in parts {
                    if let Value::String(t) = &mut p["text"] {
                        *t = redact(t, pii, &mut next, &mut values)?;
                        sent.push(t.clone());
                    }
                }
            }
            _ => {}
        }
        if let Value::String(n) = &mut m["name"] {
            *n = redact(n, pii, &mut next, &mut values)?;
            sent.push(n.clone());
        }
    }
    // Stop sequences are sent as they are: one with a secret or personal data keeps it all here.
    match &body["stop"] {
        Value::String(t) => sent.push(t.clone()),
        Value::Array(all) => sent.extend(all.iter().filter_map(|t| t.as_str().map(String::from))),
        _ => {}
    }
    let verdict = router.gate.check(sent.iter().map(String::as_str), false);
    verdict.may_leave().then(|| (body, Restorer::new(values)))
}

/// A whole answer with the placeholders in its messages restored.
fn restore_whole(r: &Restorer, bytes: &Bytes) -> Bytes {
    let Ok(mut v) = serde_json::from_slice::<Value>(bytes) else {
        return bytes.clone();
    };
    if let Some(choices) = v["choices"].as_array_mut() {
        for c in choices {
            if let Value::String(t) = &mut c["message"]["content"] {
                *t = r.restore(t);
            }
        }
    }
    Bytes::from(v.to_string())
}

/// Count a cloud answer's tokens and cost, write its ledger line.
fn account(s: &ServeState, i: usize, record: &mut EgressRecord, usage: (u64, u64)) {
    let router = &s.router;
    record.prompt_tokens = usage.0;
    record.completion_tokens = usage.1;
    record.cost_usd = router.cost(i, usage.0, usage.1);
    router.add_spend(record.cost_usd);
    s.metrics
        .router_cost(&record.deployment, usage.0, usage.1, record.cost_usd);
    if let Some(l) = router.ledger() {
        l.append(record);
    }
}

/// A cloud stream, passed on as it comes. Its end (or a break) is accounted; a stream that breaks
/// after its first token ends with an error event and `[DONE]`, so the client knows it is cut short.
fn pass_through(
    s: &Arc<ServeState>,
    i: usize,
    mut record: EgressRecord,
    decision: &Decision,
    escalated: Vec<(String, String)>,
    (head, mut rest): (Vec<Bytes>, super::upstream::ByteStream),
    mut restoring: Option<SseRestorer>,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    let s = s.clone();
    let prompt_tokens = decision.prompt_tokens as u64;
    tokio::spawn(async move {
        let mut watch = SseWatch::default();
        let mut client_gone = false;
        // Redact mode: the client gets the values back in place of the placeholders.
        let mut out = |chunk: Bytes| match &mut restoring {
            Some(r) => Bytes::from(r.feed(&chunk)),
            None => chunk,
        };
        for chunk in head {
            watch.feed(&chunk);
            client_gone |= tx.send(Ok(out(chunk))).await.is_err();
        }
        let mut broke: Option<String> = None;
        while !client_gone {
            match rest.next().await {
                Some(Ok(chunk)) => {
                    watch.feed(&chunk);
                    client_gone = tx.send(Ok(out(chunk))).await.is_err();
                }
                Some(Err(e)) => {
                    broke = Some(e.to_string());
                    break;
                }
                None => break,
            }
        }
        if let (Some(r), false) = (&mut restoring, client_gone) {
            let rest = r.finish();
            if !rest.is_empty() {
                client_gone = tx.send(Ok(Bytes::from(rest))).await.is_err();
            }
        }
        if !watch.done && !client_gone {
            let why = broke.unwrap_or_else(|| "the connection closed before [DONE]".into());
            record.outcome = "stream_broken".into();
            s.metrics
                .router_fallback(&record.deployment, "stream_after_first_token");
            let event = json!({"error": {
                "message": format!("the stream from {} broke after it began ({why}); the answer is cut short", record.deployment),
                "type": "server_error", "code": "upstream_stream_broken",
            }});
            let _ = tx
                .send(Ok(Bytes::from(format!(
                    "data: {event}\n\ndata: [DONE]\n\n"
                ))))
                .await;
        }
        let usage = watch.usage.unwrap_or_else(|| {
            let completion = s
                .base
                .tokenizer
                .encode(&watch.text, false)
                .map_or(0, |ids| ids.len() as u64);
            (prompt_tokens, completion)
        });
        account(&s, i, &mut record, usage);
        if watch.done && !escalated.is_empty() {
            s.router.save_escalation(&escalated, &watch.text);
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    resp
}

/// The answer with the route's headers, and for a whole JSON answer, `pai.route` in the body.
async fn labelled(
    s: &ServeState,
    resp: Response,
    target: Target,
    d: &Decision,
    fallbacks: &[Fallback],
) -> Response {
    let (tier, level) = match target {
        Target::Local => ("local".to_string(), 1),
        Target::Cloud(i) => {
            let c = &s.router.deployment(i).config;
            (c.name.clone(), c.level)
        }
    };
    s.metrics.router_served(&tier, level);
    let route = json!({
        "tier": tier, "level": level, "rule": d.rule, "reasons": d.reasons,
        "probe": d.probe, "score": d.score, "left_machine": target != Target::Local,
        "fallbacks": fallbacks,
    });
    let (mut parts, body) = resp.into_parts();
    let is_json = parts
        .headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let body = if is_json && parts.status.is_success() {
        match axum::body::to_bytes(body, usize::MAX).await {
            Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
                Ok(mut v) => {
                    if !v["pai"].is_object() {
                        v["pai"] = json!({});
                    }
                    v["pai"]["route"] = route;
                    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
                    Body::from(v.to_string())
                }
                Err(_) => Body::from(bytes),
            },
            Err(e) => Body::from(format!("{{\"error\": \"{e}\"}}")),
        }
    } else {
        body
    };
    let h = &mut parts.headers;
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(HeaderName::from_static(name), v);
        }
    };
    set("x-pai-tier", tier);
    set("x-pai-tier-level", level.to_string());
    set("x-pai-route-rule", d.rule.to_string());
    set("x-pai-fallbacks", fallbacks.len().to_string());
    Response::from_parts(parts, body)
}
