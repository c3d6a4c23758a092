//! The OpenAI API as clients use it: bodies, errors in the envelope, adapters by name with their
//! lineage, and streams.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::server;

async fn call(
    app: axum::Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Option<String>, String) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(body.map_or(Body::empty(), |b| Body::from(b.to_string())))
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    let status = resp.status();
    let adapter = resp
        .headers()
        .get("x-pai-adapter")
        .map(|v| v.to_str().unwrap().to_string());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        adapter,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn json_of(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

#[tokio::test]
async fn models_and_completions_from_the_base_and_an_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _registry) = server(dir.path());
    let app = pai_serve::app(state.clone());
    let base_id = state.base_id.clone();

    let (status, _, body) = call(app.clone(), "GET", "/health", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, _, body) = call(app.clone(), "GET", "/v1/models", None).await;
    let models = json_of(&body);
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [base_id.as_str(), "personal"]);
    assert_eq!(models["data"][1]["parent"], base_id.as_str());
    assert_eq!(models["data"][1]["version"], "v1");

    // The same greedy prompt through the base and through the adapter: different answers, each
    // naming what gave it.
    let ask = |model: &str| json!({"model": model, "prompt": "The heron", "max_tokens": 8, "temperature": 0});
    let (status, who, body) =
        call(app.clone(), "POST", "/v1/completions", Some(ask(&base_id))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(who.as_deref(), Some("base"));
    let bare = json_of(&body);
    assert_eq!(bare["object"], "text_completion");
    assert_eq!(bare["usage"]["completion_tokens"], 8, "{bare}");
    assert!(bare["pai"]["adapter"].is_null());
    let (status, who, body) = call(
        app.clone(),
        "POST",
        "/v1/completions",
        Some(ask("personal")),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(who.as_deref(), Some("personal@v1"));
    let adapted = json_of(&body);
    assert_eq!(adapted["pai"]["dataset_hash"], "d5e7");
    assert_ne!(
        adapted["choices"][0]["text"], bare["choices"][0]["text"],
        "the adapter changed nothing"
    );
    // The other spellings of the same adapter.
    for body in [
        json!({"model": format!("{base_id}::personal"), "prompt": "The heron", "max_tokens": 8, "temperature": 0}),
        json!({"model": base_id, "adapter": "personal@v1", "prompt": "The heron", "max_tokens": 8, "temperature": 0}),
    ] {
        let (status, who, text) = call(app.clone(), "POST", "/v1/completions", Some(body)).await;
        assert_eq!(
            (status, who.as_deref()),
            (StatusCode::OK, Some("personal@v1")),
            "{text}"
        );
        assert_eq!(
            json_of(&text)["choices"][0]["text"],
            adapted["choices"][0]["text"]
        );
    }

    // Chat, with the template and log-probabilities.
    let (status, who, body) = call(
        app.clone(),
        "POST",
        "/v1/chat/completions",
        Some(json!({"model": "personal", "messages": [{"role": "user", "content": "hi"}],
                    "max_completion_tokens": 5, "temperature": 0, "logprobs": true, "top_logprobs": 2})),
    )
    .await;
    assert_eq!(
        (status, who.as_deref()),
        (StatusCode::OK, Some("personal@v1")),
        "{body}"
    );
    let chat = json_of(&body);
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
    let lps = chat["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(
        lps.len(),
        chat["usage"]["completion_tokens"].as_u64().unwrap() as usize
    );
    assert_eq!(lps[0]["top_logprobs"].as_array().unwrap().len(), 2);
    assert!(lps[0]["logprob"].as_f64().unwrap() <= 0.0);
}

#[tokio::test]
async fn errors_come_in_the_openai_envelope_and_never_fall_back_to_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let (state, registry) = server(dir.path());
    let app = pai_serve::app(state.clone());
    let err = |body: &str| json_of(body)["error"].clone();

    let (status, who, body) = call(
        app.clone(),
        "POST",
        "/v1/completions",
        Some(json!({"model": "work", "prompt": "x", "max_tokens": 2})),
    )
    .await;
    assert_eq!((status, who), (StatusCode::NOT_FOUND, None));
    let e = err(&body);
    assert_eq!(
        (e["code"].as_str(), e["type"].as_str()),
        (Some("model_not_found"), Some("not_found_error"))
    );
    assert!(e["message"].as_str().unwrap().contains("personal"), "{e}");

    let (status, _, body) = call(
        app.clone(),
        "POST",
        "/v1/completions",
        Some(json!({"model": "personal", "prompt": "x", "best_of": 3})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let e = err(&body);
    assert_eq!(
        (e["code"].as_str(), e["param"].as_str()),
        (Some("unsupported_parameter"), Some("best_of"))
    );
    for (body, code, param) in [
        (
            json!({"model": "personal", "prompt": "x", "n": 2}),
            "unsupported_parameter",
            "n",
        ),
        (
            json!({"model": "personal", "prompt": "x", "temperature": -1}),
            "invalid_value",
            "temperature",
        ),
        (
            json!({"model": "personal", "prompt": "x", "max_tokens": 100000}),
            "invalid_value",
            "max_tokens",
        ),
        (
            json!({"model": "personal", "prompt": "x", "frequency_penalty": 3}),
            "invalid_value",
            "frequency_penalty",
        ),
        (
            json!({"model": "personal", "messages": [{"role": "robot", "content": "x"}]}),
            "invalid_value",
            "messages[0].role",
        ),
    ] {
        let uri = if body.get("messages").is_some() {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let (status, _, text) = call(app.clone(), "POST", uri, Some(body)).await;
        let e = err(&text);
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        assert_eq!(
            (e["code"].as_str(), e["param"].as_str()),
            (Some(code), Some(param)),
            "{text}"
        );
    }
    let (status, _, body) = call(app.clone(), "POST", "/v1/completions", None).await;
    assert_eq!(
        (status, err(&body)["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_json"))
    );

    // A prompt longer than the context: the numbers are in the message.
    let context = state.base.model.config().context_length;
    let long = "word ".repeat(context);
    let (status, _, body) = call(
        app.clone(),
        "POST",
        "/v1/completions",
        Some(json!({"model": "personal", "prompt": long, "max_tokens": 4})),
    )
    .await;
    let e = err(&body);
    assert_eq!(
        (status, e["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("context_length_exceeded")),
        "{body}"
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains(&format!("maximum context length is {context} tokens")),
        "{e}"
    );

    // A version whose weights changed is refused, not replaced by the base.
    let v2 = registry
        .add(
            "broken",
            &registry.dir("personal", pai_adapters::Version(1)),
            pai_adapters::AdapterMeta::default(),
        )
        .unwrap();
    registry.promote("broken", v2, "").unwrap();
    std::fs::write(
        registry.dir("broken", v2).join("adapter_model.safetensors"),
        b"garbage",
    )
    .unwrap();
    let (status, who, body) = call(
        app.clone(),
        "POST",
        "/v1/completions",
        Some(json!({"model": "broken", "prompt": "x", "max_tokens": 2})),
    )
    .await;
    assert_eq!(
        (status, who),
        (StatusCode::SERVICE_UNAVAILABLE, None),
        "{body}"
    );
    assert_eq!(err(&body)["code"], "adapter_unavailable");
}

#[tokio::test]
async fn with_api_keys_every_route_wants_one() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _registry) = server(dir.path());
    let mut state = std::sync::Arc::try_unwrap(state).ok().unwrap();
    state.api_keys = vec!["k-one".into(), "k-two".into()];
    let app = pai_serve::app(std::sync::Arc::new(state));
    let with_key = |key: Option<&str>, uri: &str| {
        let mut b = Request::builder().method("GET").uri(uri);
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        b.body(Body::empty()).unwrap()
    };
    for uri in ["/health", "/v1/models", "/reports/"] {
        let resp = app.clone().oneshot(with_key(None, uri)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{uri}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            json_of(&String::from_utf8_lossy(&body))["error"]["code"],
            "invalid_api_key"
        );
        let resp = app
            .clone()
            .oneshot(with_key(Some("wrong"), uri))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{uri}");
    }
    let resp = app
        .clone()
        .oneshot(with_key(Some("k-two"), "/v1/models"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn reports_are_served_by_file_name_only() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _registry) = server(dir.path());
    let mut state = std::sync::Arc::try_unwrap(state).ok().unwrap();
    let reports = dir.path().join("reports");
    std::fs::create_dir_all(&reports).unwrap();
    std::fs::write(reports.join("index.html"), "<h1>runs</h1>").unwrap();
    std::fs::write(reports.join("eval-1.html"), "<h1>one</h1>").unwrap();
    std::fs::write(dir.path().join("secret.html"), "no").unwrap();
    state.reports_dir = Some(reports);
    let app = pai_serve::app(std::sync::Arc::new(state));
    let (status, _, body) = call(app.clone(), "GET", "/reports/", None).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "<h1>runs</h1>"));
    let (status, _, body) = call(app.clone(), "GET", "/reports/eval-1.html", None).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "<h1>one</h1>"));
    for path in [
        "/reports/..%2Fsecret.html",
        "/reports/nothing.html",
        "/reports/eval-1.txt",
    ] {
        let (status, _, body) = call(app.clone(), "GET", path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
    }
}

#[tokio::test]
async fn streams_send_text_as_it_comes_then_usage_and_done() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _registry) = server(dir.path());
    let app = pai_serve::app(state);
    let body = |stream: bool| {
        json!({"model": "personal", "messages": [{"role": "user", "content": "Tell me"}],
        "max_tokens": 12, "temperature": 0, "stream": stream, "stream_options": {"include_usage": true}})
    };
    let (_, _, whole) = call(
        app.clone(),
        "POST",
        "/v1/chat/completions",
        Some(
            body(false)
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| *k != "stream_options")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
    )
    .await;
    let whole = json_of(&whole);
    let (status, who, text) = call(
        app.clone(),
        "POST",
        "/v1/chat/completions",
        Some(body(true)),
    )
    .await;
    assert_eq!(
        (status, who.as_deref()),
        (StatusCode::OK, Some("personal@v1"))
    );
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| json_of(e))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        streamed,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish.len(), 1);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage, &whole["usage"], "{text}");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["pai"]["adapter"] == "personal"));
}

/// Ask until `done` holds of the answer (10 s at most), checking every answer on the way.
async fn until<T>(
    mut ask: impl FnMut() -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>,
    mut check: impl FnMut(&T),
    done: impl Fn(&T) -> bool,
) -> T {
    let started = std::time::Instant::now();
    loop {
        let got = ask().await;
        check(&got);
        if done(&got) {
            return got;
        }
        assert!(started.elapsed().as_secs() < 10, "no change within 10 s");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_promoted_version_is_swapped_in_and_a_broken_one_never_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let (state, registry) = server(dir.path());
    let app = pai_serve::app(state);
    let ask =
        json!({"model": "personal", "prompt": "The heron", "max_tokens": 2, "temperature": 0});
    let who = |app: axum::Router| {
        let ask = ask.clone();
        async move { call(app, "POST", "/v1/completions", Some(ask)).await }
    };
    assert_eq!(who(app.clone()).await.1.as_deref(), Some("personal@v1"));

    // Promoted while the server runs: swapped in by the loader, no restart, no failed request.
    let v1 = registry.dir("personal", pai_adapters::Version(1));
    // The same weights and base fingerprint as v1 (the server checks the fingerprint).
    let meta = registry.meta("personal", pai_adapters::Version(1)).unwrap();
    let v2 = registry.add("personal", &v1, meta.clone()).unwrap();
    registry.promote("personal", v2, "gate").unwrap();
    let answered = |r: &(StatusCode, Option<String>, String)| {
        assert_eq!(r.0, StatusCode::OK, "{}", r.2);
        let who = r.1.as_deref().unwrap_or("");
        assert!(who == "personal@v1" || who == "personal@v2", "{who}");
    };
    until(
        || Box::pin(who(app.clone())),
        answered,
        |r| r.1.as_deref() == Some("personal@v2"),
    )
    .await;

    // A promoted version whose weights do not verify: v2 keeps answering, /health says why.
    let v3 = registry.add("personal", &v1, meta.clone()).unwrap();
    std::fs::write(
        registry
            .dir("personal", v3)
            .join("adapter_model.safetensors"),
        b"x",
    )
    .unwrap();
    registry.promote("personal", v3, "bad").unwrap_err();
    // (promote refuses it already; a file damaged after promotion is the case to survive)
    let v4 = registry.add("personal", &v1, meta.clone()).unwrap();
    registry.promote("personal", v4, "gate").unwrap();
    std::fs::write(
        registry
            .dir("personal", v4)
            .join("adapter_model.safetensors"),
        b"x",
    )
    .unwrap();
    let (status, header, body) = who(app.clone()).await;
    assert_eq!(
        (status, header.as_deref()),
        (StatusCode::OK, Some("personal@v2")),
        "{body}"
    );
    let health = until(
        || {
            let app = app.clone();
            Box::pin(async move { json_of(&call(app, "GET", "/health", None).await.2) })
        },
        |_| {},
        |h| h["status"] == "degraded",
    )
    .await;
    let (status, header, _) = who(app.clone()).await;
    assert_eq!(
        (status, header.as_deref()),
        (StatusCode::OK, Some("personal@v2"))
    );
    assert_eq!(health["status"], "degraded");
    assert!(
        health["adapter_errors"]["personal"]
            .as_str()
            .unwrap()
            .contains("v4"),
        "{health}"
    );
    // Asked for by version, the broken one is refused.
    let (status, _, _) = call(
        app.clone(),
        "POST",
        "/v1/completions",
        Some(json!({"model": "personal@v4", "prompt": "x", "max_tokens": 1})),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    // Rolled back to a good version: served, and healthy again.
    registry.rollback("personal", Some(v2)).unwrap();
    assert_eq!(who(app.clone()).await.1.as_deref(), Some("personal@v2"));
    let (_, _, health) = call(app.clone(), "GET", "/health", None).await;
    assert_eq!(json_of(&health)["status"], "ok");
}

/// `/metrics` counts what was asked and answered, per adapter: requests by route and status (a 404
/// included), tokens, time to first token and generation latency, in Prometheus' text format.
#[tokio::test]
async fn metrics_count_requests_tokens_and_latency_per_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _registry) = server(dir.path());
    let app = pai_serve::app(state.clone());
    let ask = |model: &str| json!({"model": model, "prompt": "The heron", "max_tokens": 5, "temperature": 0});
    for _ in 0..2 {
        let (status, _, body) = call(
            app.clone(),
            "POST",
            "/v1/completions",
            Some(ask("personal")),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, _, _) = call(app.clone(), "POST", "/v1/completions", Some(ask("ghost"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let streamed = json!({"model": "personal", "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3, "temperature": 0, "stream": true,
        "stream_options": {"include_usage": true}});
    let (status, _, body) = call(app.clone(), "POST", "/v1/chat/completions", Some(streamed)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let chat_tokens = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(json_of)
        .find_map(|v| v["usage"]["completion_tokens"].as_f64())
        .expect("a usage chunk");

    let req = Request::builder()
        .uri("/metrics")
        .body(Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let kind = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let value = |prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    };
    let personal = "adapter=\"personal\",version=\"v1\"";
    assert_eq!(
        value(&format!(
            "pai_requests_total{{route=\"/v1/completions\",status=\"200\",{personal}}}"
        )),
        2.0
    );
    assert_eq!(
        value(
            "pai_requests_total{route=\"/v1/completions\",status=\"404\",adapter=\"base\",version=\"\"}"
        ),
        1.0
    );
    assert_eq!(
        value(&format!(
            "pai_requests_total{{route=\"/v1/chat/completions\",status=\"200\",{personal}}}"
        )),
        1.0
    );
    // 2 × 5 completion tokens, and the streamed chat's (the stream has ended: [DONE] was read).
    assert_eq!(
        value(&format!("pai_completion_tokens_total{{{personal}}}")),
        10.0 + chat_tokens
    );
    assert!(value(&format!("pai_prompt_tokens_total{{{personal}}}")) > 0.0);
    assert_eq!(
        value(&format!(
            "pai_generation_duration_seconds_count{{{personal}}}"
        )),
        3.0
    );
    assert_eq!(
        value(&format!(
            "pai_time_to_first_token_seconds_count{{{personal}}}"
        )),
        2.0 + if chat_tokens > 0.0 { 1.0 } else { 0.0 }
    );
    assert!(
        value(&format!(
            "pai_time_to_first_token_seconds_sum{{{personal}}}"
        )) <= value(&format!(
            "pai_generation_duration_seconds_sum{{{personal}}}"
        ))
    );
    assert_eq!(value("pai_queue_depth "), 0.0);
    assert_eq!(value("pai_generations_running "), 0.0);
    assert_eq!(value("pai_adapters_loaded "), 1.0);
    assert_eq!(value("pai_adapters_broken "), 0.0);
}

/// Resident adapters are bounded by count and by bytes: past either bound the least recently used
/// version is evicted, and reloads (verified again) when asked for.
#[tokio::test]
async fn resident_adapters_are_bounded_and_evicted_ones_reload() {
    // (most versions, most bytes, versions resident after v1, v2, v1)
    for (count, bytes, resident) in [(1, 1 << 30, 1), (16, 1, 1), (16, 1 << 30, 2)] {
        let dir = tempfile::tempdir().unwrap();
        let (state, registry) = server(dir.path());
        let v1 = registry.dir("personal", pai_adapters::Version(1));
        let meta = registry.meta("personal", pai_adapters::Version(1)).unwrap();
        registry.add("personal", &v1, meta).unwrap();
        let mut state = std::sync::Arc::try_unwrap(state).ok().expect("sole owner");
        state.max_resident = count;
        state.max_resident_bytes = bytes;
        let state = std::sync::Arc::new(state);
        let app = pai_serve::app(state.clone());
        let ask = |model: &str| json!({"model": model, "prompt": "The heron", "max_tokens": 2, "temperature": 0});
        for model in ["personal@v1", "personal@v2", "personal@v1"] {
            let (status, who, body) =
                call(app.clone(), "POST", "/v1/completions", Some(ask(model))).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(who.as_deref(), Some(model));
            assert!(
                state.loaded_count() <= resident,
                "bounds ({count}, {bytes}), after {model}"
            );
        }
        assert_eq!(state.loaded_count(), resident, "bounds ({count}, {bytes})");
    }
}

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

#[tokio::test]
async fn adapters_load_and_unload_by_path_inside_the_root_with_compare_and_swap() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _registry) = server(dir.path());
    let root = dir.path().join("root");
    let first = crate::write_random_peft(&state.base, &root.join("mine-1"), "mine");
    let second = crate::write_random_peft(&state.base, &root.join("mine-2"), "mine");
    let stranger = crate::write_random_peft(&state.base, &dir.path().join("elsewhere"), "x");
    let load = |path: &std::path::Path, extra: Value| {
        let mut body = json!({"lora_name": "mine", "lora_path": path});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    // With no root configured, loading by path is off.
    let app = pai_serve::app(state.clone());
    let (status, _, body) = call(
        app,
        "POST",
        "/v1/load_lora_adapter",
        Some(load(&first, json!({}))),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let mut state = std::sync::Arc::try_unwrap(state).ok().expect("sole owner");
    state.adapter_root = Some(root.clone());
    let state = std::sync::Arc::new(state);
    let app = pai_serve::app(state.clone());
    let post = |uri: &'static str, body: Value| call(app.clone(), "POST", uri, Some(body));

    let (status, _, body) = post("/v1/load_lora_adapter", load(&first, json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let g1 = json_of(&body)["generation"].as_u64().unwrap();
    let ask = json!({"model": "mine", "prompt": "The heron", "max_tokens": 3, "temperature": 0});
    let generation_of = |body: &str| json_of(body)["pai"]["generation"].as_u64();
    let (status, who, body) = post("/v1/completions", ask.clone()).await;
    assert_eq!(
        (status, who.as_deref()),
        (StatusCode::OK, Some("mine")),
        "{body}"
    );
    assert_eq!(generation_of(&body), Some(g1));
    let (_, _, models) = call(app.clone(), "GET", "/v1/models", None).await;
    assert!(models.contains("\"mine\""), "{models}");

    // Loaded already: refused without a flag; a stale expected generation is a conflict.
    let (status, _, body) = post("/v1/load_lora_adapter", load(&second, json!({}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let stale = json!({"expected_generation": g1 + 100});
    let (status, _, body) = post("/v1/load_lora_adapter", load(&second, stale)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    // The generation it saw: swapped, and the next answer runs on the new one.
    let (status, _, body) = post(
        "/v1/load_lora_adapter",
        load(&second, json!({"expected_generation": g1})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let g2 = json_of(&body)["generation"].as_u64().unwrap();
    assert!(g2 > g1);
    assert_eq!(json_of(&body)["replaced_generation"].as_u64(), Some(g1));
    let (_, _, body) = post("/v1/completions", ask.clone()).await;
    assert_eq!(generation_of(&body), Some(g2));

    // Out of the root (directly or by a symlink), a registry name, the base's name: refused.
    let (status, _, body) = post(
        "/v1/load_lora_adapter",
        load(&stranger, json!({"load_inplace": true})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&stranger, root.join("link")).unwrap();
        let (status, _, body) = post(
            "/v1/load_lora_adapter",
            load(std::path::Path::new("link"), json!({"load_inplace": true})),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    }
    for name in ["personal", state.base_id.as_str()] {
        let (status, _, body) = post(
            "/v1/load_lora_adapter",
            json!({"lora_name": name, "lora_path": first}),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {body}");
    }

    // Unload: only the generation it is at; then the name is gone (404, never the base).
    let (status, _, body) = post(
        "/v1/unload_lora_adapter",
        json!({"lora_name": "mine", "expected_generation": g1}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, _, body) = post("/v1/unload_lora_adapter", json!({"lora_name": "mine"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, body) = post("/v1/completions", ask).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _, _) = post("/v1/unload_lora_adapter", json!({"lora_name": "mine"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// Streams running without a pause while a good version is promoted and then one that cannot load
/// onto this base: no request fails, every answer names the version and generation it ran on (the
/// same in its headers and in every chunk), and the broken version never answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_swap_under_load_fails_no_request_and_never_serves_a_broken_version() {
    let dir = tempfile::tempdir().unwrap();
    let (state, registry) = server(dir.path());
    state.watch_registry().expect("watch");
    let app = pai_serve::app(state.clone());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..6)
        .map(|k| {
            let (app, stop) = (app.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let ask = json!({"model": "personal", "prompt": format!("Stream {k}"),
                        "max_tokens": 12, "temperature": 0, "stream": true});
                    let req = Request::builder()
                        .method("POST")
                        .uri("/v1/completions")
                        .header("content-type", "application/json")
                        .body(Body::from(ask.to_string()))
                        .unwrap();
                    let resp = app.clone().oneshot(req).await.unwrap();
                    assert_eq!(resp.status(), StatusCode::OK);
                    let (who, generation) = {
                        let header = |name: &str| {
                            resp.headers()
                                .get(name)
                                .map(|v| v.to_str().unwrap().to_string())
                                .unwrap_or_else(|| panic!("no {name} header"))
                        };
                        (header("x-pai-adapter"), header("x-pai-generation"))
                    };
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    let body = String::from_utf8_lossy(&body).into_owned();
                    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
                    for data in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
                        if data == "[DONE]" {
                            continue;
                        }
                        let chunk = json_of(data);
                        assert!(chunk.get("error").is_none(), "{data}");
                        assert_eq!(chunk["pai"]["generation"].to_string(), generation, "{data}");
                    }
                    seen.push(who);
                }
                seen
            })
        })
        .collect();
    let v1 = registry.dir("personal", pai_adapters::Version(1));
    let meta = registry.meta("personal", pai_adapters::Version(1)).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let v2 = registry.add("personal", &v1, meta.clone()).unwrap();
    registry.promote("personal", v2, "gate").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Verifies as files, but was made for another base: it must never answer.
    let mut foreign = meta.clone();
    foreign.base.sha256 = "0".repeat(64);
    let v3 = registry.add("personal", &v1, foreign).unwrap();
    registry.promote("personal", v3, "gate").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen = Vec::new();
    for c in clients {
        seen.extend(c.await.expect("a client failed"));
    }
    assert!(seen.len() >= 12, "only {} requests ran", seen.len());
    assert!(
        seen.iter()
            .all(|w| w == "personal@v1" || w == "personal@v2"),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|w| w == "personal@v2"),
        "v2 never answered: {seen:?}"
    );
    let (_, _, health) = call(app.clone(), "GET", "/health", None).await;
    assert_eq!(json_of(&health)["status"], "degraded", "{health}");
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

/// Streamed log-probabilities are the non-streamed ones, each with the text of its tokens: chat's
/// `content` entries, completions' tokens, top alternatives and text offsets.
#[tokio::test]
async fn streams_carry_the_logprobs_of_their_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _registry) = server(dir.path());
    let app = pai_serve::app(state);
    let data_of = |text: &str| -> Vec<Value> {
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(json_of)
            .collect()
    };
    // Chat.
    let chat = |stream: bool| {
        json!({"model": "personal", "messages": [{"role": "user", "content": "Tell me"}],
               "max_tokens": 10, "temperature": 0, "logprobs": true, "top_logprobs": 2,
               "stream": stream})
    };
    let (_, _, whole) = call(
        app.clone(),
        "POST",
        "/v1/chat/completions",
        Some(chat(false)),
    )
    .await;
    let whole = json_of(&whole)["choices"][0]["logprobs"]["content"].clone();
    let (status, _, streamed) = call(
        app.clone(),
        "POST",
        "/v1/chat/completions",
        Some(chat(true)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{streamed}");
    let mut entries = Vec::new();
    for c in data_of(&streamed) {
        let choice = &c["choices"][0];
        match choice["logprobs"]["content"].as_array() {
            Some(lps) => {
                // The chunk's text is its tokens' bytes (a token alone may hold part of a
                // character: its `token` text is lossy, its `bytes` are not).
                let bytes: Vec<u8> = lps
                    .iter()
                    .flat_map(|t| t["bytes"].as_array().unwrap().clone())
                    .map(|b| b.as_u64().unwrap() as u8)
                    .collect();
                // (A random model also emits byte sequences that are not UTF-8: the text shows
                // them as U+FFFD, the bytes as they are.)
                let content = choice["delta"]["content"].as_str().unwrap_or("");
                assert_eq!(String::from_utf8_lossy(&bytes), content);
                entries.extend(lps.iter().cloned());
            }
            None => assert!(choice["delta"]["content"].as_str().unwrap_or("").is_empty()),
        }
    }
    assert_eq!(Value::Array(entries), whole);
    // Completions.
    let text = |stream: bool| {
        json!({"model": "base", "prompt": "The heron", "max_tokens": 10, "temperature": 0,
               "logprobs": 2, "stream": stream})
    };
    let (_, _, whole) = call(app.clone(), "POST", "/v1/completions", Some(text(false))).await;
    let whole = json_of(&whole)["choices"][0]["logprobs"].clone();
    let (_, _, streamed) = call(app.clone(), "POST", "/v1/completions", Some(text(true))).await;
    let mut joined =
        json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
    for c in data_of(&streamed) {
        let lp = &c["choices"][0]["logprobs"];
        if lp.is_null() {
            continue;
        }
        for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
            let more = lp[key].as_array().unwrap().clone();
            joined[key].as_array_mut().unwrap().extend(more);
        }
    }
    assert_eq!(joined, whole);
}
