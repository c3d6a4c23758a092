# Source this: creates (once) and activates the reference-tools venv under $HOME/.cache, with
# llama-cpp-python built without AMX (its AMX kernels crash on these CPUs; see the notes), transformers,
# gguf and a CPU-capable torch. The llama-cpp-python wheel is cached so a rebuild costs nothing.
set -euo pipefail
VENV="${PAI_REF_VENV:-$HOME/.cache/pai-ref-venv}"
WHEELS="$HOME/.cache/pai-wheels"
LLAMA_CPP_VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
if ! python -c "import llama_cpp" 2>/dev/null; then
  mkdir -p "$WHEELS"
  if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $LLAMA_CPP_VERSION without AMX (about 8 minutes on 2 cores)" >&2
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
      -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
      -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF" \
      pip wheel --no-deps -w "$WHEELS" "llama-cpp-python==$LLAMA_CPP_VERSION" >&2
  fi
  pip install -q "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl diskcache jinja2 typing-extensions >&2
fi
python -c "import transformers, gguf, torch, numpy, accelerate, sentencepiece, peft" 2>/dev/null || pip install -q gguf numpy 'transformers>=4.45' torch accelerate sentencepiece peft >&2
