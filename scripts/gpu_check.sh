#!/usr/bin/env bash
# One device call: GPU kernel tests at real sizes, then the kernel benchmark. Run from the repo root.
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python -m pytest tests/kernels -q -p no:cacheprovider 2>&1 | tail -15
python -m lmdepot.cli bench kernels | tee "${OUT:-.}/bench_kernels.txt"
