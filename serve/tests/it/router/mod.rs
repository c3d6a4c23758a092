//! The router against real peers on loopback (`peers`): OpenAI-compatible servers that answer,
//! refuse connections, hang, answer 429 with Retry-After, 500, or drop a stream before or after its
//! first token, and a second pai-serve. Each peer logs every body it receives, so the tests can say
//! what left the machine. Fallbacks, streams, decisions and escalations here; the privacy gate and
//! redact mode in `privacy`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use pai_serve::router::{EgressLedger, Router, RouterConfig, Thresholds, TierConfig};
use pai_serve::ServeState;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::{json_of, server};

mod peers;
mod privacy;
use peers::{pai_serve_peer, peer, refusing, Behaviour};

fn tier(name: &str, level: u8, url: &str) -> TierConfig {
    TierConfig {
        name: name.into(),
        level,
        base_url: url.into(),
        model: format!("{name}-model"),
        api_key_env: None,
        timeout_s: 1,
        price_input_per_m: 1.0,
        price_output_per_m: 2.0,
    }
}

/// The router's server: the tiny model with `personal`, these tiers, its home in `dir/home`.
fn routed(dir: &std::path::Path, config: RouterConfig) -> Arc<ServeState> {
    std::fs::create_dir_all(dir).unwrap();
    let (state, _registry) = server(dir);
    let mut state = Arc::into_inner(state).expect("one owner");
    state.router = Router::new(config, Some(&dir.join("home"))).expect("router");
    Arc::new(state)
}

fn fast(tiers: Vec<TierConfig>) -> RouterConfig {
    RouterConfig {
        tiers,
        retries: 1,
        backoff_ms: 10,
        max_backoff_ms: 50,
        ..Default::default()
    }
}

/// One request: status, headers, body.
async fn send(
    state: &Arc<ServeState>,
    uri: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, String) {
    let mut req = Request::builder()
        .method("POST")
        .uri(uri)
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = pai_serve::app(state.clone())
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn ask(text: &str, extra: Value) -> Value {
    let mut body = json!({"model": "auto", "messages": [{"role": "user", "content": text}],
                          "max_tokens": 4, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// A chat request with `model: auto` (`ask`) through the router.
async fn chat(
    state: &Arc<ServeState>,
    text: &str,
    extra: Value,
) -> (StatusCode, HeaderMap, String) {
    send(state, "/v1/chat/completions", ask(text, extra), &[]).await
}

/// The text of an SSE chat stream: its chunks' deltas, joined.
fn streamed_text(body: &str) -> String {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            json_of(d)["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).map_or("", |v| v.to_str().unwrap())
}

async fn metrics(state: &Arc<ServeState>) -> String {
    let resp = pai_serve::app(state.clone())
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn has_line(text: &str, line: &str) {
    assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_tier_answers_and_the_answer_says_where_it_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let medium = peer("medium", Behaviour::Answer).await;
    let state = routed(dir.path(), fast(vec![tier("medium", 2, &medium.url)]));

    let (status, h, body) = chat(&state, "Hello there", json!({"tier": "L2", "user": "u1"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v = json_of(&body);
    assert_eq!(v["choices"][0]["message"]["content"], "answer from medium");
    assert_eq!(header(&h, "x-pai-tier"), "medium");
    assert_eq!(header(&h, "x-pai-tier-level"), "2");
    assert_eq!(header(&h, "x-pai-route-rule"), "asked");
    assert_eq!(v["pai"]["route"]["tier"], "medium");
    assert_eq!(v["pai"]["route"]["left_machine"], true);
    assert!(v["pai"]["route"]["reasons"][0]
        .as_str()
        .unwrap()
        .contains("asked for L2"));

    // What the peer received: the OpenAI request with its model, without pai's own fields and
    // without the end-user id.
    let sent = json_of(&medium.received()[0]);
    assert_eq!(sent["model"], "medium-model");
    assert!(
        ["tier", "private", "user"]
            .iter()
            .all(|f| sent.get(*f).is_none()),
        "{sent}"
    );

    // Without a tier and uncalibrated: the local model answers, with its adapter.
    let (status, h, body) = chat(&state, "Hello again", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(header(&h, "x-pai-tier"), "local");
    assert_eq!(header(&h, "x-pai-adapter"), "personal@v1");
    assert_eq!(json_of(&body)["pai"]["route"]["rule"], "uncalibrated");
    assert_eq!(medium.received().len(), 1);

    // The ledger: one line, a hash of what was sent and never the text.
    let home = dir.path().join("home");
    let ledger = EgressLedger::read(&EgressLedger::path(&home)).unwrap();
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].deployment, "medium");
    assert_eq!(ledger[0].outcome, "ok");
    assert_eq!(
        (ledger[0].prompt_tokens, ledger[0].completion_tokens),
        (10, 4)
    );
    assert!(
        (ledger[0].cost_usd - 18e-6).abs() < 1e-12,
        "{}",
        ledger[0].cost_usd
    );
    let raw = std::fs::read_to_string(EgressLedger::path(&home)).unwrap();
    assert!(!raw.contains("Hello"), "{raw}");
    {
        use sha2::Digest;
        let digest = format!(
            "{:x}",
            sha2::Sha256::digest(medium.received()[0].as_bytes())
        );
        assert_eq!(ledger[0].sha256, digest);
    }

    let m = metrics(&state).await;
    has_line(&m, "pai_router_served_total{tier=\"medium\",level=\"2\"} 1");
    has_line(&m, "pai_router_served_total{tier=\"local\",level=\"1\"} 1");
    has_line(
        &m,
        "pai_router_decisions_total{rule=\"asked\",level=\"2\"} 1",
    );
    has_line(
        &m,
        "pai_router_cost_usd_total{deployment=\"medium\"} 0.000018",
    );
    has_line(&m, "pai_requests_total{route=\"/v1/chat/completions\",status=\"200\",adapter=\"tier:medium\",version=\"\"} 1");

    // `/v1/completions` does not route.
    let (status, _, body) = send(
        &state,
        "/v1/completions",
        json!({"model": "auto", "prompt": "x"}),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_deployments_fall_back_in_order_and_the_metrics_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let hang = peer("hang", Behaviour::Hang).await;
    let busy = peer("busy", Behaviour::Status(429, Some(1))).await;
    let broken = peer("broken", Behaviour::Status(500, None)).await;
    let real = pai_serve_peer(&dir.path().join("peer")).await;
    let mut large = tier("pai", 3, &real.url);
    large.model = "personal".into();
    large.timeout_s = 60;
    let config = RouterConfig {
        breaker_failures: 1,
        ..fast(vec![
            tier("refused", 2, &refusing()),
            tier("hang", 2, &hang.url),
            tier("busy", 2, &busy.url),
            tier("broken", 2, &broken.url),
            large,
        ])
    };
    let state = routed(&dir.path().join("router"), config);

    let (status, h, body) = chat(&state, "Tell me about rivers", json!({"tier": "L2"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v = json_of(&body);
    assert_eq!(header(&h, "x-pai-tier"), "pai");
    assert_eq!(header(&h, "x-pai-fallbacks"), "4");
    let causes: Vec<(String, String)> = v["pai"]["route"]["fallbacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["target"].as_str().unwrap().into(),
                f["cause"].as_str().unwrap().into(),
            )
        })
        .collect();
    let want = [
        ("refused", "connect"),
        ("hang", "timeout"),
        ("busy", "429"),
        ("broken", "5xx"),
    ];
    assert_eq!(causes, want.map(|(a, b)| (a.to_string(), b.to_string())));
    // The second pai-serve answered with its adapter (its own lineage comes back in the body).
    assert_eq!(v["pai"]["adapter"], "personal");
    assert_eq!(real.received().len(), 1);
    // Each failing deployment was tried twice (one retry); the 429 waited out its Retry-After.
    assert_eq!(hang.received().len(), 2);
    assert_eq!(broken.received().len(), 2);
    let t = busy.times();
    assert_eq!(t.len(), 2);
    assert!(
        t[1] - t[0] >= Duration::from_secs(1),
        "Retry-After not honoured: {:?}",
        t[1] - t[0]
    );

    let m = metrics(&state).await;
    for (target, cause) in want {
        has_line(
            &m,
            &format!("pai_router_fallbacks_total{{target=\"{target}\",cause=\"{cause}\"}} 1"),
        );
        has_line(
            &m,
            &format!("pai_router_retries_total{{target=\"{target}\",cause=\"{cause}\"}} 1"),
        );
    }
    has_line(&m, "pai_router_served_total{tier=\"pai\",level=\"3\"} 1");

    // The breakers are open: the next request skips the failed deployments without a call.
    let (status, h, body) = chat(&state, "And lakes?", json!({"tier": "L2"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(header(&h, "x-pai-tier"), "pai");
    assert_eq!(
        (
            hang.received().len(),
            busy.received().len(),
            broken.received().len()
        ),
        (2, 2, 2)
    );
    let m = metrics(&state).await;
    has_line(
        &m,
        "pai_router_fallbacks_total{target=\"hang\",cause=\"breaker\"} 1",
    );
    has_line(&m, "pai_router_served_total{tier=\"pai\",level=\"3\"} 2");
    has_line(&m, "pai_router_deployment_up{deployment=\"hang\"} 0");
    has_line(&m, "pai_router_deployment_up{deployment=\"pai\"} 1");
    // /health shows each deployment's breaker.
    let resp = pai_serve::app(state.clone())
        .oneshot(Request::get("/health").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let health = json_of(&String::from_utf8_lossy(
        &resp.into_body().collect().await.unwrap().to_bytes(),
    ));
    let tiers = health["router"]["tiers"].as_array().unwrap();
    let hang = tiers.iter().find(|t| t["name"] == "hang").unwrap();
    assert_eq!(hang["breaker"], "open", "{health}");
    assert!(hang["cooling_s"].as_f64().unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_pass_through_and_fall_back_only_before_their_first_token() {
    let dir = tempfile::tempdir().unwrap();
    let dropping = peer("dropping", Behaviour::DropBeforeFirstToken).await;
    let ok = peer("ok", Behaviour::Answer).await;
    let breaking = peer("breaking", Behaviour::BreakAfterFirstToken).await;
    let garbage = peer("garbage", Behaviour::Garbage).await;
    let config = RouterConfig {
        retries: 0,
        ..fast(vec![
            tier("dropping", 2, &dropping.url),
            tier("ok", 2, &ok.url),
            tier("breaking", 3, &breaking.url),
            tier("garbage", 3, &garbage.url),
        ])
    };
    let state = routed(dir.path(), config);
    let streamed = |tier: &str| ask("Stream me something", json!({"stream": true, "tier": tier}));

    let (status, h, body) = send(&state, "/v1/chat/completions", streamed("L2"), &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(header(&h, "x-pai-tier"), "ok");
    assert_eq!(header(&h, "x-pai-fallbacks"), "1");
    assert_eq!(header(&h, "content-type"), "text/event-stream");
    let text = streamed_text(&body);
    assert_eq!(text, "answer from ok");
    assert!(body.trim_end().ends_with("data: [DONE]"));
    assert_eq!(dropping.received().len(), 1);

    // Broken after its first token: no fallback (the client has the start); the end says so.
    let (status, h, body) = send(&state, "/v1/chat/completions", streamed("breaking"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&h, "x-pai-tier"), "breaking");
    assert!(body.contains("\"content\":\"answer\""), "{body}");
    assert!(body.contains("upstream_stream_broken"), "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    assert_eq!(ok.received().len(), 1);

    // A whole answer that is no chat completion is a failure too, and so is a body cut off (the
    // streaming peers break theirs): on to the next deployment.
    let (status, h, body) = chat(&state, "Whole, please", json!({"tier": "garbage"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let causes: Vec<String> = json_of(&body)["pai"]["route"]["fallbacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            format!(
                "{}/{}",
                f["target"].as_str().unwrap(),
                f["cause"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        causes,
        ["garbage/bad_answer", "breaking/connect", "dropping/connect"]
    );
    assert_eq!(header(&h, "x-pai-tier"), "ok");

    // A local stream through the router keeps the route headers.
    let (status, h, body) = send(&state, "/v1/chat/completions", streamed("local"), &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(header(&h, "x-pai-tier"), "local");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let m = metrics(&state).await;
    has_line(
        &m,
        "pai_router_fallbacks_total{target=\"dropping\",cause=\"stream\"} 1",
    );
    has_line(
        &m,
        "pai_router_fallbacks_total{target=\"breaking\",cause=\"stream_after_first_token\"} 1",
    );
    // The stream's usage chunk was counted (10 prompt tokens), and the whole answer's (10).
    has_line(
        &m,
        "pai_router_cloud_tokens_total{deployment=\"ok\",kind=\"prompt\"} 20",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_confidence_rule_and_the_budget_decide_and_route_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let medium = peer("medium", Behaviour::Answer).await;
    let large = peer("large", Behaviour::Answer).await;
    let tiers = vec![tier("medium", 2, &medium.url), tier("large", 3, &large.url)];
    // Thresholds no prompt reaches (mean log-likelihoods are negative): L3.
    // The bare base as L1: the tiny base is seeded, so every server below measures the same.
    let on_base = |thresholds| RouterConfig {
        thresholds: Some(thresholds),
        local_model: "base".into(),
        ..fast(tiers.clone())
    };
    let above = RouterConfig {
        thresholds: Some(Thresholds {
            local: 0.5,
            medium: 0.25,
            length_weight: 0.0,
            ..Default::default()
        }),
        local_model: "base".into(),
        ..fast(tiers.clone())
    };
    let state = routed(&dir.path().join("a"), above);
    let (status, _, body) = send(
        &state,
        "/v1/route",
        ask("Which way is north?", json!({})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let d = json_of(&body);
    assert_eq!(d["rule"], "confidence");
    assert_eq!(d["level"], 3);
    assert_eq!(d["plan"], json!(["large", "medium", "local"]));
    let c = d["score"].as_f64().expect("a measured confidence");
    assert_eq!(
        Some(c),
        d["probe"]["mean_loglik"].as_f64(),
        "no length weight"
    );
    assert!(c < 0.0 && c.is_finite(), "{c}");
    assert!(
        medium.received().is_empty() && large.received().is_empty(),
        "route sends nothing"
    );

    // Thresholds around the measured confidence: the same request at L2, then L1.
    for (t, level, plan) in [
        (
            Thresholds {
                local: c + 1.0,
                medium: c - 1.0,
                length_weight: 0.0,
                ..Default::default()
            },
            2,
            json!(["medium", "large", "local"]),
        ),
        (
            Thresholds {
                local: c - 1.0,
                medium: c - 2.0,
                length_weight: 0.0,
                ..Default::default()
            },
            1,
            json!(["local", "medium", "large"]),
        ),
    ] {
        let state = routed(&dir.path().join(format!("l{level}")), on_base(t));
        let (_, _, body) = send(
            &state,
            "/v1/route",
            ask("Which way is north?", json!({})),
            &[],
        )
        .await;
        let d = json_of(&body);
        assert_eq!(
            (d["level"].as_u64(), &d["plan"]),
            (Some(level), &plan),
            "{d}"
        );
    }

    // A budget: the first cloud answer spends it, the next request stays local, and the spend
    // survives a restart (read back from the ledger).
    let budget = RouterConfig {
        daily_budget_usd: Some(0.000_01),
        ..fast(tiers.clone())
    };
    let home = dir.path().join("b");
    let state = routed(&home, budget.clone());
    let (_, h, _) = chat(&state, "First", json!({"tier": "L2"})).await;
    assert_eq!(header(&h, "x-pai-tier"), "medium");
    let (_, h, body) = chat(&state, "Second", json!({"tier": "L2"})).await;
    assert_eq!(header(&h, "x-pai-tier"), "local", "{body}");
    assert_eq!(header(&h, "x-pai-route-rule"), "budget");
    let restarted = Router::new(budget, Some(&home.join("home"))).unwrap();
    assert!((restarted.spent_today() - 18e-6).abs() < 1e-12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalations_become_chat_examples_when_the_owner_opts_in() {
    let dir = tempfile::tempdir().unwrap();
    let medium = peer("medium", Behaviour::Answer).await;
    let config = RouterConfig {
        learn_from_escalations: true,
        ..fast(vec![tier("medium", 2, &medium.url)])
    };
    let state = routed(dir.path(), config);
    let system = json!({"role": "system", "content": "Be brief."});
    let mut whole = ask("What is a monad?", json!({"tier": "L2"}));
    whole["messages"]
        .as_array_mut()
        .unwrap()
        .insert(0, system.clone());
    let streamed = ask("And a functor?", json!({"tier": "L2", "stream": true}));
    for body in [whole, streamed] {
        let (status, h, _) = send(&state, "/v1/chat/completions", body, &[]).await;
        assert_eq!(
            (status, header(&h, "x-pai-tier")),
            (StatusCode::OK, "medium")
        );
    }
    // Kept local (asked, and private): nothing saved.
    chat(&state, "Hi", json!({"tier": "local"})).await;
    chat(&state, "Hi", json!({"private": true})).await;

    // The stream's file line is written when it ends, just after the response.
    let files = pai_serve::router::escalations_dir(&dir.path().join("home"));
    let mut lines = Vec::new();
    for _ in 0..50 {
        lines = std::fs::read_dir(&files)
            .map(|d| {
                d.flat_map(|e| {
                    std::fs::read_to_string(e.unwrap().path())
                        .unwrap()
                        .lines()
                        .map(String::from)
                        .collect::<Vec<_>>()
                })
                .collect()
            })
            .unwrap_or_default();
        if lines.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lines.len(), 2, "{lines:?}");
    // What a chat source reads: OpenAI's fine-tuning format, the answer as the assistant's reply.
    let first: pai_datasets::Conversation = serde_json::from_str(&lines[0]).unwrap();
    let roles: Vec<&str> = first.messages.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["system", "user", "assistant"]);
    assert_eq!(first.messages[2].content, "answer from medium");
    let second: pai_datasets::Conversation = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(second.messages[1].content, "answer from medium");
}

/// A gate record as `pai-train eval` writes it, with the standings of the primary suite's domains.
fn gate_record(incumbent: &str, notes: &str, code: &str) -> Value {
    let domain = |d: &str, s: &str| json!({"domain": d, "standing": s, "comparison": {}});
    json!({"incumbent": incumbent, "day": "2026-12-01", "decision": {
        "promote": true, "reasons": [],
        "suites": [{"suite": "perplexity", "role": "primary",
                    "domains": [domain("code", code), domain("notes", notes)]}]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_kind_and_the_adapters_gate_standing_move_the_score() {
    let dir = tempfile::tempdir().unwrap();
    let medium = peer("medium", Behaviour::Answer).await;
    let home = dir.path().join("home");
    // personal@v1 was found better than the base on the notes and worse on code.
    let registry = pai_adapters::Registry::new(&home);
    let (state, _) = server(dir.path());
    let v1 = registry.current("personal").unwrap().unwrap();
    registry
        .record_gate("personal", v1, gate_record("base", "better", "worse"))
        .unwrap();
    let mut offsets = std::collections::BTreeMap::new();
    offsets.insert("code".to_string(), -1.0);
    let config = RouterConfig {
        thresholds: Some(Thresholds {
            local: -1e9,
            medium: -2e9,
            length_weight: 0.0,
            kind_offsets: offsets,
            gate_weight: 0.5,
        }),
        ..fast(vec![tier("medium", 2, &medium.url)])
    };
    let mut s = Arc::into_inner(state).expect("one owner");
    s.router = Router::new(config, Some(&home)).expect("router");
    let state = Arc::new(s);
    let route = |text: &'static str| {
        let state = state.clone();
        async move {
            let (status, _, body) = send(&state, "/v1/route", ask(text, json!({})), &[]).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            json_of(&body)
        }
    };
    let parts = |d: &Value| {
        (
            d["kind"].as_str().unwrap().to_string(),
            d["domain"].as_str().unwrap().to_string(),
            d["standing"].as_str().unwrap().to_string(),
            d["score"].as_f64().unwrap() - d["probe"]["mean_loglik"].as_f64().unwrap(),
        )
    };
    let close = |(k, d, s, added): (String, String, String, f64), want: (&str, &str, &str, f64)| {
        assert_eq!(
            (k.as_str(), d.as_str(), s.as_str()),
            (want.0, want.1, want.2)
        );
        assert!((added - want.3).abs() < 1e-9, "{added} vs {}", want.3);
    };
    // The owner asking of their own notes: better there, +0.5.
    let d = route("When did I last repot the fig?").await;
    close(parts(&d), ("personal", "notes", "better", 0.5));
    let reasons = d["reasons"].to_string();
    assert!(reasons.contains("a personal request"), "{reasons}");
    assert!(
        reasons.contains("stands better against the base in notes"),
        "{reasons}"
    );
    // Code: the kind's offset and the worse standing, −1.0 − 0.5.
    close(
        parts(&route("How do I reverse a string in Python?").await),
        ("code", "code", "worse", -1.5),
    );
    // Anything else: the general domain, unknown to the gate, adds nothing.
    close(
        parts(&route("What is the capital of Peru?").await),
        ("question", "general", "same", 0.0),
    );

    // v2 promoted, worse than v1 on the notes: against the base that is the same as it; the
    // router reads the new version's standings from its next request.
    crate::add_random_adapter(&registry, &state.base, dir.path(), "personal");
    let v2 = registry.current("personal").unwrap().unwrap();
    assert_ne!(v1, v2);
    registry
        .record_gate(
            "personal",
            v2,
            gate_record("personal@v1", "worse", "better"),
        )
        .unwrap();
    close(
        parts(&route("When did I last repot the fig?").await),
        ("personal", "notes", "same", 0.0),
    );
    close(
        parts(&route("How do I reverse a string in Python?").await),
        ("code", "code", "same", -1.0),
    );
    assert!(medium.received().is_empty(), "route sends nothing");
}
