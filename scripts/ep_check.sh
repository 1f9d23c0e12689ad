#!/usr/bin/env bash
# ep_check.sh: the expert-parallel checks in one short run on a multi-GPU machine (a subset of
# gpu_run.sh for a tight device budget), logs under $OUT, packed into $OUT/ep_check.tgz.
#   1. tests      fp8flow_tests on the dispatch / EP / communicator suites (CPU and GPU)
#   2. sanitizer  compute-sanitizer memcheck + racecheck on DispatchGpu.* (NCCL's own API probes
#                 are not reported; hazards inside cuBLASLt's nvjet kernels and NCCL's own
#                 ncclDevKernel_* kernels (their flag-based shared-memory protocol) are ignored)
#   3. bench      fp8flow-bench comm --gpus N; layer --ep N, dedup (default) and --ep-record
# Usage: scripts/ep_check.sh [BIN_DIR]   BIN_DIR holds fp8flow_tests and fp8flow-bench (default:
# build/tests and build/tools of a default-preset build). Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT/ep"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# fp8flow-bench layer --ep: a run with no progress for 90 s prints every rank's phase and exits 3.
export FP8FLOW_BENCH_STALL_S=${FP8FLOW_BENCH_STALL_S:-90}
export PATH="/usr/local/cuda/bin:$PATH"
T=${1:-build/tests}/fp8flow_tests
B=${1:-build/tools}/fp8flow-bench
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
status=0
step() {  # step NAME TIMEOUT CMD...: runs CMD, log in $OUT/ep/NAME.log, prints rc and seconds
  local name=$1 to=$2 t0=$SECONDS
  shift 2
  timeout -k 10 "$to" "$@" >"$OUT/ep/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc, $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || status=1
  return $rc
}
echo "GPUs: $ngpu"
step tests 300 "$T" --gtest_filter='Dispatch*:EpLayer*:CommNccl*:CommInProcess*'
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED" "$OUT/ep/tests.log" | head -20
step memcheck 240 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 1 \
  "$T" --gtest_filter='DispatchGpu.*'
grep -E "ERROR SUMMARY" "$OUT/ep/memcheck.log"
step racecheck 240 compute-sanitizer --tool racecheck "$T" --gtest_filter='DispatchGpu.*'
if grep -A1 -E "Race reported between" "$OUT/ep/racecheck.log" | grep -E "access at" |
  grep -vqE "nvjet_|ncclDevKernel_"; then
  echo "racecheck: hazards outside cuBLASLt and NCCL"; status=1
fi
grep -E "RACECHECK SUMMARY" "$OUT/ep/racecheck.log"
if [ "$ngpu" -ge 2 ]; then
  step comm 120 "$B" comm --gpus "$ngpu" --json "$OUT/ep/comm.json"
  grep -E "^dispatch|^combine|^nccl-a2a" "$OUT/ep/comm.log" | head -30
  step layer_ep 180 "$B" layer --ep "$ngpu" --json "$OUT/ep/layer_ep.json"
  step layer_ep_record 180 "$B" layer --ep "$ngpu" --ep-record --json "$OUT/ep/layer_ep_record.json"
  for f in layer_ep layer_ep_record; do
    echo "-- $f"
    sed -n '/^recipe/,/^#/p' "$OUT/ep/$f.log" | head -6
  done
fi
tar czf "$OUT/ep_check.tgz" -C "$OUT" ep && echo "logs: $OUT/ep_check.tgz"
exit $status
