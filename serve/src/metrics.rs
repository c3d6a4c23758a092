//! What `GET /metrics` reports, in Prometheus' text format (version 0.0.4): requests by route, status
//! and adapter; prompt and completion tokens by adapter; time to first token and whole-generation
//! latency as histograms by adapter; batched decode steps (rows, mixed-adapter steps, largest batch);
//! the generation queue's depth and what is running; adapters loaded and broken. Counters live behind one mutex (a request touches it a handful of times,
//! nowhere near a decode step's cost) and are rendered on demand; no exporter crate is needed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Histogram bucket bounds in seconds: from a cached short answer to a long generation on a CPU.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    /// Observations at or below each bound (not cumulative; summed when rendered).
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if let Some(i) = BUCKETS.iter().position(|&b| seconds <= b) {
            self.counts[i] += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }
}

/// The adapter a metric is about: its name and served version ("base" and "" for the bare base).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct AdapterLabel {
    pub name: String,
    pub version: String,
}

impl AdapterLabel {
    pub fn base() -> Self {
        Self {
            name: "base".into(),
            version: String::new(),
        }
    }

    /// From the `x-pai-adapter` header's value (`name@vN`, `name` or `base`).
    pub fn from_header(value: &str) -> Self {
        match value.split_once('@') {
            Some((name, version)) => Self {
                name: name.into(),
                version: version.into(),
            },
            None => Self {
                name: value.into(),
                version: String::new(),
            },
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    /// (route, status, adapter) → requests.
    requests: BTreeMap<(String, u16, AdapterLabel), u64>,
    /// adapter → (prompt tokens, completion tokens).
    tokens: BTreeMap<AdapterLabel, (u64, u64)>,
    first_token: BTreeMap<AdapterLabel, Histogram>,
    generation: BTreeMap<AdapterLabel, Histogram>,
    router: RouterCounters,
}

/// The router's decisions and what came of them.
#[derive(Debug, Default)]
struct RouterCounters {
    /// (rule, level decided) → requests.
    decisions: BTreeMap<(String, u8), u64>,
    /// (tier that answered, its level) → requests.
    served: BTreeMap<(String, u8), u64>,
    /// (target that failed, cause) → fallbacks past it; retries of the same deployment.
    fallbacks: BTreeMap<(String, String), u64>,
    retries: BTreeMap<(String, String), u64>,
    /// Privacy detector → requests it kept on the machine.
    kept_local: BTreeMap<String, u64>,
    /// Deployment → (prompt tokens, completion tokens, US dollars).
    spend: BTreeMap<String, (u64, u64, f64)>,
}

/// The server's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<Counters>,
    /// Generations waiting for the model.
    queued: AtomicI64,
    /// Generations running on the model.
    running: AtomicI64,
    /// Batched decode steps, the rows they decoded, the steps that mixed adapters, the largest batch.
    steps: AtomicI64,
    step_rows: AtomicI64,
    mixed_steps: AtomicI64,
    max_rows: AtomicI64,
}

/// Holds a place in a gauge while alive.
pub struct Gauge<'a>(&'a AtomicI64);

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Counters)) {
        let mut c = match self.counters.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut c);
    }

    /// One request answered.
    pub fn request(&self, route: &str, status: u16, adapter: AdapterLabel) {
        self.with(|c| {
            *c.requests
                .entry((route.into(), status, adapter))
                .or_default() += 1
        });
    }

    /// A generation's token counts and latency (from its arrival to its last token).
    pub fn generation(
        &self,
        adapter: &AdapterLabel,
        prompt: usize,
        completion: usize,
        took: Duration,
    ) {
        self.with(|c| {
            let t = c.tokens.entry(adapter.clone()).or_default();
            t.0 += prompt as u64;
            t.1 += completion as u64;
            c.generation
                .entry(adapter.clone())
                .or_default()
                .observe(took.as_secs_f64());
        });
    }

    /// Time from a generation's arrival to its first piece of text.
    pub fn first_token(&self, adapter: &AdapterLabel, took: Duration) {
        self.with(|c| {
            c.first_token
                .entry(adapter.clone())
                .or_default()
                .observe(took.as_secs_f64())
        });
    }

    /// The router decided `level` by `rule`.
    pub fn router_decision(&self, rule: &str, level: u8) {
        self.with(|c| *c.router.decisions.entry((rule.into(), level)).or_default() += 1);
    }

    /// `tier` (at `level`) answered a routed request.
    pub fn router_served(&self, tier: &str, level: u8) {
        self.with(|c| *c.router.served.entry((tier.into(), level)).or_default() += 1);
    }

    /// `target` failed for `cause` and the request went on to the next one.
    pub fn router_fallback(&self, target: &str, cause: &str) {
        self.with(|c| {
            *c.router
                .fallbacks
                .entry((target.into(), cause.into()))
                .or_default() += 1
        });
    }

    /// `deployment` failed for `cause` and is tried again.
    pub fn router_retry(&self, deployment: &str, cause: &str) {
        self.with(|c| {
            *c.router
                .retries
                .entry((deployment.into(), cause.into()))
                .or_default() += 1
        });
    }

    /// The privacy `detector` kept a request on the machine.
    pub fn router_kept_local(&self, detector: &str) {
        self.with(|c| *c.router.kept_local.entry(detector.into()).or_default() += 1);
    }

    /// A cloud answer's tokens and cost.
    pub fn router_cost(&self, deployment: &str, prompt: u64, completion: u64, usd: f64) {
        self.with(|c| {
            let e = c.router.spend.entry(deployment.into()).or_default();
            e.0 += prompt;
            e.1 += completion;
            e.2 += usd;
        });
    }

    /// A generation waiting for the model, until the guard drops.
    pub fn queued(&self) -> Gauge<'_> {
        self.queued.fetch_add(1, Ordering::Relaxed);
        Gauge(&self.queued)
    }

    /// One batched decode step of `rows` sequences using `adapters` different adapter stacks.
    pub fn decode_step(&self, rows: usize, adapters: usize) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.step_rows.fetch_add(rows as i64, Ordering::Relaxed);
        if adapters > 1 {
            self.mixed_steps.fetch_add(1, Ordering::Relaxed);
        }
        self.max_rows.fetch_max(rows as i64, Ordering::Relaxed);
    }

    /// Requests that joined (+1) or left (-1) the engine's queue.
    pub fn queue_changed(&self, delta: i64) {
        self.queued.fetch_add(delta, Ordering::Relaxed);
    }

    /// A generation on the model, until the guard drops.
    pub fn running(&self) -> Gauge<'_> {
        self.running.fetch_add(1, Ordering::Relaxed);
        Gauge(&self.running)
    }

    /// The exposition text; `loaded` and `broken` are the adapters resident and failing now.
    pub fn render(&self, loaded: usize, broken: usize) -> String {
        let c = match self.counters.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut out = String::new();
        let adapter = |a: &AdapterLabel| {
            format!(
                "adapter=\"{}\",version=\"{}\"",
                escape(&a.name),
                escape(&a.version)
            )
        };

        header(
            &mut out,
            "pai_requests_total",
            "counter",
            "HTTP requests answered.",
        );
        for ((route, status, a), n) in &c.requests {
            let _ = writeln!(
                out,
                "pai_requests_total{{route=\"{}\",status=\"{status}\",{}}} {n}",
                escape(route),
                adapter(a)
            );
        }
        header(
            &mut out,
            "pai_prompt_tokens_total",
            "counter",
            "Prompt tokens processed.",
        );
        for (a, (p, _)) in &c.tokens {
            let _ = writeln!(out, "pai_prompt_tokens_total{{{}}} {p}", adapter(a));
        }
        header(
            &mut out,
            "pai_completion_tokens_total",
            "counter",
            "Tokens generated.",
        );
        for (a, (_, g)) in &c.tokens {
            let _ = writeln!(out, "pai_completion_tokens_total{{{}}} {g}", adapter(a));
        }
        for (name, help, map) in [
            (
                "pai_time_to_first_token_seconds",
                "From a generation's arrival (queue included) to its first text.",
                &c.first_token,
            ),
            (
                "pai_generation_duration_seconds",
                "From a generation's arrival (queue included) to its last token.",
                &c.generation,
            ),
        ] {
            header(&mut out, name, "histogram", help);
            for (a, h) in map {
                let labels = adapter(a);
                let mut cumulative = 0;
                for (bound, n) in BUCKETS.iter().zip(&h.counts) {
                    cumulative += n;
                    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
                }
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
                let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum);
                let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
            }
        }
        render_router(&mut out, &c.router);
        for (name, help, value) in [
            (
                "pai_decode_steps_total",
                "Batched decode steps.",
                self.steps.load(Ordering::Relaxed),
            ),
            (
                "pai_decode_rows_total",
                "Sequences advanced by batched decode steps (rows / steps = mean batch).",
                self.step_rows.load(Ordering::Relaxed),
            ),
            (
                "pai_decode_mixed_adapter_steps_total",
                "Decode steps whose rows used more than one adapter.",
                self.mixed_steps.load(Ordering::Relaxed),
            ),
        ] {
            header(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {value}");
        }
        for (name, help, value) in [
            (
                "pai_decode_batch_rows_max",
                "The most sequences one decode step has advanced.",
                self.max_rows.load(Ordering::Relaxed),
            ),
            (
                "pai_queue_depth",
                "Generations waiting for the model.",
                self.queued.load(Ordering::Relaxed),
            ),
            (
                "pai_generations_running",
                "Generations on the model now.",
                self.running.load(Ordering::Relaxed),
            ),
            (
                "pai_adapters_loaded",
                "Adapter versions resident.",
                loaded as i64,
            ),
            (
                "pai_adapters_broken",
                "Adapter names whose current version fails to verify or load.",
                broken as i64,
            ),
        ] {
            header(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {value}");
        }
        out
    }
}

fn render_router(out: &mut String, r: &RouterCounters) {
    let pairs = [
        (
            "pai_router_decisions_total",
            "Routed requests by the rule that decided and the level it chose.",
            &r.decisions,
            ("rule", "level"),
        ),
        (
            "pai_router_served_total",
            "Routed requests by the tier that answered.",
            &r.served,
            ("tier", "level"),
        ),
    ];
    for (name, help, map, (k1, k2)) in pairs {
        header(out, name, "counter", help);
        for ((a, b), n) in map {
            let _ = writeln!(out, "{name}{{{k1}=\"{}\",{k2}=\"{b}\"}} {n}", escape(a));
        }
    }
    for (name, help, map) in [
        (
            "pai_router_fallbacks_total",
            "Targets that failed a routed request, which then went to the next one.",
            &r.fallbacks,
        ),
        (
            "pai_router_retries_total",
            "Attempts of a cloud deployment repeated after a failure.",
            &r.retries,
        ),
    ] {
        header(out, name, "counter", help);
        for ((target, cause), n) in map {
            let _ = writeln!(
                out,
                "{name}{{target=\"{}\",cause=\"{}\"}} {n}",
                escape(target),
                escape(cause)
            );
        }
    }
    header(
        out,
        "pai_router_kept_local_total",
        "counter",
        "Requests the privacy gate kept on the machine, by detector.",
    );
    for (detector, n) in &r.kept_local {
        let _ = writeln!(
            out,
            "pai_router_kept_local_total{{detector=\"{}\"}} {n}",
            escape(detector)
        );
    }
    header(
        out,
        "pai_router_cloud_tokens_total",
        "counter",
        "Tokens sent to and received from cloud deployments.",
    );
    for (d, (p, g, _)) in &r.spend {
        let d = escape(d);
        let _ = writeln!(
            out,
            "pai_router_cloud_tokens_total{{deployment=\"{d}\",kind=\"prompt\"}} {p}"
        );
        let _ = writeln!(
            out,
            "pai_router_cloud_tokens_total{{deployment=\"{d}\",kind=\"completion\"}} {g}"
        );
    }
    header(
        out,
        "pai_router_cost_usd_total",
        "counter",
        "US dollars spent on cloud deployments (at the configured prices).",
    );
    for (d, (_, _, usd)) in &r.spend {
        let _ = writeln!(
            out,
            "pai_router_cost_usd_total{{deployment=\"{}\"}} {usd}",
            escape(d)
        );
    }
}

/// The router's state now: each deployment up (its breaker not open) or not, and the day's spend.
pub fn render_router_gauges(out: &mut String, deployments: &[(String, bool)], spent_usd: f64) {
    header(
        out,
        "pai_router_deployment_up",
        "gauge",
        "1 while a cloud deployment's circuit breaker lets requests through, 0 while it is open.",
    );
    for (name, up) in deployments {
        let _ = writeln!(
            out,
            "pai_router_deployment_up{{deployment=\"{}\"}} {}",
            escape(name),
            u8::from(*up)
        );
    }
    header(
        out,
        "pai_router_spent_today_usd",
        "gauge",
        "US dollars spent on cloud deployments today (UTC), what the daily budget is held against.",
    );
    let _ = writeln!(out, "pai_router_spent_today_usd {spent_usd}");
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value as the text format wants it: backslash, quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::default();
        let a = AdapterLabel::from_header("personal@v3");
        m.request("/v1/chat/completions", 200, a.clone());
        m.request("/v1/chat/completions", 200, a.clone());
        m.request("/v1/completions", 404, AdapterLabel::from_header("ghost"));
        m.generation(&a, 12, 5, Duration::from_millis(300));
        m.generation(&a, 8, 7, Duration::from_secs(3));
        m.first_token(&a, Duration::from_millis(40));
        let _waiting = m.queued();
        {
            let _running = m.running();
        }
        let text = m.render(2, 1);
        let want = [
            "pai_requests_total{route=\"/v1/chat/completions\",status=\"200\",adapter=\"personal\",version=\"v3\"} 2",
            "pai_requests_total{route=\"/v1/completions\",status=\"404\",adapter=\"ghost\",version=\"\"} 1",
            "pai_prompt_tokens_total{adapter=\"personal\",version=\"v3\"} 20",
            "pai_completion_tokens_total{adapter=\"personal\",version=\"v3\"} 12",
            "pai_generation_duration_seconds_bucket{adapter=\"personal\",version=\"v3\",le=\"0.25\"} 0",
            "pai_generation_duration_seconds_bucket{adapter=\"personal\",version=\"v3\",le=\"0.5\"} 1",
            "pai_generation_duration_seconds_bucket{adapter=\"personal\",version=\"v3\",le=\"5\"} 2",
            "pai_generation_duration_seconds_bucket{adapter=\"personal\",version=\"v3\",le=\"+Inf\"} 2",
            "pai_generation_duration_seconds_count{adapter=\"personal\",version=\"v3\"} 2",
            "pai_time_to_first_token_seconds_bucket{adapter=\"personal\",version=\"v3\",le=\"0.05\"} 1",
            "pai_queue_depth 1",
            "pai_generations_running 0",
            "pai_adapters_loaded 2",
            "pai_adapters_broken 1",
            "# TYPE pai_time_to_first_token_seconds histogram",
        ];
        for line in want {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
