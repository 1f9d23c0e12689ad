#!/usr/bin/env bash
# fp8flow-bench's command line: every bad invocation exits 2 with a message naming the subcommand,
# the option, what was expected and what came; `--help` exits 0. Registered with CTest
# (tests/CMakeLists.txt) as bench_cli; usage: bench_cli_test.sh path/to/fp8flow-bench
set -uo pipefail
B=${1:?usage: bench_cli_test.sh path/to/fp8flow-bench}
fail=0
# expect RC PATTERN ARGS...: the exit status is RC and stdout+stderr match the extended regex.
expect() {
  local rc=$1 pat=$2
  shift 2
  local out got
  out=$("$B" "$@" 2>&1)
  got=$?
  if [ "$got" -ne "$rc" ] || ! grep -Eq -- "$pat" <<<"$out"; then
    echo "FAIL: fp8flow-bench $*: expected exit $rc and /$pat/, got exit $got:"
    head -5 <<<"$out" | sed 's/^/  | /'
    fail=1
  else
    echo "ok: fp8flow-bench $* -> $got"
  fi
}
expect 0 "layer" --help
expect 2 "unknown subcommand 'nosuch'" nosuch
expect 2 "unknown option '--bogus'" layer --bogus
expect 2 "layer: --config: expected dsv3-shard, dsv2-lite or small, got 'nope'" layer --config nope
expect 2 "layer: --recipe: expected bf16, .* or all, got 'nope'" layer --recipe nope
expect 2 "layer: --routing: expected balanced or skewed, got 'nope'" layer --routing nope
expect 2 "--reps: expected an integer >= 1, got '-3'" layer --reps -3
expect 2 "--gpus: expected an integer >= 1, got '0'" comm --gpus 0
expect 2 "ops: no case matches --only 'nosuchop'" ops --only nosuchop
# Under mpirun without GPUs (simulated by the launcher's environment variable; skipped where a GPU
# driver is installed), both EP tools say what is missing and what to run instead, rather than
# running N unrelated copies.
if ! command -v nvidia-smi >/dev/null; then
  OMPI_COMM_WORLD_SIZE=2 expect 2 "started under mpirun, but mpirun mode .* is unavailable: .*--ep N" layer
  OMPI_COMM_WORLD_SIZE=2 expect 2 "started under mpirun, but mpirun mode .* is unavailable: .*--gpus N" comm
fi
exit $fail
