#!/usr/bin/env bash
# Build pai with the `cuda` feature on a machine without a CUDA toolkit: NVIDIA's PyPI wheels give nvcc,
# its crt headers, nvvm (cicc), the runtime headers and CCCL (CUDA 13.x), unpacked once under
# ~/.cache/pai-cuda-toolkit. No GPU is needed to build; cudarc loads the driver's libraries at run time.
#   scripts/build-cuda.sh [--compute-cap 90] [cargo build arguments…]   (default: -p pai-model)
set -euo pipefail
cd "$(dirname "$0")/.."
cap="${CUDA_COMPUTE_CAP:-90}"
if [ "${1:-}" = "--compute-cap" ]; then cap="$2"; shift 2; fi
toolkit="${PAI_CUDA_TOOLKIT:-$HOME/.cache/pai-cuda-toolkit}"
root="$toolkit/nvidia/cu13"
if [ ! -x "$root/bin/nvcc" ] || [ ! -x "$root/nvvm/bin/cicc" ]; then
  wheels="$(mktemp -d)"
  trap 'rm -rf "$wheels"' EXIT
  # One toolkit release for all parts (nvcc alone lacks crt/, nvvm and the runtime headers).
  version=13.5.37
  python3 -m pip download -q --no-deps -d "$wheels" "nvidia-cuda-nvcc==$version" \
    "nvidia-cuda-crt==$version" "nvidia-nvvm==$version" "nvidia-cuda-runtime==$version" nvidia-cuda-cccl
  mkdir -p "$toolkit"
  for w in "$wheels"/*.whl; do
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$toolkit"
  done
  chmod +x "$root"/bin/* "$root"/nvvm/bin/*
fi
# cudarc 0.19 knows CUDA up to 13.4; the 13.x API it binds is the same, so build against 13.2's.
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13020}"
export CUDA_ROOT="$root" CUDA_PATH="$root" PATH="$root/bin:$PATH" CUDA_COMPUTE_CAP="$cap"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pai-cuda-target}"
"$root/bin/nvcc" --version | tail -n 1 >&2
if [ $# -eq 0 ]; then set -- -p pai-model; fi
cargo build --features cuda "$@"
