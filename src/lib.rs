//! Shared front-end pieces of the `pai-train` and `pai-serve` binaries: where pai keeps its files, how a
//! model argument is resolved, logging setup. The binaries stay thin; the work lives in the crates.

pub mod adapters;
pub mod bench;
pub mod evals;
pub mod ingest;
pub mod nightly;
pub mod pipeline;
pub mod report;
pub mod router;
pub mod train;
pub mod watch;

use std::path::PathBuf;

use anyhow::{bail, Context};

/// File name of the default base model that `scripts/fetch-model.sh` installs.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$PAI_HOME`, or `~/.pai`.
pub fn pai_home() -> PathBuf {
    if let Some(h) = std::env::var_os("PAI_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".pai")
}

/// Where the default model lives: `$PAI_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf`.
pub fn default_model_path() -> PathBuf {
    pai_home().join("models").join(DEFAULT_MODEL_FILE)
}

/// The model a command should load: the one given, or the default, with an error that says how to
/// get it when it is missing.
pub fn resolve_model(arg: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match arg {
        Some(p) if p.exists() => Ok(p),
        Some(p) => bail!(
            "no model at {}: pass a GGUF file or a Hugging Face model directory",
            p.display()
        ),
        None => {
            let p = default_model_path();
            if !p.is_file() {
                bail!(
                    "the default model is not installed (looked for {}).\n\
                     Fetch it with:  scripts/fetch-model.sh\n\
                     or pass --model PATH to use another GGUF file or Hugging Face directory",
                    p.display()
                );
            }
            Ok(p)
        }
    }
}

/// The model arguments every command that runs the model takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// GGUF file or Hugging Face directory (default: the model scripts/fetch-model.sh installs).
    #[arg(long, env = "PAI_MODEL")]
    pub model: Option<PathBuf>,
    /// PEFT LoRA adapter directory to apply (repeat to stack several).
    #[arg(long)]
    pub adapter: Vec<PathBuf>,
    /// Expand quantized weights to f32 at load (exact f32 arithmetic, as transformers runs a GGUF).
    #[arg(long)]
    pub dequantize: bool,
}

impl ModelArgs {
    /// Load the base model and the adapters named on the command line.
    pub fn load(&self) -> anyhow::Result<(pai_model::BaseModel, Vec<pai_model::Adapter>)> {
        let options = pai_model::LoadOptions {
            dequantize: self.dequantize,
        };
        load_model(self.model.clone(), &self.adapter, options)
    }
}

/// Load a base model and adapters.
pub fn load_model(
    model: Option<PathBuf>,
    adapters: &[PathBuf],
    options: pai_model::LoadOptions,
) -> anyhow::Result<(pai_model::BaseModel, Vec<pai_model::Adapter>)> {
    let path = resolve_model(model)?;
    let device = pai_model::default_device();
    let base = pai_model::BaseModel::load_with(&path, &device, options)
        .with_context(|| format!("loading model {}", path.display()))?;
    let adapters = adapters
        .iter()
        .map(|dir| {
            base.load_adapter(dir)
                .with_context(|| format!("loading adapter {}", dir.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((base, adapters))
}

/// mimalloc option numbers (mimalloc.h, v2 and v3 alike; the binding names only some of them).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t =
    libmimalloc_sys::mi_option_use_numa_nodes - 1;

/// Set up memory for pai-train; call first thing in `main`. mimalloc's arenas are committed as pages
/// are used, and the process asks for no transparent huge pages: faulted in as huge pages, fresh
/// memory is zeroed 2 MiB at a time by the kernel, and on the virtual machine benchmarks run on that
/// took half of a 200 MB ingest (perf: `clear_page_erms` under `do_huge_pmd_anonymous_page`; 16–21 s
/// → 7.4–7.7 s, system time 10–16 s → 1.3 s). Setting the mimalloc option alone is not enough, since
/// the first arena is reserved before `main`. Training speed is the same either way (91–100 tokens/s
/// on `benches/train.rs`, with and without). (`MIMALLOC_ARENA_EAGER_COMMIT=0` in the environment,
/// read before that first arena, was as fast on its own.)
pub fn setup_allocator() {
    // SAFETY: mi_option_set only stores an integer option; mimalloc reads it when it next reserves
    // an arena.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE only sets a flag on this process's address space.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0)
    };
}

/// Keep the pages mimalloc frees instead of handing them back to the OS. A training step allocates and
/// frees the same few hundred MB of tensors every step; returned pages come back zeroed by the kernel,
/// which took 13–30% of a step (perf: `clear_page_erms`) and a quarter of its speed. Peak RSS is what
/// the step needs either way. (`MIMALLOC_PURGE_DELAY=-1` does the same from the environment.) A
/// one-shot ingest too: system time 1.2 → 0.8–0.9 s of a 200 MB ingest, peak RSS 0.70 → 0.77–0.82
/// GB. Not for `watch`, which runs for days.
pub fn keep_freed_memory() {
    // SAFETY: as above; -1 never purges.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Log to stderr; `RUST_LOG` overrides the default level (warnings).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
