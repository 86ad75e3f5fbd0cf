#!/usr/bin/env bash
# Runs benches/compare_llm.py (kith against onnxruntime and llama.cpp on SmolLM2-135M)
# in .venv-bench, creating it on the first run: numpy, onnxruntime, tokenizers
# (benches/requirements-llm.txt) and llama-cpp-python built from source (a few
# minutes). All arguments go to compare_llm.py; see `benches/compare_llm.sh --help`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv-bench"
py="$venv/bin/python"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

if [ ! -x "$py" ]; then
  say "creating .venv-bench"
  python3 -m venv "$venv"
fi
if ! "$py" -c "import numpy, onnxruntime, tokenizers" 2>/dev/null; then
  say "installing benches/requirements-llm.txt into .venv-bench"
  "$py" -m pip install -q --disable-pip-version-check -r "$root/benches/requirements-llm.txt"
fi
if ! "$py" -c "import llama_cpp" 2>/dev/null; then
  say "building llama-cpp-python 0.3.36 from source (a few minutes)"
  export CMAKE_ARGS="-DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
  # ggml's AMX kernels crash (SIGILL) in this version: build without them on AMX CPUs.
  if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
    export CFLAGS="${CFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    export CXXFLAGS="${CXXFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  fi
  "$py" -m pip install -q --disable-pip-version-check llama-cpp-python==0.3.36
fi
exec "$py" "$root/benches/compare_llm.py" "$@"
