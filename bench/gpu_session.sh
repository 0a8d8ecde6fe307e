#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one device call, from the repository root:
# build with the machine's torch, the whole test suite (CUDA cases included), compute-sanitizer
# (memcheck, racecheck) on the CUDA tests, and the GPU benchmarks. Logs and bench/results come
# back as one archive, $OUT/gpu_results.tar.gz (the device tool returns at most 8 files). The device image has no shapely: carry its wheel in .whl/ (see the device tool's
# README) and this script installs it first.
set -uo pipefail
OUT=${OUT:-/tmp/dbf_ext_gpu}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3
(cd /tmp && python3 -m dbf_ext info) | tee "$LOGS/info.txt"
# Always the installed package, never the source tree (which has no build): -P keeps the
# current folder off sys.path.
run_pytest() { (cd python_tests && python3 -P -m pytest -q -p no:cacheprovider "$@" .); }
run_pytest 2>&1 | tee "$LOGS/tests.log" | tail -5
for tool in memcheck racecheck; do
  (cd python_tests && compute-sanitizer --tool "$tool" --error-exitcode 99 \
      python3 -P -m pytest -q -x -p no:cacheprovider -k "cuda" .) > "$LOGS/sanitizer_$tool.log" 2>&1
  echo "compute-sanitizer $tool: exit $?" | tee -a "$LOGS/sanitizer_summary.txt"
done
for suite in box_iou_rotated nms_rotated assign feature_cache; do
  python3 -P -m pytest "bench/bench_$suite.py" --benchmark-only -q -p no:cacheprovider 2>&1 | tail -2
done
cp -r bench/results "$LOGS/"
tar czf "$OUT/gpu_results.tar.gz" -C "$LOGS" .
tail -3 "$LOGS/tests.log" "$LOGS/sanitizer_summary.txt"
