#!/usr/bin/env bash
# The GPU benchmarks, for a lent GPU machine only (never CI), under 5 minutes on one
# H200: the controller's cost per router call at Qwen3-30B-A3B shapes (128 experts,
# top-8, bf16 logits, 8K to 32K tokens) against native selection, and the ingestion
# path with the rank's share built on the device. Results go to $OUT (or ./gpu-results)
# as JSON, one file per case.
#
#     bash benchmarks/gpu.sh            # python3 with torch (CUDA), numpy, safetensors
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
out="${OUT:-gpu-results}"
mkdir -p "$out"
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
for tokens in 8192 16384 32768; do
    "$python" benchmarks/bench_controller.py --device cuda --dtype bfloat16 \
        --tokens "$tokens" --experts 128 --top-k 8 --json | tee "$out/router_$tokens.json"
done
"$python" benchmarks/bench_ingest.py --device cuda --rounds 3 --json | tee "$out/ingest.json"
