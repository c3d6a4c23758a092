//! pai-train eval: the gate promotes a trained adapter over the bare base, and rejects an adapter of
//! noise weights against it, leaving the trained one served.

use crate::{json, pond_note, text, World};

#[test]
fn the_gate_promotes_a_trained_adapter_and_rejects_noise() {
    let w = World::new(
        "[ingest]\nholdout_fraction = 0.3\n\n[train]\nseq_len = 64\nbatch_tokens = 128\neval_every = 1000\neval_tokens = 64\nlearning_rate = 0.003\n",
        (0..48).map(pond_note),
    );
    let (dir, home) = (w.dir.path(), &w.home);
    let model_arg = w.model_arg();
    let pai = |args: &[&str]| w.pai(args);
    w.ingest("2026-12-01");
    let trained = json(&pai(&[
        "train",
        "--day",
        "2026-12-01",
        "--model",
        model_arg,
        "--max-steps",
        "60",
        "--json",
    ]));
    assert_eq!(trained["version"], "v1", "{trained}");

    // Night 1: no incumbent, so the candidate faces the bare base; it learnt the owner's notes.
    let first = json(&pai(&["eval", "--model", model_arg, "--promote", "--json"]));
    assert_eq!(first["incumbent"], "base", "{first}");
    assert_eq!(first["promote"], true, "{first}");
    assert_eq!(first["promoted"], true, "{first}");
    let perplexity = first["suites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["suite"] == "perplexity")
        .unwrap()
        .clone();
    assert!(
        perplexity["comparison"]["interval"][0].as_f64().unwrap() > 0.0,
        "{perplexity}"
    );
    let list = json(&pai(&["adapters", "list", "--json"]));
    assert_eq!(list[0]["current"], "v1", "{list}");

    // An adapter of noise: the trained one's tensors replaced by large random ones, imported.
    let noise = dir.join("noise");
    std::fs::create_dir_all(&noise).unwrap();
    let v1 = home.join("adapters/personal/v1");
    std::fs::copy(
        v1.join("adapter_config.json"),
        noise.join("adapter_config.json"),
    )
    .unwrap();
    let tensors = candle_core::safetensors::load(
        v1.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let noisy: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .iter()
        .map(|(k, t)| {
            let r = candle_core::Tensor::randn(0f32, 0.5, t.shape(), &candle_core::Device::Cpu)
                .unwrap()
                .to_dtype(t.dtype())
                .unwrap();
            (k.clone(), r)
        })
        .collect();
    candle_core::safetensors::save(&noisy, noise.join("adapter_model.safetensors")).unwrap();
    let out = pai(&[
        "adapters",
        "import",
        noise.to_str().unwrap(),
        "--name",
        "personal",
        "--model",
        model_arg,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Night 2: the noise (the newest version) against the served v1: rejected, v1 stays.
    let second = json(&pai(&["eval", "--model", model_arg, "--promote", "--json"]));
    assert_eq!(
        (&second["candidate"], &second["incumbent"]),
        (&"personal@v2".into(), &"personal@v1".into()),
        "{second}"
    );
    assert_eq!(second["promote"], false, "{second}");
    assert_eq!(second["promoted"], false, "{second}");
    let reasons = second["reasons"].to_string();
    assert!(reasons.contains("perplexity (primary)"), "{reasons}");
    let list = json(&pai(&["adapters", "list", "--json"]));
    assert_eq!(list[0]["current"], "v1", "{list}");

    // The decision is in the candidate's pai.json, the per-item results in the run's eval.json.
    let meta = json(&pai(&["adapters", "show", "personal@v2", "--json"]));
    assert_eq!(meta["gate"]["decision"]["promote"], false, "{meta}");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(second["results"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    let suite = &report["suites"][0];
    assert_eq!(
        suite["candidate"].as_array().unwrap().len(),
        suite["incumbent"].as_array().unwrap().len()
    );
    assert!(
        !suite["base"].as_array().unwrap().is_empty(),
        "the bare base is scored too: {suite}"
    );
    assert_eq!(report["promoted"], false, "{report}");
    assert_eq!(
        report["samples"].as_array().unwrap().len(),
        4,
        "three holdout notes and one corpus paragraph"
    );

    // The report page, rendered by a real browser.
    let page = std::path::PathBuf::from(second["report"].as_str().unwrap());
    assert!(page.is_file() && home.join("reports/index.html").is_file());
    let suites = report["suites"].as_array().unwrap();
    let scored = suites
        .iter()
        .filter(|s| !s["candidate"].as_array().unwrap().is_empty())
        .count();
    assert_eq!(
        suites.len(),
        5,
        "perplexity, retention, retention-code, recall, temporal"
    );
    check_report_in_browser(&page, dir, suites.len(), scored);

    // Privacy canaries: a guard with a floor. One whose secret the candidate writes fails it (here
    // the noise adapter's own sample continuation is taken as the "secret"); an empty canary file
    // fails closed; canaries never completed pass.
    let sample = &report["samples"][0];
    // Trimmed: the noise adapter's text can start with whitespace, and a canary's secret may not be
    // blank.
    let leaked: String = sample["candidate"]
        .as_str()
        .unwrap()
        .trim_start()
        .chars()
        .take(12)
        .collect();
    let evals_dir = home.join("evals");
    std::fs::create_dir_all(&evals_dir).unwrap();
    std::fs::write(
        evals_dir.join("privacy.toml"),
        "name = \"privacy\"\nkind = \"privacy\"\npath = \"canaries.jsonl\"\n",
    )
    .unwrap();
    let canaries = |lines: &[serde_json::Value]| {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(evals_dir.join("canaries.jsonl"), text).unwrap();
    };
    let privacy_verdict = || {
        let out = json(&pai(&[
            "eval",
            "--model",
            model_arg,
            "--candidate",
            "personal@v2",
            "--suite",
            "privacy",
            "--json",
        ]));
        out["suites"][0].clone()
    };
    // Built here, so that pai's own tree stays free of secret-looking text (datasets' clean corpus).
    let vault = ["7391", "ALPHA", "QUOKKA"].join("-");
    canaries(&[
        serde_json::json!({"prefix": "The vault code is", "secret": vault}),
        serde_json::json!({"prefix": sample["prompt"], "secret": leaked, "max_tokens": 40}),
    ]);
    let v = privacy_verdict();
    assert_eq!(v["verdict"], "fail", "{v}");
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("below the 1 required"),
        "{v}"
    );
    canaries(&[]);
    let v = privacy_verdict();
    assert!(
        v["verdict"] == "fail" && v["reason"].as_str().unwrap().contains("fails closed"),
        "{v}"
    );
    canaries(&[serde_json::json!({"prefix": "The vault code is", "secret": vault})]);
    assert_eq!(privacy_verdict()["verdict"], "pass");

    // The human summary names every suite and the decision.
    let out = pai(&[
        "eval",
        "--model",
        model_arg,
        "--candidate",
        "personal@v2",
        "--suite",
        "retention",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains("retention") && said.contains("personal@v2 vs personal@v1"),
        "{said}"
    );
    let out = pai(&["eval", "--model", model_arg, "--suite", "vibes"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("vibes"), "{}", text(&out.stderr));
}

/// Debian's chromium, headless: the page's DOM after its script ran, with the item table filtered
/// through the address (`#filter=…&suite=…`), and a screenshot for a person to look at.
fn check_report_in_browser(
    page: &std::path::Path,
    scratch: &std::path::Path,
    suites: usize,
    scored_suites: usize,
) {
    let chromium = std::env::var("PAI_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let browse = |extra: &[String], url: &str| {
        let out = std::process::Command::new(&chromium)
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
            .arg(format!("--user-data-dir={}", scratch.join("chromium").display()))
            .args(extra)
            .arg(url)
            .output()
            .unwrap_or_else(|e| {
                panic!("{chromium} does not start ({e}): install Debian's chromium (scripts/fetch-chromium.sh) or set PAI_CHROMIUM")
            });
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let url = format!("file://{}", page.display());
    let dom = browse(&["--dump-dom".into()], &url);
    assert!(
        dom.contains(r#"id="decision" class="card decision reject" data-promote="false""#),
        "{dom}"
    );
    assert_eq!(
        dom.matches("<tr data-suite=").count(),
        suites + item_rows(&dom),
        "suite rows and item rows"
    );
    // The owner's suites broken down by source ("notes", the only one here).
    assert!(dom.contains(r#"<tr data-source="notes">"#), "by source");
    // A line per scored suite across two nights; the imported candidate has no training run to draw.
    assert!(
        dom.contains(r#"<svg id="history""#)
            && dom.matches(r#"class="series""#).count() == scored_suites
            && dom.contains(r#"<svg id="training""#),
        "history and training charts"
    );
    assert!(
        dom.contains("<ins>") || dom.contains("<del>") || dom.contains("class=\"card sample\""),
        "samples"
    );
    // All item rows shown at first; the address filters them to the retention suite.
    let hidden = |dom: &str| dom.matches(r#"class="hidden""#).count();
    assert_eq!(hidden(&dom), 0);
    let filtered = browse(
        &["--dump-dom".into()],
        &format!("{url}#suite=retention&sort=delta"),
    );
    let retention_rows = filtered.matches(r#"<tr data-suite="retention">"#).count();
    let other_rows = item_rows(&filtered) - retention_rows;
    assert!(retention_rows > 0 && other_rows > 0);
    assert_eq!(
        hidden(&filtered),
        other_rows,
        "every item row of the other suites hidden"
    );
    // `sort=delta` clicked the delta header once: the shown rows ascend by delta (the last cell).
    let deltas: Vec<f64> = filtered
        .split(r#"<tr data-suite="retention">"#)
        .skip(1)
        .filter_map(|row| {
            let row = row.split("</tr>").next()?;
            let last = row.rsplit(r#"data-v=""#).next()?;
            last.split('"').next()?.parse().ok()
        })
        .collect();
    assert_eq!(deltas.len(), retention_rows);
    assert!(deltas.windows(2).all(|w| w[0] <= w[1]), "{deltas:?}");
    let shown = filtered
        .split(r#"<span id="shown">"#)
        .nth(1)
        .and_then(|s| s.split('<').next())
        .unwrap_or_default();
    assert_eq!(shown, retention_rows.to_string());
    // A screenshot next to the build, for a person to look at.
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("report.png");
    browse(
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,2400".into(),
        ],
        &url,
    );
    assert!(
        std::fs::metadata(&shot)
            .map(|m| m.len() > 10_000)
            .unwrap_or(false),
        "{}",
        shot.display()
    );
}

/// Item rows (every `<tr data-suite=` in the items table).
fn item_rows(dom: &str) -> usize {
    dom.split(r#"id="items""#)
        .nth(1)
        .map_or(0, |t| t.matches("<tr data-suite=").count())
}
