"""The one device a run computes on: the config's ``device: auto | cpu | cuda | cuda:N``, resolved once.

- ``cpu`` (default): everything on the CPU.
- ``auto``: the current CUDA device when ``torch.cuda.is_available()``, else the CPU.
- ``cuda`` / ``cuda:N``: the current (resp. N-th) CUDA device; asking for one that is not there is a
  :class:`~reloop.errors.ConfigError` naming ``device``.

Under ``torchrun`` with several processes, :func:`reloop.distributed.init_distributed` gives each process
the GPU of its ``LOCAL_RANK`` instead (``cuda:N`` is then overridden); :func:`runtime_device` returns that.

The protocol copies the encoded stream to the device once, builds every model and error memory there,
and brings only each period's served predictions back to the CPU (metrics are computed on the CPU).
Checkpoints are written with CPU tensors and read with ``map_location="cpu"``, so a run checkpointed on a
GPU resumes on a CPU-only machine and vice versa.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from reloop.errors import ConfigError

SPEC = re.compile(r"(auto|cpu|cuda)(?::(\d+))?")


def check_device_spec(value: Any) -> str:
    """The spec ``value`` if it is syntactically one of ``auto``, ``cpu``, ``cuda``, ``cuda:N``.

    Raises:
        ValueError: naming the accepted forms (the caller prefixes the key, ``device: ...``).
    """
    text = str(value).strip().lower() if isinstance(value, (str, torch.device)) else None
    m = SPEC.fullmatch(text) if text is not None else None
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ValueError(f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
    return text


def resolve_device(
    spec: str | torch.device = "cpu", *, default_index: int | None = None, where: str = "device"
) -> torch.device:
    """``auto | cpu | cuda | cuda:N`` (or a ``torch.device``) -> a concrete ``torch.device``.

    CUDA devices always come back with their index (``cuda:0``, not ``cuda``), so they compare equal to
    the ``.device`` of the tensors placed on them. ``default_index`` is the GPU that ``cuda`` / ``auto``
    mean (default: ``torch.cuda.current_device()``).

    Raises:
        reloop.errors.ConfigError: ``device: ...`` for a malformed spec, for CUDA requested when
            ``torch.cuda.is_available()`` is False, and for an index beyond the visible GPUs.
    """
    try:
        text = check_device_spec(spec)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    kind, _, index = text.partition(":")
    if kind == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if kind == "auto":
        if not available:
            return torch.device("cpu")
    elif not available:
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
        raise ConfigError(
            f"{where}: {str(spec)!r} requested but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built {built}); use device: cpu or auto"
        )
    if index:
        n = int(index)
    else:
        n = default_index if default_index is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if n >= count:
        raise ConfigError(
            f"{where}: {str(spec)!r} requested but only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})"
        )
    return torch.device("cuda", n)


def clock(device: torch.device | str = "cpu") -> float:
    """``time.perf_counter()`` once the work queued on ``device`` has finished: CUDA kernels run
    asynchronously, so a stage timed without waiting would be charged to whichever stage syncs next."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor inside (dicts, lists, tuples) on the CPU, for device-neutral checkpoints.

    CPU tensors are returned as they are (no copy); other objects are left alone.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu() if obj.device.type != "cpu" else obj
    if isinstance(obj, dict):  # dict, OrderedDict (a module's state_dict, with its ``_metadata``)
        out = type(obj)() if type(obj) in (dict, OrderedDict) else {}
        for k, v in obj.items():
            out[k] = to_cpu(v)
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(obj, Mapping):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(to_cpu(v) for v in obj)
    return obj
