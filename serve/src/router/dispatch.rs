//! The router over HTTP: `POST /v1/chat/completions` with `"model": "auto"` (decide, then try the
//! plan's targets in order until one answers) and `POST /v1/route` (the decision alone, nothing run).
//! Every answer says which tier and deployment served it and why, in headers (`x-pai-tier`,
//! `x-pai-tier-level`, `x-pai-route-rule`, `x-pai-fallbacks`) and, for a whole answer, in the body's
//! `pai.route`. Sending to a cloud deployment is in `cloud`.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use axum::{Extension, Json};
use pai_adapters::Standing;
use serde_json::{json, Value};

use super::{Decision, RouteInput, Target};
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

/// The local model's confidence on `text` under `local` (`local_model`), off the async threads.
async fn probe(s: &Arc<ServeState>, local: &str, text: String) -> Option<super::probe::Probe> {
    let adapter = if local == s.base_id {
        None
    } else {
        s.resolve(local, None).ok().flatten()
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
    // The kind, from the last thing the user said, and the L1 adapter's standing in its domain.
    let kind = messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map_or(super::kind::RequestKind::Question, |m| {
            super::kind::classify(&m.content)
        });
    let local = local_model(s);
    let standing = if local == s.base_id {
        Standing::Same
    } else {
        router
            .standings(s.registry.as_ref(), &local)
            .get(kind.domain())
            .copied()
            .unwrap_or(Standing::Same)
    };
    let input = RouteInput {
        tier: tier.filter(|t| !t.is_empty() && t != "auto"),
        prompt_tokens,
        local_context: s.base.model.config().context_length,
        kind,
        standing,
    };
    let confidence = if router.needs_probe(&input, &verdict) {
        let texts = contents(req);
        probe(
            s,
            &local,
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
            Target::Cloud(i) => {
                super::cloud::answer(&s, i, &decision, &original, req.stream, &escalated).await
            }
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
pub(super) enum Reply {
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
