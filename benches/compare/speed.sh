#!/usr/bin/env bash
# Decode and prefill tokens/s of pai and of llama.cpp (n_threads=2) on the same GGUF, in the same run,
# alternating the two tools three times; writes benches/compare/results/speed-<date>.json and prints
# the medians and peak RSS. Usage: benches/compare/speed.sh [--model PATH] [--prefill N] [--decode N] [--reps N]
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
rss = {}
for r in rows:
    rss.setdefault(r["runtime"].split(" ")[0], []).append(r.get("peak_rss_bytes") or 0)
p, l = max(rss["pai"]) / 2**20, max(rss["llama.cpp"]) / 2**20
base = max(r.get("interpreter_rss_bytes") or 0 for r in rows if r["runtime"].startswith("llama.cpp")) / 2**20
print(f"peak RSS pai {p:.1f} MiB   llama.cpp {l:.1f} MiB (of which the Python interpreter {base:.1f})   "
      f"pai/llama.cpp {p / l:.2f}, pai/(llama.cpp without the interpreter) {p / (l - base):.2f}")
print(f"(rounds: {len(rows) // 2}; raw results in {sys.argv[1]})")
PY
