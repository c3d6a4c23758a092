#!/usr/bin/env bash
# pai-serve against llama.cpp's server (llama-cpp-python[server]) on the same GGUF and threads, in the
# same run, rounds alternating the two: single-stream decode tokens/s and time to first token (p50,
# p99), and total throughput of 8 concurrent streams — for pai with 4 different adapters in the batch
# and with one, for llama.cpp on the bare model (its server runs one request at a time; queued,
# not interrupted). The client
# (serve_client.py) streams over plain HTTP with a distinct prompt per request. The 4 adapters are random r-16 q/k/v/o LoRAs imported
# into a temporary PAI_HOME. Writes benches/compare/results/serve-<date>.jsonl and prints medians and
# ratios.
# Usage: benches/compare/serve_speed.sh [--rounds 3] [--threads 2] [--max-tokens 128] [--streams 8]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# shellcheck disable=SC1091
source "$here/env.sh"
pip install -q uvicorn fastapi pydantic-settings sse-starlette starlette-context httpx >&2
rounds=3 threads=2 max_tokens=128 streams=8
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --max-tokens) max_tokens="$2"; shift 2 ;;
    --streams) streams="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pai-target}"
(cd "$root" && cargo build --release -q -p pai --bin pai-serve --bin pai-train)
bin="$CARGO_TARGET_DIR/release"
model="$("$root/scripts/fetch-model.sh")"
home="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]+"${pids[@]}"}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$home"; }
trap cleanup EXIT
export PAI_HOME="$home" PAI_NUM_THREADS="$threads"
mkdir -p "$home/models"
ln -s "$model" "$home/models/$(basename "$model")"

# Four random adapters (what a user with several personal adapters serves).
python "$here/make_random_adapters.py" "$home/peft" 4
for n in 0 1 2 3; do
  "$bin/pai-train" adapters import "$home/peft/a$n" --name "a$n" >/dev/null
  "$bin/pai-train" promote "a$n@v1" --reason bench >/dev/null
done

wait_up() {
  for _ in $(seq 1 600); do
    if python -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1])" "$1/models" 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  echo "server at $1 did not come up" >&2; return 1
}
stop() { kill "$1"; wait "$1" 2>/dev/null || true; pids=(); }

mkdir -p "$here/results"
out="$here/results/serve-$(date +%Y%m%d-%H%M%S).jsonl"
client=(python "$here/serve_client.py" --max-tokens "$max_tokens" --streams "$streams")
for round in $(seq 1 "$rounds"); do
  "$bin/pai-serve" serve --port 18080 --max-batch "$streams" >"$home/pai.log" 2>&1 &
  pids=($!)
  wait_up http://127.0.0.1:18080/v1
  r4="$("${client[@]}" --url http://127.0.0.1:18080/v1 --single-model auto --models a0,a1,a2,a3)"
  r1="$("${client[@]}" --url http://127.0.0.1:18080/v1 --single-model auto --models a0 --skip-single)"
  rb="$("${client[@]}" --url http://127.0.0.1:18080/v1 --single-model auto --models auto --skip-single)"
  echo "{\"round\": $round, \"tool\": \"pai\", \"four_adapters\": $r4, \"one_adapter\": $r1, \"base\": $rb}" >>"$out"
  stop "${pids[0]}"

  python -m llama_cpp.server --model "$model" --n_threads "$threads" --n_ctx 2048 --host 127.0.0.1 \
    --interrupt_requests False \
    --port 18081 >"$home/llama.log" 2>&1 &
  pids=($!)
  wait_up http://127.0.0.1:18081/v1
  rl="$("${client[@]}" --url http://127.0.0.1:18081/v1 --single-model auto --models auto)"
  echo "{\"round\": $round, \"tool\": \"llama.cpp\", \"base\": $rl}" >>"$out"
  stop "${pids[0]}"
done

python - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
pai = [r for r in rows if r["tool"] == "pai"]
ll = [r for r in rows if r["tool"] == "llama.cpp"]
med = lambda xs: statistics.median(xs)
single_p = med(r["four_adapters"]["single"]["decode_tokens_per_s_median"] for r in pai)
single_l = med(r["base"]["single"]["decode_tokens_per_s_median"] for r in ll)
ttft = lambda rs, k, p: med(r[k]["single"][f"ttft_s_{p}"] for r in rs) * 1000
conc4 = med(r["four_adapters"]["concurrent"]["tokens_per_s"] for r in pai)
conc1 = med(r["one_adapter"]["concurrent"]["tokens_per_s"] for r in pai)
concb = med(r["base"]["concurrent"]["tokens_per_s"] for r in pai)
concl = med(r["base"]["concurrent"]["tokens_per_s"] for r in ll)
print(f"single-stream decode: pai {single_p:.1f} / llama.cpp server {single_l:.1f} tok/s = {single_p / single_l:.2f}")
print(f"time to first token p50: pai {ttft(pai, 'four_adapters', 'p50'):.0f} ms / llama.cpp {ttft(ll, 'base', 'p50'):.0f} ms;"
      f" p99: pai {ttft(pai, 'four_adapters', 'p99'):.0f} ms / llama.cpp {ttft(ll, 'base', 'p99'):.0f} ms")
print(f"8 streams: pai, 4 adapters {conc4:.1f}, 1 adapter {conc1:.1f}, base {concb:.1f} / llama.cpp server {concl:.1f} tok/s")
print(f"  pai 4 adapters / llama.cpp = {conc4 / concl:.2f};  4 adapters / 1 adapter = {conc4 / conc1:.2f}")
print(f"(rounds: {len(pai)}; raw results in {sys.argv[1]})")
PY
