#!/usr/bin/env bash
# The GPU checks of the memory manager and the transformers runtime, in one run on the lent
# machine (the `device` tool), after benchmarks/device/wheels.sh has filled .whl/ here:
#
#   run(command="bash benchmarks/device/check.sh", carry=[".whl"], timeout_s=480)
#
# (first on a fresh machine, then vllm_check.sh's chain of carry runs: see the README's "On a
# lent GPU"). Steps, logs under $OUT, each step's exit status in $OUT/summary.txt, the servers'
# logs in $OUT/server-logs.tgz, sized to end within 455 s; exits non-zero if a step failed:
#   1. the machine: nvidia-smi, torch, NVML and pydantic versions, CUDA/vLLM environment, pip check;
#   2. the GPU tests: fp16 placement and measured sizes, offload/restore through page-locked
#      host memory (and its buffer alone), and the memory scenario through HTTP with NVML as the
#      judge (pytest -m gpu);
#   3. benchmarks/host_tier.py: offload, restore (one transfer against a tensor at a time) and
#      release of ~1 GiB of Llama-shaped tensors through page-locked host memory;
#   4. benchmarks/memory_swap.py on CUDA: swap-in from the host tier and from disk against their
#      baselines, a Zipf stream over 3x more ~1 GB models than fit, NVML back to baseline.
# MEMORY_SWAP_ARGS overrides step 4's arguments; a local dry run (no GPU, nothing carried):
#   OUT=/tmp/out MEMORY_SWAP_ARGS="--device cpu --model-mib 16 --models 6 --minutes 0.1" bash benchmarks/device/check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
. benchmarks/device/lib.sh
if ls .whl/*.whl > /dev/null 2>&1; then
  install_wheels .whl/*.whl
fi
step machine 45 machine
step gpu-tests 150 pytest_gpu tests/test_host_copy.py tests/test_transformers_runtime.py tests/test_memory_scenario.py
step host-tier 60 python3 benchmarks/host_tier.py --mib 1024
# shellcheck disable=SC2086  # the arguments are meant to split
step memory-swap 200 python3 benchmarks/memory_swap.py --server-log /tmp/pt/memory-swap/server.log \
  ${MEMORY_SWAP_ARGS:---device cuda --model-mib 1024 --models 6 --minutes 1}
finish
