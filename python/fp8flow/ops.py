"""fp8flow's single ops on torch tensors (thin wrappers of torch.ops.fp8flow.*).

Every op runs the C++ library on the tensors' device: CPU tensors -> the reference backend (the
bit-exact definition), CUDA tensors -> the sm_90a kernels on the current CUDA stream. Shapes,
layouts and rounding rules are the C++ headers' (include/fp8flow/{quantize,transpose,mxfp4}.h);
errors are fp8flow.Error with the library's message.

Tensors are 2-D with unit-stride rows. Formats on the torch side:
  FP8 data       torch.float8_e4m3fn / float8_e5m2 (uint8 accepted as input)
  FP8 scales     float32 multipliers (powers of two): value = code * scale
                   rowwise: data [M][K], scale [tiles][M] (1x128 tiles along K, M contiguous)
                   block:   data [N][K], scale [ceil(N/128)][ceil(K/128)]
  MXFP4 data     torch.float4_e2m1fn_x2 [M][K/2] (two values per byte, element 2i in the low
                 nibble; uint8 on torch < 2.8), scales torch.float8_e8m0fnu [M][K/32] (uint8 on
                 torch < 2.7)
  groups         column groups of a transposed ("column-wise") copy: tokens per expert, summing
                 to M; the 128-token scale tiles restart at each group. [] = one group.
"""

import torch

from ._errors import translate

_ops = torch.ops.fp8flow

__all__ = [
    "quantize",
    "quantize_transposed",
    "quantize_both",
    "dequantize",
    "transpose_scaled",
    "quantize_mxfp4",
    "fp8_to_mxfp4",
    "mxfp4_to_fp8",
    "mxfp4_to_fp8_transposed",
]


def _groups(groups):
    return [] if groups is None else [int(g) for g in groups]


@translate
def quantize(x, layout="rowwise", fmt="e4m3"):
    """x F32/BF16 [M][K] -> (data FP8 [M][K], scale F32). layout 'rowwise' (1x128 tiles,
    activations: scale [ceil(K/128)][M]) or 'block' (128x128, weights). K % 16 == 0."""
    return _ops.quantize(x, layout, fmt)


@translate
def quantize_transposed(x, groups=None, fmt="e4m3"):
    """x [M][K] -> the column-wise (128x1 along M) FP8 copy stored transposed: (data [K][M],
    scale [tiles][K]), tiles restarting at each group of `groups` (sum M)."""
    return _ops.quantize_transposed(x, _groups(groups), fmt)


@translate
def quantize_both(x, groups=None, fmt="e4m3"):
    """quantize(x) and quantize_transposed(x, groups) from one read: (data, scale, data_t, scale_t)."""
    return _ops.quantize_both(x, _groups(groups), fmt)


@translate
def dequantize(data, scale, layout="rowwise", groups=None, out_dtype=torch.bfloat16):
    """A scaled tensor (layout 'rowwise', 'block' or 'mx') -> out_dtype (float32/bfloat16) of the
    same logical shape. `groups`: the column groups of a rowwise tensor (for transposed copies)."""
    return _ops.dequantize(data, scale, layout, _groups(groups), out_dtype)


@translate
def transpose_scaled(data, scale, groups=None, policy="column_tight"):
    """Scaling-aware transpose: rowwise E4M3 [M][K] (K % 128 == 0) -> column-wise copy
    (data_t [K][M], scale_t [tiles][K]) with exactly the same values, except elements that
    underflow at the new scale (rounded to nearest-even subnormal or zero). Returns
    (data_t, scale_t, underflow) where underflow is an int64 scalar tensor on the same device (no
    host sync). policy 'column_tight' (default) or 'tile_max' (the paper's)."""
    return _ops.transpose_scaled(data, scale, _groups(groups), policy)


@translate
def quantize_mxfp4(x):
    """x F32/BF16 [M][K] (K % 32 == 0) -> MXFP4 (data [M][K/2] packed, scale E8M0 [M][K/32])."""
    return _ops.quantize_mxfp4(x)


@translate
def fp8_to_mxfp4(data, scale):
    """Rowwise E4M3 [M][K] (K % 128 == 0) -> MXFP4 directly (no BF16 in between)."""
    return _ops.fp8_to_mxfp4(data, scale)


@translate
def mxfp4_to_fp8(data, scale):
    """MXFP4 [M][K] -> rowwise E4M3 [M][K] with 1x128 scales, directly."""
    return _ops.mxfp4_to_fp8(data, scale)


@translate
def mxfp4_to_fp8_transposed(data, scale, groups=None):
    """MXFP4 [M][K] -> column-wise E4M3 stored transposed (data_t [K][M], scale_t [tiles][K]),
    tiles restarting at each group (tokens per expert). Equals
    quantize_transposed(dequantize(mx), groups) bit for bit."""
    return _ops.mxfp4_to_fp8_transposed(data, scale, _groups(groups))
