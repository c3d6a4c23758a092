//! The peers the router tests send to: OpenAI-compatible servers on loopback that behave as told
//! (answer, echo, refuse connections, hang, 429 with Retry-After, 500, garbage, streams dropped
//! before or after their first token), and a second pai-serve; each logs every body it receives.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde_json::{json, Value};

use crate::{json_of, server};

/// What a peer does with each request.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    Answer,
    Status(u16, Option<u64>),
    Hang,
    /// A stream that sends its role chunk, then breaks.
    DropBeforeFirstToken,
    /// A stream that sends one token, then breaks.
    BreakAfterFirstToken,
    /// 200 with a body that is no chat completion.
    Garbage,
    /// Answers with the last message's content (streamed in two pieces cut in its middle).
    Echo,
}

struct PeerState {
    name: String,
    behaviour: Behaviour,
    /// Every body received, with when.
    log: Mutex<Vec<(Instant, String)>>,
}

#[derive(Clone)]
pub struct Peer {
    state: Arc<PeerState>,
    pub url: String,
}

impl Peer {
    pub fn received(&self) -> Vec<String> {
        self.state
            .log
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| b.clone())
            .collect()
    }

    pub fn times(&self) -> Vec<Instant> {
        self.state
            .log
            .lock()
            .unwrap()
            .iter()
            .map(|(t, _)| *t)
            .collect()
    }
}

fn sse(events: &[Value]) -> String {
    events
        .iter()
        .map(|e| format!("data: {e}\n\n"))
        .collect::<String>()
}

fn chunk(content: Option<&str>, finish: Option<&str>) -> Value {
    let delta = match content {
        Some(c) => json!({"content": c}),
        None => json!({"role": "assistant", "content": ""}),
    };
    json!({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
}

async fn peer_handler(State(p): State<Arc<PeerState>>, body: Bytes) -> Response {
    let text = String::from_utf8_lossy(&body).into_owned();
    p.log.lock().unwrap().push((Instant::now(), text.clone()));
    let stream = json_of(&text)["stream"].as_bool().unwrap_or(false);
    let answer = match p.behaviour {
        Behaviour::Echo => json_of(&text)["messages"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m["content"].as_str())
            .unwrap_or_default()
            .to_string(),
        _ => format!("answer from {}", p.name),
    };
    let broken = |first: Vec<Value>| {
        let head = Bytes::from(sse(&first));
        let items: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(head),
            Err(std::io::Error::other("peer dropped the stream")),
        ];
        // The break comes a moment after the head, so the head is on the wire first.
        let items =
            futures_util::StreamExt::then(futures_util::stream::iter(items), |item| async {
                if item.is_err() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                item
            });
        (
            [(axum::http::header::CONTENT_TYPE, "text/event-stream")],
            Body::from_stream(items),
        )
            .into_response()
    };
    match p.behaviour {
        Behaviour::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK.into_response()
        }
        Behaviour::Status(code, retry_after) => {
            let mut resp = (
                StatusCode::from_u16(code).unwrap(),
                axum::Json(json!({"error": {"message": format!("{} says {code}", p.name)}})),
            )
                .into_response();
            if let Some(s) = retry_after {
                resp.headers_mut()
                    .insert("retry-after", s.to_string().parse().unwrap());
            }
            resp
        }
        Behaviour::DropBeforeFirstToken => broken(vec![chunk(None, None)]),
        Behaviour::BreakAfterFirstToken => {
            broken(vec![chunk(None, None), chunk(Some("answer"), None)])
        }
        Behaviour::Garbage => "<html>a captive portal</html>".into_response(),
        Behaviour::Answer | Behaviour::Echo if stream => {
            let (first, rest) = answer.split_at(answer.len() / 2);
            let events = [
                chunk(None, None),
                chunk(Some(first), None),
                chunk(Some(rest), None),
                chunk(None, Some("stop")),
                json!({"id": "x", "object": "chat.completion.chunk", "choices": [],
                       "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}}),
            ];
            (
                [(axum::http::header::CONTENT_TYPE, "text/event-stream")],
                sse(&events) + "data: [DONE]\n\n",
            )
                .into_response()
        }
        Behaviour::Answer | Behaviour::Echo => axum::Json(json!({
            "id": "chatcmpl-peer", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14},
        }))
        .into_response(),
    }
}

/// A peer on loopback behaving as told.
pub async fn peer(name: &str, behaviour: Behaviour) -> Peer {
    let state = Arc::new(PeerState {
        name: name.into(),
        behaviour,
        log: Mutex::new(Vec::new()),
    });
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(peer_handler))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Peer { state, url }
}

/// An address nothing listens on.
pub fn refusing() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", l.local_addr().unwrap());
    drop(l);
    url
}

async fn log_body(
    State(p): State<Arc<PeerState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    p.log
        .lock()
        .unwrap()
        .push((Instant::now(), String::from_utf8_lossy(&bytes).into_owned()));
    next.run(axum::extract::Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// A second pai-serve (tiny model, adapter `personal`) as a cloud peer, logging what it receives.
pub async fn pai_serve_peer(dir: &std::path::Path) -> Peer {
    std::fs::create_dir_all(dir).unwrap();
    let (state, _registry) = server(dir);
    let log = Arc::new(PeerState {
        name: "pai-serve-peer".into(),
        behaviour: Behaviour::Answer,
        log: Mutex::new(Vec::new()),
    });
    let app =
        pai_serve::app(state).layer(axum::middleware::from_fn_with_state(log.clone(), log_body));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Peer { state: log, url }
}
