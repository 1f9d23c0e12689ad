"""fp8flow.MoE: the C++ MoE layer (include/fp8flow/moe.h) as a torch.nn.Module.

    moe = fp8flow.MoE(hidden=1024, ffn=512, experts=64, top_k=6, recipe="fp8-flow").cuda()
    y = moe(x)            # x [T, H] or [B, S, H], any float dtype (computed in BF16)
    y.sum().backward()    # dx, dW1, dW2, dgate through autograd (accumulated into .grad)
    opt.step()            # the next forward re-makes the FP8 weight copies (see "Weights")

Parameters (the layout of Megatron-Core's grouped experts, see fp8flow.megatron for the mapping):
  gate_weight  F32 [E, H]          router.weight
  expert_bias  F32 [E] (buffer)    router.expert_bias (selection bias; only with expert_bias=True)
  w1           [E*2F, H]           rows [e*2F, e*2F+F) = expert e's gate projection, the next F its
                                   up projection: torch.cat of TEGroupedMLP's linear_fc1.weight{e}
  w2           [E*H, F]            rows [e*H, (e+1)*H) = expert e's down projection:
                                   torch.cat of TEGroupedMLP's linear_fc2.weight{e}
  w1/w2 dtype: params_dtype, float32 (FP32 masters, default) or bfloat16. Gradients: dW1, dW2 and
  dgate are FP32 from the C++ layer; autograd accumulates them into .grad (cast to the
  parameter's dtype).

Recipes (settable at any time; the C++ layer is rebuilt at the next forward):
  "bf16", "fp8-blockwise", "fp8-flow", "fp8-flow-mxfp4"   the C++ layer's four recipes
  "torch"                                                 plain PyTorch (fp8flow.reference), the
                                                          sanity baseline; same parameters

Weights. The C++ layer keeps FP8 (or BF16) copies of W1 and W2, made from the parameters. With
refresh="auto" (default) each forward checks the parameters' version counters and storage: an
in-place update (optimizer.step(), nn.init.*, copy_ under no_grad) re-makes the copies before the
forward runs, a replaced storage (param.data = ..., .to()) re-points the layer at it. A step of any
torch.optim optimizer that holds w1 or w2 counts as an update too (a global optimizer step hook):
fused optimizers (AdamW(fused=True), torch 2.11) update the parameters without bumping their
version counters. Other updates that bypass the version counter (writes through
`param.data.<op>_()`) are not seen: call
refresh_weights() after them, or use refresh="always" (every forward re-makes the copies) or
"manual" (only refresh_weights() does). The gate and the bias are read directly, never copied.

Router aux loss (aux_loss_coeff != 0, sequence-wise, needs T % seq_len == 0; seq_len defaults to
S of a [B, S, H] input): as in Megatron, it is not returned into the caller's loss: the backward
adds its gradient with weight 1 itself. Its value is module.last_aux_loss (a float, read after
each forward when track_aux_loss is True: one host synchronization).

Memory: the C++ layer allocates its own device pools (not torch's caching allocator):
fp8flow_device_bytes() reports them. One context (the saved state of one forward) per forward in
flight, allocated once and reused.

Expert parallelism (process_group=pg with pg.size() = N > 1; include/fp8flow/moe.h):
  experts E is the GLOBAL count (E % N == 0); rank r of pg owns experts [r E_l, (r+1) E_l),
  E_l = E / N (Megatron's EP sharding). Parameters: w1 [E_l*2F, H] and w2 [E_l*H, F] are this
  rank's shard (module.local_experts = E_l, module.expert_offset = r E_l); gate_weight [E, H] and
  expert_bias [E] are replicated and must be equal on every rank (same seed at construction, or
  broadcast them). Each rank passes its own tokens; the layer dispatches them to the experts'
  ranks and combines the results back (fp8flow's NCCL communicator, built from pg at the first
  forward by fp8flow.distributed.make_communicator: rank 0's unique id broadcast over pg; it is
  kept alive by the C++ layer that uses it). Every forward/backward is collective over pg (all
  ranks call it, same recipe and config), and so is the first forward and any re-build.
  Gradients: dW1/dW2 are the local experts' full gradients (no reduction over pg needed). dgate
  covers only this rank's tokens: the router is a replicated parameter and its gradient must be
  summed over pg, which this module does NOT do: it is left to the caller's data-parallel
  reduction, as Megatron does (DDP over a group spanning pg all-reduces gate_weight.grad like any
  replicated weight; note DDP averages: use the same token-mean loss convention as for the dense
  weights). Do not let a DDP over pg reduce or broadcast w1/w2 (they differ per rank): exclude
  them (e.g. DistributedDataParallel._set_params_and_buffers_to_ignore_for_model) or give them
  their own expert-data-parallel group. The aux loss (module.last_aux_loss) covers this rank's
  sequences. Token cap: with max_tokens=None every forward agrees the cap over pg (one all_reduce
  of T, a host sync); pass max_tokens (the per-rank T bound, equal on all ranks) to avoid it.
  ep_max_recv_rows bounds the rows one rank may receive (memory; None/0: the C++ worst case,
  N * max_tokens * min(top_k, E_l)); a forward that would exceed it raises on every rank.
  ep_dedup (None: on with expert parallelism, MoEConfig's default) dispatches one record per
  (token, destination rank) instead of one per routed pair (MoEConfig::ep_dedup; bit-identical
  results, fewer bytes on the wire); False: one record per routed pair.
  expert_parallel=True builds the EP layer even on a 1-rank group (reproduces the EP transport,
  e.g. fp8-flow-mxfp4's MXFP4 dispatch, on one GPU); False keeps every expert on every rank.
  Needs CUDA parameters and a libfp8flow.a with NCCL (fp8flow.distributed.comm_available()).

Not supported: double backward; inputs needing more than max_tokens tokens re-build the layer
(max_tokens=None sizes it from the largest T seen). torch.compile: the layer's forward runs
outside the compiled graph (a clean graph break).
"""

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import reference
from ._errors import call, translate

# Optimizer steps per watched parameter (id(param) -> count), counted by one global
# torch.optim step post-hook: the "auto" refresh's second signal next to the version counter,
# which fused optimizer kernels do not bump. Only the expert weights of MoE modules are watched;
# a reused id after a parameter dies only causes one extra (harmless) refresh.
_OPT_STEPS = {}
_OPT_HOOK = None


def _count_optimizer_step(optimizer, args, kwargs):
    for group in optimizer.param_groups:
        for p in group["params"]:
            k = id(p)
            if k in _OPT_STEPS:
                _OPT_STEPS[k] += 1


def _optimizer_hook_registrar():
    """torch.optim.optimizer.register_optimizer_step_post_hook (torch >= 2.0), else None. Imported
    explicitly: torch.optim's __init__ does not keep its submodules as attributes."""
    try:
        from torch.optim.optimizer import register_optimizer_step_post_hook
    except ImportError:
        return None
    return register_optimizer_step_post_hook


def _watch(*params):
    global _OPT_HOOK
    if _OPT_HOOK is None:
        register = _optimizer_hook_registrar()
        _OPT_HOOK = register(_count_optimizer_step) if register else False  # torch < 2.0: none
    for p in params:
        _OPT_STEPS.setdefault(id(p), 0)

RECIPES = ("bf16", "fp8-blockwise", "fp8-flow", "fp8-flow-mxfp4")
ALL_RECIPES = RECIPES + ("torch",)


def _compiler_disable(fn):
    c = getattr(torch, "compiler", None)
    if c is not None and hasattr(c, "disable"):
        return c.disable(fn)
    dynamo = getattr(torch, "_dynamo", None)
    if dynamo is not None and hasattr(dynamo, "disable"):
        return dynamo.disable(fn)
    return fn


class _MoEFunction(torch.autograd.Function):
    """forward: torch.ops.fp8flow.moe_forward -> y (the C++ context saved on ctx);
    backward: torch.ops.fp8flow.moe_backward -> dx, dgate, dW1, dW2."""

    @staticmethod
    def forward(ctx, layer, reject_nonfinite, box, x, gate, w1, w2):
        y, c = call(torch.ops.fp8flow.moe_forward, layer, x, reject_nonfinite)
        ctx.fp8flow_ctx = c
        box.append(c)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        c = ctx.fp8flow_ctx
        ctx.fp8flow_ctx = None  # the context goes back to its layer once the last reference drops
        if c is None:
            raise RuntimeError("fp8flow.MoE: backward ran twice through the same forward")
        dx, dw1, dw2, dgate = call(torch.ops.fp8flow.moe_backward, c, dy)
        return None, None, None, dx, dgate, dw1, dw2


class MoE(nn.Module):
    """One MoE layer (router + routed experts + combine). See the module docstring.

    Config (as MoEConfig / RouterConfig in include/fp8flow/moe.h, router.h; validated by the C++
    layer when it is built, i.e. at the first forward):
      hidden H, ffn F (multiples of 128), experts E (multiple of 4, 4..256), top_k (1..8)
      router "softmax" (Mixtral/Qwen) or "sigmoid" (DeepSeek-V3: selection on sigmoid + bias)
      n_groups, topk_groups: group-limited selection; renormalize; scaling: the weight factor
      aux_loss_coeff, seq_len: the sequence-wise aux loss (off at 0)
      expert_bias: keep a selection-bias buffer (not trained by autograd; e.g. aux-loss-free
        balancing updates it in place)
      recipe, align (expert segment alignment), max_tokens (None: from the input), gemm_streams
      (align / gemm_streams None: MoEConfig's defaults: align 32 rows for the FP8 recipes, 16 for
      bf16)
      count_underflow: fp8-flow's scaling-aware transposes also count the elements they round to
        subnormal or zero (the last context's transpose_underflow(); MoEConfig::count_underflow,
        a diagnostic costing ~16% of the transposes' time, off by default)
      mxfp4_stochastic, mxfp4_seed: fp8-flow-mxfp4 rounds the activations saved for the weight
        gradients to E2M1 stochastically (unbiased dW1/dW2; forward and dx unchanged), with
        random bits from (mxfp4_seed, forward count): give each layer its own seed
        (MoEConfig::mxfp4_stochastic)
      process_group, expert_parallel, ep_max_recv_rows, ep_dedup: expert parallelism (module
        docstring)
    """

    def __init__(self, hidden, ffn, experts, top_k, *, router="softmax", n_groups=1,
                 topk_groups=1, renormalize=True, scaling=1.0, aux_loss_coeff=0.0, seq_len=None,
                 expert_bias=False, recipe="fp8-flow", align=None, max_tokens=None,
                 gemm_streams=None, count_underflow=False, mxfp4_stochastic=False, mxfp4_seed=0,
                 params_dtype=torch.float32, device=None, init_std=0.02, output_init_std=None,
                 refresh="auto", reject_nonfinite=True, track_aux_loss=True,
                 process_group=None, expert_parallel=None, ep_max_recv_rows=None,
                 ep_dedup=None):
        super().__init__()
        self.hidden, self.ffn = int(hidden), int(ffn)
        self.experts, self.top_k = int(experts), int(top_k)
        self.router, self.n_groups, self.topk_groups = router, int(n_groups), int(topk_groups)
        self.renormalize, self.scaling = bool(renormalize), float(scaling)
        self.aux_loss_coeff = float(aux_loss_coeff)
        self.seq_len = seq_len
        self.align, self.max_tokens, self.gemm_streams = align, max_tokens, gemm_streams
        self.count_underflow = bool(count_underflow)
        self.mxfp4_stochastic, self.mxfp4_seed = bool(mxfp4_stochastic), int(mxfp4_seed)
        if not 0 <= self.mxfp4_seed < 2**63:
            raise ValueError(f"fp8flow.MoE: mxfp4_seed: expected an integer in [0, 2^63), "
                             f"got {mxfp4_seed}")
        self.init_std = init_std
        self.output_init_std = init_std if output_init_std is None else output_init_std
        if refresh not in ("auto", "always", "manual"):
            raise ValueError(
                f"fp8flow.MoE: refresh: expected 'auto', 'always' or 'manual', got {refresh!r}")
        self.refresh = refresh
        self.reject_nonfinite = bool(reject_nonfinite)
        self.track_aux_loss = bool(track_aux_loss)
        self.keep_last_context = False  # debug/test: keep the last forward's C++ context
        self.last_context = None
        self.last_aux_loss = 0.0
        self.process_group = process_group
        self.ep_size, self.ep_rank, self._ep = 1, 0, False
        if process_group is not None:
            import torch.distributed as dist

            world = dist.get_world_size(process_group)
            self._ep = world > 1 if expert_parallel is None else bool(expert_parallel)
            if self._ep:
                if not torch.ops.fp8flow.moe_ep_available():
                    raise NotImplementedError(
                        f"fp8flow.MoE: expert parallelism over a process group of {world} ranks "
                        "needs fp8flow's NCCL communicator, and this libfp8flow.a has none "
                        "(built without NCCL / CUDA): fp8flow.distributed.comm_available() is "
                        "False")
                if self.experts % world:
                    raise ValueError(f"fp8flow.MoE: experts: expected a multiple of the process "
                                     f"group's size {world}, got {self.experts}")
                self.ep_size, self.ep_rank = world, dist.get_rank(process_group)
        elif expert_parallel:
            raise ValueError("fp8flow.MoE: expert_parallel=True needs a process_group")
        self.ep_max_recv_rows = int(ep_max_recv_rows or 0)
        self.ep_dedup = self._ep if ep_dedup is None else bool(ep_dedup)
        if self.ep_dedup and not self._ep:
            raise ValueError("fp8flow.MoE: ep_dedup=True needs expert parallelism (a process_group "
                             "of more than one rank, or expert_parallel=True)")
        if self.ep_max_recv_rows < 0:
            raise ValueError(f"fp8flow.MoE: ep_max_recv_rows: expected >= 0 or None, "
                             f"got {ep_max_recv_rows}")
        self.local_experts = self.experts // self.ep_size
        self.expert_offset = self.ep_rank * self.local_experts
        self._comm = None  # fp8flow.Communicator over process_group (EP), made at the first forward
        H, Fw, E, El = self.hidden, self.ffn, self.experts, self.local_experts
        self.gate_weight = nn.Parameter(torch.empty(E, H, device=device, dtype=torch.float32))
        self.w1 = nn.Parameter(torch.empty(El * 2 * Fw, H, device=device, dtype=params_dtype))
        self.w2 = nn.Parameter(torch.empty(El * H, Fw, device=device, dtype=params_dtype))
        if expert_bias:
            self.register_buffer("expert_bias", torch.zeros(E, device=device, dtype=torch.float32))
        else:
            self.expert_bias = None
        self._recipe = None
        self.recipe = recipe
        self._layer = None
        self._layer_key = None
        self._seen = None
        self.reset_parameters()

    # ---- config -------------------------------------------------------------------------------
    @property
    def recipe(self):
        return self._recipe

    @recipe.setter
    def recipe(self, r):
        if r not in ALL_RECIPES:
            raise ValueError(f"fp8flow.MoE: recipe: expected one of {ALL_RECIPES}, got {r!r}")
        if r != self._recipe:
            self._recipe = r
            self._layer = None  # rebuilt at the next forward

    def extra_repr(self):
        return (f"hidden={self.hidden}, ffn={self.ffn}, experts={self.experts}, top_k={self.top_k}, "
                f"router={self.router!r}, recipe={self.recipe!r}, params_dtype={self.w1.dtype}"
                + (f", ep_size={self.ep_size}, ep_rank={self.ep_rank}, "
                   f"local_experts={self.local_experts}" if self._ep else ""))

    @torch.no_grad()
    def reset_parameters(self):
        nn.init.normal_(self.gate_weight, 0.0, self.init_std)
        nn.init.normal_(self.w1, 0.0, self.init_std)
        nn.init.normal_(self.w2, 0.0, self.output_init_std)

    # ---- the C++ layer ------------------------------------------------------------------------
    def _weights(self):
        return self.gate_weight, self.expert_bias, self.w1, self.w2

    def _snapshot(self):
        _watch(self.w1, self.w2)
        return tuple(None if t is None else
                     (t.data_ptr(), t.dtype, t.device, t._version, _OPT_STEPS.get(id(t), 0))
                     for t in self._weights())

    def _communicator(self, device):
        """fp8flow's NCCL communicator over process_group (EP; collective at its first call)."""
        if self._comm is None:
            if device.type != "cuda":
                raise ValueError("fp8flow.MoE: expert parallelism needs CUDA parameters, got "
                                 f"{device}")
            from . import distributed

            with torch.cuda.device(device):
                self._comm = distributed.make_communicator(self.process_group)
        return self._comm

    def _agreed_cap(self, tokens, device):
        """EP with max_tokens=None: the largest T over the process group (every rank's layer must
        have the same max_tokens; the C++ constructor checks it). One all_reduce + host sync."""
        import torch.distributed as dist

        t = torch.tensor([tokens], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
        return int(t.item())

    def _prepare(self, tokens, seq_hint):
        """The C++ layer for this forward: built, re-pointed or refreshed as needed."""
        gate, bias, w1, w2 = self._weights()
        if self._ep and self.max_tokens is None:
            tokens = self._agreed_cap(tokens, w1.device)
        cap = tokens if self.max_tokens is None else int(self.max_tokens)
        if self.max_tokens is None and self._layer is not None:
            cap = max(cap, self._layer.max_tokens())
        seq = self.seq_len if self.seq_len is not None else (seq_hint or 0)
        seq = int(seq) if self.aux_loss_coeff else 0
        key = (self.recipe, w1.device, w1.dtype, cap, seq, bias is not None, self.ep_dedup,
               self.count_underflow, self.mxfp4_stochastic, self.mxfp4_seed)
        snap = self._snapshot()
        if self._layer is None or key != self._layer_key:
            self._layer = None  # free the old pools first
            comm = self._communicator(w1.device) if self._ep else None
            self._layer = translate(torch.classes.fp8flow.MoELayer)(
                self.hidden, self.ffn, self.experts, self.top_k, self.router, self.n_groups,
                self.topk_groups, self.renormalize, self.scaling, self.aux_loss_coeff, seq,
                self.recipe, self.align or 0, cap, self.gemm_streams or 0, gate, bias, w1, w2,
                comm, self.ep_max_recv_rows, self.ep_dedup, self.count_underflow,
                self.mxfp4_stochastic, self.mxfp4_seed)
            self._layer_key = key
        elif [s[:3] if s else None for s in snap] != [s[:3] if s else None for s in self._seen]:
            call(self._layer.set_weights, gate, bias, w1, w2)
        elif self.refresh == "always" or (self.refresh == "auto" and (
                snap[2][3:] != self._seen[2][3:] or snap[3][3:] != self._seen[3][3:])):
            call(self._layer.refresh_weights)
        self._seen = snap
        return self._layer

    def refresh_weights(self):
        """Re-make the C++ layer's weight copies now (after updates the version check misses)."""
        if self._layer is not None:
            gate, bias, w1, w2 = self._weights()
            call(self._layer.set_weights, gate, bias, w1, w2)
            self._seen = self._snapshot()

    def fp8flow_device_bytes(self):
        """Device memory the C++ layer owns (scratch pool, weight copies, contexts made so far)."""
        return 0 if self._layer is None else int(self._layer.device_bytes())

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x):
        if x.shape[-1] != self.hidden:
            raise ValueError(f"fp8flow.MoE: x: expected last dimension {self.hidden}, "
                             f"got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        seq_hint = x.shape[-2] if x.dim() == 3 else None
        y = self._forward_2d(x.reshape(-1, self.hidden), seq_hint)
        return y.to(x.dtype).reshape(*lead, self.hidden)

    @_compiler_disable
    def _forward_2d(self, x, seq_hint):
        x = x.to(torch.bfloat16)
        if self.recipe == "torch":
            if self._ep:
                raise NotImplementedError(
                    "fp8flow.MoE: recipe 'torch' (the PyTorch reference) has no expert parallelism")
            return self._forward_torch(x, seq_hint)
        layer = self._prepare(x.shape[0], seq_hint)
        gate, _, w1, w2 = self._weights()
        box = []
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate, w1, w2)):
            y = _MoEFunction.apply(layer, self.reject_nonfinite, box, x, gate, w1, w2)
        else:
            y, c = call(torch.ops.fp8flow.moe_forward, layer, x, self.reject_nonfinite)
            box.append(c)
        if self.aux_loss_coeff and self.track_aux_loss:
            self.last_aux_loss = float(box[0].aux_loss())
        self.last_context = box[0] if self.keep_last_context else None
        return y

    def _forward_torch(self, x, seq_hint):
        seq = self.seq_len if self.seq_len is not None else seq_hint
        gate, bias, w1, w2 = self._weights()
        with torch.autocast(device_type=x.device.type, enabled=False):  # F32 router, as in C++
            y, aux, _ = reference.moe_reference(
                x, gate, bias, w1, w2, kind=self.router, top_k=self.top_k, n_groups=self.n_groups,
                topk_groups=self.topk_groups, renormalize=self.renormalize, scaling=self.scaling,
                aux_alpha=self.aux_loss_coeff, seq_len=seq)
        if self.aux_loss_coeff:
            if self.track_aux_loss:
                self.last_aux_loss = float(aux)
            if torch.is_grad_enabled() and aux.requires_grad:
                y = reference.AuxLossInjector.apply(y, aux)
        return y

    # ---- state -------------------------------------------------------------------------------
    def __getstate__(self):  # pickling / deepcopy: the C++ layer is rebuilt on first use
        state = self.__dict__.copy()
        state["_layer"] = None
        state["_layer_key"] = None
        state["_seen"] = None
        state["last_context"] = None
        state["_comm"] = None  # EP: a new communicator at the first forward (collective)
        return state


def moe_flops_per_token(hidden, ffn, top_k):
    """Expert GEMM FLOPs per token of one forward (FC1 H -> 2F and FC2 F -> H per routed slot)."""
    return 2 * top_k * (hidden * 2 * ffn + ffn * hidden)


__all__ = ["MoE", "RECIPES", "ALL_RECIPES", "moe_flops_per_token"]
