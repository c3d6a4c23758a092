//! Continuous batching: concurrent requests share decode steps across adapters and each gets what it
//! would alone; a client that goes away frees its slot.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::{call, json_of, server};

#[tokio::test]
async fn concurrent_requests_decode_together_and_each_gets_what_it_would_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (state, registry) = server(dir.path());
    crate::add_random_adapter(&registry, &state.base, dir.path(), "work");
    let app = pai_serve::app(state.clone());
    let requests: Vec<Value> = ["base", "personal", "work", "personal", "base", "work"]
        .iter()
        .enumerate()
        .map(|(i, model)| {
            let prompt = ["The heron", "A quiet river", "Stones and", "The heron"][i % 4];
            json!({"model": model, "prompt": prompt, "max_tokens": 120, "temperature": 0})
        })
        .collect();
    let text_of = |status: StatusCode, body: &str| {
        assert_eq!(status, StatusCode::OK, "{body}");
        json_of(body)["choices"][0]["text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // Each alone, one after another.
    let mut alone = Vec::new();
    for r in &requests {
        let (status, _, body) = call(app.clone(), "POST", "/v1/completions", Some(r.clone())).await;
        alone.push(text_of(status, &body));
    }
    let metrics = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    let (_, _, before) = call(app.clone(), "GET", "/metrics", None).await;
    assert_eq!(metrics(&before, "pai_decode_batch_rows_max"), 1.0);
    // All at once: they share decode steps, across adapters, and each says what it said alone.
    let tasks: Vec<_> = requests
        .iter()
        .map(|r| {
            let (app, r) = (app.clone(), r.clone());
            tokio::spawn(async move { call(app, "POST", "/v1/completions", Some(r)).await })
        })
        .collect();
    for (task, expected) in tasks.into_iter().zip(&alone) {
        let (status, _, body) = task.await.unwrap();
        assert_eq!(&text_of(status, &body), expected);
    }
    let (_, _, after) = call(app.clone(), "GET", "/metrics", None).await;
    assert!(
        metrics(&after, "pai_decode_batch_rows_max") > 1.0,
        "{after}"
    );
    assert!(
        metrics(&after, "pai_decode_mixed_adapter_steps_total") > 0.0,
        "{after}"
    );
    assert_eq!(metrics(&after, "pai_generations_running"), 0.0);
    assert_eq!(metrics(&after, "pai_queue_depth"), 0.0);
}

/// A client that goes away frees its place in the batch at the next step: the generation stops long
/// before its max_tokens, for a stream dropped after its first chunk and for a plain request whose
/// response future is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_frees_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _registry) = server(dir.path());
    let app = pai_serve::app(state.clone());
    let running = |app: axum::Router| async move {
        let (_, _, text) = call(app, "GET", "/metrics", None).await;
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.parse().ok())
                .unwrap()
        };
        (
            value("pai_generations_running"),
            value("pai_decode_rows_total"),
        )
    };
    let long = |stream: bool| {
        json!({"model": "base", "prompt": "The heron", "max_tokens": 240, "temperature": 0,
               "stream": stream})
    };
    // Wait until nothing runs; the rows decoded since `before` must be far short of 240.
    let settle = |before: f64, what: &'static str| {
        let app = app.clone();
        async move {
            let started = std::time::Instant::now();
            loop {
                let (now_running, rows) = running(app.clone()).await;
                if now_running == 0.0 {
                    assert!(
                        rows - before < 200.0,
                        "{what}: {} rows decoded",
                        rows - before
                    );
                    return rows;
                }
                assert!(
                    started.elapsed().as_secs() < 10,
                    "{what}: still running after 10 s"
                );
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        }
    };
    // A stream read for one chunk, then dropped.
    let req = Request::builder()
        .method("POST")
        .uri("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(long(true).to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.expect("a first chunk").unwrap();
    assert!(first.is_data());
    drop(body);
    let rows = settle(0.0, "dropped stream").await;
    // A plain request abandoned once it runs.
    let abandoned = tokio::spawn(call(
        app.clone(),
        "POST",
        "/v1/completions",
        Some(long(false)),
    ));
    while running(app.clone()).await.0 == 0.0 {
        tokio::task::yield_now().await;
    }
    abandoned.abort();
    settle(rows, "abandoned request").await;
}
