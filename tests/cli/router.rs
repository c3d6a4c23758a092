//! The router end to end with the real binaries: one pai-serve is the "cloud" tier of another (a real
//! OpenAI-compatible server on loopback), `pai-train router calibrate` sets the thresholds the
//! routing server reads, a request carrying personal data stays local, and `pai-train egress` shows
//! what left (a hash, not the text).

use crate::serve::http;
use crate::{json, run, start_serve as start, text, tiny_model, TRAIN};

fn chat(text: &str, tier: Option<&str>) -> String {
    let mut body = serde_json::json!({
        "model": "auto", "max_tokens": 3, "temperature": 0,
        "messages": [{"role": "user", "content": text}],
    });
    if let Some(t) = tier {
        body["tier"] = t.into();
    }
    body.to_string()
}

#[test]
fn a_pai_serve_routes_to_another_keeps_private_requests_and_keeps_a_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let cloud = start(&model, &dir.path().join("cloud-home"));
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(
        home.join("pai.toml"),
        format!(
            "[router]\nlocal_model = \"base\"\n\n[[router.tiers]]\nname = \"peer\"\nlevel = 2\n\
             base_url = \"http://{}/v1\"\nmodel = \"base\"\ntimeout_s = 60\n\
             price_input_per_m = 1.0\nprice_output_per_m = 2.0\n",
            cloud.addr
        ),
    )
    .unwrap();
    let env = [("PAI_HOME", home.as_path())];
    let check = run(TRAIN, &["config", "check"], None, &env);
    assert!(check.status.success(), "{}", text(&check.stderr));

    // Calibration on a small labelled set, under the tiny base.
    let labels = dir.path().join("labels.jsonl");
    let item = |content: &str, level: u8| {
        serde_json::json!({"messages": [{"role": "user", "content": content}], "level": level, "kind": "t"})
            .to_string()
    };
    let lines: Vec<String> = (0..8)
        .map(|i| item(&format!("short question {i}"), 1))
        .chain([item("a much longer and harder request with many more words in it than the others have", 2)])
        .chain([item("the longest and hardest request of all, full of words, clauses, conditions and detail to weigh", 3)])
        .collect();
    std::fs::write(&labels, lines.join("\n")).unwrap();
    let m = model.to_str().unwrap();
    let out = run(
        TRAIN,
        &[
            "router",
            "calibrate",
            "--labels",
            labels.to_str().unwrap(),
            "--model",
            m,
        ],
        None,
        &env,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains("agreement with the labels"), "{said}");
    // Every short question reads as a question: too few of any kind for an offset.
    assert!(said.contains("kind offsets: none"), "{said}");
    assert!(said.contains("by its gates: not known"), "{said}");
    let calibration: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.join("router/calibration.json")).unwrap())
            .unwrap();
    assert_eq!(calibration["labelled"], 10);
    assert_eq!(calibration["share"][0], 80.0, "{calibration}");

    let server = start(&model, &home);
    assert!(
        server
            .said
            .contains("between the local model and peer (L2)"),
        "{}",
        server.said
    );
    assert!(
        server.said.contains("thresholds: local >="),
        "{}",
        server.said
    );

    // Asked for L2: the other pai-serve answers.
    let (status, body) = http(
        &server.addr,
        "POST",
        "/v1/chat/completions",
        &chat("Hello", Some("L2")),
    );
    assert!(status.contains("200"), "{status} {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["pai"]["route"]["tier"], "peer", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3);

    // Personal data stays local, even asked for L2.
    let email = [
        "write to ",
        "grace.hopper",
        "@",
        "navy-computing.org",
        " today",
    ]
    .concat();
    let (status, body) = http(
        &server.addr,
        "POST",
        "/v1/chat/completions",
        &chat(&email, Some("L2")),
    );
    assert!(status.contains("200"), "{status} {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["pai"]["route"]["tier"], "local", "{v}");
    assert_eq!(v["pai"]["route"]["rule"], "private");

    // The decision alone, from the calibrated thresholds.
    let (status, body) = http(
        &server.addr,
        "POST",
        "/v1/route",
        &chat("short question 3", None),
    );
    assert!(status.contains("200"), "{status} {body}");
    let d: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(d["rule"], "confidence", "{d}");
    assert!(d["score"].is_number(), "{d}");

    // The ledger: one request left, to the peer.
    let out = run(TRAIN, &["egress"], None, &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains("peer") && said.contains(" ok ") && said.contains("1 requests"),
        "{said}"
    );
    assert!(
        !said.contains("Hello") && !said.contains("hopper"),
        "{said}"
    );
    let out = run(TRAIN, &["egress", "--json"], None, &env);
    let record = json(&out);
    assert_eq!(record["deployment"], "peer");
    assert_eq!(record["sha256"].as_str().unwrap().len(), 64);

    // `status` says where requests can go, the calibration, and what left today.
    let out = run(TRAIN, &["status"], None, &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains("router: local, then peer (L2); calibrated "),
        "{said}"
    );
    assert!(
        said.contains("left the machine today: 1 requests"),
        "{said}"
    );
    let status = json(&run(TRAIN, &["status", "--json"], None, &env));
    assert_eq!(status["router"]["egress_today"]["requests"], 1, "{status}");

    // A bad tier is named by `config check`.
    std::fs::write(
        home.join("pai.toml"),
        "[[router.tiers]]\nname = \"x\"\nlevel = 7\nbase_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\n",
    )
    .unwrap();
    let check = run(TRAIN, &["config", "check"], None, &env);
    assert!(!check.status.success());
    let said = text(&check.stdout) + &text(&check.stderr);
    assert!(said.contains("router.tiers[0].level"), "{said}");
}
