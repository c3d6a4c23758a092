#!/usr/bin/env bash
# How long a long prompt arriving stalls a stream already running, for several --prefill-chunk
# sizes of pai-serve (the newcomer's prompt runs in chunks of that many tokens between the running
# stream's decode steps; 100000 = the whole prompt at once, as before chunking). Medians of --rounds
# runs of prefill_stall.py each. Writes benches/compare/results/prefill-stall-<date>.jsonl.
# Usage: benches/compare/prefill_stall.sh [--rounds 3] [--threads 2] [--prompt-tokens 1000]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# shellcheck disable=SC1091
source "$here/env.sh"
pip install -q httpx >&2
rounds=3 threads=2 prompt_tokens=1000
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --prompt-tokens) prompt_tokens="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pai-target}"
(cd "$root" && cargo build --release -q -p pai --bin pai-serve)
model="$("$root/scripts/fetch-model.sh")"
home="$(mktemp -d)"
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$home"; }
trap cleanup EXIT
export PAI_HOME="$home" PAI_NUM_THREADS="$threads"
mkdir -p "$here/results"
out="$here/results/prefill-stall-$(date +%Y%m%d-%H%M%S).jsonl"
for chunk in 32 128 512 100000; do
  "$CARGO_TARGET_DIR/release/pai-serve" serve --model "$model" --port 18081 --prefill-chunk "$chunk" >"$home/log" 2>&1 &
  pid=$!
  for _ in $(seq 1 300); do
    python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:18081/health')" 2>/dev/null && break
    sleep 0.2
  done
  name="$(python -c "import json,urllib.request; print(json.load(urllib.request.urlopen('http://127.0.0.1:18081/v1/models'))['data'][0]['id'])")"
  for _ in $(seq 1 "$rounds"); do
    python "$here/prefill_stall.py" --url http://127.0.0.1:18081/v1 --model "$name" \
      --prompt-tokens "$prompt_tokens" | python -c "import json,sys; d=json.load(sys.stdin); d['prefill_chunk']=$chunk; print(json.dumps(d))" >>"$out"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
done
python - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'prefill_chunk':>13} {'stream gap max ms':>18} {'gap median ms':>14} {'newcomer TTFT ms':>17}")
for chunk in sorted({r["prefill_chunk"] for r in rows}):
    rs = [r for r in rows if r["prefill_chunk"] == chunk]
    med = lambda k: statistics.median(r[k] for r in rs)
    print(f"{chunk:>13} {med('stream_gap_max_ms'):>18.1f} {med('stream_gap_median_ms'):>14.1f} {med('newcomer_ttft_ms'):>17.1f}")
print(f"raw: {sys.argv[1]}")
PY
