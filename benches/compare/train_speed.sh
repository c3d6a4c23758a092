#!/usr/bin/env bash
# Training speed and peak RSS, pai vs PyTorch + PEFT, same model, LoRA config, batch and threads, in
# alternating rounds (the machine is shared: each ratio is taken within one run). Prints both tools'
# JSON lines per round; the medians go to BENCHMARKS.md.
#   benches/compare/train_speed.sh [--rounds 3] [--steps 6] [--threads 2]
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=3 STEPS=6 THREADS=2
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
# shellcheck disable=SC1091
source benches/compare/env.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pai-target}"
# The release build, as users run it (until 2026-12-03 the dev profile's debug assertions in pai-model
# made a step on the int8 kernels up to twice as slow; Cargo.toml turns them off there now).
cargo build --release --bench train >&2
BIN=$(ls -t "$CARGO_TARGET_DIR"/release/deps/train-* | grep -v '\.d$' | head -1)
for round in $(seq "$ROUNDS"); do
  echo "# round $round" >&2
  PAI_NUM_THREADS="$THREADS" "$BIN" --steps "$STEPS"
  python benches/compare/peft_train_speed.py --steps "$STEPS" --threads "$THREADS"
done
