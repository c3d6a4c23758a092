//! `pai-train router calibrate` (the router's confidence thresholds from a labelled set, written to
//! `$PAI_HOME/router/calibration.json`, which a running pai-serve rereads) and `pai-train egress`
//! (the ledger of what the router sent off the machine).

use std::path::{Path, PathBuf};

use anyhow::Context;
use pai_serve::router::calibrate::{choose, level_of, LabelledRequest};
use pai_serve::router::kind::{classify, RequestKind};
use pai_serve::router::probe::{probe, probe_text, Signals};
use pai_serve::router::{Calibration, EgressLedger};

/// The labelled set that ships with pai: everyday requests a small local model answers well, and
/// harder ones a larger model should take.
pub const LABELLED: &str = include_str!("../configs/router/labelled.jsonl");

pub struct CalibrateArgs {
    pub labels: Option<PathBuf>,
    pub model: Option<PathBuf>,
    /// The L1 model to measure under (default: `[router] local_model`).
    pub local_model: Option<String>,
    /// Print and write nothing but the figures.
    pub dry_run: bool,
    pub json: bool,
}

fn read_labels(path: Option<&Path>) -> anyhow::Result<Vec<LabelledRequest>> {
    let (text, name) = match path {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (LABELLED.to_string(), "configs/router/labelled.jsonl".into()),
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let item: LabelledRequest = serde_json::from_str(line)
            .with_context(|| format!("{name} line {}: not a labelled request", i + 1))?;
        anyhow::ensure!(
            (1..=3).contains(&item.level),
            "{name} line {}: level {} must be 1, 2 or 3",
            i + 1,
            item.level
        );
        out.push(item);
    }
    anyhow::ensure!(!out.is_empty(), "{name} holds no labelled requests");
    Ok(out)
}

pub fn calibrate(args: CalibrateArgs) -> anyhow::Result<()> {
    let home = crate::pai_home();
    let config = pai_pipeline::LoadedConfig::load(&home, None)?.config;
    let items = read_labels(args.labels.as_deref())?;
    let (base, _) = crate::load_model(
        args.model.or(config.model),
        &[],
        pai_model::LoadOptions::default(),
    )?;
    let local = args
        .local_model
        .unwrap_or_else(|| config.router.local_model.clone());
    let registry = pai_adapters::Registry::new(&home);
    let mut standings = pai_adapters::Standings::new();
    let adapter = match registry.resolve(&local) {
        Ok((name, version)) if local != "base" => {
            let verified = registry.verify(&name, version)?;
            standings = registry.standings(&name, version);
            Some((
                format!("{name}@{version}"),
                base.load_adapter(&verified.dir)
                    .with_context(|| format!("loading {name}@{version}"))?,
            ))
        }
        _ => None,
    };
    let under = adapter.as_ref().map_or_else(
        || format!("{} (no adapter)", base.name()),
        |(l, _)| l.clone(),
    );
    eprintln!(
        "pai-train router calibrate: {} labelled requests under {under}",
        items.len()
    );
    let started = std::time::Instant::now();
    let mut points = Vec::with_capacity(items.len());
    for item in &items {
        let text = probe_text(item.messages.iter().map(|m| m.content.as_str()));
        let p = probe(
            &base,
            adapter.as_ref().map(|(_, a)| a),
            &text,
            config.router.probe_tokens,
        )
        .with_context(|| {
            format!(
                "no confidence for {:?}",
                text.chars().take(60).collect::<String>()
            )
        })?;
        let kind = item
            .messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map_or(RequestKind::Question, |m| classify(&m.content));
        let standing = standings
            .get(kind.domain())
            .copied()
            .unwrap_or(pai_adapters::Standing::Same);
        points.push((
            Signals {
                probe: p,
                kind,
                standing,
            },
            item.level,
        ));
    }
    let (share, gate_weight) = (config.router.target_share, config.router.gate_weight);
    let chosen = choose(&points, share, gate_weight).context("fewer than two labelled requests")?;
    let (fitted, held_out) = (&chosen.fitted, chosen.held_out);
    let calibration = Calibration {
        thresholds: fitted.thresholds.clone(),
        share: fitted.share,
        agreement: fitted.agreement,
        held_out_agreement: held_out,
        labelled: items.len(),
        local_model: under.clone(),
        time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "calibration": calibration, "confusion": fitted.confusion,
                "standings": standings,
                "kinds_kept": chosen.kinds_kept,
                "with_kinds": {"agreement": chosen.with_kinds.0, "held_out_agreement": chosen.with_kinds.1},
                "without_kinds": {"agreement": chosen.without_kinds.0, "held_out_agreement": chosen.without_kinds.1},
                "seconds": started.elapsed().as_secs_f64(),
                "items": items.iter().zip(&points).map(|(item, (s, _))| serde_json::json!({
                    "kind": item.kind, "level": item.level, "probe": s.probe,
                    "read_as": s.kind, "standing": s.standing,
                    "decided": level_of(s.score(&fitted.thresholds), &fitted.thresholds),
                })).collect::<Vec<_>>(),
            }))?
        );
    } else {
        let t = &fitted.thresholds;
        println!(
            "thresholds: local >= {:.3}, medium >= {:.3} on mean log-likelihood per token (nats) \
             - {} x ln(tokens) + kind offset + {} x standing",
            t.local, t.medium, t.length_weight, t.gate_weight
        );
        let offsets: Vec<String> = t
            .kind_offsets
            .iter()
            .map(|(k, o)| format!("{k} {o:+.1}"))
            .collect();
        let (with, without) = (chosen.with_kinds, chosen.without_kinds);
        println!(
            "kind offsets: {} ({}: {:.0}% with offsets on requests left out of the fit, {:.0}% \
             without; in the fit {:.0}% and {:.0}%)",
            if offsets.is_empty() {
                "none".to_string()
            } else {
                offsets.join(", ")
            },
            if chosen.kinds_kept {
                "kept"
            } else {
                "none kept"
            },
            100.0 * with.1,
            100.0 * without.1,
            100.0 * with.0,
            100.0 * without.0,
        );
        let standing: Vec<String> = standings
            .iter()
            .map(|(d, s)| format!("{d} {}", s.as_str()))
            .collect();
        println!(
            "the adapter against the base, by its gates: {}",
            if standing.is_empty() {
                "not known (never gated, or no adapter)".to_string()
            } else {
                standing.join(", ")
            }
        );
        println!(
            "share:      L1 {:.0}%  L2 {:.0}%  L3 {:.0}%  (target {:?})",
            fitted.share[0], fitted.share[1], fitted.share[2], config.router.target_share
        );
        println!(
            "agreement with the labels: {:.0}% ({} requests); {:.0}% on requests left out of the \
             fit (leave-one-out)",
            100.0 * fitted.agreement,
            items.len(),
            100.0 * held_out
        );
        println!("labelled \\ decided   L1   L2   L3");
        for (i, row) in fitted.confusion.iter().enumerate() {
            println!(
                "L{}                  {:>4} {:>4} {:>4}",
                i + 1,
                row[0],
                row[1],
                row[2]
            );
        }
        // Per kind: how many of each went local.
        let mut kinds: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
        for (item, (s, _)) in items.iter().zip(&points) {
            let e = kinds.entry(item.kind.as_str()).or_default();
            e.0 += usize::from(level_of(s.score(t), t) == 1);
            e.1 += 1;
        }
        let kinds: Vec<String> = kinds
            .iter()
            .map(|(k, (local, all))| format!("{k} {local}/{all}"))
            .collect();
        println!("kept local by kind: {}", kinds.join(", "));
        println!("measured in {:.1} s", started.elapsed().as_secs_f64());
    }
    if !args.dry_run {
        let path = Calibration::path(&home);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        pai_pipeline::nightly::write_atomic(&path, &serde_json::to_vec_pretty(&calibration)?)?;
        eprintln!(
            "written to {} (a running pai-serve uses it from its next request)",
            path.display()
        );
    }
    Ok(())
}

/// What `pai-train status` says of the router: the tiers, the calibration, and what left today.
pub fn status(home: &Path, config: &pai_serve::router::RouterConfig) -> serde_json::Value {
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let left: Vec<_> = EgressLedger::read(&EgressLedger::path(home))
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.time.starts_with(&today))
        .collect();
    let calibration = Calibration::read(&Calibration::path(home)).ok().flatten();
    serde_json::json!({
        "tiers": config.tiers.iter().map(|t| format!("{} (L{})", t.name, t.level)).collect::<Vec<_>>(),
        "thresholds": config.thresholds.clone().or(calibration.as_ref().map(|c| c.thresholds.clone())),
        "calibrated": calibration.as_ref().map(|c| serde_json::json!({
            "time": c.time, "agreement": c.agreement, "held_out_agreement": c.held_out_agreement,
            "share": c.share, "local_model": c.local_model,
        })),
        "egress_today": {"requests": left.len(), "cost_usd": left.iter().map(|r| r.cost_usd).sum::<f64>()},
        "daily_budget_usd": config.daily_budget_usd,
    })
}

/// `status`'s router lines.
pub fn status_lines(s: &serde_json::Value) -> Vec<String> {
    let tiers: Vec<&str> = s["tiers"]
        .as_array()
        .map(|t| t.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    if tiers.is_empty() {
        return vec!["router: local only (no [[router.tiers]])".into()];
    }
    let calibrated = match &s["calibrated"] {
        serde_json::Value::Null if s["thresholds"].is_null() => {
            "not calibrated (pai-train router calibrate): local first".to_string()
        }
        serde_json::Value::Null => "thresholds from pai.toml".to_string(),
        c => format!(
            "calibrated {} ({:.0}% agreement, {:.0}% held out)",
            c["time"].as_str().unwrap_or("?"),
            100.0 * c["agreement"].as_f64().unwrap_or(0.0),
            100.0 * c["held_out_agreement"].as_f64().unwrap_or(0.0)
        ),
    };
    let budget = s["daily_budget_usd"]
        .as_f64()
        .map(|b| format!(" of ${b:.2}"))
        .unwrap_or_default();
    vec![
        format!("router: local, then {}; {calibrated}", tiers.join(", ")),
        format!(
            "  left the machine today: {} requests, ${:.4}{budget} (pai-train egress)",
            s["egress_today"]["requests"].as_u64().unwrap_or(0),
            s["egress_today"]["cost_usd"].as_f64().unwrap_or(0.0)
        ),
    ]
}

/// `pai-train egress`: what left the machine (newest last), optionally one day's.
pub fn egress(day: Option<&str>, json: bool) -> anyhow::Result<()> {
    let path = EgressLedger::path(&crate::pai_home());
    let records: Vec<_> = EgressLedger::read(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .into_iter()
        .filter(|r| day.is_none_or(|d| r.time.starts_with(d)))
        .collect();
    if json {
        for r in &records {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    if records.is_empty() {
        println!(
            "nothing has left this machine{} ({})",
            day.map(|d| format!(" on {d}")).unwrap_or_default(),
            path.display()
        );
        return Ok(());
    }
    println!(
        "{:<24} {:>2} {:<16} {:<14} {:>7} {:>7} {:>10} sha256 of what was sent",
        "time (UTC)", "L", "deployment", "outcome", "bytes", "tokens", "cost $"
    );
    let mut total = 0.0;
    for r in &records {
        total += r.cost_usd;
        println!(
            "{:<24} {:>2} {:<16} {:<14} {:>7} {:>7} {:>10.6} {}",
            r.time,
            r.tier_level,
            r.deployment,
            r.outcome,
            r.bytes,
            r.prompt_tokens + r.completion_tokens,
            r.cost_usd,
            &r.sha256[..16.min(r.sha256.len())]
        );
        if r.redacted > 0 {
            println!(
                "  {} secret or personal values went out as placeholders (redact mode)",
                r.redacted
            );
        }
        // Nothing private is ever sent; a line that says otherwise is a bug to report.
        if r.secrets + r.pii + r.private_shingles > 0 || r.flagged {
            println!("  !! the detectors flagged this request: please report it");
        }
    }
    println!("{} requests, ${total:.6}", records.len());
    Ok(())
}
