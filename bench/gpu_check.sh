#!/usr/bin/env bash
# The prepared GPU check (issues: performance, distributed engines), for one H100 or H200, in at most 9 minutes. It
# uses only the repository and the machine's own python3 (torch, transformers, accelerate); nothing is downloaded.
#   1. the loss benchmark at Qwen2.5 shapes (V = 151,936; student 896, teacher 3584 wide) at N = 8,192 under bf16
#      autocast: chunked and fused against the naive dense twin (memory and time ratios, gradient agreement);
#   2. one EGAD training step of a Qwen2.5-0.5B-shaped student with a 1.5B-shaped teacher, both from configs, head fused
#      and not: tokens/s and peak memory;
#   3. the losses' compiled kernels (Triton) against eager PyTorch at one Qwen2.5 chunk (bench/loss_kernels.py);
#   4. a short bf16 run of configs/tiny.yaml on 1 GPU under DeepSpeed ZeRO-3 and under FSDP2 (teacher sharded): the
#      engine each run logs, its loss curve and its time (ZeRO-3 is skipped, with the reason, without deepspeed).
# Writes its logs under $OUT (the device tool's output folder) or /tmp/egad-gpu-check.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/egad-gpu-check}"
mkdir -p "$out"
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))" \
    | tee "$out/device.txt"
timeout 240 python3 bench/loss_memory.py --device cuda --tokens 8192 --trl-tokens --autocast 2>&1 | tee "$out/loss_memory.txt"
timeout 120 python3 bench/gpu_step.py --device cuda 2>&1 | tee "$out/gpu_step.txt"
timeout 60 python3 bench/loss_kernels.py --device cuda --rows 110 --vocab 151936 --calls 10 2>&1 | tee "$out/loss_kernels.txt"
run_engine() {  # $1: name, $2: accelerate config
    local dir="$out/engine-$1"
    rm -rf "$dir"
    /usr/bin/time -f "$1: %e s wall" timeout 60 python3 -m accelerate.commands.launch --config_file "$2" \
        --num_processes 1 --mixed_precision bf16 -m egad.cli train -c configs/tiny.yaml --train.max_steps 10 \
        --train.log_every 2 --train.eval_every 0 --train.save_every 0 --train.calib_examples 64 \
        --data.max_train_examples 800 --data.max_dev_examples 16 --train.output_dir "$dir" 2>&1 | tail -5
    python3 -c "import json,sys; rows=[json.loads(l) for l in open(sys.argv[1])]; \
print(sys.argv[2], 'engine:', rows[0].get('engine'), 'teacher:', rows[0].get('teacher_placement'), \
'loss:', [round(r['loss'], 3) for r in rows if 'loss' in r])" "$dir/metrics.jsonl" "$1"
}
{
    if python3 -c "import deepspeed" 2>/dev/null; then
        run_engine zero3 configs/accelerate/deepspeed_zero3.yaml
    else
        echo "zero3: skipped, deepspeed is not installed on this machine"
    fi
    run_engine fsdp2 configs/accelerate/fsdp.yaml
} 2>&1 | tee "$out/engines.txt"
