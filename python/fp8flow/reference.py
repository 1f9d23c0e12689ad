"""A plain-PyTorch MoE layer with fp8flow's semantics: the baseline the tests and the training
example compare against (recipe "torch"). Not used by the fp8flow recipes, which run the C++ layer.

Same parameters and layout as fp8flow.MoE (gate F32 [E][H], W1 [E*2F][H] gate rows then up rows per
expert, W2 [E*H][F]), same router (include/fp8flow/router.h: sigmoid + selection bias or softmax,
optional group-limited selection, optional renormalization, scaling, sequence-wise aux loss), same
expert math (FC1, weighted SwiGLU silu(g) * u * p in FP32, FC2, sum over the k slots); the GEMMs run
in `dtype` (BF16 by default) with PyTorch's FP32 accumulation. Gradients come from autograd, with
the top-k selection held fixed (as in the C++ layer). Optionally takes the selection (`topk_idx`)
from elsewhere, so that it can be compared with fp8flow on exactly the same routing.
"""

import torch
import torch.nn.functional as F


def route(logits, bias=None, *, kind="softmax", top_k=2, n_groups=1, topk_groups=1,
          renormalize=True, scaling=1.0, topk_idx=None):
    """logits F32 [T][E] -> (scores [T][E], topk_idx int64 [T][k], topk_weight F32 [T][k]).
    kind 'softmax' (Mixtral/Qwen) or 'sigmoid' (DeepSeek-V3: selection on scores + bias)."""
    if kind == "softmax":
        s = torch.softmax(logits, dim=-1)
    elif kind == "sigmoid":
        s = torch.sigmoid(logits)
    else:
        raise ValueError(f"route: kind: expected 'softmax' or 'sigmoid', got {kind!r}")
    if topk_idx is None:
        with torch.no_grad():
            sel = s + bias.reshape(1, -1) if bias is not None else s.clone()
            if n_groups > 1:
                T, E = sel.shape
                g = sel.view(T, n_groups, E // n_groups)
                gscore = g.topk(2, dim=-1).values.sum(-1)  # sum of each group's two largest
                keep = gscore.topk(topk_groups, dim=-1).indices
                mask = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, keep, True)
                sel = sel.masked_fill(~mask.repeat_interleave(E // n_groups, dim=1), float("-inf"))
            topk_idx = sel.topk(top_k, dim=-1, sorted=True).indices
    topk_idx = topk_idx.long()
    w = s.gather(1, topk_idx)
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return s, topk_idx, w * scaling


def seq_aux_loss(scores, topk_idx, *, aux_alpha, seq_len):
    """DeepSeek-V3's sequence-wise balance loss (router.h): alpha * mean_b sum_i f_bi * P_bi."""
    T, E = scores.shape
    k = topk_idx.shape[1]
    B = T // seq_len
    counts = torch.zeros(B, E, device=scores.device, dtype=torch.float32)
    seq = (torch.arange(T, device=scores.device) // seq_len).repeat_interleave(k)
    counts.index_put_((seq, topk_idx.reshape(-1)), torch.ones_like(seq, dtype=torch.float32),
                      accumulate=True)
    f = counts * (E / (k * seq_len))
    p = (scores / (scores.sum(-1, keepdim=True) + 1e-20)).view(B, seq_len, E).mean(1)
    return aux_alpha * (f * p).sum(-1).mean()


def experts(x, topk_idx, topk_weight, w1, w2, *, dtype=torch.bfloat16):
    """Routed experts: y[t] = sum_j FC2_e(silu(g) * u * w_tj) with e = topk_idx[t][j],
    [g | u] = FC1_e(x[t]). x [T][H]; w1 [E*2F][H]; w2 [E*H][F]. Returns y [T][H] in `dtype`."""
    T, H = x.shape
    k = topk_idx.shape[1]
    E = w2.shape[0] // H
    Fw = w2.shape[1]
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // k
    counts = torch.bincount(flat, minlength=E).tolist()
    xs = x[token].to(dtype)
    ps = topk_weight.reshape(-1)[order].float()
    w1c = w1.to(dtype).view(E, 2 * Fw, H)
    w2c = w2.to(dtype).view(E, H, Fw)
    outs = []
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        h = xs[start:start + n] @ w1c[e].t()
        g, u = h.float().split(Fw, dim=-1)
        a = (F.silu(g) * u * ps[start:start + n, None]).to(dtype)
        outs.append(a @ w2c[e].t())
        start += n
    yp = torch.cat(outs) if outs else xs.new_zeros(0, H)
    y = torch.zeros(T, H, device=x.device, dtype=torch.float32).index_add(0, token, yp.float())
    return y.to(dtype)


def moe_reference(x, gate, bias, w1, w2, *, kind="softmax", top_k=2, n_groups=1, topk_groups=1,
                  renormalize=True, scaling=1.0, aux_alpha=0.0, seq_len=None, topk_idx=None,
                  dtype=torch.bfloat16):
    """The whole layer: (y [T][H] in dtype, aux loss (0-dim F32 tensor, 0 when off), topk_idx).
    x [T][H] (any float dtype; the router reads it as F32 like the C++ gate GEMM)."""
    logits = x.float() @ gate.float().t()
    s, idx, w = route(logits, bias, kind=kind, top_k=top_k, n_groups=n_groups,
                      topk_groups=topk_groups, renormalize=renormalize, scaling=scaling,
                      topk_idx=topk_idx)
    y = experts(x, idx, w, w1, w2, dtype=dtype)
    if aux_alpha:
        aux = seq_aux_loss(s, idx, aux_alpha=aux_alpha, seq_len=seq_len)
    else:
        aux = torch.zeros((), device=x.device, dtype=torch.float32)
    return y, aux, idx


class AuxLossInjector(torch.autograd.Function):
    """Returns y unchanged; in backward adds d(aux) = 1 (Megatron's MoEAuxLossAutoScaler), so the
    aux loss trains the router exactly as the C++ layer's backward does (weight 1, not added to
    the caller's loss)."""

    @staticmethod
    def forward(ctx, y, aux):
        ctx.aux_shape = aux.shape
        ctx.aux_device = aux.device
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        return dy, torch.ones(ctx.aux_shape, device=ctx.aux_device, dtype=torch.float32)
