#!/usr/bin/env bash
# The vLLM runtime on the lent GPU, in the run that carries the last part of vLLM's wheels
# (benchmarks/device/vllm_wheels.py made them; the earlier runs of the same warm machine left
# the other parts in .vllm/): reassembles and installs them with .whl's, then
#   1. imports vLLM and reports its version and the GPU;
#   2. runs the vLLM GPU test: two engines packed under one GPU budget, the evicted one asleep
#      (level 1, weights in host RAM), woken by its next request with the same greedy output,
#      the ledger against NVML, and the wake time;
#   3. benchmarks/vllm_throughput.py: tokens/s through mmserver against the same engine direct.
# Logs under $OUT, exit statuses in $OUT/summary.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
. benchmarks/device/lib.sh
parts=(.vllm/*/part-*)
echo "vLLM wheels: ${#parts[@]} parts" | tee -a "$summary"
rm -rf /tmp/vllm-wheels && mkdir -p /tmp/vllm-wheels
cat "${parts[@]}" | tar -x -C /tmp/vllm-wheels || { echo "vllm parts: incomplete" | tee -a "$summary"; exit 1; }
install_wheels .whl/*.whl /tmp/vllm-wheels/*.whl
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_HOST_IP=127.0.0.1
step vllm-import 120 python3 -c "import torch, vllm; print(vllm.__version__, torch.__version__, torch.cuda.get_device_name())"
step vllm-gpu-test 420 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="-ra -s" tests/test_vllm_runtime.py
step vllm-throughput 300 python3 benchmarks/vllm_throughput.py --rounds 2
cat "$summary"
