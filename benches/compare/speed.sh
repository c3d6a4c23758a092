#!/usr/bin/env bash
# Decode and prefill tokens/s of pai, llama.cpp and transformers (PyTorch f32; n_threads=2 for all) on
# the same GGUF, in the same run, alternating the tools three times; writes
# benches/compare/results/speed-<date>.jsonl and prints the medians, the ratios and peak RSS. Usage: benches/compare/speed.sh [--model PATH] [--prefill N] [--decode N] [--reps N] [--threads N] [--load]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# shellcheck disable=SC1091
source "$here/env.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pai-target}"
(cd "$root" && cargo build --release --bench generation -q)
pai_bench="$(ls -t "$CARGO_TARGET_DIR"/release/deps/generation-* | grep -v '\.d$' | head -n 1)"
args=()
load=""
for a in "$@"; do
  if [ "$a" = "--load" ]; then load="-load"; else args+=("$a"); fi
done
set -- "${args[@]+"${args[@]}"}"
mkdir -p "$here/results"
out="$here/results/speed$load-$(date +%Y%m%d-%H%M%S).jsonl"
if [ -n "$load" ]; then
  python -c 'while True: pass' &
  busy=$!
  trap 'kill $busy' EXIT
fi
for round in 1 2 3; do
  (cd "$root" && "$pai_bench" --bench "$@") >>"$out"
  python "$here/llama_cpp_speed.py" "$@" >>"$out"
  python "$here/transformers_speed.py" "$@" >>"$out"
done
python - "$out" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
tools = ["pai", "llama.cpp", "transformers"]
def tool(r):
    return r["runtime"].split(" ")[0]
med = {(t, k): statistics.median(r["results"][k]["median_tokens_per_second"] for r in rows if tool(r) == t)
       for t in tools for k in ("prefill", "decode")}
for k in ("prefill", "decode"):
    p, l, t = (med[(x, k)] for x in tools)
    print(f"{k:8s} pai {p:8.1f}   llama.cpp {l:8.1f}   transformers {t:8.1f} tok/s   "
          f"pai/llama.cpp {p / l:.2f}   pai/transformers {p / t:.2f}   pai/faster {p / max(l, t):.2f}")
rss = {t: max(r.get("peak_rss_bytes") or 0 for r in rows if tool(r) == t) / 2**20 for t in tools}
base = {t: max(r.get("interpreter_rss_bytes") or 0 for r in rows if tool(r) == t) / 2**20 for t in tools[1:]}
print(f"peak RSS pai {rss['pai']:.1f} MiB   llama.cpp {rss['llama.cpp']:.1f} MiB   transformers "
      f"{rss['transformers']:.1f} MiB (each Python figure includes the interpreter, {base['llama.cpp']:.1f} MiB)   "
      f"pai/llama.cpp {rss['pai'] / rss['llama.cpp']:.2f}, "
      f"pai/(llama.cpp without the interpreter) {rss['pai'] / (rss['llama.cpp'] - base['llama.cpp']):.2f}")
print(f"(rounds: {len(rows) // 3}; raw results in {sys.argv[1]})")
PY
