#!/usr/bin/env bash
# The prepared GPU check (issues: performance, distributed engines), for one H200, in at most 8 minutes. It uses only
# the repository and the machine's own python3 (torch, transformers, accelerate); nothing is downloaded.
#   1. the loss benchmark at Qwen2.5 shapes (V = 151,936; student 896, teacher 3584 wide) at N = 8,192 under bf16
#      autocast: chunked and fused against the naive dense twin (memory and time ratios, gradient agreement);
#   2. one EGAD training step of a Qwen2.5-0.5B-shaped student with a 1.5B-shaped teacher, both from configs, head fused
#      and not: tokens/s and peak memory.
# Writes its logs under $OUT (the device tool's output folder) or /tmp/egad-gpu-check.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/egad-gpu-check}"
mkdir -p "$out"
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))" \
    | tee "$out/device.txt"
timeout 300 python3 bench/loss_memory.py --device cuda --tokens 8192 --trl-tokens --autocast 2>&1 | tee "$out/loss_memory.txt"
timeout 150 python3 bench/gpu_step.py --device cuda 2>&1 | tee "$out/gpu_step.txt"
