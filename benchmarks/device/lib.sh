# Shared by check.sh and vllm_check.sh (sourced, run on the lent GPU machine from the repository root).
OUT=${OUT:?set OUT to a folder for the logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
summary="$OUT/summary.txt"
touch "$summary"
failures=0

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, record the exit status
  local name=$1 limit=$2
  shift 2
  if declare -F "$1" > /dev/null; then  # a function of this file: in a shell of its own, under the timeout
    set -- bash -c "$(declare -f "$1"); \"\$@\"" "$1" "$@"
  fi
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  [ "$status" -eq 0 ] || failures=$((failures + 1))
  echo "$name: exit $status in $((SECONDS - started)) s" | tee -a "$summary"
  tail -n 15 "$OUT/$name.log"
}

machine() {  # what the later steps depend on: the GPU, versions, the environment, unmet requirements
  nvidia-smi || echo "nvidia-smi: exit $?"
  python3 -c "import torch, pynvml, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), 'transformers', transformers.__version__)"
  python3 -m pip show nvidia-ml-py typing_extensions pydantic 2>/dev/null | grep -E '^(Name|Version|Location)'
  env | grep -E '^(PYTORCH|CUDA|VLLM|NCCL)' || true
  python3 -m pip check || true  # (the image may have unmet optional requirements of its own)
}

pytest_gpu() {  # pytest_gpu TEST_FILE...: the tests marked gpu, their servers' logs kept under /tmp/pt
  python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="-ra -s" --basetemp=/tmp/pt "$@"
}

finish() {  # the servers' logs in one archive (at most 8 files come back), the summary, the verdict
  if [ -d /tmp/pt ]; then
    find /tmp/pt -name '*.log' -print0 | tar czf "$OUT/server-logs.tgz" --null -T - 2>/dev/null
  fi
  cat "$summary"
  exit "$failures"
}

install_wheels() {  # install_wheels WHEEL...: the carried wheels, then mmserver and its runtimes, into /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@" \
    && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target /tmp/site \
      . runtimes/sklearn runtimes/transformers runtimes/vllm \
    || { echo "install: failed" | tee -a "$summary"; exit 1; }
  export PYTHONPATH=/tmp/site
}
