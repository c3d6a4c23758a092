//! The router's overhead per request (issue 9: p50/p99 under 2 ms without the confidence probe).
//! A peer on loopback answers every chat completion at once with a fixed body; the same request is
//! sent to it directly (reqwest) and through the router (`"model": "auto"`, `"tier": "L2"`: the
//! privacy gate over a privacy index of the example notes, the prompt's tokenization, the body
//! rewritten, the ledger line written, the answer labelled), interleaved; the overhead is the
//! difference of the two. Also the decision alone (`POST /v1/route`) without and with the probe.
//! Prints one JSON line.
//! `cargo bench -p pai-serve --bench router -- [--model PATH] [--requests 500]`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use pai_serve::router::{Router, RouterConfig, Thresholds, TierConfig};
use pai_serve::ServeState;
use serde_json::{json, Value};
use tower::ServiceExt;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn default_model() -> PathBuf {
    let home = std::env::var_os("PAI_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".pai")
        });
    home.join("models").join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn summary(mut times: Vec<Duration>) -> (f64, f64) {
    times.sort();
    (percentile(&times, 0.5), percentile(&times, 0.99))
}

async fn peer() -> String {
    let answer = json!({
        "id": "chatcmpl-peer", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Fine, thanks."},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 60, "completion_tokens": 4, "total_tokens": 64},
    });
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move || {
            let a = answer.clone();
            async move { axum::Json(a) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/v1", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

async fn oneshot(state: &Arc<ServeState>, uri: &str, body: &Value) -> (Duration, Value) {
    let started = Instant::now();
    let resp = pai_serve::app(state.clone())
        .oneshot(
            Request::post(uri)
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .expect("request"),
        )
        .await
        .expect("answer");
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let took = started.elapsed();
    (took, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn main() {
    let model = arg("--model").map_or_else(default_model, PathBuf::from);
    let n: usize = arg("--requests")
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let url = peer().await;
        let home = tempfile::tempdir().expect("tempdir");
        // The privacy index of the example notes, as ingest would build it.
        let notes_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/notes");
        let notes: Vec<String> = std::fs::read_dir(&notes_dir)
            .expect("examples/notes")
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
            .collect();
        let index = pai_datasets::PrivacyIndex::build(notes.iter().map(String::as_str));
        index
            .save(&pai_datasets::PrivacyIndex::path(home.path()))
            .expect("index");
        let tier = TierConfig {
            name: "peer".into(),
            level: 2,
            base_url: url.clone(),
            model: "m".into(),
            api_key_env: None,
            timeout_s: 10,
            price_input_per_m: 1.0,
            price_output_per_m: 2.0,
        };
        let state_with = |thresholds: Option<Thresholds>| {
            let base = pai_model::BaseModel::load(&model, &pai_model::default_device())
                .unwrap_or_else(|e| panic!("{}: {e}", model.display()));
            let mut state = ServeState::new(base, None);
            let config = RouterConfig {
                tiers: vec![tier.clone()],
                local_model: "base".into(),
                thresholds,
                ..Default::default()
            };
            state.router = Router::new(config, Some(home.path())).expect("router");
            Arc::new(state)
        };
        let state = state_with(None);
        let question = "I am planning next week and would like a short checklist for getting the \
            garden ready for spring: what to prune, what to sow under cover, and what to order \
            before the end of the month. Keep it to ten items and say which ones can wait.";
        let body = json!({
            "model": "auto", "tier": "L2", "max_tokens": 64,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": question},
            ],
        });
        let mut direct_body = body.clone();
        direct_body["model"] = json!("m");
        direct_body.as_object_mut().map(|o| o.remove("tier"));
        let client = reqwest::Client::new();
        let direct = || async {
            let started = Instant::now();
            let r = client
                .post(format!("{url}/chat/completions"))
                .header("content-type", "application/json")
                .body(direct_body.to_string())
                .send()
                .await
                .expect("peer");
            r.bytes().await.expect("peer body");
            started.elapsed()
        };
        // Warm up both paths (connections, the tokenizer, the index).
        for _ in 0..20 {
            direct().await;
            oneshot(&state, "/v1/chat/completions", &body).await;
        }
        let (mut via_peer, mut via_router) = (Vec::new(), Vec::new());
        for _ in 0..n {
            via_peer.push(direct().await);
            let (took, v) = oneshot(&state, "/v1/chat/completions", &body).await;
            assert_eq!(v["pai"]["route"]["tier"], "peer", "{v}");
            via_router.push(took);
        }
        let mut route_body = body.clone();
        route_body.as_object_mut().map(|o| o.remove("tier"));
        let mut decide = Vec::new();
        for _ in 0..n {
            decide.push(oneshot(&state, "/v1/route", &route_body).await.0);
        }
        let probed = state_with(Some(Thresholds {
            local: -4.0,
            medium: -6.0,
            length_weight: 0.0,
            ..Default::default()
        }));
        let mut probe = Vec::new();
        for _ in 0..n.min(100) {
            let (took, v) = oneshot(&probed, "/v1/route", &route_body).await;
            assert!(v["score"].is_number(), "{v}");
            probe.push(took);
        }
        let (peer50, peer99) = summary(via_peer);
        let (routed50, routed99) = summary(via_router);
        let (decide50, decide99) = summary(decide);
        let (probe50, probe99) = summary(probe);
        println!(
            "{}",
            json!({
                "requests": n, "model": model.display().to_string(),
                "privacy_index_shingles": index.len(),
                "direct_ms": {"p50": peer50, "p99": peer99},
                "routed_ms": {"p50": routed50, "p99": routed99},
                "overhead_ms": {"p50": routed50 - peer50, "p99": routed99 - peer99},
                "route_decision_ms": {"p50": decide50, "p99": decide99},
                "route_decision_with_probe_ms": {"p50": probe50, "p99": probe99},
            })
        );
    });
}
