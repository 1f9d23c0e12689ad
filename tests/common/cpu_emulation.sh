# Shared driver of the CPU emulation checks (tests/*/cpu_emulation/run.sh): source it, then call
#   emu_run NAME CU_FILE LAUNCH_REGEX MIN_LAUNCHES [EXTRA_G++_FLAGS...] -- [TEST_ARGS...]
# from the suite's cpu_emulation/ folder. It rewrites every kernel launch in CU_FILE
# (LAUNCH_REGEX: group 1 the kernel name with its template arguments, followed by <<<...>>>( )
# into ::emu::launch(kernel, grid, block)(args), compiles it as plain C++ against the suite's
# fake CUDA runtime (fake_cuda/) with emu_driver.cpp, links libfp8flow.a of the CPU-only build
# (cmake --preset cpu && cmake --build build-cpu -j2) and runs the test binary with TEST_ARGS.
# Work files go to ${TMPDIR:-/tmp}/fp8flow_NAME_emu. FP8FLOW_EMU_FLAGS (environment) adds g++ flags
# to the compile and link steps, e.g. "-fsanitize=address,undefined -fno-sanitize-recover=all"
# (CI runs the emulations that way: out-of-bounds indexing in a kernel then fails the check).
emu_run() {
  local name="$1" cu="$2" regex="$3" min_launches="$4"
  shift 4
  local extra=()
  while [[ $# -gt 0 && "$1" != "--" ]]; do
    extra+=("$1")
    shift
  done
  [[ $# -gt 0 ]] && shift  # the --
  local here root out base
  here="$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)"
  root="$(cd "$here/../../.." && pwd)"
  out="${TMPDIR:-/tmp}/fp8flow_${name}_emu"
  base="$(basename "$cu" .cu)"
  mkdir -p "$out"
  # name<...><<<grid, block, smem, stream>>>(args) -> ::emu::launch(name<...>, grid, block)(args)
  python3 - "$root/$cu" "$out/${base}_emu.cpp" "$regex" "$min_launches" <<'PY'
import re, sys
src = open(sys.argv[1]).read()
def split_top(x):
    out, depth, cur = [], 0, ''
    for ch in x:
        depth += ch in '(<[{'
        depth -= ch in ')>]}'
        if ch == ',' and depth == 0:
            out.append(cur.strip()); cur = ''
        else:
            cur += ch
    return out + [cur.strip()]
def rep(m):
    a = split_top(m.group(2))
    return f"::emu::launch({m.group(1)}, {a[0]}, {a[1]})("
dst, n = re.subn(sys.argv[3], rep, src, flags=re.S)
want = int(sys.argv[4])
assert n >= want, f"expected at least {want} launches in {sys.argv[1]}, found {n}"
open(sys.argv[2], 'w').write(dst)
PY
  local flags=(-O2 -std=c++20 -I "$here/fake_cuda" -I "$root/include" -I "$root/src"
               -I "$root/tests" -DFP8FLOW_WITH_CUDA=0 "${extra[@]}")
  local user=()
  read -r -a user <<<"${FP8FLOW_EMU_FLAGS:-}"
  flags+=("${user[@]}")
  g++ "${flags[@]}" -c -x c++ "$out/${base}_emu.cpp" -o "$out/kernels.o"
  g++ "${flags[@]}" -c "$here/emu_driver.cpp" -o "$out/driver.o"
  g++ "$out/kernels.o" "$out/driver.o" -o "$out/emu_test" "$root/build-cpu/libfp8flow.a" -lgtest \
      -lgtest_main -lpthread "${user[@]}"
  "$out/emu_test" "$@"
}
