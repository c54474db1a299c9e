#!/usr/bin/env bash
# The GPU session's checks in one command (the device machine is lent by the minute): the Triton kernel tests
# on CUDA (bf16 included) and the CUDA-graph generation tests, the Triton attention benchmark, and the end-to-end
# generation benchmark at its GPU size (64 prefixes x 4 requests). Every step is bounded by `timeout` and
# logs under $OUT, so one that breaks still leaves the others' results.
# Usage (repository root, CUDA machine): OUT=out/gpu bash benchmarks/gpu_checks.sh
set -u
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{
  date -u +%FT%TZ
  echo "commit ${PREFIXRT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c 'import sys, torch, triton, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "transformers", transformers.__version__)'
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
$PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { echo "install failed"; tail "$OUT/install.log"; }

echo "== Triton tests and CUDA-graph generation tests on CUDA"
timeout "${TEST_TIMEOUT:-240}" $PY -m pytest -q -n "${WORKERS:-8}" -rfE tests/ops/test_triton_*.py tests/hf/test_triton_model.py tests/engine/test_cuda_generation.py \
  >"$OUT/triton_tests.log" 2>&1
echo "exit $?"; tail -n 40 "$OUT/triton_tests.log"

echo "== Triton attention benchmark"
timeout "${BENCH_TIMEOUT:-120}" $PY benchmarks/bench_triton_attention.py --out "$OUT/triton_attention.json" >"$OUT/triton_bench.log" 2>&1
echo "exit $?"; tail -n 30 "$OUT/triton_bench.log"

echo "== generation benchmark, 64 prefixes x 4 requests"
timeout "${GENERATE_TIMEOUT:-170}" $PY -m prefixrt bench generate --device cuda --prefixes 64 --per-prefix 4 \
  --out "$OUT/generate.json" >"$OUT/generate.log" 2>&1
echo "exit $?"; tail -n 25 "$OUT/generate.log"
