#!/usr/bin/env bash
# Everything a session with a lent GPU runs, in one device call, from the repository root:
# the driver and toolkit first, a build with -lineinfo (so compute-sanitizer names source lines),
# the CUDA tests, compute-sanitizer (memcheck, racecheck) on the small CUDA cases only (tests
# marked `large` are left out: under the sanitizer they take minutes), the GPU benchmarks, and
# the rest of the test suite when time is left. Every stage gets a share of one time budget
# (DBF_EXT_GPU_BUDGET_S, default 360 s) so the whole call fits a 15-minute device session with
# room for a second run. Logs and bench/results come back as one archive,
# $OUT/gpu_results.tar.gz (the device tool returns at most 8 files).
#
# The device image has no shapely: carry its wheel in .whl/ (see the device tool's README) and
# this script installs it first.
set -uo pipefail
OUT=${OUT:-/tmp/dbf_ext_gpu}
BUDGET=${DBF_EXT_GPU_BUDGET_S:-360}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# Seconds a stage may take: its own cap, but never past the budget (10 s kept for packing).
stage_limit() {
  local left=$((BUDGET - SECONDS - 10))
  ((left < $1)) && echo $((left > 5 ? left : 5)) || echo "$1"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nvcc --version | tail -2
} 2>&1 | tee "$LOGS/driver.txt"

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
CMAKE_ARGS="-DCMAKE_CUDA_FLAGS=-lineinfo" timeout "$(stage_limit 150)" \
  python3 -m pip install -q --no-build-isolation --no-deps . > "$LOGS/build.log" 2>&1
echo "build: exit $? after ${SECONDS}s" | tee -a "$LOGS/summary.txt"
(cd /tmp && python3 -m dbf_ext info) 2>&1 | tee "$LOGS/info.txt"

# Always the installed package, never the source tree (which has no build): -P keeps the
# current folder off sys.path.
run_pytest() { (cd python_tests && python3 -P -m pytest -q -p no:cacheprovider "$@" .); }

timeout "$(stage_limit 120)" bash -c "$(declare -f run_pytest); run_pytest -k cuda" \
  > "$LOGS/tests_cuda.log" 2>&1
echo "CUDA tests: exit $? after ${SECONDS}s; $(tail -1 "$LOGS/tests_cuda.log")" | tee -a "$LOGS/summary.txt"

# Only dbf_ext's kernels are instrumented (torch's own kernels run unchecked, which keeps
# the sanitizer runs short). memcheck takes every small CUDA case; racecheck, several times
# slower, the cases that cover each kernel using shared memory (IoU tiles, NMS mask and
# reduction, assignment tiles and chunking).
sanitize() {
  local tool=$1 cap=$2 selection=$3
  (cd python_tests && timeout "$(stage_limit "$cap")" compute-sanitizer --tool "$tool" \
      --kernel-name kns=dbf_ext --error-exitcode 99 --print-limit 50 \
      python3 -P -m pytest -q -p no:cacheprovider -k "$selection" -m "not large" .) \
    > "$LOGS/sanitizer_$tool.log" 2>&1
  echo "compute-sanitizer $tool: exit $? after ${SECONDS}s; $(grep -E 'ERROR SUMMARY|passed|failed' "$LOGS/sanitizer_$tool.log" | tail -2 | tr '\n' ' ')" \
    | tee -a "$LOGS/summary.txt"
}
sanitize memcheck 75 "cuda and not train_cli"
sanitize racecheck 75 "cuda and (test_cuda_matches_cpu or chunked or batched_equals_per_image or pairwise_matches_shapely)"

for suite in "box_iou_rotated -k test_gpu" "nms_rotated -k cuda" "assign -k test_gpu" "feature_cache" \
  "mask_to_obb -k test_gpu" "roi_align_rotated -k cuda" "distributed -k GPU" "oriented_rcnn_step -k cuda"; do
  set -- $suite
  name=$1; shift
  timeout "$(stage_limit 60)" python3 -P -m pytest "bench/bench_$name.py" --benchmark-only -q \
    -p no:cacheprovider "$@" > "$LOGS/bench_$name.log" 2>&1
  echo "bench $name: exit $? after ${SECONDS}s" | tee -a "$LOGS/summary.txt"
done

# Data-parallel training on the GPU: two processes sharing GPU 0 (gloo; NCCL refuses two ranks
# on one GPU), with SyncBatchNorm while the trunk trains and the cache in GPU memory. A smoke
# check of the multi-process path on CUDA (the bench's "2 processes, GPU" case measures it);
# with two or more GPUs, drop --device cuda:0 for one GPU per process and NCCL.
(cd /tmp && timeout "$(stage_limit 90)" python3 -P -m torch.distributed.run --nproc_per_node=2 --standalone \
    -m dbf_ext demo --epochs 4 --unfrozen 1 --output /tmp/ddp_smoke --device cuda:0) \
  > "$LOGS/distributed_smoke.log" 2>&1
echo "distributed smoke (demo, 2 processes on GPU 0): exit $? after ${SECONDS}s" | tee -a "$LOGS/summary.txt"
(cd /tmp && timeout "$(stage_limit 90)" python3 -P -m torch.distributed.run --nproc_per_node=2 --standalone \
    -m dbf_ext train --data "$(python3 -P -c 'from dbf_ext.data.synthetic import prepare_synthetic_dota as p; print(p(quiet=True))')" \
    --output /tmp/ddp_syncbn --epochs 2 --unfrozen-epochs 0 --sync-bn --cache bfloat16:gpu=1GB --device cuda:0) \
  > "$LOGS/distributed_sync_bn.log" 2>&1
echo "distributed --sync-bn (2 processes on GPU 0): exit $? after ${SECONDS}s" | tee -a "$LOGS/summary.txt"

timeout "$(stage_limit 120)" bash -c "$(declare -f run_pytest); run_pytest -k 'not cuda'" \
  > "$LOGS/tests_rest.log" 2>&1
echo "other tests: exit $? after ${SECONDS}s; $(tail -1 "$LOGS/tests_rest.log")" | tee -a "$LOGS/summary.txt"

cp -r bench/results "$LOGS/"
tar czf "$OUT/gpu_results.tar.gz" -C "$LOGS" .
