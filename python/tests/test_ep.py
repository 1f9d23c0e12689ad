"""Expert parallelism through torch.distributed (fp8flow.MoE(..., process_group=pg)).

GPU (>= 2 GPUs, a libfp8flow.a with NCCL): two processes (torch.multiprocessing.spawn, NCCL
backend, file:// store in the test's tmp dir, NCCL_NVLS_ENABLE=0), each with its own tokens
(300 and 177: unequal, so the agreed token cap is exercised). The EP=2 module, holding only its
rank's experts, against the single-GPU module on the same GPU with the same global weights and the
concatenated tokens (as tests/dispatch/ep_gpu_test.cpp does in C++):
  bf16, fp8-blockwise, fp8-flow: y, dx and the rank's dW1/dW2 slices bit for bit;
  fp8-flow-mxfp4: bit for bit against the 1-rank EP module (expert_parallel=True on a 1-rank
    group: the MXFP4 dispatch changes the FC1 input vs. the comm-less layer), and within a loose
    bound of the comm-less module;
  dgate summed over the ranks vs. the reference's: relative error < 1e-5 (FP32 summation order).
CPU: the C++ InProcess communicator cannot be shared between torch processes, and fp8flow's NCCL
one needs CUDA, so EP itself is not run on the CPU; the CPU tests check the argument handling
(a 1-rank group is the plain layer; a 2-rank gloo group without NCCL raises NotImplementedError).
"""

import os
import socket

import pytest

torch = pytest.importorskip("torch")
fp8flow = pytest.importorskip("fp8flow")

from util import rel  # noqa: E402

_N_GPUS = torch.cuda.device_count() if fp8flow.cuda_available() else 0
two_gpus = pytest.mark.skipif(
    _N_GPUS < 2,
    reason=f"needs two CUDA GPUs with fp8flow's CUDA backend (found {_N_GPUS}); EP is not run on "
    "the CPU (the C++ InProcess communicator cannot be shared between torch processes)")
needs_nccl = pytest.mark.skipif(
    not fp8flow.distributed.comm_available(),
    reason="libfp8flow.a has no NCCL communicator (built without NCCL): no EP from torch")

H, F, E, K = 256, 256, 8, 2
TOKENS = (300, 177)  # rank 0, rank 1
MX_BOUND = 0.35  # fp8-flow-mxfp4 EP vs. the comm-less layer (MXFP4 vs FP8 FC1 input, ~10% rms)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, world, store, backend="nccl"):
    import datetime

    import torch.distributed as dist

    os.environ["NCCL_NVLS_ENABLE"] = "0"  # the GPU machine's rule (no NVLink multicast)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    return dist


def _spawn(fn, world, tmp_path, *args):
    import torch.multiprocessing as mp

    os.environ["NCCL_NVLS_ENABLE"] = "0"
    mp.spawn(fn, args=(world, str(tmp_path / "store"), str(tmp_path)) + args, nprocs=world,
             join=True)


def _comm_worker(rank, world, store, out):
    dist = _init(rank, world, store)
    try:
        comm = fp8flow.distributed.make_communicator(None)
        assert comm.rank() == rank and comm.size() == world and comm.backend() == "nccl"
    finally:
        dist.destroy_process_group()


def _global_problem():
    g = torch.Generator().manual_seed(1)
    T = sum(TOKENS)
    return {
        "gate": torch.randn(E, H, generator=g) / H**0.5,
        "w1": torch.randn(E * 2 * F, H, generator=g) / H**0.5,
        "w2": torch.randn(E * H, F, generator=g) / F**0.5,
        "x": torch.randn(T, H, generator=g).to(torch.bfloat16),
        "dy": torch.randn(T, H, generator=g).to(torch.bfloat16),
    }


def _load(m, gate, w1, w2):
    with torch.no_grad():
        m.gate_weight.copy_(gate)
        m.w1.copy_(w1)
        m.w2.copy_(w2)


def _run(m, x, dy):
    """y, dx, dW1, dW2, dgate of one forward + backward (fresh gradients)."""
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = m(x)
    y.backward(dy)
    return [y.detach(), x.grad, m.w1.grad, m.w2.grad, m.gate_weight.grad]


def _bitwise(a, b):
    a, b = a.detach().contiguous().cpu(), b.detach().contiguous().cpu()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == torch.bfloat16:
        a, b = a.view(torch.int16), b.view(torch.int16)
    else:
        a, b = a.view(torch.int32), b.view(torch.int32)
    return torch.equal(a, b)


def _ep_worker(rank, world, store, out):
    dist = _init(rank, world, store)
    failures = []
    try:
        p = _global_problem()
        dev = torch.device("cuda", rank)
        El = E // world
        t0, T = sum(TOKENS[:rank]), TOKENS[rank]
        w1_local = p["w1"][rank * El * 2 * F:(rank + 1) * El * 2 * F]
        w2_local = p["w2"][rank * El * H:(rank + 1) * El * H]
        x, dy = p["x"].to(dev), p["dy"].to(dev)
        # 1-rank groups (every rank creates every group, in the same order): the mxfp4 reference.
        singles = [dist.new_group([r]) for r in range(world)]

        # The record path (one record per routed pair); the default is the token-dedup dispatch.
        ep = fp8flow.MoE(H, F, E, K, device=dev, process_group=dist.group.WORLD, ep_dedup=False)
        if (tuple(ep.w1.shape), tuple(ep.w2.shape), tuple(ep.gate_weight.shape)) != (
                (El * 2 * F, H), (El * H, F), (E, H)):
            failures.append(f"EP shapes {ep.w1.shape} {ep.w2.shape} {ep.gate_weight.shape}")
        if (ep.ep_size, ep.ep_rank, ep.local_experts, ep.expert_offset) != (
                world, rank, El, rank * El):
            failures.append("EP attributes")
        _load(ep, p["gate"], w1_local, w2_local)
        ref = fp8flow.MoE(H, F, E, K, device=dev)
        _load(ref, p["gate"], p["w1"], p["w2"])
        ref1 = fp8flow.MoE(H, F, E, K, device=dev, process_group=singles[rank],
                           expert_parallel=True)
        _load(ref1, p["gate"], p["w1"], p["w2"])

        # The same EP layer with the token-dedup dispatch (the default): every output
        # bit-identical to ep's.
        epd = fp8flow.MoE(H, F, E, K, device=dev, process_group=dist.group.WORLD)
        _load(epd, p["gate"], w1_local, w2_local)

        names = ("y", "dx", "dw1", "dw2")
        for recipe in fp8flow.RECIPES:
            mx = recipe == "fp8-flow-mxfp4"
            ep.recipe = ref.recipe = ref1.recipe = epd.recipe = recipe  # rebuilt, same comm
            got = _run(ep, x[t0:t0 + T], dy[t0:t0 + T])
            dd = _run(epd, x[t0:t0 + T], dy[t0:t0 + T])
            for n, a, b in zip(names + ("dgate",), dd, got):
                if not _bitwise(a, b):
                    failures.append(f"{recipe}: ep_dedup {n} differs from the record path")
            if not epd._layer.ep_dedup() or ep._layer.ep_dedup():
                failures.append(f"{recipe}: ep_dedup: expected on by default and off on request, "
                                f"got {epd._layer.ep_dedup()} / {ep._layer.ep_dedup()}")
            dist.all_reduce(got[4], group=dist.group.WORLD)  # dgate: sum over the ranks
            full = _run(ref, x, dy)
            # The reference's rows/slices of this rank.
            want = [full[0][t0:t0 + T], full[1][t0:t0 + T],
                    full[2][rank * El * 2 * F:(rank + 1) * El * 2 * F],
                    full[3][rank * El * H:(rank + 1) * El * H], full[4]]
            if mx:
                loose = want
                one = _run(ref1, x, dy)
                want = [one[0][t0:t0 + T], one[1][t0:t0 + T],
                        one[2][rank * El * 2 * F:(rank + 1) * El * 2 * F],
                        one[3][rank * El * H:(rank + 1) * El * H], one[4]]
                for n, a, b in zip(names, got, loose):
                    e = rel(a, b)
                    if not e < MX_BOUND:
                        failures.append(f"{recipe}: {n} vs comm-less layer: rel {e:.3g} >= "
                                        f"{MX_BOUND}")
            for n, a, b in zip(names, got, want):
                if not _bitwise(a, b):
                    failures.append(f"{recipe}: {n} not bitwise equal (rel {rel(a, b):.3g})")
            e = rel(got[4], want[4])
            if not e < 1e-5:
                failures.append(f"{recipe}: dgate summed over ranks: rel {e:.3g} >= 1e-5")
            if ep._layer.ep_size() != world:
                failures.append(f"{recipe}: C++ layer ep_size {ep._layer.ep_size()}")
        if ep._layer.max_tokens() != max(TOKENS):
            failures.append(f"agreed max_tokens {ep._layer.max_tokens()} != {max(TOKENS)}")
    except Exception as e:  # noqa: BLE001  (reported by the parent; the peer may time out)
        import traceback

        failures.append(f"exception {e!r}: " + traceback.format_exc())
    finally:
        torch.save(failures, f"{out}/rank{rank}.pt")
        dist.destroy_process_group()


def _gloo_worker(rank, world, store, out):
    dist = _init(rank, world, store, backend="gloo")
    try:
        with pytest.raises(NotImplementedError, match="NCCL"):
            fp8flow.MoE(256, 256, 4, 2, process_group=dist.group.WORLD)
        m = fp8flow.MoE(256, 256, 4, 2, process_group=dist.group.WORLD, expert_parallel=False)
        assert m.w1.shape == (4 * 2 * 256, 256) and m.local_experts == 4
        torch.save([], f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _failures(tmp_path, world):
    out = []
    for r in range(world):
        f = tmp_path / f"rank{r}.pt"
        out += [f"rank {r}: {x}" for x in torch.load(f)] if f.exists() else [f"rank {r}: no result"]
    return out


@pytest.mark.cuda
@pytest.mark.multigpu
@two_gpus
@needs_nccl
def test_communicator_from_process_group(tmp_path):
    _spawn(_comm_worker, 2, tmp_path)


@pytest.mark.cuda
@pytest.mark.multigpu
@two_gpus
@needs_nccl
def test_ep2_equals_one_gpu(tmp_path):
    _spawn(_ep_worker, 2, tmp_path)
    fails = _failures(tmp_path, 2)
    assert not fails, "\n".join(fails)


def test_ep_arguments():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    with pytest.raises(ValueError, match="process_group"):
        fp8flow.MoE(256, 256, 4, 2, expert_parallel=True)
    with pytest.raises(ValueError, match="ep_dedup=True needs expert parallelism"):
        fp8flow.MoE(256, 256, 4, 2, ep_dedup=True)
    assert fp8flow.MoE(256, 256, 4, 2).ep_dedup is False  # the default is on with EP only
    # A real single-process group (gloo) of size 1 is the plain layer: every expert, no comm.
    own = not dist.is_initialized()
    if own:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        m = fp8flow.MoE(256, 256, 4, 2, recipe="bf16", process_group=dist.group.WORLD)
        assert m.process_group is dist.group.WORLD and m.ep_size == 1 and m.local_experts == 4
        assert m.w1.shape == (4 * 2 * 256, 256)
        y = m(torch.randn(8, 256))
        assert y.shape == (8, 256) and m._layer.ep_size() == 1
        with pytest.raises(ValueError, match="ep_max_recv_rows"):
            fp8flow.MoE(256, 256, 4, 2, process_group=dist.group.WORLD, ep_max_recv_rows=-1)
        if not fp8flow.distributed.comm_available():
            with pytest.raises(NotImplementedError, match="NCCL"):
                fp8flow.MoE(256, 256, 4, 2, process_group=dist.group.WORLD, expert_parallel=True)
    finally:
        if own:
            dist.destroy_process_group()


def test_ep_without_nccl_raises(tmp_path):
    """2 gloo processes on the CPU: without NCCL, EP raises NotImplementedError (naming NCCL)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo unavailable")
    if fp8flow.distributed.comm_available():
        pytest.skip("this build has NCCL: EP is tested on two GPUs (test_ep2_equals_one_gpu)")
    _spawn(_gloo_worker, 2, tmp_path)
    fails = _failures(tmp_path, 2)
    assert not fails, "\n".join(fails)
