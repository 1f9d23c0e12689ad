"""Mapping between fp8flow.MoE's parameters and Megatron-Core's MoE layer state dict (TP = 1; with
expert parallelism, E in w1/w2 is the rank's number of local experts; the router stays [E_g, H]).

fp8flow.MoE               Megatron-Core (MoELayer, moe_grouped_gemm)
gate_weight [E, H]        router.weight [E, H]
expert_bias [E]           router.expert_bias [E]            (moe_router_enable_expert_bias)
w1 [E*2F, H]              TEGroupedMLP: experts.linear_fc1.weight{e} [2F, H] = w1[e*2F:(e+1)*2F]
                            (rows 0..F-1 the gate projection, F..2F-1 the up projection: Megatron's
                            glu() chunks the FC1 output in that order)
                          GroupedMLP (legacy): experts.weight1 [H, E*2F]; weight1.view(E, H, 2F)[e]
                            = w1[e*2F:(e+1)*2F].T
w2 [E*H, F]               TEGroupedMLP: experts.linear_fc2.weight{e} [H, F] = w2[e*H:(e+1)*H]
                          GroupedMLP (legacy): experts.weight2 [E*F, H]; weight2.view(E, F, H)[e]
                            = w2[e*H:(e+1)*H].T

Router settings: Megatron's moe_router_score_function "softmax" (with moe_router_pre_softmax
False: top-k of the logits, softmax over the k = fp8flow's softmax + renormalize) or "sigmoid",
moe_router_topk -> top_k, moe_router_num_groups / moe_router_group_topk -> n_groups / topk_groups,
moe_router_topk_scaling_factor -> scaling, moe_aux_loss_coeff with load balancing "seq_aux_loss"
-> aux_loss_coeff.
"""

import torch


def to_megatron(moe, prefix="", layout="te"):
    """fp8flow.MoE -> a Megatron-Core state dict (tensors are copies). layout 'te' (TEGroupedMLP)
    or 'legacy' (GroupedMLP)."""
    E, H, Fw = moe.local_experts, moe.hidden, moe.ffn
    sd = {prefix + "router.weight": moe.gate_weight.detach().clone()}
    if moe.expert_bias is not None:
        sd[prefix + "router.expert_bias"] = moe.expert_bias.detach().clone()
    w1 = moe.w1.detach().view(E, 2 * Fw, H)
    w2 = moe.w2.detach().view(E, H, Fw)
    if layout == "te":
        for e in range(E):
            sd[f"{prefix}experts.linear_fc1.weight{e}"] = w1[e].clone()
            sd[f"{prefix}experts.linear_fc2.weight{e}"] = w2[e].clone()
    elif layout == "legacy":
        sd[prefix + "experts.weight1"] = w1.transpose(1, 2).contiguous().view(H, E * 2 * Fw)
        sd[prefix + "experts.weight2"] = w2.transpose(1, 2).contiguous().view(E * Fw, H)
    else:
        raise ValueError(f"to_megatron: layout: expected 'te' or 'legacy', got {layout!r}")
    return sd


@torch.no_grad()
def load_megatron(moe, sd, prefix="", layout="te"):
    """Copies a Megatron-Core state dict (see the module docstring) into fp8flow.MoE's parameters
    (in place: the next forward refreshes the FP8 weight copies)."""
    E, H, Fw = moe.local_experts, moe.hidden, moe.ffn
    moe.gate_weight.copy_(sd[prefix + "router.weight"])
    if moe.expert_bias is not None and prefix + "router.expert_bias" in sd:
        moe.expert_bias.copy_(sd[prefix + "router.expert_bias"])
    w1 = moe.w1.view(E, 2 * Fw, H)
    w2 = moe.w2.view(E, H, Fw)
    if layout == "te":
        for e in range(E):
            w1[e].copy_(sd[f"{prefix}experts.linear_fc1.weight{e}"])
            w2[e].copy_(sd[f"{prefix}experts.linear_fc2.weight{e}"])
    elif layout == "legacy":
        w1.copy_(sd[prefix + "experts.weight1"].reshape(E, H, 2 * Fw).transpose(1, 2))
        w2.copy_(sd[prefix + "experts.weight2"].reshape(E, Fw, H).transpose(1, 2))
    else:
        raise ValueError(f"load_megatron: layout: expected 'te' or 'legacy', got {layout!r}")
