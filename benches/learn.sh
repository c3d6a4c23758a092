#!/usr/bin/env bash
# Learning for real (issue 6): one training run on this repository's own code and docs — a "personal"
# corpus the base model has never seen — within a time budget on the CPU. Reports the holdout
# perplexity before and after (the holdout split `pai-train train` measures), and the perplexity of a
# general text the base knew (tests/fixtures/perplexity.txt), for forgetting, and the change on the
# gate's retention guards (prose and code) as training measured them.
#
# The corpus is `git archive HEAD` with fixtures removed (other people's text, and the general-text
# probe): Markdown ingested as notes, everything else as code.
#
#   benches/learn.sh [--budget SECONDS] [--lr LR] [--keep DIR]
set -euo pipefail

budget=840
lr=2e-4   # the default `train.learning_rate`: what a user gets
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
# The release binary, as users run it (a time-budgeted run counts steps, and the dev build's are
# slower).
cargo build --release --bin pai-train --manifest-path "$root/Cargo.toml" >&2
bin="$CARGO_TARGET_DIR/release/pai-train"

export PAI_MODEL="${PAI_MODEL:-${PAI_HOME:-$HOME/.pai}/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
work="${keep:-$(mktemp -d)}"
mkdir -p "$work"
export PAI_HOME="$work/home"
rm -rf "$PAI_HOME" "$work/code" "$work/notes" "$work/adapter"
mkdir -p "$PAI_HOME" "$work/code" "$work/notes"
git -C "$root" archive HEAD | tar -x -C "$work/code"
find "$work/code" -path '*fixtures*' -prune -exec rm -rf {} +
# The retention guards' own corpora: training on them would hide the forgetting they measure.
rm -f "$work/code/configs/evals/"*.txt
(cd "$work/code" && find . -name '*.md' -print0 | xargs -0 -I{} sh -c 'mkdir -p "$0/$(dirname "{}")" && mv "{}" "$0/{}"' "$work/notes")
cat > "$PAI_HOME/pai.toml" <<EOF
[train]
learning_rate = $lr
eval_every = 10
eval_tokens = 4096
EOF

general="$root/tests/fixtures/perplexity.txt"
"$bin" ingest --source "$work/code:code" --source "$work/notes:notes" --day 2026-01-01 --json > "$work/ingest.json"
"$bin" perplexity --file "$general" --json > "$work/general-base.json"
start=$(date +%s)
/usr/bin/time -v "$bin" train --day 2026-01-01 --time-budget "$budget" --max-steps 100000 \
  --out "$work/adapter" --json > "$work/train.json" 2> "$work/train.time"
wall=$(( $(date +%s) - start ))
"$bin" perplexity --file "$general" --adapter "$work/adapter" --json > "$work/general-adapter.json"
python3 - "$work" "$wall" <<'EOF'
import json, math, re, sys
work, wall = sys.argv[1], int(sys.argv[2])
load = lambda name: json.load(open(f"{work}/{name}.json"))
t = load("train")["metrics"]
base, after = load("general-base")["perplexity"], load("general-adapter")["perplexity"]
rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{work}/train.time").read())
print(json.dumps({
    "steps": t.get("steps"),
    "stop": t.get("stop"),
    "train_tokens": t.get("tokens"),
    "holdout_ppl_before": math.exp(t["initial_holdout_loss"]),
    "holdout_ppl_after": math.exp(t["best_holdout_loss"]),
    "holdout_change": math.exp(t["best_holdout_loss"] - t["initial_holdout_loss"]) - 1,
    "best_step": t.get("best_step"),
    "general_ppl_before": base,
    "general_ppl_after": after,
    "general_change": after / base - 1,
    # The gate's retention guards as the trainer measured them: the kept checkpoint's perplexity
    # change on each guard's items (prose, code), against the base.
    "guard_changes": {
        name: math.exp(t["best_retention_loss"][name] - ref) - 1
        for name, ref in (t.get("reference_retention_loss") or {}).items()
        if name in (t.get("best_retention_loss") or {})
    },
    "train_wall_s": wall,
    "peak_rss_mb": int(rss.group(1)) / 1024 if rss else None,
}))
EOF
