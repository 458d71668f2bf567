#!/usr/bin/env bash
# The one script a session with a lent GPU runs (the device tool: `bash benchmarks/gpu_check.sh`):
# build the extension for sm_90, run the CUDA tests, a compute-sanitizer pass on small shapes,
# then the GPU benchmarks. Every step has its own time limit and the script goes on after a
# failure, so one broken step still leaves the others' results. Logs and JSON land in $OUT
# (default: gpu_check_out/), a summary of exit codes in $OUT/summary.txt.
#   STEPS="build tests sanitize attention gumbel sampling" (default: all, in that order)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
STEPS=${STEPS:-build tests sanitize attention gumbel sampling}
PY=${PYTHON:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local start=$SECONDS
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
"$PY" -c "import torch; print(torch.__version__, torch.version.cuda)" >> "$OUT/gpu.txt" 2>&1

step build 240 env CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16} \
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} DALLE_FAST_CUDA=1 \
  "$PY" -m pip install --no-build-isolation --no-deps -e .
step tests 240 bash -c "'$PY' -m pytest -q -p no:cacheprovider tests/ops/test_attention_cuda.py; a=\$?; \
  '$PY' -m pytest -q -p no:cacheprovider tests/ops/test_attention.py tests/ops/test_gumbel.py tests/test_sampler.py tests/test_prior.py -k cuda; exit \$((a + \$?))"
step sanitize 150 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" benchmarks/sanitize_cases.py
step attention 200 bash -c "'$PY' benchmarks/bench_attention.py --device cuda --json '$OUT/attention_d64.json' && \
  '$PY' benchmarks/bench_attention.py --device cuda --dim 128 --json '$OUT/attention_d128.json' && \
  '$PY' benchmarks/bench_attention.py --device cuda --batch 32 --json '$OUT/attention_b32.json'"
step gumbel 90 "$PY" benchmarks/bench_gumbel.py --device cuda --json "$OUT/gumbel.json"
step sampling 120 "$PY" benchmarks/bench_sampling.py --device cuda --json "$OUT/sampling.json"
cat "$OUT/summary.txt"
