"""Data-parallel training in processes started by ``torchrun`` (torch.distributed).

``torchrun --nproc-per-node=N -m lrlab run RECIPE`` starts N processes ("ranks") and tells each
its place through the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``; see the torchrun documentation). :func:`process_group` reads it once, around a
command of the ``lrlab`` CLI, and joins the default process group: gloo for CPU tensors, NCCL
for CUDA tensors (each rank on ``cuda:LOCAL_RANK``). Every other module asks this one:

* :func:`is_distributed`, :func:`rank`, :func:`world_size`, :func:`is_main`, :func:`shard`;
* :func:`from_main` (rank 0 computes, e.g. the LR range test or reading a checkpoint; every
  rank gets its value, or its :class:`~lrlab.errors.LrlabError`, by ``broadcast_object_list``),
  :func:`main_first`, :func:`barrier`;
* :func:`all_reduce_sums` (metrics summed over the ranks), :func:`wrap`
  (``DistributedDataParallel``, optionally with ``SyncBatchNorm``), :func:`check_batch_sizes`.

The data-parallel scheme (Li et al. 2020, "PyTorch Distributed", arXiv:2006.15704): every rank
holds the same model; each global batch of ``train.batch_size`` images is split into ``world``
equal, disjoint parts (``BatchLoader(shard=(rank, world))``); the backward pass averages the
gradients over the ranks, so every rank takes the same optimizer step as one process would on
the whole batch (exactly, up to float rounding, for models without BatchNorm; BatchNorm
normalises over each rank's part unless ``train.sync_bn``).

Without torchrun (or with one process) nothing is initialised and every function is the
single-process identity: rank 0 of 1, no communication.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from lrlab.errors import LrlabError

T = TypeVar("T")

COMMANDS = ("run", "train", "find-lr", "resume")
"""The ``lrlab`` commands that run under torchrun with more than one process."""

TIMEOUT = timedelta(hours=6)
"""How long a collective may wait: the other ranks wait in a broadcast while rank 0 runs the LR
range test (torch's default, 30 minutes, is shorter than a long range test on a CPU)."""


def launched() -> bool:
    """True when torchrun (or another launcher setting ``WORLD_SIZE``) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """True while the process group is initialised (more than one rank)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in [0, world_size); 0 without torchrun. Read from the environment
    when the group is not (or no longer) initialised, so error messages stay on rank 0 only."""
    if is_distributed():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world_size() -> int:
    """The number of ranks (processes) of the job; 1 without torchrun."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0, the only rank that writes files and prints."""
    return rank() == 0


def shard() -> tuple[int, int]:
    """(rank, world size): the part of every batch this process computes on (``BatchLoader(shard=)``)."""
    return rank(), world_size()


@contextlib.contextmanager
def process_group(command: str) -> Iterator[None]:
    """Join the process group described by torchrun's environment for the block, then leave it;
    a no-op without torchrun. Backends: ``cpu:gloo,cuda:nccl`` with CUDA (after
    ``torch.cuda.set_device(LOCAL_RANK)``), gloo without.

    Raises:
        LrlabError: ``command`` is not one of :data:`COMMANDS` under torchrun.
    """
    if not launched():
        yield
        return
    if command not in COMMANDS:
        raise LrlabError(f"lrlab {command} runs in one process; start it without torchrun "
                         f"(torchrun runs: {', '.join(COMMANDS)})")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank has reached this call (nothing without torchrun)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object, tensors included) on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _attempt(fn: Callable[[], T]) -> tuple[bool, Any]:
    try:
        return True, fn()
    except LrlabError as e:
        return False, e


def from_main(fn: Callable[[], T]) -> T:
    """``fn()`` computed on rank 0 only; its value on every rank. An
    :class:`~lrlab.errors.LrlabError` raised by ``fn`` is raised on every rank, so all of them
    stop alike (only rank 0 prints it). Other exceptions end rank 0; torchrun then stops the job.

    Without torchrun: ``fn()``.
    """
    if not is_distributed():
        return fn()
    ok, value = broadcast_object(_attempt(fn) if is_main() else None)
    if not ok:
        raise value
    return value


def main_first(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 first, then on the other ranks (e.g. loading data that rank 0 may
    have to decode into the cache first); an :class:`LrlabError` of rank 0 is raised on every
    rank. Without torchrun: ``fn()``."""
    if not is_distributed():
        return fn()
    if is_main():
        ok, value = _attempt(fn)
        broadcast_object((ok, None if ok else value))
        if not ok:
            raise value
        return value
    ok, error = broadcast_object(None)
    if not ok:
        raise error
    return fn()


def all_reduce_sums(*values: float) -> tuple[float, ...]:
    """The sums over all ranks of each of ``values`` (float64, through gloo on the CPU),
    identical on every rank. Without torchrun: ``values`` as floats."""
    if not is_distributed():
        return tuple(float(v) for v in values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t)
    return tuple(t.tolist())


def wrap(model: nn.Module, sync_bn: bool = False) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` (its gradients averaged over the ranks in the
    backward pass), with ``sync_bn`` its BatchNorm layers first made ``SyncBatchNorm`` (in
    place: same parameters and buffers; statistics over the whole global batch, CUDA only).
    Without torchrun: ``model`` itself. The wrapper's ``.module`` is ``model``."""
    if not is_distributed():
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device = next(model.parameters()).device
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def check_batch_sizes(sizes: list[int], device: torch.device, sync_bn: bool) -> None:
    """Before any work under torchrun: every epoch's global batch splits evenly over the ranks,
    and ``train.sync_bn`` has CUDA devices. Nothing without torchrun.

    Raises:
        LrlabError: a batch with fewer images than ranks or not a multiple of the number of
            ranks (naming both numbers), or ``train.sync_bn`` on a CPU.
    """
    world = world_size()
    if world == 1:
        return
    for epoch, bs in enumerate(sizes):
        if bs < world:
            raise LrlabError(f"torchrun started {world} ranks but train.batch_size is {bs} (epoch {epoch + 1}): "
                             f"fewer images per training batch than ranks; use at most {bs} ranks or "
                             f"train.batch_size >= {world}")
        if bs % world:
            raise LrlabError(f"train.batch_size {bs} (epoch {epoch + 1}) does not split evenly over {world} "
                             f"torchrun ranks; use a multiple of {world} (it is the global batch)")
    if sync_bn and device.type != "cuda":
        raise LrlabError(f"train.sync_bn needs CUDA devices (torch's SyncBatchNorm), not {device.type}; "
                         f"set train.sync_bn=false")
