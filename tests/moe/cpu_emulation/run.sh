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
source "$(cd "$(dirname "$0")" && pwd)/../../common/cpu_emulation.sh"
emu_run moe src/moe/moe_sm90.cu '(\w+_kernel(?:<[^;()]*?>)?)\s*<<<(.*?)>>>\s*\(' 6 -- "$@"
