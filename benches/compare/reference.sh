#!/usr/bin/env bash
# Regenerate tests/fixtures/reference.json from llama.cpp and transformers (see reference.py).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck disable=SC1091
source "$here/env.sh"
exec python "$here/reference.py" "$@"
