//! The privacy gate against real peers: planted private notes, secrets, personal data and private
//! flags never reach any peer's log (also with the local model down), and redact mode sends
//! placeholders out and restores the values in the answer.

use axum::http::StatusCode;
use pai_serve::router::EgressLedger;
use serde_json::{json, Value};

use super::peers::{pai_serve_peer, peer, Behaviour};
use super::{ask, chat, fast, has_line, header, metrics, routed, send, streamed_text, tier};
use crate::json_of;

/// A request carrying something private: its text, extra fields, headers, the detector expected.
type PrivateCase = (
    String,
    Value,
    &'static [(&'static str, &'static str)],
    &'static str,
);

/// Overwrite every adapter weight file under `home` (the registry's verify then refuses them).
fn damage_adapters(home: &std::path::Path) {
    let mut dirs = vec![home.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "safetensors") {
                std::fs::write(&p, b"damaged").unwrap();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_material_never_reaches_a_cloud_tier() {
    let dir = tempfile::tempdir().unwrap();
    let note = "Planted private note: the allotment shed key hangs behind the third loose brick on \
                the north wall, and the padlock code is the year grandmother planted the pear tree.";
    let index = pai_datasets::PrivacyIndex::build([note]);
    for server in ["router", "down"] {
        let home = dir.path().join(server).join("home");
        index
            .save(&pai_datasets::PrivacyIndex::path(&home))
            .unwrap();
    }
    let broken = peer("broken", Behaviour::Status(500, None)).await;
    let open = peer("open", Behaviour::Answer).await;
    let real = pai_serve_peer(&dir.path().join("peer")).await;
    let mut large = tier("pai", 3, &real.url);
    large.model = "personal".into();
    large.timeout_s = 60;
    let tiers = vec![
        tier("broken", 2, &broken.url),
        tier("open", 2, &open.url),
        large,
    ];
    let state = routed(&dir.path().join("router"), fast(tiers.clone()));

    let secret = ["my key is ", "ghp_", "Zq8Xw2Lm4Nv6Bp0Rt3Ys5Ku7Hj9Gf1Dc2Ae4"].concat();
    let email = [
        "mail ",
        "ada.lovelace",
        "@",
        "analytical-engines.co.uk",
        " about the engine",
    ]
    .concat();
    let quoted = format!("Please summarise: {}", &note[22..]);
    let cases: [PrivateCase; 5] = [
        (quoted.clone(), json!({"tier": "L2"}), &[], "private_index"),
        (secret.clone(), json!({"tier": "L3"}), &[], "secret"),
        (email.clone(), json!({"tier": "open"}), &[], "pii"),
        (
            "Plain question one".into(),
            json!({"tier": "L2", "private": true}),
            &[],
            "flag",
        ),
        (
            "Plain question two".into(),
            json!({"tier": "L2"}),
            &[("x-pai-private", "true")],
            "flag",
        ),
    ];
    for (text, extra, headers, detector) in &cases {
        let (status, h, body) = send(
            &state,
            "/v1/chat/completions",
            ask(text, extra.clone()),
            headers,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{detector}: {body}");
        assert_eq!(header(&h, "x-pai-tier"), "local", "{detector}");
        assert_eq!(header(&h, "x-pai-route-rule"), "private", "{detector}");
        // The decision alone says the same, and why.
        let (_, _, route) = send(&state, "/v1/route", ask(text, extra.clone()), headers).await;
        let route = json_of(&route);
        assert_eq!(route["plan"], json!(["local"]), "{detector}: {route}");
        assert_eq!(route["privacy"]["may_leave"], false);
    }
    let m = metrics(&state).await;
    has_line(&m, "pai_router_kept_local_total{detector=\"flag\"} 4");
    has_line(
        &m,
        "pai_router_kept_local_total{detector=\"private_index\"} 2",
    );

    // The local model is down (its adapter's weights are damaged on disk): private requests are
    // refused, never sent.
    let state = routed(&dir.path().join("down"), fast(tiers));
    damage_adapters(&dir.path().join("down").join("home"));
    for (text, extra, headers, detector) in &cases {
        let (status, _, body) = send(
            &state,
            "/v1/chat/completions",
            ask(text, extra.clone()),
            headers,
        )
        .await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{detector}: {body}"
        );
        let e = json_of(&body);
        assert_eq!(e["error"]["code"], "local_unavailable", "{body}");
        assert!(e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not sent to any cloud tier"));
    }
    for p in [&broken, &open, &real] {
        assert!(p.received().is_empty(), "{:?}", p.received());
    }

    // An ordinary request with the local model down goes out, past the failing tier.
    let (status, h, body) = chat(&state, "What is a river delta?", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(header(&h, "x-pai-tier"), "open");
    assert_eq!(header(&h, "x-pai-fallbacks"), "2", "local, then broken");
    let everything: String = [&broken, &open, &real]
        .iter()
        .flat_map(|p| p.received())
        .collect();
    for planted in ["allotment", "ghp_", "lovelace", "Plain question"] {
        assert!(!everything.contains(planted), "{planted} left the machine");
    }
    let home = dir.path().join("down").join("home");
    let ledger = EgressLedger::read(&EgressLedger::path(&home)).unwrap();
    assert_eq!(ledger.len(), 3, "broken's two attempts and open's answer");
    assert!(ledger
        .iter()
        .all(|r| r.secrets + r.pii + r.private_shingles == 0 && !r.flagged));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redact_mode_sends_placeholders_and_restores_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let echo = peer("echo", Behaviour::Echo).await;
    let mut config = fast(vec![tier("echo", 2, &echo.url)]);
    config.privacy.redact = pai_serve::router::Redact::All;
    let state = routed(dir.path(), config);
    let email = ["ada", "@", "analytical-engines.co.uk"].concat();
    let token = ["gh", "p_", "Zq8Xw2Lm4Nv6Bp0Rt3Ys5Ku7Hj9Gf1Dc2Ae4"].concat();
    let question = format!("Tell {email} that the token {token} expired; cc {email}.");

    // Whole and streamed: the peer sees placeholders, the client gets its own text back.
    for stream in [false, true] {
        let (status, h, body) =
            chat(&state, &question, json!({"tier": "L2", "stream": stream})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(header(&h, "x-pai-tier"), "echo");
        let answer: String = if stream {
            streamed_text(&body)
        } else {
            json_of(&body)["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(answer, question, "stream {stream}");
    }
    let seen = echo.received().join("\n");
    assert!(!seen.contains(&email) && !seen.contains(&token), "{seen}");
    assert!(
        seen.contains("<PII:email#1>") && seen.contains("<PII:email#2>"),
        "{seen}"
    );
    assert!(seen.contains("<SECRET:github_token#3>"), "{seen}");

    // The ledger says what was redacted and that nothing detectable left.
    let ledger = EgressLedger::read(&EgressLedger::path(&dir.path().join("home"))).unwrap();
    assert_eq!(ledger.len(), 2);
    assert!(
        ledger
            .iter()
            .all(|r| r.redacted == 3 && r.secrets + r.pii == 0),
        "{ledger:?}"
    );

    // A stop sequence is sent as it is: one carrying personal data keeps the request here.
    let (_, h, body) = chat(
        &state,
        "Plain question",
        json!({"tier": "L2", "stop": [email.clone()]}),
    )
    .await;
    assert_eq!(header(&h, "x-pai-tier"), "local", "{body}");
    assert_eq!(echo.received().len(), 2);

    // A quote of a private note or a private flag is not redactable: it stays.
    let (_, h, _) = chat(&state, &question, json!({"tier": "L2", "private": true})).await;
    assert_eq!(header(&h, "x-pai-tier"), "local");
    assert_eq!(echo.received().len(), 2);
}

/// In redact mode `shareable` (the default), a request that quotes a source the owner marked
/// shareable leaves with placeholders; the same personal data in a request that quotes nothing of it
/// stays local.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shareable_mode_redacts_only_quotes_of_shareable_sources() {
    let dir = tempfile::tempdir().unwrap();
    let minutes =
        "Minutes of the supplier call: the pallet counts are confirmed for Thursday, the \
                   pricing sheet is back from finance, and the warehouse opens an hour early.";
    pai_datasets::PrivacyIndex::build([minutes])
        .save(&pai_datasets::PrivacyIndex::shareable_path(
            &dir.path().join("home"),
        ))
        .unwrap();
    let echo = peer("echo", Behaviour::Echo).await;
    let config = fast(vec![tier("echo", 2, &echo.url)]);
    assert_eq!(config.privacy.redact, pai_serve::router::Redact::Shareable);
    let state = routed(dir.path(), config);
    let email = ["ops", "@", "example-supplier.com"].concat();

    let quoting = format!("Send this to {email}: {minutes}");
    let (status, h, body) = chat(&state, &quoting, json!({"tier": "L2"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(header(&h, "x-pai-tier"), "echo", "{body}");
    let answer = json_of(&body)["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(answer, quoting);
    let seen = echo.received().join("\n");
    assert!(
        !seen.contains(&email) && seen.contains("<PII:email#1>"),
        "{seen}"
    );

    let unknown = format!("Tell {email} that the meeting moved to Friday.");
    let (_, h, body) = chat(&state, &unknown, json!({"tier": "L2"})).await;
    assert_eq!(header(&h, "x-pai-tier"), "local", "{body}");
    assert_eq!(echo.received().len(), 1);
}
