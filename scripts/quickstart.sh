#!/usr/bin/env bash
# The main job on the embedded default model: convert SmolLM2-135M to a tp=3 workspace and inspect it.
set -euo pipefail
venv=${VENV:-.venv}
lmdepot="$venv/bin/lmdepot"
ws=${WORKSPACE:-ws/smollm2-135m}
"$lmdepot" convert smollm2-135m --tp 3 --dst-path "$ws" --force
"$lmdepot" inspect "$ws" --verify
