#!/usr/bin/env bash
# pai-serve on a real socket, checked with the official `openai` Python SDK (openai_sdk_check.py) and
# with curl: a temporary PAI_HOME with the default model and one random adapter promoted in the
# registry, a second one under --adapter-root for load_lora_adapter.
#   benches/compare/openai_sdk_check.sh [--model PATH]
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL="${PAI_HOME:-$HOME/.pai}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
# shellcheck disable=SC1091
source benches/compare/env.sh
python -c "import openai" 2>/dev/null || pip install -q openai >&2
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pai-target}"
cargo build -q --bin pai-serve --bin pai-train >&2
BIN="$CARGO_TARGET_DIR/debug"
WORK="$(mktemp -d)"
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
export PAI_HOME="$WORK/home"
mkdir -p "$PAI_HOME/models" "$WORK/root"
ln -s "$MODEL" "$PAI_HOME/models/$(basename "$MODEL")"
python benches/compare/make_random_adapters.py "$WORK/peft" 1
python benches/compare/make_random_adapters.py "$WORK/root" 1
"$BIN/pai-train" adapters import "$WORK/peft/a0" --name a0 >&2
"$BIN/pai-train" promote a0@v1 --reason check >&2

# Port 0: the system picks a free one; the server prints it.
"$BIN/pai-serve" serve --model "$MODEL" --port 0 --adapter-root "$WORK/root" 2>"$WORK/serve.log" &
server=$!
url=""
for _ in $(seq 1 300); do
  url="$(grep -o 'http://127.0.0.1:[0-9]*' "$WORK/serve.log" | head -n 1 || true)"
  [ -n "$url" ] && break
  sleep 0.1
done
[ -n "$url" ] || { cat "$WORK/serve.log" >&2; echo "pai-serve did not start" >&2; exit 1; }

# curl: health, a streamed completion ending in [DONE], an error envelope.
curl -sf "$url/health" | grep -q '"status"'
curl -sfN "$url/v1/completions" -H 'content-type: application/json' \
  -d '{"model": "a0", "prompt": "Once upon a time", "max_tokens": 5, "stream": true}' >"$WORK/stream.txt"
tail -n 2 "$WORK/stream.txt" | grep -q '^data: \[DONE\]'
code="$(curl -s -o "$WORK/err.json" -w '%{http_code}' "$url/v1/chat/completions" \
  -H 'content-type: application/json' -d '{"model": "nope", "messages": [{"role": "user", "content": "x"}]}')"
[ "$code" = 404 ] && grep -q '"model_not_found"' "$WORK/err.json"
echo "curl check: health, stream, error envelope: ok"

python benches/compare/openai_sdk_check.py --url "$url/v1" --adapter-dir "$WORK/root/a0"
