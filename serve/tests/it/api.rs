//! The OpenAI API as clients use it: bodies, errors in the envelope, API keys, reports, metrics,
//! streams and their log-probabilities.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::{call, json_of, server};

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

/// `/metrics` counts what was asked and answered, per adapter: requests by route and status (a 404
/// included), tokens, time to first token and generation latency, in Prometheus' text format.
#[tokio::test]
async fn metrics_count_requests_tokens_and_latency_per_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _registry) = server(dir.path());
    let app = pai_serve::app(state.clone());
    let ask = |model: &str| json!({"model": model, "prompt": "The heron", "max_tokens": 5, "temperature": 0});
    // What the two completions generated (up to 5 tokens each: a random adapter may end one early).
    let (mut completion_tokens, mut answered) = (0.0, 0.0);
    for _ in 0..2 {
        let (status, _, body) = call(
            app.clone(),
            "POST",
            "/v1/completions",
            Some(ask("personal")),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let n = json_of(&body)["usage"]["completion_tokens"]
            .as_f64()
            .unwrap();
        completion_tokens += n;
        answered += if n > 0.0 { 1.0 } else { 0.0 };
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
    // The two completions' tokens and the streamed chat's (the stream has ended: [DONE] was read).
    assert_eq!(
        value(&format!("pai_completion_tokens_total{{{personal}}}")),
        completion_tokens + chat_tokens
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
        answered + if chat_tokens > 0.0 { 1.0 } else { 0.0 }
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
                // Control tokens the model emits are left out of the text.
                let control = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"];
                let bytes: Vec<u8> = lps
                    .iter()
                    .filter(|t| !control.contains(&t["token"].as_str().unwrap_or("")))
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
