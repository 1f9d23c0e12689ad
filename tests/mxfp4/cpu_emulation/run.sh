#!/bin/bash
# CPU emulation check of the MXFP4 kernels: compiles src/ops/mxfp4/mxfp4_sm90.cu as plain C++
# against a fake CUDA runtime (fake_cuda/: one CPU thread per CUDA thread, blocks one at a time,
# __syncthreads / __syncthreads_or / __shfl_xor_sync / __reduce_max_sync via a barrier; cp.async
# copies land only at the wait_group that covers them; the mx:: lane helpers take their host
# versions) and compares each of the four kernels with fp8flow::ref bit for bit (emu_driver.cpp:
# the GPU tests' shapes, groups and fills). For machines without a GPU: it catches indexing, tail,
# group, swizzle and block-logic bugs in the device code. It does NOT check the DPX/PRMT
# instructions themselves (mxfp4_tables_test checks their host versions), timing or races.
# Then runs the transposed case again with FP8FLOW_MX_TR_VARIANT=1 and 2 (the session-9 and
# session-13 kernels, see mxfp4_sm90.cu) from the same binary. Not part of the CTest suite (a few minutes). Needs the
# CPU-only build first:
#   cmake --preset cpu && cmake --build build-cpu -j2
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/../../common/cpu_emulation.sh"
emu_run mxfp4 src/ops/mxfp4/mxfp4_sm90.cu '(sm90_\w+(?:<[^;()]*?>)?)\s*<<<(.*?)>>>\s*\(' 4 -- "$@"
for v in 1 2; do
  FP8FLOW_MX_TR_VARIANT=$v "${TMPDIR:-/tmp}/fp8flow_mxfp4_emu/emu_test" \
    --gtest_filter='Emu.Mxfp4ToFp8Transposed' "$@"
done
