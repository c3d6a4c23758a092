//! Whole-program speed of pai's runtime on a GGUF (see `src/bench.rs`); prints one JSON line.
//! `cargo bench --bench generation -- [--model PATH] [--prefill 512] [--decode 128] [--reps 5] [--threads N]`
//! (benches/compare/speed.sh runs it beside llama.cpp and writes the comparison.)

use std::path::PathBuf;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let model = arg("--model")
        .map(PathBuf::from)
        .unwrap_or_else(pai::default_model_path);
    let prefill: usize = arg("--prefill").and_then(|v| v.parse().ok()).unwrap_or(512);
    let decode: usize = arg("--decode").and_then(|v| v.parse().ok()).unwrap_or(128);
    let reps: usize = arg("--reps").and_then(|v| v.parse().ok()).unwrap_or(5);
    if let Some(n) = arg("--threads") {
        // Read once when the kernels' pool starts, which is after this point.
        std::env::set_var("PAI_NUM_THREADS", n);
    }
    let base =
        pai_model::BaseModel::load(&model, &pai_model::default_device()).unwrap_or_else(|e| {
            eprintln!("{e}\n(run scripts/fetch-model.sh, or pass --model PATH)");
            std::process::exit(1)
        });
    match pai::bench::run(&base, prefill, decode, reps) {
        Ok(report) => println!("{}", report.to_json(&base)),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1)
        }
    }
}
