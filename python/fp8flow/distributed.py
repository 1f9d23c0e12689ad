"""Expert-parallel plumbing: fp8flow's NCCL communicator built from a torch.distributed group.

    comm = fp8flow.distributed.make_communicator(group)   # collective over the group's ranks

Rank 0 of the group makes an NCCL unique id (fp8flow::nccl_unique_id, include/fp8flow/comm.h),
torch.distributed.broadcast_object_list sends its 128 bytes to the group, and every rank makes its
communicator (fp8flow::make_nccl_communicator(id, rank, size)) on its current CUDA device (call
torch.cuda.set_device first). fp8flow owns this communicator (its own NCCL communicator next to
torch's, same ranks).

Availability: needs a libfp8flow.a built with NCCL (comm_available()). fp8flow.MoE(...,
process_group=group) calls make_communicator itself at its first forward (expert parallelism, see
fp8flow/moe.py) and its C++ layer keeps the communicator alive.
"""

import torch


def comm_available():
    """True when this build has fp8flow's NCCL communicator."""
    return bool(torch.ops.fp8flow.comm_available())


def make_communicator(group=None, timeout_ms=120000):
    """fp8flow Communicator (torch.classes.fp8flow.Communicator) over `group` (None: the default
    group). Collective: every rank of the group must call it."""
    import torch.distributed as dist

    from ._errors import translate

    if not comm_available():
        raise NotImplementedError(
            "fp8flow.distributed.make_communicator: this libfp8flow.a has no NCCL communicator "
            "(built without branch `comm`, or without NCCL)")
    rank = dist.get_rank(group)
    size = dist.get_world_size(group)
    payload = [bytes(torch.ops.fp8flow.nccl_unique_id().tolist())] if rank == 0 else [None]
    if group is None:
        src = 0
    elif hasattr(dist, "get_global_rank"):
        src = dist.get_global_rank(group, 0)
    else:  # torch < 2.0
        src = dist.distributed_c10d._get_global_rank(group, 0)
    dist.broadcast_object_list(payload, src=src, group=group)
    uid = torch.tensor(list(payload[0]), dtype=torch.uint8)
    return translate(torch.classes.fp8flow.Communicator)(uid, rank, size, int(timeout_ms))
