"""Helpers shared by the tests."""

import torch


def rel(a, b):
    """Relative Frobenius error ||a - b|| / ||b|| in float64."""
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def as_bytes(t):
    """The tensor's storage bytes (uint8 view) on the CPU: for bitwise comparisons of any dtype."""
    t = t.detach().contiguous().cpu()
    if t.dim() == 0:
        t = t.reshape(1)  # view(dtype) rejects 0-dim tensors of another element size (torch 2.x)
    if t.dtype == torch.uint8:
        return t
    return t.view(torch.uint8)


def values(shape, kind="normal", seed=0, device="cpu", dtype=torch.float32):
    """Test inputs: 'normal' N(0,1) with a per-row scale 2^U(-8, 8), 'wide' scales spanning 2^-30..
    2^30 per element, 'adversarial' mixing zeros, tiny and huge values and signed zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if kind == "normal":
        x = x * torch.exp2(torch.randint(-8, 9, (shape[0], 1), generator=g).float())
    elif kind == "wide":
        x = x * torch.exp2(torch.randint(-30, 31, shape, generator=g).float())
    elif kind == "adversarial":
        r = torch.rand(*shape, generator=g)
        x = torch.where(r < 0.2, torch.zeros_like(x), x)
        x = torch.where((r > 0.2) & (r < 0.3), x * 1e-30, x)
        x = torch.where((r > 0.3) & (r < 0.35), x * 1e30, x)
        x = torch.where((r > 0.35) & (r < 0.4), -torch.zeros_like(x), x)
        if shape[1] >= 256:  # one all-zero 128-tile in the first rows
            x[: min(4, shape[0]), 128:256] = 0
    return x.to(dtype).to(device)


def has_fp8_dtypes():
    return hasattr(torch, "float8_e4m3fn")
