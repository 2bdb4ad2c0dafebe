"""Scale-out on PyTorch's own engine: ``torch.distributed`` (DDP), launched by ``torchrun``.

No home-made cluster: processes are started by ``torchrun`` (or ``reloop run --nproc N``, which calls
it), find each other through the ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE`` environment
``torchrun`` sets, and talk through gloo (CPU) or NCCL (CUDA).

What runs in parallel, and what does not:

* **Training is data-parallel.** Every rank holds the same model (DDP broadcasts rank 0's weights when
  it wraps the model) and an identically seeded shuffling generator. :func:`reloop.update.trainer.train_rows`
  draws the *global* batch of ``train.batch_size`` rows exactly as one process would, and rank ``r`` trains
  on its share ``batch[r::world]``; DDP averages the gradients (weighted by the share sizes), so one
  optimizer step equals the single-process step on the whole batch, up to float summation order.
  With several processes the result therefore matches one process (see ``tests/test_distributed.py``).
* **Rows can be sharded**: :func:`shard_indices` / :func:`shard_rows` give each rank a deterministic
  ``DistributedSampler``-like share of a period (padded or truncated to equal lengths so every rank takes
  the same number of steps), and :class:`reloop.data.shards.ShardedPeriod` reads a rank's share of
  Parquet row groups, for data larger than one machine's memory.
* **Metrics are reduced**: :func:`all_reduce_sums` (loss sums, counts), :func:`all_gather_rows` and
  :func:`global_auc` (exact AUC over the rows of every rank).
* Serving a period batch by batch (error memory in between) is sequential by nature: every rank serves
  the whole period (identical models give identical results) and **rank 0 alone writes results**
  (:func:`run_experiment_distributed`).

Example (single process: everything degrades to a no-op)::

    >>> env = init_distributed()            # no torchrun variables -> world of one, nothing initialised
    >>> env.world_size, env.rank, env.is_main
    (1, 0, True)
    >>> shard_indices(10, rank=1, world=3).tolist()
    [1, 4, 7, 0]
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from reloop.device import resolve_device

__all__ = [
    "DistEnv",
    "init_distributed",
    "shutdown",
    "current",
    "is_active",
    "barrier",
    "env_from_torchrun",
    "backend_for",
    "wrap_ddp",
    "unwrap",
    "shard_indices",
    "shard_rows",
    "shard_bounds",
    "all_reduce_sums",
    "all_gather_rows",
    "rank_zero_first",
    "launch_local",
    "launched_by_torchrun",
    "rank_out_dir",
]


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its node), its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_CURRENT: DistEnv | None = None


def env_from_torchrun(environ: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from the variables ``torchrun`` sets, or None outside torchrun."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ or "RANK" not in environ:
        return None
    rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
    local = int(environ.get("LOCAL_RANK", rank))
    return rank, world, local


def backend_for(device: str | torch.device) -> str:
    """NCCL for CUDA devices, gloo otherwise (CPU)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(
    device: str | torch.device = "cpu", backend: str | None = None, timeout_s: float = 1800.0
) -> DistEnv:
    """Join the process group ``torchrun`` describes (``env://``), or return a world of one.

    ``device``: the config's ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``; see :mod:`reloop.device`);
    with CUDA every process of a group takes the GPU of its ``LOCAL_RANK`` (an explicit ``cuda:N`` is
    overridden) and the backend defaults to NCCL. CUDA asked for where there is none raises
    :class:`reloop.config.ConfigError` naming ``device``. Calling it again returns the same environment.
    """
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    found = env_from_torchrun()
    if found is None or found[1] <= 1:
        _CURRENT = DistEnv(device=resolve_device(device, default_index=0))
        return _CURRENT
    rank, world, local = found
    dev = resolve_device(device, default_index=local)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    backend = backend or backend_for(dev)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    _CURRENT = DistEnv(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend)
    return _CURRENT


def shutdown() -> None:
    """Leave the process group (idempotent)."""
    global _CURRENT
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = None


def current() -> DistEnv:
    """The environment of :func:`init_distributed` (a world of one before or without it)."""
    if _CURRENT is not None:
        return _CURRENT
    if dist.is_available() and dist.is_initialized():  # a process group someone else initialised
        return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), backend=dist.get_backend())
    return DistEnv()


def is_active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def runtime_device(spec: str | torch.device = "cpu") -> torch.device:
    """The device this process computes on: its ``LOCAL_RANK`` GPU (or the CPU) inside a ``torchrun``
    process group of several processes, else :func:`resolve_device` of ``spec``."""
    if is_active():
        return current().device
    return resolve_device(spec)


def barrier() -> None:
    if is_active():
        dist.barrier()


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills a cache), the others after it (then reading the cache)."""
    env = current()
    if env.distributed and not env.is_main:
        barrier()
    try:
        yield
    finally:
        if env.distributed and env.is_main:
            barrier()


# --------------------------------------------------------------------------------------------------
# models


def wrap_ddp(
    model: nn.Module, env: DistEnv | None = None, find_unused_parameters: bool = False, static_graph: bool = True
) -> nn.Module:
    """``DistributedDataParallel(model)`` in a process group of several processes, else ``model``.

    Wrapping broadcasts rank 0's parameters and buffers, so all ranks start identical.
    ``static_graph`` (default): the set of parameters a step uses does not change between steps, which
    holds for every model of the zoo; DDP then finds parameters a model never reads (a sequence table
    without sequences...) on its first step, without a graph traversal on every step.
    """
    env = env or current()
    if not is_active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model
    on_cuda = next((p.device.type == "cuda" for p in model.parameters()), False)
    device_ids = [env.device.index if env.device.index is not None else env.local_rank] if on_cuda else None
    return DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters, static_graph=static_graph
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


# --------------------------------------------------------------------------------------------------
# rows


def shard_indices(
    n: int,
    rank: int | None = None,
    world: int | None = None,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> Tensor:
    """This rank's row indices out of ``n``, as ``torch.utils.data.DistributedSampler`` splits them.

    The (optionally seeded-shuffled) order is padded by wrapping around to a multiple of ``world``
    (or truncated with ``drop_last``) and rank ``r`` takes positions ``r, r + world, ...``; every rank gets
    the same count, so every rank takes the same number of steps (DDP needs that), and the union over
    ranks is every row (padding repeats at most ``world - 1`` rows).
    """
    env = current()
    rank = env.rank if rank is None else rank
    world = env.world_size if world is None else world
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside 0..{world - 1}")
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(n)
    if drop_last:
        order = order[: n - n % world]
    elif n % world and n:
        pad = world - n % world
        order = torch.cat([order, order[torch.arange(pad) % n]])
    return order[rank::world]


def shard_bounds(n: int, rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """A contiguous ``[start, end)`` block of ``n`` rows for this rank (sizes differ by at most one).

    For readers that must stay sequential (Parquet row ranges); pair it with ``drop_last``-style
    step counts or ``DistributedDataParallel.join`` when sizes differ.
    """
    env = current()
    rank = env.rank if rank is None else rank
    world = env.world_size if world is None else world
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_rows(
    rows,
    rank: int | None = None,
    world: int | None = None,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
):
    """This rank's share of a :class:`~reloop.data.tensors.PeriodTensors` (see :func:`shard_indices`)."""
    idx = shard_indices(len(rows), rank, world, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return rows.take(idx)


# --------------------------------------------------------------------------------------------------
# metrics


def all_reduce_sums(values: Mapping[str, float | Tensor]) -> dict[str, float]:
    """Sum each value over ranks (one collective); identity in a world of one.

    Reduce *sums and counts* (``loss_sum``, ``n``) and divide afterwards: a mean of per-rank means is
    wrong when ranks hold different row counts.
    """
    keys = list(values)
    vec = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if is_active():
        if dist.get_backend() == "nccl":
            vec = vec.to(current().device)
        dist.all_reduce(vec, op=dist.ReduceOp.SUM)
    return {k: float(v) for k, v in zip(keys, vec.cpu().tolist())}


def all_gather_rows(t: Tensor) -> Tensor:
    """Concatenate a per-rank ``[n_r, ...]`` tensor over ranks in rank order (sizes may differ)."""
    if not is_active():
        return t
    world = dist.get_world_size()
    dev = current().device if dist.get_backend() == "nccl" else torch.device("cpu")
    local = t.to(dev).contiguous()
    n = torch.tensor([local.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    top = max(counts)
    padded = torch.zeros((top, *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)


# --------------------------------------------------------------------------------------------------
# the protocol under torchrun


def launched_by_torchrun() -> bool:
    """True in a process ``torchrun`` started as one of several (``WORLD_SIZE`` > 1)."""
    found = env_from_torchrun()
    return found is not None and found[1] > 1


def launch_local(
    nproc: int, cli_args: list[str], threads: int | None = None, extra_env: Mapping[str, str] | None = None
) -> int:
    """Run ``reloop <cli_args>`` in ``nproc`` processes on this machine with ``torch.distributed.run``
    (``torchrun --standalone``); returns its exit code. Each process gets ``threads`` intra-op threads
    (``RELOOP_THREADS``; torchrun's own default is 1 per process)."""
    import subprocess
    import sys

    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    env = dict(os.environ)
    if threads:
        env["RELOOP_THREADS"] = str(threads)
        env.setdefault("OMP_NUM_THREADS", str(threads))
    env.update(extra_env or {})
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "reloop.cli",
        *cli_args,
    ]
    return subprocess.run(cmd, env=env).returncode


def rank_out_dir(out: Path, env: DistEnv | None = None) -> Path:
    """Where a rank writes: ``out`` for rank 0, ``out/_ranks/rank<r>`` for the others.

    The other ranks keep their own checkpoints there so that ``--resume`` resumes every rank.
    """
    env = env or current()
    return Path(out) if env.is_main else Path(out) / "_ranks" / f"rank{env.rank}"
