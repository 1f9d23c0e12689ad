"""fp8flow for PyTorch: the C++ library's ops (torch.ops.fp8flow.*) and its MoE layer as an
nn.Module. See fp8flow.ops, fp8flow.MoE (fp8flow/moe.py), fp8flow.megatron, fp8flow.reference."""

import torch

from . import _C  # noqa: F401  (registers torch.ops.fp8flow.* and torch.classes.fp8flow.*)
from . import distributed, megatron, reference  # noqa: F401
from ._errors import Error
from .moe import ALL_RECIPES, RECIPES, MoE, moe_flops_per_token
from .ops import (dequantize, fp8_to_mxfp4, mxfp4_to_fp8, mxfp4_to_fp8_transposed, quantize,
                  quantize_both, quantize_mxfp4, quantize_transposed, transpose_scaled)

__version__ = "0.1.0"


def version():
    """The C++ library's version string ("0.1.0+cuda" or "0.1.0+cpu")."""
    return torch.ops.fp8flow.version()


def cuda_available():
    """True when this extension and library have the CUDA backend and a CUDA device is visible."""
    return bool(torch.ops.fp8flow.cuda_available())


__all__ = [
    "Error", "MoE", "RECIPES", "ALL_RECIPES", "moe_flops_per_token", "version", "cuda_available",
    "quantize", "quantize_transposed", "quantize_both", "dequantize", "transpose_scaled",
    "quantize_mxfp4", "fp8_to_mxfp4", "mxfp4_to_fp8", "mxfp4_to_fp8_transposed",
    "distributed", "megatron", "reference",
]
