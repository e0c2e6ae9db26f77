#!/usr/bin/env bash
# The first run on a GPU, as one prepared command (bench/gpu_check.py says what it measures):
#   bench/gpu_check.sh              # eager and compiled, a random ~1.1B Llama in bf16, <= 8 minutes
#   bench/gpu_check.sh --tiny       # seconds on the CPU (CI runs this so the script cannot rot)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
if [[ " $* " == *" --tiny "* ]]; then
  exec timeout 480 .venv/bin/python bench/gpu_check.py "$@"
fi
exec timeout 480 .venv/bin/python bench/gpu_check.py --compile "$@"
