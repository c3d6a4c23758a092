//! Adapters while the server runs: promoted versions swapped in (under load too) and broken ones
//! never served, the resident set bounded, loading and unloading by path.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::{call, json_of, server};

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

/// A promotion wakes the loader once; reading the pointer (which the loader and the router do) is
/// no promotion, so an idle server stays idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_server_does_not_keep_reloading_after_a_promotion() {
    let dir = tempfile::tempdir().unwrap();
    let (state, registry) = server(dir.path());
    state.watch_registry().expect("watch");
    crate::add_random_adapter(&registry, &state.base, dir.path(), "personal");
    let started = std::time::Instant::now();
    while state.background_refreshes() < 2 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "no refresh"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let settled = state.background_refreshes();
    // Reads of the pointer, as every request's lookup makes.
    for _ in 0..20 {
        registry.current("personal").unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    assert_eq!(
        state.background_refreshes(),
        settled,
        "the loader kept waking with nothing promoted"
    );
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
