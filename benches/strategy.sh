#!/usr/bin/env bash
# Nightly strategies compared on the same corpus (issue 6): `fresh` (a new adapter from the base on
# every day, recency-weighted) against `continue` (yesterday's adapter, the new day plus a replay share).
#
# The corpus is this repository's own code at HEAD, split into two days: night 1 ingests model/ and
# datasets/ and trains a first adapter; night 2 ingests trainers/, src/ and benches/, then trains once
# each way with the same settings and time budget. Both are scored on the same holdout sample (every
# day's holdout split, as `pai-train train` measures it) and on general text the base model knows
# (tests/fixtures/perplexity.txt), for forgetting. Prints one JSON line per run and a summary.
#
#   benches/strategy.sh [--budget SECONDS] [--lr LR] [--keep DIR]
set -euo pipefail

budget=240
lr=5e-4
keep=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --budget) budget="$2"; shift 2 ;;
    --lr) lr="$2"; shift 2 ;;
    --keep) keep="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

root="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pai-target}"
cargo build --release --bin pai-train --manifest-path "$root/Cargo.toml" >&2
bin="$CARGO_TARGET_DIR/release/pai-train"

# The model from the usual home (the runs below get a PAI_HOME of their own).
export PAI_MODEL="${PAI_MODEL:-${PAI_HOME:-$HOME/.pai}/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
work="${keep:-$(mktemp -d)}"
mkdir -p "$work"
export PAI_HOME="$work/home"
rm -rf "$PAI_HOME" "$work/day1" "$work/day2" "$work/src"
mkdir -p "$PAI_HOME" "$work/day1" "$work/day2" "$work/src"
git -C "$root" archive HEAD | tar -x -C "$work/src"
cp -r "$work/src/model" "$work/src/datasets" "$work/day1/"
cp -r "$work/src/trainers" "$work/src/src" "$work/src/benches" "$work/day2/"
# Fixtures are other people's text (and the general-text probe): not the owner's code.
find "$work/day1" "$work/day2" -path '*fixtures*' -prune -exec rm -rf {} +
cat > "$PAI_HOME/pai.toml" <<EOF
[train]
learning_rate = $lr
eval_every = 10
eval_tokens = 4096
EOF

general="$root/tests/fixtures/perplexity.txt"
ppl() { # adapter dir or "" → perplexity of the general text
  if [[ -n "$1" ]]; then "$bin" perplexity --file "$general" --adapter "$1" --json; else "$bin" perplexity --file "$general" --json; fi
}

"$bin" ingest --source "$work/day1:code" --day 2026-01-01 --json > "$work/ingest1.json"
"$bin" train --day 2026-01-01 --strategy fresh --time-budget "$budget" --out "$work/night1" --json > "$work/night1.json"
"$bin" ingest --source "$work/day2:code" --day 2026-01-02 --json > "$work/ingest2.json"
"$bin" train --day 2026-01-02 --strategy fresh --time-budget "$budget" --out "$work/fresh" --json > "$work/fresh.json"
"$bin" train --day 2026-01-02 --strategy continue --from "$work/night1" --time-budget "$budget" --out "$work/continue" --json > "$work/continue.json"

ppl "" > "$work/general-base.json"
for run in night1 fresh continue; do
  ppl "$work/$run" > "$work/general-$run.json"
done
python3 - "$work" <<'EOF'
import json, sys, math
work = sys.argv[1]
load = lambda name: json.load(open(f"{work}/{name}.json"))
base = load("general-base")
for run in ["night1", "fresh", "continue"]:
    t, g = load(run)["metrics"], load(f"general-{run}")
    row = {
        "run": run,
        "steps": t.get("steps"),
        "train_tokens": t.get("tokens"),
        "initial_holdout_loss": t.get("initial_holdout_loss"),
        "best_holdout_loss": t.get("best_holdout_loss"),
        "best_holdout_ppl": math.exp(t["best_holdout_loss"]) if t.get("best_holdout_loss") else None,
        "general_ppl": g.get("perplexity"),
        "general_change": g.get("perplexity") / base.get("perplexity") - 1,
    }
    print(json.dumps(row))
EOF
