//! Sending a routed request to one cloud deployment: the privacy gate asked again (the only place
//! that sends), redact mode's placeholders in and the values back out, retries with backoff and
//! Retry-After, the breaker told how it went, every attempt that may have sent bytes written to the
//! egress ledger, tokens and cost accounted, and a stream passed through as it comes (one that fails
//! before its first token falls back; one that breaks after it ends with an error event saying so).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::dispatch::Reply;
use super::redact::{redact, Restorer, SseRestorer};
use super::upstream::{backoff, Answer, Failure, SseWatch};
use super::{Decision, EgressRecord};
use crate::state::ServeState;

/// Deployment `i` answers, with its retries. Err: (deployment, cause, what happened).
pub(super) async fn answer(
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
