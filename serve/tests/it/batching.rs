//! Continuous batching: concurrent requests share decode steps across adapters and each gets what it
//! would alone (prompts prefilled in chunks between steps); clients take turns; a client that goes
//! away frees its slot.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::{call, json_of, server};

#[tokio::test]
async fn concurrent_requests_decode_together_and_each_gets_what_it_would_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (mut state, registry) = server(dir.path());
    // Prompts prefill 3 positions a step while others decode (alone, in one go).
    Arc::get_mut(&mut state).unwrap().prefill_chunk = 3;
    crate::add_random_adapter(&registry, &state.base, dir.path(), "work");
    let app = pai_serve::app(state.clone());
    let requests: Vec<Value> = ["base", "personal", "work", "personal", "base", "work"]
        .iter()
        .enumerate()
        .map(|(i, model)| {
            let prompt = [
                "The heron",
                "A quiet river runs past the old mill and under the bridge",
                "Stones and",
                "The heron",
            ][i % 4];
            // 40 tokens: enough for every request to share steps with the others. Longer, the
            // random adapters' chaotic outputs can turn a last-ulp difference between a batched and a
            // lone product (their summation orders differ with the row count) into another greedy
            // choice (seen once in six CI runs at 120 tokens).
            json!({"model": model, "prompt": prompt, "max_tokens": 40, "temperature": 0})
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

/// With one place in the batch, a client with a backlog and a client with one request take turns: the
/// second client's request runs after the first client's next one, not after its whole backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_take_turns_for_places_in_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (mut state, _registry) = server(dir.path());
    Arc::get_mut(&mut state).unwrap().max_batch = 1;
    let app = pai_serve::app(state.clone());
    let gauge = |app: axum::Router, name: &'static str| async move {
        let (_, _, text) = call(app, "GET", "/metrics", None).await;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    let finished = Arc::new(std::sync::Mutex::new(Vec::new()));
    let send = |who: &'static str, n: usize, max_tokens: usize| {
        let (app, finished) = (app.clone(), finished.clone());
        tokio::spawn(async move {
            let body = json!({"model": "base", "prompt": "Once", "max_tokens": max_tokens,
                              "temperature": 0, "user": who});
            let (status, _, text) = call(app, "POST", "/v1/completions", Some(body)).await;
            assert_eq!(status, StatusCode::OK, "{text}");
            finished.lock().unwrap().push(format!("{who}{n}"));
        })
    };
    // a1 takes the only place; a2..a4 then b1 queue behind it.
    let mut tasks = vec![send("a", 1, 250)];
    while gauge(app.clone(), "pai_generations_running").await < 1.0 {
        tokio::task::yield_now().await;
    }
    for (who, n) in [("a", 2), ("a", 3), ("a", 4), ("b", 1)] {
        // Long enough (30 steps) that the previous request's client has recorded its answer before
        // this one can finish: the order recorded is the order the engine ran them in.
        tasks.push(send(who, n, 30));
        let queued = tasks.len() - 1;
        while gauge(app.clone(), "pai_queue_depth").await < queued as f64 {
            assert!(
                !finished.lock().unwrap().contains(&"a1".to_string()),
                "a1 finished before the others were queued: make it longer"
            );
            tokio::task::yield_now().await;
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let order = finished.lock().unwrap().clone();
    assert_eq!(
        order,
        ["a1", "a2", "b1", "a3", "a4"],
        "arrival order would be a1 a2 a3 a4 b1"
    );
}
