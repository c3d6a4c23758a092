//! `pai-train eval`: the command-line edge of pai-evals. Scores a candidate adapter against the
//! incumbent (the current version of its name, or the bare base) on every suite, writes the per-item
//! results and the gate's decision to `runs/<id>/eval.json`, records the decision in the candidate's
//! `pai.json`, and with `--promote` serves the candidate when the gate says so.

use std::path::PathBuf;

use anyhow::Context;
use pai_adapters::{Registry, Version};
use pai_datasets::Store;
use pai_evals::{evaluate, load_configs, Contenders, EvalReport, Scoring, Verdict};
use pai_model::AdapterStack;

pub struct EvalArgs {
    /// `NAME@vN`, `NAME` (its newest version) or a PEFT directory.
    pub candidate: Option<String>,
    /// `NAME`, `NAME@vN`, a directory, or `base`; default: the current version of the candidate's
    /// name, else the base.
    pub incumbent: Option<String>,
    pub name: String,
    pub day: Option<String>,
    pub suites: Vec<String>,
    pub model: Option<PathBuf>,
    pub row_tokens: usize,
    pub promote: bool,
    pub json: bool,
}

/// An adapter to evaluate (`pai_evals::Contender` is the scoring side): its directory, label, and registry place when it has one.
struct Contender {
    dir: PathBuf,
    label: String,
    registered: Option<(String, Version)>,
}

impl Contender {
    /// What its weights are, for the score cache: the digest recorded at registration, else the
    /// file's own.
    fn weights_sha256(&self) -> anyhow::Result<String> {
        let meta = pai_adapters::AdapterMeta::read(&self.dir)?;
        match meta
            .registry
            .and_then(|r| r.files.get(pai_adapters::ADAPTER_WEIGHTS).cloned())
        {
            Some(sha) => Ok(sha),
            None => Ok(pai_adapters::sha256_file(
                &self.dir.join(pai_adapters::ADAPTER_WEIGHTS),
            )?),
        }
    }
}

fn contender(registry: &Registry, spec: &str, newest: bool) -> anyhow::Result<Contender> {
    let path = std::path::Path::new(spec);
    if path.is_dir() {
        return Ok(Contender {
            dir: path.to_path_buf(),
            label: path.display().to_string(),
            registered: None,
        });
    }
    let (name, version) = match (spec.split_once('@'), newest) {
        (Some((n, v)), _) => (n.to_string(), v.parse::<Version>()?),
        (None, true) => {
            let v = registry.versions(spec)?.last().copied();
            (
                spec.to_string(),
                v.with_context(|| format!("adapter {spec:?} has no versions"))?,
            )
        }
        (None, false) => registry.resolve(spec)?,
    };
    let verified = registry.verify(&name, version)?;
    Ok(Contender {
        dir: verified.dir,
        label: format!("{name}@{version}"),
        registered: Some((name, version)),
    })
}

pub fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let home = crate::pai_home();
    let registry = Registry::new(&home);

    // 1. Who is compared.
    let candidate = contender(
        &registry,
        args.candidate.as_deref().unwrap_or(&args.name),
        true,
    )?;
    let candidate_name = candidate
        .registered
        .as_ref()
        .map_or(args.name.clone(), |(n, _)| n.clone());
    let incumbent = match args.incumbent.as_deref() {
        Some("base") => None,
        Some(spec) => Some(contender(&registry, spec, false)?),
        None => match registry.current(&candidate_name) {
            Ok(Some(v)) => Some(contender(
                &registry,
                &format!("{candidate_name}@{v}"),
                false,
            )?),
            _ => None,
        },
    };
    let candidate_meta = pai_adapters::AdapterMeta::read(&candidate.dir)?;
    let day = args
        .day
        .clone()
        .or_else(|| candidate_meta.dataset.as_ref().map(|d| d.day.clone()))
        .unwrap_or_else(crate::ingest::today);

    // 2. The model with both adapters, and the suites.
    let dirs: Vec<PathBuf> = std::iter::once(candidate.dir.clone())
        .chain(incumbent.iter().map(|c| c.dir.clone()))
        .collect();
    let (base, adapters) =
        crate::load_model(args.model.clone(), &dirs, pai_model::LoadOptions::default())?;
    let store = Store::open(&home.join("dataset"))?;
    let mut suites = Vec::new();
    for (config, origin) in load_configs(&home.join("evals"))? {
        if !args.suites.is_empty() && !args.suites.contains(&config.name) {
            continue;
        }
        suites.push(pai_evals::suite::build(config, &origin, &store, &day)?);
    }
    anyhow::ensure!(
        !suites.is_empty(),
        "no suite named {:?} (built in: perplexity, retention; yours go in {})",
        args.suites,
        home.join("evals").display()
    );

    // 3. Score and decide.
    let candidate_list = [&adapters[0]];
    let incumbent_list: Vec<&pai_model::Adapter> = adapters.get(1).into_iter().collect();
    let incumbent_label = incumbent
        .as_ref()
        .map_or("base".to_string(), |c| c.label.clone());
    // Scores are kept per base, adapter weights and row length (`pai_evals::cache`).
    let base_sha = base.sha256()?.to_string();
    let rows = args.row_tokens.to_string();
    let key_of = |weights: &str| pai_evals::cache::key(&["pai-evals 1", &base_sha, weights, &rows]);
    let candidate_key = key_of(&candidate.weights_sha256()?);
    let incumbent_key = match &incumbent {
        Some(c) => key_of(&c.weights_sha256()?),
        None => key_of("base"),
    };
    let base_key = key_of("base");
    let cache = pai_evals::ScoreCache::new(&home.join("evals").join("cache"));
    let report = evaluate(
        &base.model,
        &base.tokenizer,
        &suites,
        Contenders {
            candidate: pai_evals::Contender {
                label: &candidate.label,
                adapters: AdapterStack::new(&candidate_list),
                key: Some(&candidate_key),
            },
            incumbent: pai_evals::Contender {
                label: &incumbent_label,
                adapters: AdapterStack::new(&incumbent_list),
                key: Some(&incumbent_key),
            },
            base: incumbent.as_ref().map(|_| pai_evals::Contender {
                label: "base",
                adapters: AdapterStack::NONE,
                key: Some(&base_key),
            }),
        },
        Scoring {
            row_tokens: args.row_tokens,
            pack: pai_evals::Scorer::packs_by_default(&base.model),
            seed: 0x7061_6920_6576_616c,
            cache: Some(&cache),
        },
        |name, n| {
            if !args.json {
                eprintln!("scoring {name} ({n} items)");
            }
        },
    )?;

    // 4. Written down: the run, the candidate's pai.json, and the registry when promoted.
    let runs = home.join("runs");
    let id = format!("eval-{}", chrono::Local::now().format("%Y%m%d-%H%M%S"));
    let run_dir = (1..1000)
        .map(|n| match n {
            1 => runs.join(&id),
            n => runs.join(format!("{id}-{n}")),
        })
        .find(|d| std::fs::create_dir_all(runs.as_path()).is_ok() && std::fs::create_dir(d).is_ok())
        .with_context(|| format!("cannot create a run directory in {}", runs.display()))?;
    let report_path = run_dir.join("eval.json");
    std::fs::write(&report_path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", report_path.display()))?;
    let mut promoted = false;
    if let Some((name, version)) = &candidate.registered {
        let gate = serde_json::json!({
            "incumbent": incumbent_label,
            "day": day,
            "report": report_path,
            "decision": report.decision,
        });
        registry.record_gate(name, *version, gate)?;
        if args.promote && report.decision.promote {
            let reason = format!("gate: {}", report.decision.reasons.join("; "));
            registry.promote(name, *version, &reason)?;
            promoted = true;
        }
    } else if args.promote {
        anyhow::bail!(
            "--promote needs a registered candidate (NAME@vN), not a directory: import it first \
             (pai-train adapters import)"
        );
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "candidate": report.candidate,
                "incumbent": report.incumbent,
                "promote": report.decision.promote,
                "promoted": promoted,
                "reasons": report.decision.reasons,
                "suites": report.decision.suites,
                "report": report_path,
            })
        );
    } else {
        print_summary(&report, promoted, &report_path);
    }
    Ok(())
}

fn print_summary(report: &EvalReport, promoted: bool, path: &std::path::Path) {
    println!("{} vs {}", report.candidate, report.incumbent);
    for s in &report.decision.suites {
        let verdict = match s.verdict {
            Verdict::Pass => "pass",
            Verdict::Fail => "FAIL",
            Verdict::Neutral => "-",
        };
        match &s.comparison {
            Some(c) => println!(
                "  {:<12} {:<7} {:>4} items {:>3} groups  {:+.4} → {:+.4}  delta {:+.4} [{:+.4}, {:+.4}]  detects ±{:.4}  {verdict}",
                s.suite,
                s.role.as_str(),
                c.items,
                c.groups,
                c.incumbent,
                c.candidate,
                c.delta,
                c.interval.0,
                c.interval.1,
                c.detectable
            ),
            None => println!("  {:<12} {:<7} no items  {verdict}", s.suite, s.role.as_str()),
        }
    }
    let decision = if report.decision.promote {
        if promoted {
            "promoted"
        } else {
            "passes the gate (not promoted: pass --promote)"
        }
    } else {
        "rejected"
    };
    println!("{decision}: {}", report.decision.reasons.join("; "));
    println!("results: {}", path.display());
}
