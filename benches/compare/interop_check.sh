#!/usr/bin/env bash
# Interoperability of pai's adapters: train a small adapter with pai on this project's sources, then
#  * load it with PEFT onto the same base (transformers reading the GGUF): it must move the logits as it
#    does in pai (benches/compare/peft_check.py);
#  * export it with `pai-train export --format gguf` and load that in llama.cpp (llama-cpp-python's
#    lora_path): it must move llama.cpp's logits as it moves pai's (benches/compare/gguf_lora_check.py).
# The reverse direction (an adapter made by PEFT applied by pai) is checked by pai-model's tests against
# tests/fixtures/peft-adapter. The tools live in the reference venv (benches/compare/env.sh).
#   benches/compare/interop_check.sh [--model PATH]
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
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pai-target}"
cargo build -q --bin pai-train >&2
TRAIN="$CARGO_TARGET_DIR/debug/pai-train"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export PAI_HOME="$WORK/home"
mkdir -p "$PAI_HOME"
# Plain code examples only (no FIM), so every trained token counts.
# The retention guard off: this adapter is meant to move the logits far (see below).
printf '[ingest.fim]\nrate = 0.0\n\n[train]\nmax_retention_rise = 1e9\n' > "$PAI_HOME/pai.toml"
"$TRAIN" ingest --model "$MODEL" --source "$PWD/trainers/src:code" --day 2026-01-01 >&2
# Every projection, a high learning rate and a few steps: an adapter that moves the logits by ~17, far
# above the ~1 by which int8 activation rounding moves a quantized model's logits (pai's and llama.cpp's
# alike), so the llama.cpp comparison can tell a right export from a wrong one (without the q/k row
# permutation: effect cosine 0.957, relative RMS 0.34; with it: 0.994, 0.107).
"$TRAIN" train --model "$MODEL" --day 2026-01-01 --targets q,k,v,o,gate,up,down --lr 1e-2 \
  --max-steps 8 --seq-len 128 --batch-tokens 256 --out "$WORK/adapter" >&2
TEXT='fn main() { let total: u32 = (1..10).sum(); println!("{total}"); }'
"$TRAIN" logits --model "$MODEL" --dequantize --adapter "$WORK/adapter" --text "$TEXT" > "$WORK/pai-f32.json"
python benches/compare/peft_check.py --model "$MODEL" --adapter "$WORK/adapter" --pai "$WORK/pai-f32.json"
"$TRAIN" export --model "$MODEL" --adapter "$WORK/adapter" --out "$WORK/adapter.gguf" >&2
"$TRAIN" logits --model "$MODEL" --adapter "$WORK/adapter" --text "$TEXT" > "$WORK/pai-q.json"
python benches/compare/gguf_lora_check.py --model "$MODEL" --adapter-gguf "$WORK/adapter.gguf" \
  --pai "$WORK/pai-q.json"
