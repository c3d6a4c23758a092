#!/usr/bin/env bash
# The router against real OpenAI-compatible peers on loopback (issue 9): llama-cpp-python's server on
# the default model and a second pai-serve as the cloud tiers, plus tiers that refuse connections,
# hang, answer 429 with Retry-After, 500, or drop the connection, each behind a proxy that logs every
# body it receives. A notes folder with a private note is ingested first (that builds the privacy
# index). Requests go through the official openai SDK; planted private text, a secret and personal
# data must appear in no log, and /metrics and the egress ledger must match what happened.
#   benches/compare/router_check.sh [--model PATH]
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
python -c "import openai, uvicorn, fastapi, sse_starlette, starlette_context, pydantic_settings" 2>/dev/null \
  || pip install -q openai uvicorn fastapi pydantic-settings sse-starlette starlette-context >&2
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pai-target}"
cargo build -q --bin pai-serve --bin pai-train >&2
python benches/compare/router_check.py --model "$MODEL" --bin "$CARGO_TARGET_DIR/debug"
