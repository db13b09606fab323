"""Sharding work across the processes of a ``torchrun`` launch (gloo on CPU, NCCL on GPUs).

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`session` joins its process
group for the commands that shard their work. Outside a process group of two or more processes
every helper acts as one process would: :func:`shard` keeps every item, the reductions return
their input, :func:`is_main` is true. ``torch.distributed`` is imported only where it is used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import DistributedError

if TYPE_CHECKING:
    import numpy as np

T = TypeVar("T")
SHARDED_COMMANDS = ("eval", "explain")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer") from None


def launched() -> bool:
    """True when torchrun started this process as one of two or more (``WORLD_SIZE`` > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def _dist():
    """``torch.distributed`` while a process group of two or more processes is up, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def rank() -> int:
    """This process's rank in the process group (0 without one)."""
    dist = _dist()
    return dist.get_rank() if dist else 0


def world_size() -> int:
    """The number of processes sharing the work (1 without a process group)."""
    dist = _dist()
    return dist.get_world_size() if dist else 1


def is_main() -> bool:
    """True in the process that writes the results (rank 0, or the only process)."""
    return rank() == 0


def shard(items: Sequence[T]) -> list[T]:
    """This process's items: every ``world_size()``-th from index ``rank()`` (round-robin), so
    the shards are disjoint and together hold every item exactly once."""
    return list(items[rank() :: world_size()])


def _device():
    """Where collective tensors live: this process's GPU under NCCL, else the CPU."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(array: np.ndarray) -> np.ndarray:
    """The element-wise sum of ``array`` over every process (exact for integer arrays)."""
    import numpy as np

    dist = _dist()
    if dist is None:
        return np.array(array, copy=True)
    import torch

    tensor = torch.from_numpy(np.array(array, copy=True)).to(_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    dist = _dist()
    if dist is None:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for without a process group)."""
    dist = _dist()
    if dist is None:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[_device().index])
    else:
        dist.barrier()


def _cuda_device(device: str) -> str:
    """``cuda:<LOCAL_RANK>``, made this process's current GPU; DistributedError if it has none."""
    import torch

    local = _env_int("LOCAL_RANK", 0)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local >= count:
        raise DistributedError(
            f"--device {device}: LOCAL_RANK {local} has no GPU ({count} visible); start at most "
            f"{count} process(es) per machine (--nproc_per_node)"
        )
    torch.cuda.set_device(local)
    return f"cuda:{local}"


def init(device: str) -> str:
    """Join torchrun's process group (NCCL for a cuda device, else gloo); returns the device
    this process uses: ``cuda:<LOCAL_RANK>`` for any cuda device, else ``device`` unchanged."""
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("torchrun needs torch.distributed, which this PyTorch lacks")
    cuda = device.split(":")[0] == "cuda"
    if cuda:
        device = _cuda_device(device)
    backend = "nccl" if cuda else "gloo"
    try:
        dist.init_process_group(backend=backend)
    except (RuntimeError, ValueError) as error:
        detail = " ".join(str(error).split())[:200]
        raise DistributedError(f"cannot join the {backend} process group: {detail}") from None
    return device


def teardown() -> None:
    """Leave the process group, if this process joined one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def session(command: str, device: str | None) -> Iterator[str | None]:
    """Under torchrun: refuse a command that does not shard, join the process group for the
    others and leave it on the way out; yields the device to use. Else: yields ``device``."""
    if not launched():
        yield device
        return
    if command not in SHARDED_COMMANDS:
        raise DistributedError(
            f"{command} does not shard its work; run it without torchrun "
            f"(under torchrun: {', '.join(SHARDED_COMMANDS)})"
        )
    device = init(device or "cpu")
    try:
        yield device
        barrier()  # every rank done before any leaves: gloo can abort a rank torn down early
    finally:
        teardown()
