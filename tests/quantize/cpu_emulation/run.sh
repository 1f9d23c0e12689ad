#!/bin/bash
# CPU emulation check of the quantize kernels: compiles src/ops/quantize/quantize_sm90.cu as plain
# C++ against a fake CUDA runtime (fake_cuda/: one CPU thread per CUDA thread, blocks run one at a
# time, __syncthreads/__shfl_xor_sync via a barrier) and compares every kernel with fp8flow::ref
# bit for bit (emu_driver.cpp). For machines without a GPU: it catches tiling, tail, group and
# alignment bugs in the device code. It does NOT check the hardware cvt (fmt:: stands in for it,
# see kernels/fp8_device.cuh), timing, or races. Not part of the CTest suite (minutes to run).
# Needs the CPU-only build first: cmake --preset cpu && cmake --build build-cpu -j2
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/../../common/cpu_emulation.sh"
# -DFP8FLOW_DEQUANT_HW_CVT=0: the hw decode is inline PTX
emu_run quantize src/ops/quantize/quantize_sm90.cu '(sm90_\w+_kernel<[^;]*?>)\s*<<<(.*?)>>>\(' 1 -DFP8FLOW_DEQUANT_HW_CVT=0 -- "$@"
