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

/// What an evaluation decided, and where it is written down.
pub struct EvalResult {
    pub run_id: String,
    /// `runs/<id>/eval.json`.
    pub results: PathBuf,
    /// The report page.
    pub page: PathBuf,
    pub promoted: bool,
    pub report: EvalReport,
}

/// `pai-train eval`: evaluate, then say what came of it.
pub fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let json = args.json;
    let r = run(args)?;
    let report = &r.report;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "candidate": report.candidate,
                "incumbent": report.incumbent,
                "promote": report.decision.promote,
                "promoted": r.promoted,
                "reasons": report.decision.reasons,
                "suites": report.decision.suites,
                "results": r.results,
                "report": r.page,
            })
        );
    } else {
        print_summary(report, r.promoted, &r.results);
        println!("report: {}", r.page.display());
    }
    Ok(())
}

/// Score the candidate against the incumbent, record the decision, and promote when asked to and
/// the gate says so.
pub fn run(args: EvalArgs) -> anyhow::Result<EvalResult> {
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
    let mut known = Vec::new();
    for (config, origin) in load_configs(&home.join("evals"))? {
        known.push(config.name.clone());
        if !args.suites.is_empty() && !args.suites.contains(&config.name) {
            continue;
        }
        suites.push(pai_evals::suite::build(config, &origin, &store, &day)?);
    }
    anyhow::ensure!(
        !suites.is_empty(),
        "no suite named {:?} (there are: {}; yours go in {})",
        args.suites,
        known.join(", "),
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

    // 4. Sample generations for the report: the start of a few holdout notes and code the owner has
    // not marked private, and of the general corpus.
    let mut report = report;
    let prompts = sample_prompts(&store, &day)?;
    let who = Contenders {
        candidate: pai_evals::Contender {
            label: &candidate.label,
            adapters: AdapterStack::new(&candidate_list),
            key: None,
        },
        incumbent: pai_evals::Contender {
            label: &incumbent_label,
            adapters: AdapterStack::new(&incumbent_list),
            key: None,
        },
        base: None,
    };
    report.samples = pai_evals::samples(&base.model, &base.tokenizer, &who, &prompts, 40)?;

    // 5. Written down: the run, the candidate's pai.json, the registry when promoted, the report page.
    let runs = home.join("runs");
    let id = format!("eval-{}", chrono::Local::now().format("%Y%m%d-%H%M%S"));
    let run_dir = (1..1000)
        .map(|n| match n {
            1 => runs.join(&id),
            n => runs.join(format!("{id}-{n}")),
        })
        .find(|d| std::fs::create_dir_all(runs.as_path()).is_ok() && std::fs::create_dir(d).is_ok())
        .with_context(|| format!("cannot create a run directory in {}", runs.display()))?;
    let run_id = run_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let report_path = run_dir.join("eval.json");
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
    let training_run = candidate_meta
        .training
        .as_ref()
        .and_then(|t| t["run"].as_str())
        .map(String::from);
    let stored = crate::report::EvalRun {
        run: run_id.clone(),
        created: chrono::Local::now().to_rfc3339(),
        promoted,
        training_run,
        report,
    };
    std::fs::write(&report_path, serde_json::to_vec_pretty(&stored)?)
        .with_context(|| format!("writing {}", report_path.display()))?;
    let page = crate::report::write_reports(&home, Some(&run_id))?;
    Ok(EvalResult {
        run_id,
        results: report_path,
        page,
        promoted,
        report: stored.report,
    })
}

/// Up to three holdout notes or code files not marked private (their first ~200 characters, cut at
/// a space), and one paragraph of the general corpus.
fn sample_prompts(store: &Store, day: &str) -> anyhow::Result<Vec<(String, String)>> {
    let cut = |text: &str| -> String {
        let end = text
            .char_indices()
            .map(|(i, _)| i)
            .take_while(|&i| i <= 200)
            .last()
            .unwrap_or(0);
        let head = &text[..end];
        head.rfind(' ').map_or(head, |i| &head[..i]).to_string()
    };
    let mut holdout = Vec::new();
    for d in store.days()? {
        if d.as_str() > day {
            continue;
        }
        holdout.extend(store.read_day(&d)?.into_iter().filter(|e| {
            e.split == pai_datasets::Split::Holdout
                && !e.private
                && matches!(e.kind, pai_datasets::Kind::Note | pai_datasets::Kind::Code)
        }));
    }
    holdout.sort_by(|a, b| a.id.cmp(&b.id));
    let mut prompts: Vec<(String, String)> = holdout
        .iter()
        .take(3)
        .map(|e| (e.path.clone(), cut(&e.text)))
        .collect();
    if let Some(p) =
        pai_evals::sources::corpus_items(pai_evals::suite::RETENTION_CORPUS, "general").first()
    {
        if let pai_evals::Task::Continuation { text, .. } = &p.task {
            prompts.push((p.group.clone(), cut(text)));
        }
    }
    Ok(prompts)
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
        // A suite over several domains: each one's standing (the router trusts the adapter by it).
        if s.domains.len() > 1 {
            for d in &s.domains {
                let c = &d.comparison;
                println!(
                    "    {:<18} {:>4} items  delta {:+.4} [{:+.4}, {:+.4}]  {}",
                    d.domain,
                    c.items,
                    c.delta,
                    c.interval.0,
                    c.interval.1,
                    d.standing.as_str()
                );
            }
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
