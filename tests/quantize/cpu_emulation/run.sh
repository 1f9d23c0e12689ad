#!/bin/bash
# CPU emulation check of the quantize kernels: compiles src/ops/quantize/quantize_sm90.cu as plain
# C++ against a fake CUDA runtime (fake_cuda/: one CPU thread per CUDA thread, blocks run one at a
# time, __syncthreads/__shfl_xor_sync via a barrier) and compares every kernel with fp8flow::ref
# bit for bit (emu_driver.cpp). For machines without a GPU: it catches tiling, tail, group and
# alignment bugs in the device code. It does NOT check the hardware cvt (fmt:: stands in for it,
# see kernels/fp8_device.cuh), timing, or races. Not part of the CTest suite (minutes to run).
# Needs the CPU-only build first: cmake --preset cpu && cmake --build build-cpu -j2
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
out="${TMPDIR:-/tmp}/fp8flow_quantize_emu"
mkdir -p "$out"
# <<<grid, block, smem, stream>>>(args) -> ::emu::launch(kernel, grid, block)(args)
python3 - "$root/src/ops/quantize/quantize_sm90.cu" "$out/quantize_sm90_emu.cpp" <<'PY'
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
dst, n = re.subn(r"(sm90_\w+_kernel<[^;]*?>)\s*<<<(.*?)>>>\(", rep, src, flags=re.S)
assert n > 0, "no launches found"
open(sys.argv[2], 'w').write(dst)
PY
flags=(-O2 -std=c++20 -I "$here/fake_cuda" -I "$root/include" -I "$root/src" -I "$root/tests"
       -DFP8FLOW_WITH_CUDA=0 -DFP8FLOW_DEQUANT_HW_CVT=0)  # the hw decode is inline PTX
g++ "${flags[@]}" -c -x c++ "$out/quantize_sm90_emu.cpp" -o "$out/kernels.o"
g++ "${flags[@]}" -c "$here/emu_driver.cpp" -o "$out/driver.o"
g++ "$out/kernels.o" "$out/driver.o" -o "$out/emu_test" "$root/build-cpu/libfp8flow.a" -lgtest \
    -lgtest_main -lpthread
"$out/emu_test" "$@"
