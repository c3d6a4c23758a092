#!/usr/bin/env bash
# The README's first command: one real night of pai on this machine. Fetches the default model, builds
# the binaries, ingests a folder (the example notes in examples/notes, or the one you name), trains an
# adapter on it, evaluates it against the bare model, promotes it if it wins, writes the report, and
# prints where the report is and how to chat with the result.
# Usage: scripts/quickstart.sh [DIR[:notes|code|chat]]
#   With no folder, the example notes go into their own home ($HOME/.cache/pai-quickstart, or
#   $PAI_HOME if set) so that your own ~/.pai stays untouched; with a folder, into $PAI_HOME (~/.pai).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pai-target}"
started=$(date +%s)
model="$(scripts/fetch-model.sh)"
source_arg="${1:-}"
if [ -z "$source_arg" ]; then
  source_arg="$PWD/examples/notes:notes"
  export PAI_HOME="${PAI_HOME:-$HOME/.cache/pai-quickstart}"
  # Small-corpus settings (a variable already set wins).
  while IFS='=' read -r key value; do
    case "$key" in ''|'#'*) continue ;; esac
    if [ -z "${!key:-}" ]; then export "$key=$value"; fi
  done < examples/notes.env
fi
home="${PAI_HOME:-$HOME/.pai}"
echo "quickstart: building pai (release; the first build takes a while)" >&2
cargo build --release -q -p pai --bin pai-train --bin pai-serve
bin="$CARGO_TARGET_DIR/release"
# The folder goes into pai.toml (so later nights and `pai-train schedule` read it too), unless a
# pai.toml is already there: then it is added for this run only, if it is not among its sources.
extra=()
if [ ! -f "$home/pai.toml" ]; then
  "$bin/pai-train" init --source "$source_arg"
elif ! grep -qF "\"${source_arg%:*}\"" "$home/pai.toml"; then
  extra=(--source "$source_arg")
fi
code=0
"$bin/pai-train" nightly "${extra[@]+"${extra[@]}"}" --model "$model" || code=$?
took=$(( $(date +%s) - started ))
report="$home/reports/index.html"
cat <<MSG

quickstart: done in ${took}s (exit code $code: 0 promoted or nothing to learn, 3 the candidate lost to the bare model).
  report:  $report
  status:  PAI_HOME=$home $bin/pai-train status
  chat:    PAI_HOME=$home $bin/pai-serve serve --model $model
           then, from another terminal:
           curl -s localhost:8080/v1/chat/completions -H 'content-type: application/json' \\
             -d '{"model": "personal", "messages": [{"role": "user", "content": "How do I feed the starter?"}]}'
  nightly: PAI_HOME=$home $bin/pai-train schedule --print-crontab
MSG
exit "$code"
