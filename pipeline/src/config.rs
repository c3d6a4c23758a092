//! The configuration: `$PAI_HOME/pai.toml` on top of the defaults embedded from
//! `configs/default.toml`, with `PAI_<SECTION>_<KEY>` environment variables on top of both. Read once,
//! at the edge, into typed settings (`Config`); every value remembers where it came from (`Origin`)
//! so that `pai-train config show` can say it, and a bad value is reported with its key, its value,
//! what is allowed and where it was set.
//!
//! Tables merge key by key (a file that sets `[train] r = 8` keeps every other `[train]` default);
//! arrays and values replace. An environment variable names a key by its path with `_` for the dots,
//! upper-cased: `PAI_TRAIN_LEARNING_RATE=1e-4`, `PAI_INGEST_FIM_RATE=0.3`, `PAI_SERVE_PORT=9000`,
//! `PAI_MODEL=/models/x.gguf`; its value is read as a TOML value when it is one (`1e-4`, `true`,
//! `["q", "v"]`) and as a string otherwise.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use pai_datasets::{IngestSettings, MixSettings, SourceConfig};
use pai_trainers::TrainConfig;
use serde::{Deserialize, Serialize};
use toml::{Table, Value};

use crate::error::{PipelineError, Result};
use crate::layers::{env_path, env_value, merge, set};

/// Every default, with comments: what `pai-train init` writes out and what the binaries start from.
pub const DEFAULT_TOML: &str = include_str!("../../configs/default.toml");

/// `PAI_*` variables that are not configuration keys.
const NOT_KEYS: &[&str] = &[
    "PAI_HOME",
    "PAI_SERVE_API_KEYS",
    "PAI_NUM_THREADS",
    "PAI_KERNELS",
];

/// The whole configuration, typed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The base model (a GGUF file or a Hugging Face directory); the default model when absent.
    pub model: Option<PathBuf>,
    pub sources: Vec<SourceConfig>,
    pub ingest: IngestSettings,
    pub mix: MixSettings,
    pub train: TrainConfig,
    pub nightly: NightlySettings,
    pub schedule: ScheduleSettings,
    pub serve: ServeSettings,
    /// `[router]`: the cloud tiers and the rules of `"model": "auto"` (pai-serve's router).
    pub router: pai_serve::router::RouterConfig,
}

/// `[nightly]`: what one nightly run does and how it behaves on the owner's machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NightlySettings {
    /// The registry name the night's adapter is trained, gated and promoted as.
    pub adapter: String,
    /// Fewer new training tokens than this since the last trained night: nothing is trained.
    pub min_new_tokens: usize,
    /// Minutes of training at most; then training stops at a checkpoint and the run still evaluates.
    pub time_budget_min: u64,
    /// The scheduling priority the run lowers itself to (`nice`, 0–19; 0 leaves it as it is).
    pub nice: i32,
    /// Threads for the CPU kernels (0: every core).
    pub threads: usize,
    /// Run only on mains power, where the system says (Linux: /sys/class/power_supply).
    pub only_on_ac: bool,
    /// Run only when the machine is idle: the one-minute load average per core at most this (0: off;
    /// where the system says, Linux: /proc/loadavg).
    pub idle_max_load: f64,
    /// Minutes to wait for the machine to become idle before giving the night up.
    pub idle_wait_min: u64,
    /// Promote a candidate that passes the gate (off: the report says what would have happened).
    pub promote: bool,
}

impl Default for NightlySettings {
    fn default() -> Self {
        Self {
            adapter: "personal".into(),
            min_new_tokens: 2000,
            time_budget_min: 120,
            nice: 10,
            threads: 0,
            only_on_ac: false,
            idle_max_load: 0.0,
            idle_wait_min: 30,
            promote: true,
        }
    }
}

/// `[schedule]`: when `pai-train schedule` starts the nightly run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSettings {
    /// A cron expression in local time: five fields (minute hour day month weekday) as crontab
    /// writes them, or six with seconds first.
    pub cron: String,
    /// After a sleep or shutdown that skipped a run, run once when back (never more than once).
    pub catch_up: bool,
}

impl Default for ScheduleSettings {
    fn default() -> Self {
        Self {
            cron: "30 2 * * *".into(),
            catch_up: true,
        }
    }
}

/// `[serve]`: the defaults of `pai-serve serve` (its flags override them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeSettings {
    pub host: String,
    pub port: u16,
    pub max_batch: usize,
    pub max_queue: usize,
    pub prefill_chunk: usize,
    pub max_adapters: usize,
    pub max_adapter_mib: usize,
    /// Where POST /v1/load_lora_adapter may load from (absent: loading by path is off).
    pub adapter_root: Option<PathBuf>,
}

impl Default for ServeSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            max_batch: 8,
            max_queue: 64,
            prefill_chunk: 128,
            max_adapters: 16,
            max_adapter_mib: 1024,
            adapter_root: None,
        }
    }
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    File(PathBuf),
    Env(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::Env(v) => write!(f, "${v}"),
        }
    }
}

/// The configuration and where each of its values came from.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: Config,
    /// The file read (or that would have been: it may not exist).
    pub file: PathBuf,
    /// Dotted key paths (`train.r`, `sources`) set by the file or the environment.
    origins: BTreeMap<String, Origin>,
}

impl LoadedConfig {
    /// `$PAI_HOME/pai.toml` (or `file`) over the defaults, under the process's `PAI_*` variables.
    pub fn load(home: &Path, file: Option<&Path>) -> Result<Self> {
        let file = file.map_or_else(|| home.join("pai.toml"), Path::to_path_buf);
        Self::load_with_env(&file, std::env::vars())
    }

    /// As `load`, with the environment given (tests).
    pub fn load_with_env(
        file: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self> {
        let defaults = defaults()?;
        let mut merged = defaults.clone();
        let mut origins = BTreeMap::new();
        // 1. The file over the defaults.
        match std::fs::read_to_string(file) {
            Ok(text) => {
                let table: Table = toml::from_str(&text).map_err(|source| PipelineError::Toml {
                    path: file.to_path_buf(),
                    source: Box::new(source),
                })?;
                merge(
                    &mut merged,
                    table,
                    "",
                    &Origin::File(file.to_path_buf()),
                    &mut origins,
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(PipelineError::io("read", file, e)),
        }
        // 2. The environment over both (sorted, so that the outcome never depends on its order).
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("PAI_") && !NOT_KEYS.contains(&k.as_str()))
            .collect();
        env.sort();
        for (name, raw) in env {
            let Some(path) = env_path(&name, &defaults) else {
                continue;
            };
            set(&mut merged, &path, env_value(&raw));
            origins.insert(path.join("."), Origin::Env(name));
        }
        // 3. Typed, one table at a time so that an error names its table and where it was set.
        let origin_of = |section: &str| -> String {
            let mut from: Vec<String> = origins
                .iter()
                .filter(|(k, _)| *k == section || k.starts_with(&format!("{section}.")))
                .map(|(_, o)| o.to_string())
                .collect();
            from.dedup();
            if from.is_empty() {
                "the defaults".into()
            } else {
                from.join(", ")
            }
        };
        let known = [
            "model", "sources", "ingest", "mix", "train", "nightly", "schedule", "serve", "router",
        ];
        if let Some(unknown) = merged.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(PipelineError::Invalid {
                key: unknown.clone(),
                value: merged[unknown].to_string(),
                allowed: format!(
                    "not a key of pai.toml; the tables are {}",
                    known[2..].join(", ")
                ),
                origin: origin_of(unknown),
            });
        }
        let config = Config::deserialize(merged.clone()).map_err(|source| {
            // Find the table at fault by reading each alone.
            let section = known
                .iter()
                .find(|k| {
                    let mut alone = Table::new();
                    if let Some(v) = merged.get(**k) {
                        alone.insert((*k).to_string(), v.clone());
                    }
                    Config::deserialize(alone).is_err()
                })
                .copied()
                .unwrap_or("pai.toml");
            PipelineError::Section {
                section: section.into(),
                origin: origin_of(section),
                source: Box::new(source),
            }
        })?;
        Ok(Self {
            config,
            file: file.to_path_buf(),
            origins,
        })
    }

    /// Where the value at `key` (dotted: `train.r`) came from.
    pub fn origin(&self, key: &str) -> Origin {
        // A value set as a whole table or array counts for everything inside it.
        let mut at = key;
        loop {
            if let Some(o) = self.origins.get(at) {
                return o.clone();
            }
            match at.rsplit_once('.') {
                Some((parent, _)) => at = parent,
                None => return Origin::Default,
            }
        }
    }

    /// The effective configuration as TOML, each value followed by where it came from.
    pub fn show(&self) -> Result<String> {
        let table =
            Table::try_from(&self.config).map_err(|source| PipelineError::Serialize { source })?;
        let mut out = String::new();
        out.push_str(&format!(
            "# the effective configuration: defaults, then {}, then PAI_* variables\n",
            self.file.display()
        ));
        self.show_table(&table, "", &mut out);
        Ok(out)
    }

    fn show_table(&self, table: &Table, prefix: &str, out: &mut String) {
        let path = |k: &str| {
            if prefix.is_empty() {
                k.to_string()
            } else {
                format!("{prefix}.{k}")
            }
        };
        // Values first, then tables (TOML's order), then arrays of tables.
        for (k, v) in table {
            let is_tables =
                matches!(v, Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_table));
            if v.is_table() || is_tables {
                continue;
            }
            out.push_str(&format!("{k} = {v}  # {}\n", self.origin(&path(k))));
        }
        for (k, v) in table {
            if let Value::Table(t) = v {
                out.push_str(&format!("\n[{}]\n", path(k)));
                self.show_table(t, &path(k), out);
            }
        }
        for (k, v) in table {
            if let Value::Array(items) = v {
                if items.is_empty() || !items.iter().all(Value::is_table) {
                    continue;
                }
                for item in items {
                    out.push_str(&format!("\n[[{}]]  # {}\n", path(k), self.origin(&path(k))));
                    if let Value::Table(t) = item {
                        for (ik, iv) in t {
                            out.push_str(&format!("{ik} = {iv}\n"));
                        }
                    }
                }
            }
        }
    }

    /// Every value checked beyond its type (ranges, the cron expression, the adapter name, the
    /// sources' paths; `[train]` against the model when its configuration is given): all problems at
    /// once, each naming its key, value, what is allowed and where it was set.
    pub fn check(&self, model: Option<&pai_model::ModelConfig>) -> Vec<PipelineError> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, value: String, allowed: &str| {
            problems.push(PipelineError::Invalid {
                key: key.into(),
                value,
                allowed: allowed.into(),
                origin: self.origin(key).to_string(),
            });
        };
        let c = &self.config;
        if !(0.0..1.0).contains(&c.ingest.holdout_fraction) {
            bad(
                "ingest.holdout_fraction",
                c.ingest.holdout_fraction.to_string(),
                "at least 0 and below 1",
            );
        }
        if c.ingest.near_duplicate_threshold.is_nan() || c.ingest.near_duplicate_threshold <= 0.0 {
            bad(
                "ingest.near_duplicate_threshold",
                c.ingest.near_duplicate_threshold.to_string(),
                "above 0 (above 1 turns near-duplicate removal off)",
            );
        }
        if !(0.0..=1.0).contains(&c.mix.replay_share) {
            bad(
                "mix.replay_share",
                c.mix.replay_share.to_string(),
                "between 0 and 1",
            );
        }
        if c.mix.half_life_days.is_nan() || c.mix.half_life_days <= 0.0 {
            bad(
                "mix.half_life_days",
                c.mix.half_life_days.to_string(),
                "above 0",
            );
        }
        if let Some(model) = model {
            if let Err(pai_trainers::TrainError::BadConfig {
                key,
                value,
                allowed,
            }) = c.train.validate(model)
            {
                bad(&format!("train.{key}"), value, &allowed);
            }
        }
        if let Err(e) = crate::config::valid_adapter_name(&c.nightly.adapter) {
            bad("nightly.adapter", format!("{:?}", c.nightly.adapter), &e);
        }
        if !(0..=19).contains(&c.nightly.nice) {
            bad(
                "nightly.nice",
                c.nightly.nice.to_string(),
                "0 to 19 (a nightly run only ever lowers its priority)",
            );
        }
        if c.nightly.time_budget_min == 0 {
            bad("nightly.time_budget_min", "0".into(), "at least 1 minute");
        }
        if !(c.nightly.idle_max_load.is_finite() && c.nightly.idle_max_load >= 0.0) {
            bad(
                "nightly.idle_max_load",
                c.nightly.idle_max_load.to_string(),
                "0 (off) or a load per core above 0, e.g. 0.5",
            );
        }
        if let Err(e) = crate::config::parse_cron(&c.schedule.cron) {
            bad("schedule.cron", format!("{:?}", c.schedule.cron), &e);
        }
        for (key, v) in [
            ("serve.max_batch", c.serve.max_batch),
            ("serve.max_queue", c.serve.max_queue),
            ("serve.prefill_chunk", c.serve.prefill_chunk),
            ("serve.max_adapters", c.serve.max_adapters),
        ] {
            if v == 0 {
                bad(key, "0".into(), "at least 1");
            }
        }
        for (key, value, allowed) in c.router.problems() {
            bad(&key, value, &allowed);
        }
        if let Err(e) = pai_datasets::resolve_sources(&c.sources) {
            bad(
                "sources",
                format!("{} source(s)", c.sources.len()),
                &e.to_string(),
            );
        }
        problems
    }
}

/// The text `pai-train init` writes: every default with its comment, and `sources` as `[[sources]]`
/// tables at the end.
pub fn init_text(sources: &[SourceConfig]) -> Result<String> {
    if sources.is_empty() {
        return Ok(DEFAULT_TOML.to_string());
    }
    #[derive(Serialize)]
    struct Sources<'a> {
        sources: &'a [SourceConfig],
    }
    let tables = toml::to_string(&Sources { sources })
        .map_err(|source| PipelineError::Serialize { source })?;
    let text = DEFAULT_TOML.replacen("\nsources = []\n", "\n", 1);
    Ok(format!("{text}\n# What to learn from.\n{tables}"))
}

/// The embedded defaults as a table.
fn defaults() -> Result<Table> {
    toml::from_str(DEFAULT_TOML).map_err(|source| PipelineError::Toml {
        path: PathBuf::from("configs/default.toml (embedded)"),
        source: Box::new(source),
    })
}

/// An adapter name the registry accepts (it is also a directory name).
pub fn valid_adapter_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err("1 to 64 letters, digits, '-', '_' or '.', not starting with '.'".into())
    }
}

/// A cron expression: five fields as crontab writes them, or six/seven with seconds (and years).
pub fn parse_cron(expr: &str) -> std::result::Result<cron::Schedule, String> {
    let fields = expr.split_whitespace().count();
    let full = match fields {
        5 => format!("0 {expr}"),
        6 | 7 => expr.to_string(),
        n => {
            return Err(format!(
                "{n} fields; a cron expression has five (minute hour day month weekday), or six \
                 with seconds first"
            ))
        }
    };
    full.parse::<cron::Schedule>()
        .map_err(|e| format!("not a cron expression ({e}); e.g. \"30 2 * * *\" for 02:30 daily"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(
        file_text: Option<&str>,
        env: &[(&str, &str)],
    ) -> (tempfile::TempDir, Result<LoadedConfig>) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pai.toml");
        if let Some(text) = file_text {
            std::fs::write(&file, text).unwrap();
        }
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let loaded = LoadedConfig::load_with_env(&file, env);
        (dir, loaded)
    }

    #[test]
    fn the_embedded_defaults_are_the_types_defaults_and_name_every_key() {
        let (_dir, loaded) = load(None, &[]);
        let loaded = loaded.unwrap();
        let from_file = Table::try_from(&loaded.config).unwrap();
        let from_types = Table::try_from(Config::default()).unwrap();
        assert_eq!(from_file, from_types);
        // Every key the types have (optional ones included) is written in the file, set or commented.
        let text = DEFAULT_TOML;
        for key in [
            "max_steps",
            "time_budget_s",
            "adapter_root",
            "model",
            "max_tokens",
        ] {
            assert!(
                text.contains(&format!("# {key} = ")),
                "{key} is not documented"
            );
        }
        assert!(loaded.check(None).is_empty(), "{:?}", loaded.check(None));
    }

    #[test]
    fn file_then_environment_over_the_defaults_each_value_with_its_origin() {
        let (dir, loaded) = load(
            Some("[train]\nr = 8\nstrategy = \"continue\"\n\n[[sources]]\npath = \"/tmp\"\nkind = \"notes\"\n"),
            &[
                ("PAI_TRAIN_LEARNING_RATE", "1e-4"),
                ("PAI_INGEST_FIM_RATE", "0.25"),
                ("PAI_TRAIN_MAX_STEPS", "7"),
                ("PAI_TRAIN_TARGET_MODULES", "[\"q\", \"v\"]"),
                ("PAI_SCHEDULE_CRON", "0 3 * * *"),
                ("PAI_SERVE_PORT", "9001"),
                ("PAI_NUM_THREADS", "2"),
                ("PAI_HOME", "/elsewhere"),
                ("PAI_SOMETHING_ELSE", "x"),
            ],
        );
        let loaded = loaded.unwrap();
        let c = &loaded.config;
        assert_eq!(c.train.r, 8);
        assert_eq!(c.train.strategy, pai_trainers::Strategy::Continue);
        assert_eq!(
            c.train.alpha, 32.0,
            "the rest of [train] keeps its defaults"
        );
        assert_eq!(c.train.learning_rate, 1e-4);
        assert_eq!(c.train.max_steps, Some(7));
        assert_eq!(c.train.target_modules, ["q", "v"]);
        assert_eq!(c.ingest.fim.rate, 0.25);
        assert_eq!(c.ingest.fim.spm_rate, 0.5);
        assert_eq!(c.schedule.cron, "0 3 * * *");
        assert_eq!(c.serve.port, 9001);
        assert_eq!(c.sources.len(), 1);
        let file = Origin::File(dir.path().join("pai.toml"));
        assert_eq!(loaded.origin("train.r"), file);
        assert_eq!(loaded.origin("sources"), file);
        assert_eq!(
            loaded.origin("ingest.fim.rate"),
            Origin::Env("PAI_INGEST_FIM_RATE".into())
        );
        assert_eq!(loaded.origin("train.alpha"), Origin::Default);
        let shown = loaded.show().unwrap();
        assert!(
            shown.contains(&format!(
                "r = 8  # {}",
                dir.path().join("pai.toml").display()
            )),
            "{shown}"
        );
        assert!(
            shown.contains("learning_rate = 0.0001  # $PAI_TRAIN_LEARNING_RATE"),
            "{shown}"
        );
        assert!(shown.contains("alpha = 32.0  # default"), "{shown}");
        assert!(
            shown.contains("[ingest.fim]\nrate = 0.25  # $PAI_INGEST_FIM_RATE"),
            "{shown}"
        );
        assert!(shown.contains("[[sources]]"), "{shown}");
        // What show prints reads back as the same configuration.
        let again: Config = toml::from_str(&shown).unwrap();
        assert_eq!(
            Table::try_from(&again).unwrap(),
            Table::try_from(c).unwrap()
        );
    }

    #[test]
    fn bad_keys_and_values_name_the_table_the_key_and_where_they_were_set() {
        let (_dir, e) = load(Some("[train]\nlerning_rate = 0.1\n"), &[]);
        let e = e.unwrap_err().to_string();
        assert!(
            e.contains("[train]") && e.contains("lerning_rate") && e.contains("pai.toml"),
            "{e}"
        );

        let (_dir, e) = load(None, &[("PAI_TRAIN_R", "\"sixteen\"")]);
        let e = e.unwrap_err().to_string();
        assert!(e.contains("[train]") && e.contains("$PAI_TRAIN_R"), "{e}");

        let (_dir, e) = load(Some("[trian]\nr = 4\n"), &[]);
        let e = e.unwrap_err().to_string();
        assert!(e.contains("trian") && e.contains("the tables are"), "{e}");

        let (_dir, e) = load(Some("[train\nr = 4\n"), &[]);
        assert!(e.unwrap_err().to_string().contains("not valid TOML"));

        let (_dir, loaded) = load(
            Some("[mix]\nreplay_share = 1.5\n[nightly]\nnice = -5\nadapter = \"../x\"\n"),
            &[("PAI_SCHEDULE_CRON", "every night")],
        );
        let problems: Vec<String> = loaded
            .unwrap()
            .check(None)
            .iter()
            .map(|e| e.to_string())
            .collect();
        let all = problems.join("\n");
        assert_eq!(problems.len(), 4, "{all}");
        assert!(
            all.contains("mix.replay_share = 1.5") && all.contains("between 0 and 1"),
            "{all}"
        );
        assert!(all.contains("nightly.nice = -5"), "{all}");
        assert!(all.contains("nightly.adapter = \"../x\""), "{all}");
        assert!(
            all.contains("schedule.cron") && all.contains("$PAI_SCHEDULE_CRON"),
            "{all}"
        );
    }

    #[test]
    fn init_writes_the_defaults_with_the_sources_given() {
        let dir = tempfile::tempdir().unwrap();
        let notes = SourceConfig::from_arg(&format!("{}:notes", dir.path().display())).unwrap();
        let text = init_text(&[notes]).unwrap();
        assert!(
            text.contains("# Projections that get LoRA pairs"),
            "the comments stay"
        );
        let file = dir.path().join("pai.toml");
        std::fs::write(&file, &text).unwrap();
        let loaded = LoadedConfig::load_with_env(&file, Vec::new()).unwrap();
        assert_eq!(loaded.config.sources.len(), 1);
        assert_eq!(loaded.config.sources[0].path, dir.path());
        assert_eq!(loaded.config.train.r, 16);
        assert_eq!(init_text(&[]).unwrap(), DEFAULT_TOML);
    }

    #[test]
    fn cron_takes_crontabs_five_fields_or_six_with_seconds() {
        assert!(parse_cron("30 2 * * *").is_ok());
        assert!(parse_cron("0 30 2 * * *").is_ok());
        assert!(parse_cron("30 2 * *").unwrap_err().contains("4 fields"));
        assert!(parse_cron("61 2 * * *").is_err());
    }
}
