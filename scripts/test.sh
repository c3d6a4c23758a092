#!/usr/bin/env bash
# The project's test command (README "Quick start"; .ci/run calls exactly this).
# Fetches the default model (and Debian's Chromium, for the report viewer's browser test) if missing,
# then checks formatting and lints and runs every test.
# Build outputs go to $CARGO_TARGET_DIR (default ~/.cache/pai-target) so repeated runs reuse them.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pai-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

scripts/fetch-model.sh >/dev/null
scripts/fetch-chromium.sh
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
else
  echo "test.sh: rustfmt is not installed; skipping the format check" >&2
fi
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --workspace --all-targets --locked -- -D warnings
else
  echo "test.sh: clippy is not installed; skipping lints" >&2
fi
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked --lib --bins --tests 2>&1 | tee "$log" || status=$?
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
[ "$status" -eq 0 ] || exit "$status"
# Interoperability: an adapter pai trains, loaded by PEFT onto the same base and exported to llama.cpp's
# LoRA GGUF, moves the logits as in pai (the reference tools' venv is built once under ~/.cache).
if [ -z "${PAI_SKIP_INTEROP_CHECK:-}" ]; then
  benches/compare/interop_check.sh
  echo "interop check (PEFT, llama.cpp): passed"
fi
# pai-serve on a socket, as the official openai Python SDK and curl see it.
if [ -z "${PAI_SKIP_SDK_CHECK:-}" ]; then
  benches/compare/openai_sdk_check.sh
fi
# The router against real peers on loopback (llama.cpp's server, a second pai-serve, failing tiers):
# fallbacks, the privacy gate, /metrics and the egress ledger.
if [ -z "${PAI_SKIP_ROUTER_CHECK:-}" ]; then
  benches/compare/router_check.sh
fi
