"""How many intra-op threads torch should use for a run, chosen from the model and the host.

torch starts with one intra-op thread per core. For the small models of drift benchmarks that is the
wrong default: each operation is too small to split, the threads spend their time waiting for each
other, and on a host whose cores are busy with other work they wait for the scheduler too (the demo
took 26 min with torch's default against 77 s with one thread on a 2-core host running other jobs).
The rule (:func:`choose_threads`; measurements in ``docs/guide/quickstart.md``):

* ``cpus``: the CPUs this process may run on (``os.sched_getaffinity``), capped by a cgroup CPU quota;
* ``busy``: the CPUs other processes keep busy, the larger of the 1-minute load average and the
  non-idle share of every CPU sampled over ``SAMPLE_SECONDS`` (``/proc/stat``), scaled to this
  process's share of the host;
* ``work``: multiply-adds of one training step's dense part, ``dense parameters × batch size``
  (embedding lookups and their sparse updates barely gain from threads);
* ``threads = 1`` when ``work < SMALL_WORK`` (small model), else ``max(1, min(cpus, ⌊cpus − busy + 0.25⌋))``:
  one thread per CPU that is free, so threads never queue behind other processes (for such models
  ``reloop run`` looks at the host again before each run).

``--threads N`` (or ``RELOOP_THREADS``) overrides the rule.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

#: Dense multiply-adds per training step below which one thread is used whatever the host (see
#: docs/guide/quickstart.md#threads: a wrong "several" costs far more than a wrong "one", so it is high).
SMALL_WORK = 500_000_000
#: Seconds over which ``/proc/stat`` is sampled for the CPUs other processes keep busy.
SAMPLE_SECONDS = 0.2
#: A CPU counts as free for a thread when at most this share of it is busy.
SLACK = 0.25


@dataclass(frozen=True)
class HostLoad:
    """What :func:`choose_threads` knows about the host."""

    cpus: int  # CPUs this process may use
    host_cpus: int  # CPUs of the whole host (the load figures are over these)
    busy: float  # CPUs of the host kept busy by other processes

    @property
    def busy_here(self) -> float:
        """The busy CPUs among ours, assuming the load spreads evenly over the host."""
        return min(float(self.cpus), self.busy * self.cpus / max(self.host_cpus, 1))


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str

    def describe(self) -> str:
        return f"{self.threads} ({self.reason})"


def _cgroup_cpus() -> float | None:
    """The CPU quota of this process's cgroup in CPUs (v2 ``cpu.max`` or v1 CFS), None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity set, capped by a cgroup quota (rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies over all CPUs from ``/proc/stat``; None where there is none."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def sampled_busy_cpus(seconds: float = SAMPLE_SECONDS) -> float | None:
    """CPUs of the host busy during ``seconds`` (this process sleeps meanwhile); None off Linux."""
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(seconds)
    second = _cpu_times()
    if second is None or second[1] <= first[1]:
        return None
    share = (second[0] - first[0]) / (second[1] - first[1])
    return share * (os.cpu_count() or 1)


def host_load(sample_seconds: float = SAMPLE_SECONDS) -> HostLoad:
    """The host as :func:`choose_threads` sees it now (takes ``sample_seconds``)."""
    busy = 0.0
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        pass
    sampled = sampled_busy_cpus(sample_seconds) if sample_seconds > 0 else None
    if sampled is not None:
        busy = max(busy, sampled)
    # processes started together on this machine (torchrun's LOCAL_WORLD_SIZE) share its CPUs
    share = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return HostLoad(cpus=max(1, usable_cpus() // share), host_cpus=os.cpu_count() or 1, busy=busy / share)


def choose_threads(work: float | None, load: HostLoad) -> ThreadChoice:
    """The thread count for a model doing ``work`` dense multiply-adds per step on a host under ``load``.

    ``work=None`` (unknown) is treated as large: only the host decides.
    """
    if load.cpus <= 1:
        return ThreadChoice(1, "auto: one usable CPU")
    if work is not None and work < SMALL_WORK:
        return ThreadChoice(
            1, f"auto: small model, {work / 1e6:.1f}M dense multiply-adds per step < {SMALL_WORK / 1e6:.0f}M"
        )
    free = load.cpus - load.busy_here
    threads = max(1, min(load.cpus, math.floor(free + SLACK)))
    return ThreadChoice(threads, f"auto: {load.cpus} usable CPUs, {load.busy_here:.1f} busy with other work")


def dense_work(model, batch_size: int) -> float:
    """Multiply-adds of one forward pass of ``model``'s dense part over a batch: parameters outside
    embedding tables × ``batch_size`` (the backward pass costs about twice as much, the same share)."""
    from torch import nn

    from reloop.models.layers import FeatureEmbedding

    sparse: set[int] = set()
    for module in model.modules():
        if isinstance(module, (FeatureEmbedding, nn.Embedding, nn.EmbeddingBag)):
            sparse.update(id(p) for p in module.parameters())
    dense = sum(p.numel() for p in model.parameters() if id(p) not in sparse)
    return float(dense) * batch_size


AUTO = "auto"


def parse_threads(value: str | int | None) -> int | str | None:
    """A thread setting: ``"auto"``, an integer ≥ 1 (also as text), or None (leave torch as it is).

    Raises:
        ValueError: anything else.
    """
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected 'auto' or a number of threads >= 1, got {value!r}") from None
    if isinstance(value, bool) or n < 1:
        raise ValueError(f"expected 'auto' or a number of threads >= 1, got {value!r}")
    return n


_COMMAND_SETTING: int | str | None = None


def set_command_setting(setting: int | str | None) -> None:
    """What ``reloop --threads`` chose for this process (``auto`` unless the user gave a number)."""
    global _COMMAND_SETTING
    _COMMAND_SETTING = parse_threads(setting)


def current_setting() -> int | str | None:
    """The thread setting in force: ``reloop --threads`` in this process, else ``RELOOP_THREADS``, else None."""
    if _COMMAND_SETTING is not None:
        return _COMMAND_SETTING
    return parse_threads(os.environ.get("RELOOP_THREADS"))


def apply_threads(setting: int | str | None, work: float | None, load: HostLoad | None = None) -> ThreadChoice | None:
    """Set torch's intra-op threads from ``setting`` (N, ``"auto"``: :func:`choose_threads` for a model
    doing ``work`` dense multiply-adds per step); None leaves torch as it is and returns None."""
    import torch

    setting = parse_threads(setting)
    if setting is None:
        return None
    if setting == AUTO:
        if load is None:  # a small model needs no look at the host (sampling it takes SAMPLE_SECONDS)
            small = work is not None and work < SMALL_WORK
            load = HostLoad(usable_cpus(), os.cpu_count() or 1, 0.0) if small else host_load()
        choice = choose_threads(work, load)
    else:
        choice = ThreadChoice(int(setting), "--threads / RELOOP_THREADS")
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    return choice
