"""The protocol under ``torchrun``: every process runs the experiment, DDP splits each training batch.

:mod:`reloop.distributed` holds the process-group mechanics (below the models and the trainer);
this module puts the protocol on top of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from reloop import distributed as rd
from reloop.config import Config
from reloop.data.encode import EncoderConfig
from reloop.data.prepare import prepare_stream
from reloop.protocol.experiment import ExperimentResult, run_experiment


def run_experiment_distributed(
    cfg: Config, out: Path, resume: bool = False, show_progress: bool = True, console: Any = None
) -> ExperimentResult:
    """``run_experiment`` in every process of a ``torchrun`` job; rank 0's result directory is ``out``.

    Rank 0 prepares (and caches) the encoded stream first, then the others load it from the cache. Each
    rank runs the protocol; :func:`reloop.update.trainer.train_rows` splits every training batch across
    ranks (DDP). Returns the :class:`~reloop.protocol.experiment.ExperimentResult` (of this rank).
    """
    env = rd.init_distributed(getattr(cfg, "device", "cpu"))  # auto/cuda -> this rank's LOCAL_RANK GPU
    if not env.is_main:
        console, show_progress = Console(quiet=True), False
    try:
        with rd.rank_zero_first():
            prepare_stream(cfg.data, cfg.protocol.pretrain, EncoderConfig(**cfg.encoder.model_dump()))
        result = run_experiment(
            cfg, rd.rank_out_dir(out, env), resume=resume, show_progress=show_progress and env.is_main, console=console
        )
        rd.barrier()
        return result
    finally:
        rd.shutdown()
