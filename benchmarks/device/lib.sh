# Shared by check.sh and vllm_check.sh (sourced, run on the lent GPU machine from the repository root).
OUT=${OUT:?set OUT to a folder for the logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
summary="$OUT/summary.txt"
touch "$summary"

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, record the exit status
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  echo "$name: exit $status in $((SECONDS - started)) s" | tee -a "$summary"
  tail -n 15 "$OUT/$name.log"
}

install_wheels() {  # install_wheels WHEEL...: the carried wheels, then mmserver and its runtimes, into /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@" \
    && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target /tmp/site \
      . runtimes/sklearn runtimes/transformers runtimes/vllm \
    || { echo "install: failed" | tee -a "$summary"; exit 1; }
  export PYTHONPATH=/tmp/site
}
