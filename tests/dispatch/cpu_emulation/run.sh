#!/bin/bash
# CPU emulation check of the EP dispatch kernels (src/ops/dispatch/dispatch_sm90.cu: pack, unpack,
# row maps, and the dedup slot words and slot scatter): compiles the .cu as plain C++ against a
# fake CUDA runtime (fake_cuda/: one CPU thread per CUDA thread, blocks one at a time, per-warp
# ballots) and compares every kernel with fp8flow::ref bit for bit (emu_driver.cpp), for every
# payload, with and without probs, chunk filters, and dedup plans of several ranks. For machines
# without a GPU: it catches indexing, tail and record-layout bugs in the device code, not races or
# timing. Not part of the CTest suite (a minute or two).
# Needs the CPU-only build first: cmake --preset cpu && cmake --build build-cpu -j2
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/../../common/cpu_emulation.sh"
emu_run dispatch src/ops/dispatch/dispatch_sm90.cu '(\w+_kernel(?:<[^;()]*?>)?)\s*<<<(.*?)>>>\s*\(' 4 -- "$@"
