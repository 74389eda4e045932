#!/usr/bin/env bash
# Tensor parallel on two GPUs, in one device call (nvidia-h200-x2, <= 10 min). Run from the repo root.
#
#   bash scripts/tp_check.sh                       # results in $OUT (or /tmp/tp_check_out)
#   LAYERS=32 bash scripts/tp_check.sh             # the full-depth Llama-2-7B shape (default 16 layers)
#   WHEELS=path/to/wheels bash scripts/tp_check.sh # installs fastapi/uvicorn/... from there for api_server
#
# For each shape: a random-weight HF checkpoint (built on the GPU), converted with --tp 1 and --tp 2 in fp16
# and int4 (RTN); the tp=2 workspaces pushed to a file:// registry; `serve api_server NAME:TAG --tp 2`
# started from the registry (each rank pulls only its own files; its log shows the bytes); a torchrun-style
# launch (RANK/WORLD_SIZE env, one cache per "node") of `generate` from the registry; and
# scripts/tp_equality.py (run first, after the push): bf16 logits and greedy tokens tp=2 vs tp=1, decode
# bs1 latency, 256-request throughput, with NCCL and with the one-shot all-reduce. Stages past BUDGET
# seconds are skipped so that $OUT always comes back.
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1   # no NVLink multicast on the lent machines
out=${OUT:-/tmp/tp_check_out}
work=${WORK:-/tmp/tp_check}
LAYERS=${LAYERS:-16}          # Llama-2-7B shape depth
LAYERS3=${LAYERS3:-8}         # Llama-3-8B (GQA) shape depth, run if time is left
BUDGET=${BUDGET:-480}         # seconds after which optional stages are skipped
STAGES=${STAGES:-equality,serve,launched,int4,throughput,llama3}   # the optional stages to run
mkdir -p "$out" "$work"
export LMDEPOT_REGISTRY=file://$work/registry LMDEPOT_CACHE=$work/cache LMDEPOT_PROGRESS=0
log=$out/tp_check.log
lm() { python -m lmdepot.cli "$@"; }
stage() { echo "== +${SECONDS}s $*" | tee -a "$log"; }
have_time() {  # stage-name description...: in STAGES and within BUDGET
  [[ ",$STAGES," == *",$1,"* ]] || return 1
  [ "$SECONDS" -lt "$BUDGET" ] || { stage "skipped (budget): $*"; return 1; }
}

EQ_ARGS=${EQ_ARGS:-}            # AFTER_PUSH: a command run once the workspaces are pushed           # extra tp_equality.py options (a CPU dry run: TP_CHECK_TINY=1 EQ_ARGS="--requests 8")
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
python -c "import torch; print('torch', torch.__version__, 'gpus', torch.cuda.device_count())" | tee -a "$log"
if [ -n "${WHEELS:-}" ]; then
  pip install -q --no-index --find-links "$WHEELS" fastapi uvicorn pydantic platformdirs prometheus-client 2>&1 | tail -2
fi

build() {  # shape layers dir
  python - "$1" "$2" "$3" <<'EOF'
import sys, time
from pathlib import Path
import os
from lmdepot.bench.models import random_checkpoint
from lmdepot.bench.shapes import SHAPES
if os.environ.get("TP_CHECK_TINY"):  # a CPU dry run of this script: the shapes at 1/32 of the width
    for s in SHAPES.values():
        s.update(hidden_size=128, intermediate_size=s["intermediate_size"] // 32, vocab_size=s["vocab_size"] // 32)
t = time.perf_counter()
random_checkpoint(sys.argv[1], Path(sys.argv[3]), int(sys.argv[2]))
print(f"built {sys.argv[1]} x {sys.argv[2]} layers in {time.perf_counter() - t:.0f} s")
EOF
}

convert_all() {  # dir: the four workspaces at once (the converter is mostly I/O and CPU)
  local d=$1
  lm convert "$d/hf" --dst-path "$d/fp16-tp1" --tp 1 > "$d/c1.log" 2>&1 &
  lm convert "$d/hf" --dst-path "$d/fp16-tp2" --tp 2 > "$d/c2.log" 2>&1 &
  lm lite auto_awq "$d/hf" --method rtn --tp 2 --dst-path "$d/int4-tp2" > "$d/c3.log" 2>&1 &
  [[ ",$STAGES," == *",int4,"* ]] && lm lite auto_awq "$d/hf" --method rtn --tp 1 --dst-path "$d/int4-tp1" > "$d/c4.log" 2>&1 &
  wait
  tail -qn1 "$d"/c[1-4].log 2>/dev/null | tee -a "$log"
}

serve_tp2() {  # ref: api_server --tp 2 from the registry, one completion, the per-rank pull lines
  local ref=$1 port=$2 name=${1//[:\/]/_}
  if ! python -c "import fastapi, uvicorn" 2>/dev/null; then
    stage "api_server skipped: fastapi/uvicorn not installed (set WHEELS=...)"; return
  fi
  # python itself in the background (not the lm function), so that $! is the server's pid
  python -m lmdepot.cli serve api_server "$ref" --tp 2 --model-name tp --server-port "$port" --server-name 127.0.0.1 \
    > "$out/serve_$name.log" 2>&1 &
  local pid=$!
  # wait for /health (or the server's death), then one greedy completion; urllib: curl may be absent
  python - "$port" "$pid" > "$out/serve_$name.json" <<'EOF'
import json, os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
base = f"http://127.0.0.1:{port}"
for _ in range(480):
    try:
        urllib.request.urlopen(base + "/health", timeout=2)
        break
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            sys.exit("server exited")
        time.sleep(0.5)
body = {"model": "tp", "prompt": "w5 w6 w7 w8", "max_tokens": 16, "temperature": 0}
req = urllib.request.Request(base + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
print(urllib.request.urlopen(req, timeout=120).read().decode())
EOF
  kill -INT $pid 2>/dev/null   # drains, closes the engine: rank 1 exits with it
  for _ in $(seq 30); do kill -0 $pid 2>/dev/null || break; sleep 1; done
  kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
  grep -Ei "^\[lmdepot\] rank|serving|error" "$out/serve_$name.log" | tee -a "$log"
  head -c 600 "$out/serve_$name.json" | tee -a "$log"; echo | tee -a "$log"
}

launched_tp2() {  # ref: torchrun-style, two "nodes" with their own caches, generate from the registry
  local ref=$1 port=$2 name=${1//[:\/]/_}
  rm -rf "$work/node0" "$work/node1"
  for r in 0 1; do
    RANK=$r LOCAL_RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port LMDEPOT_CACHE=$work/node$r \
      python -m lmdepot.cli generate "$ref" --prompt "w5 w6 w7 w8" --no-chat-template --temperature 0 \
      --max-new-tokens 16 > "$out/launch_${name}_rank$r.out" 2> "$out/launch_${name}_rank$r.err" &
  done
  wait
  for r in 0 1; do
    grep -E "^\[lmdepot\] rank|^error" "$out/launch_${name}_rank$r.err" | tee -a "$log"
    echo "node$r cache: $(du -sb "$work/node$r/blobs" | cut -f1) bytes of blobs;" \
      "weights: $(ls "$work"/node$r/snapshots/*/*/weights | tr '\n' ' ')" | tee -a "$log"
  done
  echo "rank 0 output: $(cat "$out/launch_${name}_rank0.out")" | tee -a "$log"
}

shape_run() {  # shape layers
  local shape=$1 layers=$2 d=$work/$1 port=$3
  stage "$shape x $layers layers: build"; build "$shape" "$layers" "$d/hf" 2>&1 | tail -1 | tee -a "$log"
  stage "$shape: convert fp16/int4 x tp1/tp2"; convert_all "$d"
  rm -rf "$d/hf"   # disk: the workspaces are what the rest needs
  stage "$shape: push tp=2 workspaces"
  lm registry push "$d/fp16-tp2" "$shape:fp16-tp2" 2>&1 | tail -1 | tee -a "$log"
  lm registry push "$d/int4-tp2" "$shape:int4-tp2" 2>&1 | tail -1 | tee -a "$log"
  eval "${AFTER_PUSH:-}"   # e.g. wait for another job sharing the GPUs before the timed stages
  have_time equality "$shape fp16 equality" && {
    stage "$shape: tp_equality fp16 weights, bf16 compute, all-reduce by NCCL then by the fused all-reduce + norm"
    python scripts/tp_equality.py --tp1 "$d/fp16-tp1" --tp2 "$d/fp16-tp2" --allreduce nccl,fused \
      --json "$out/tp_equality_${shape}_fp16.json" $EQ_ARGS 2>> "$log" | grep summary | tee -a "$log"; }
  have_time serve "$shape serve" && { stage "$shape: serve api_server $shape:fp16-tp2 --tp 2"; serve_tp2 "$shape:fp16-tp2" "$port"; }
  have_time launched "$shape launched" && { stage "$shape: torchrun-style launch of $shape:int4-tp2"; launched_tp2 "$shape:int4-tp2" $((port + 1)); }
  have_time int4 "$shape int4 equality" && {
    stage "$shape: tp_equality int4 (RTN) weights"
    python scripts/tp_equality.py --tp1 "$d/int4-tp1" --tp2 "$d/int4-tp2" --no-speed \
      --json "$out/tp_equality_${shape}_int4.json" $EQ_ARGS 2>> "$log" | grep summary | tee -a "$log"; }
  have_time throughput "$shape bench throughput" && {   # the project's own benchmark, 256 requests, tp1 then tp2
    stage "$shape: lmdepot bench throughput, fp16 tp1 vs tp2"
    for t in 1 2; do
      lm bench throughput --model "$d/fp16-tp$t" --json "$out/bench_throughput_${shape}_fp16_tp$t.json" 2>> "$log" \
        | tail -3 | tee -a "$log"
    done; }
}

shape_run llama2-7b "$LAYERS" 23456
have_time llama3 "llama3-8b" && { rm -rf "$work/llama2-7b"; LAYERS=$LAYERS3; BUDGET=$((BUDGET + 90)); shape_run llama3-8b "$LAYERS3" 23466; }
stage "done"
