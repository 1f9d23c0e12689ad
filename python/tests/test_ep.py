"""Expert parallelism through torch.distributed: the NCCL communicator built from a process group,
and an EP=2 layer equal to the single-GPU layer. Needs two GPUs; skipped (with the reason) while
the library lacks the communicator (branch `comm`) or the C++ MoELayer has no EP config (branch
`ep`), and on machines with fewer than two GPUs.
"""

import os
import socket

import pytest

torch = pytest.importorskip("torch")
fp8flow = pytest.importorskip("fp8flow")

two_gpus = pytest.mark.skipif(
    not fp8flow.cuda_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, world, port):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    return dist


def _comm_worker(rank, world, port):
    dist = _init(rank, world, port)
    try:
        comm = fp8flow.distributed.make_communicator(None)
        assert comm.rank() == rank and comm.size() == world and comm.backend() == "nccl"
    finally:
        dist.destroy_process_group()


def _ep_worker(rank, world, port, out):
    dist = _init(rank, world, port)
    try:
        H, F, E, k, T = 256, 256, 8, 2, 128
        torch.manual_seed(0)
        full = fp8flow.MoE(H, F, E, k, recipe="fp8-flow", device="cuda")  # same init on all ranks
        El = E // world
        ep = fp8flow.MoE(H, F, E, k, recipe="fp8-flow", device="cuda", process_group=dist.group.WORLD)
        with torch.no_grad():  # rank r holds experts [r El, (r+1) El) (Megatron's EP sharding)
            ep.gate_weight.copy_(full.gate_weight)
            ep.w1.copy_(full.w1.view(E, -1, H)[rank * El:(rank + 1) * El].reshape(-1, H))
            ep.w2.copy_(full.w2.view(E, H, F)[rank * El:(rank + 1) * El].reshape(-1, F))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(world * T, H, generator=g).to(torch.bfloat16).cuda()
        with torch.no_grad():
            y_ep = ep(x[rank * T:(rank + 1) * T])
            y_one = full(x)[rank * T:(rank + 1) * T]
        torch.save({"equal": torch.equal(y_ep, y_one)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.multigpu
@two_gpus
@pytest.mark.skipif(not fp8flow.distributed.comm_available(),
                    reason="libfp8flow.a has no NCCL communicator yet (branch `comm`)")
def test_communicator_from_process_group():
    import torch.multiprocessing as mp

    mp.spawn(_comm_worker, args=(2, free_port()), nprocs=2, join=True)


@pytest.mark.cuda
@pytest.mark.multigpu
@two_gpus
@pytest.mark.skipif(not torch.ops.fp8flow.moe_ep_available(),
                    reason="the C++ MoELayer has no expert-parallel config yet (branch `ep`)")
def test_ep2_equals_one_gpu(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ep_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        assert torch.load(tmp_path / f"rank{r}.pt")["equal"], f"rank {r}: EP output != 1-GPU output"


def test_ep_without_the_cpp_layer_support_raises():
    if torch.ops.fp8flow.moe_ep_available():
        pytest.skip("EP is wired")

    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    # A real single-process group (gloo) of size 1 is accepted; size > 1 raises NotImplementedError.
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        m = fp8flow.MoE(256, 256, 4, 2, process_group=dist.group.WORLD)
        assert m.process_group is dist.group.WORLD
    finally:
        dist.destroy_process_group()
