#!/bin/bash
# CPU emulation check of the MoE layer's CUDA helpers (src/moe/moe_sm90.cu: gate GEMMs, non-finite
# counter, BF16 copy): compiles the .cu as plain C++ against a fake CUDA runtime (fake_cuda/, built
# on tests/quantize/cpu_emulation/fake_cuda: one CPU thread per CUDA thread, blocks one at a time,
# cp.async as a synchronous copy) and compares every kernel with fp8flow::ref bit for bit
# (emu_driver.cpp), at shapes that hit every tile variant, partial tiles and edge cases. For
# machines without a GPU: it catches tiling, tail and indexing bugs in the device code, not races,
# cp.async ordering or timing. Not part of the CTest suite (a minute or two).
# Needs the CPU-only build first: cmake --preset cpu && cmake --build build-cpu -j2
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
out="${TMPDIR:-/tmp}/fp8flow_moe_emu"
mkdir -p "$out"
# name<...><<<grid, block, smem, stream>>>(args) -> ::emu::launch(name<...>, grid, block)(args)
python3 - "$root/src/moe/moe_sm90.cu" "$out/moe_sm90_emu.cpp" <<'PY'
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
dst, n = re.subn(r"(\w+_kernel(?:<[^;()]*?>)?)\s*<<<(.*?)>>>\s*\(", rep, src, flags=re.S)
assert n >= 6, f"expected the 6 launches, found {n}"
open(sys.argv[2], 'w').write(dst)
PY
flags=(-O2 -std=c++20 -I "$here/fake_cuda" -I "$root/include" -I "$root/src" -I "$root/tests"
       -DFP8FLOW_WITH_CUDA=0)
g++ "${flags[@]}" -c -x c++ "$out/moe_sm90_emu.cpp" -o "$out/kernels.o"
g++ "${flags[@]}" -c "$here/emu_driver.cpp" -o "$out/driver.o"
g++ "$out/kernels.o" "$out/driver.o" -o "$out/emu_test" "$root/build-cpu/libfp8flow.a" -lgtest \
    -lgtest_main -lpthread
"$out/emu_test" "$@"
