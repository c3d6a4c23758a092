#!/usr/bin/env bash
# Decode and prefill tokens/s of pai and of llama.cpp (n_threads=2) on the same GGUF, in the same run,
# alternating the two tools three times; writes benches/compare/results/speed-<date>.json and prints
# the medians. Usage: benches/compare/speed.sh [--model PATH] [--reps N]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# shellcheck disable=SC1091
source "$here/env.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pai-target}"
(cd "$root" && cargo build --release --bench generation -q)
pai_bench="$(ls -t "$CARGO_TARGET_DIR"/release/deps/generation-* | grep -v '\.d$' | head -n 1)"
mkdir -p "$here/results"
out="$here/results/speed-$(date +%Y%m%d-%H%M%S).jsonl"
for round in 1 2 3; do
  (cd "$root" && "$pai_bench" --bench "$@") >>"$out"
  python "$here/llama_cpp_speed.py" "$@" >>"$out"
done
python - "$out" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    for k in ("prefill", "decode"):
        by.setdefault((r["runtime"].split(" ")[0], k), []).append(r["results"][k]["median_tokens_per_second"])
for k in ("prefill", "decode"):
    p, l = statistics.median(by[("pai", k)]), statistics.median(by[("llama.cpp", k)])
    print(f"{k:8s} pai {p:8.1f} tok/s   llama.cpp {l:8.1f} tok/s   pai/llama.cpp {p / l:.2f}")
print(f"(rounds: {len(rows) // 2}; raw results in {sys.argv[1]})")
PY
