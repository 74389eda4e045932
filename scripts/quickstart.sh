#!/usr/bin/env bash
# The main job on the embedded default model: convert SmolLM2-135M-Instruct to a workspace, push it
# to the local registry as smollm2-135m:latest, pull it back by tag and answer one chat turn.
set -euo pipefail
venv=${VENV:-.venv}
lmdepot="$venv/bin/lmdepot"
ws=${WORKSPACE:-ws/smollm2-135m}
export LMDEPOT_REGISTRY=${LMDEPOT_REGISTRY:-$PWD/ws/registry}

step() { printf '\n== %s\n' "$*" >&2; }
step "convert (the GGUF is dequantized once and cached)"
"$lmdepot" convert smollm2-135m --dst-path "$ws" --force
"$lmdepot" inspect "$ws" --verify | tail -n 3
step "push to the registry at $LMDEPOT_REGISTRY"
"$lmdepot" registry push "$ws" smollm2-135m:latest
"$lmdepot" registry tags smollm2-135m
step "pull smollm2-135m:latest and chat"
"$lmdepot" generate smollm2-135m:latest --prompt "What is the capital of France? Answer in one sentence." \
  --temperature 0 --max-new-tokens 48 --stats
