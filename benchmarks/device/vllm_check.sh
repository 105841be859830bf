#!/usr/bin/env bash
# The vLLM runtime on the lent GPU, in the run that carries the last part of vLLM's wheels
# (benchmarks/device/vllm_wheels.py made them and parts.sha256; the earlier runs of the same warm
# machine left the other parts in .vllm/): checks and reassembles the parts, installs them with
# .whl's, then
#   1. the machine (as check.sh's step 1), then vLLM's import, its version and the GPU;
#   2. runs the vLLM GPU test: two engines packed under one GPU budget, the evicted one asleep
#      (level 1, weights in host RAM), woken by its next request with the same greedy output,
#      the ledger against NVML, and the wake time;
#   3. benchmarks/vllm_throughput.py: tokens/s through mmserver against the same engine direct.
# Logs under $OUT, exit statuses in $OUT/summary.txt, the servers' logs in $OUT/server-logs.tgz,
# sized to end within 465 s after the install; exits non-zero if a step failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
. benchmarks/device/lib.sh
parts=(.vllm/*/part-*)
echo "vLLM wheels: ${#parts[@]} parts" | tee -a "$summary"
sha256sum --quiet -c .vllm/*/parts.sha256 2>&1 | tee -a "$summary" \
  || { echo "vllm parts: missing or damaged (each earlier carry run must have kept the machine warm)" | tee -a "$summary"; exit 1; }
rm -rf /tmp/vllm-wheels && mkdir -p /tmp/vllm-wheels
cat "${parts[@]}" | tar -x -C /tmp/vllm-wheels || { echo "vllm parts: cannot be unpacked" | tee -a "$summary"; exit 1; }
install_wheels .whl/*.whl /tmp/vllm-wheels/*.whl
# FlashInfer is not carried: vLLM's sampler must not try to import it (its default on CUDA)
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_HOST_IP=127.0.0.1 VLLM_USE_FLASHINFER_SAMPLER=0
step machine 45 machine
step vllm-import 60 python3 -c "import torch, vllm; print(vllm.__version__, torch.__version__, torch.cuda.get_device_name())"
step vllm-gpu-test 240 pytest_gpu tests/test_vllm_runtime.py
step vllm-throughput 120 python3 benchmarks/vllm_throughput.py --rounds 1 --tokens 128 \
  --server-log /tmp/pt/vllm-throughput/server.log
finish
