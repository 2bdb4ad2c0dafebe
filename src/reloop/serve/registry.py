"""Model versions on disk, published atomically, and the bootstrap of an empty model directory.

Layout of a model directory::

    DIR/config.yaml        the resolved run config the service was bootstrapped from
    DIR/service.json       run name, pretraining periods/rows, format version
    DIR/encoder.json       encoder snapshot (ids of the pretraining periods; the log's ``vocab`` table
                           holds every id assigned since, so the snapshot is only a starting point)
    DIR/pretrain.pt        encoded rows of the pretraining periods (batch/full updates read them)
    DIR/log.sqlite3        the durable log (``reloop.serve.log``)
    DIR/versions/000001/   serving.pt (Θ*, what serves), base.pt (Θ, the update chain), state.pt
                           (optimizer, strategy, generator, RNG), meta.json
    DIR/CURRENT            the published version number, replaced atomically

Publishing writes a version into a temporary directory, fsyncs every file and the directory,
renames it into ``versions/`` and only then replaces ``CURRENT`` (write a temporary file, fsync,
``os.replace``, fsync the directory). A reader that sees a version number in ``CURRENT`` therefore
always finds the complete version; a crash in between leaves the previous version serving.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from reloop.config import Config, dump_config, parse_config
from reloop.data.encode import EncoderConfig, FeatureEncoder
from reloop.data.schema import N_RESERVED, FeatureMap
from reloop.data.tensors import PeriodTensors
from reloop.models.base import CTRModel, load_model, save_model

FORMAT = 1
OUR_FILES = {"config.yaml", "service.json", "encoder.json", "pretrain.pt", "versions", "CURRENT",
             "log.sqlite3", "log.sqlite3-wal", "log.sqlite3-shm", "retrain.lock", "CURRENT.tmp"}


def is_ours(name: str) -> bool:
    """A file name a model directory may hold (ours, or one of our hidden temporary files)."""
    return name in OUR_FILES or (name.startswith(".") and name.endswith(".tmp"))


class RegistryError(RuntimeError):
    """A model directory is missing, foreign or inconsistent."""


# -- durable file helpers ----------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``path`` so that readers see either the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _torch_save_synced(obj: Any, path: Path) -> None:
    from reloop.device import to_cpu

    torch.save(to_cpu(obj), path)  # CPU tensors: a version made on a GPU loads anywhere
    _fsync_file(path)


@dataclass
class Version:
    number: int
    path: Path
    meta: dict[str, Any]


class ModelDir:
    """A service's model directory (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- paths ---------------------------------------------------------------------------------
    @property
    def current_file(self) -> Path:
        return self.path / "CURRENT"

    @property
    def log_path(self) -> Path:
        return self.path / "log.sqlite3"

    @property
    def versions(self) -> Path:
        return self.path / "versions"

    def version_path(self, number: int) -> Path:
        return self.versions / f"{number:06d}"

    # -- state ---------------------------------------------------------------------------------
    def is_bootstrapped(self) -> bool:
        return self.current_file.exists()

    def check(self) -> None:
        if not self.is_bootstrapped():
            raise RegistryError(f"{self.path} is not a bootstrapped model directory (no CURRENT file); "
                                "start `reloop serve --config CONFIG --model-dir DIR` once to create it")

    def current_version(self) -> int:
        self.check()
        text = self.current_file.read_text().strip()
        try:
            return int(text)
        except ValueError:
            raise RegistryError(f"{self.current_file}: expected a version number, got {text!r}") from None

    def current_stamp(self) -> tuple[int, int] | None:
        """A cheap change detector for ``CURRENT`` (mtime in ns, inode)."""
        try:
            st = os.stat(self.current_file)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_ino

    def info(self) -> dict[str, Any]:
        return json.loads((self.path / "service.json").read_text())

    def config(self) -> Config:
        raw = yaml.safe_load((self.path / "config.yaml").read_text())
        return parse_config(raw)

    def meta(self, number: int) -> dict[str, Any]:
        return json.loads((self.version_path(number) / "meta.json").read_text())

    def list_versions(self) -> list[int]:
        if not self.versions.exists():
            return []
        return sorted(int(p.name) for p in self.versions.iterdir() if p.is_dir() and p.name.isdigit())

    def encoder(self) -> FeatureEncoder:
        return FeatureEncoder.from_state(json.loads((self.path / "encoder.json").read_text()))

    def save_encoder(self, encoder: FeatureEncoder) -> None:
        self.save_encoder_state(encoder.state_dict())

    def save_encoder_state(self, state: dict[str, Any]) -> None:
        write_atomic(self.path / "encoder.json", json.dumps(state, default=_np_default))

    def pretrain_rows(self) -> tuple[PeriodTensors, list[tuple[int, int]], FeatureMap]:
        blob = torch.load(self.path / "pretrain.pt", map_location="cpu", weights_only=False)
        return PeriodTensors(blob["columns"]), [tuple(b) for b in blob["bounds"]], FeatureMap(**blob["feature_map"])

    def feature_map(self) -> FeatureMap:
        return FeatureMap(**self.info()["feature_map"])

    # -- models --------------------------------------------------------------------------------
    def load_serving(self, number: int) -> CTRModel:
        model = load_model(self.version_path(number) / "serving.pt", self.feature_map())
        model.eval()
        return model

    def load_base(self, number: int) -> CTRModel:
        path = self.version_path(number) / "base.pt"
        if not path.exists():
            path = self.version_path(number) / "serving.pt"
        model = load_model(path, self.feature_map())
        model.eval()
        return model

    def load_state(self, number: int) -> dict[str, Any]:
        return torch.load(self.version_path(number) / "state.pt", map_location="cpu", weights_only=False)

    def publish(self, base: CTRModel, serving: CTRModel, state: dict[str, Any], meta: dict[str, Any],
                number: int | None = None) -> Version:
        """Write a complete version, then point ``CURRENT`` at it (both steps atomic and synced).

        Callers serialise publications (``retrain`` holds ``retrain.lock``).
        """
        self.versions.mkdir(parents=True, exist_ok=True)
        number = number if number is not None else max(self.list_versions(), default=0) + 1
        final = self.version_path(number)
        if final.exists():
            raise RegistryError(f"version {number} already exists in {self.versions}")
        tmp = self.versions / f".tmp-{number:06d}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            save_model(serving, tmp / "serving.pt")
            _fsync_file(tmp / "serving.pt")
            if base is not serving:
                save_model(base, tmp / "base.pt")
                _fsync_file(tmp / "base.pt")
            _torch_save_synced(state, tmp / "state.pt")
            meta = {**meta, "version": number}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
            _fsync_file(tmp / "meta.json")
            fsync_dir(tmp)
            os.rename(tmp, final)
            fsync_dir(self.versions)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        write_atomic(self.current_file, f"{number}\n")
        return Version(number, final, meta)


def _np_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# -- bootstrap ---------------------------------------------------------------------------------
def pick_run(cfg: Config, run: str | None) -> str:
    if run is None:
        return next(iter(cfg.runs))
    if run not in cfg.runs:
        raise RegistryError(f"--run {run!r}: the config has no such run (runs: {', '.join(cfg.runs)})")
    return run


def composition(cfg: Config, run: str) -> dict[str, Any]:
    spec = cfg.runs[run]
    return {"run": run, "update": spec.update, "loss": spec.loss, "generator": spec.generator, "memory": spec.memory}


def pretrain_encoder(encoder: FeatureEncoder, rows: PeriodTensors, feature_map: FeatureMap) -> FeatureEncoder:
    """The encoder as it stood after the pretraining periods only (``prepare_stream`` grows its
    encoder over the whole log; the service must not know ids that arrive later).

    Ids are indexed in order of first arrival, so the pretraining ids are a prefix of each table.
    """
    state = encoder.state_dict()
    for table, vocab in state["vocabs"].items():
        fields = [f.name for f in feature_map.fields if f.table == table and f.kind != "numeric"]
        cap = vocab["capacity"]
        seen: set[int] = set()
        for name in fields:
            if name in rows.data:
                col = rows.data[name].reshape(-1)
                inside = col[(col >= N_RESERVED) & (col < N_RESERVED + cap)]
                seen.update(inside.unique().tolist())
        k = len(seen)
        if seen and max(seen) != N_RESERVED + k - 1:
            raise RegistryError(f"encoder table {table!r}: the pretraining ids are not a prefix of the vocabulary")
        vocab["ids"] = vocab["ids"][:k]
    if "user" in rows.data and state["users"]:
        users = rows.data["user"]
        k = int(users.max()) + 1 if len(users) else 0
        state["users"] = state["users"][:max(k, 0)]
    return FeatureEncoder.from_state(state)


def bootstrap(cfg: Config, model_dir: str | Path, run: str | None = None, seed: int | None = None,
              log=print) -> ModelDir:
    """Create a model directory: prepare the stream, pretrain Θ0, save encoder and version 1.

    ``CURRENT`` is written last: a directory interrupted half-way is bootstrapped again from scratch.
    """
    from reloop.data.prepare import prepare_stream
    from reloop.engine import RunEngine
    from reloop.protocol.runner import pretrain
    from reloop.serve.log import ServeLog

    md = ModelDir(model_dir)
    run = pick_run(cfg, run)
    if md.is_bootstrapped():
        raise RegistryError(f"{md.path} is already bootstrapped")
    if md.path.exists():
        foreign = [p.name for p in md.path.iterdir() if not is_ours(p.name)]
        if foreign:
            raise RegistryError(f"{md.path} is not empty and not a model directory (found {sorted(foreign)[:5]})")
        for p in md.path.iterdir():  # the leftovers of an interrupted bootstrap
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    md.path.mkdir(parents=True, exist_ok=True)
    seed = cfg.protocol.seeds[0] if seed is None else seed
    P = cfg.protocol.pretrain
    t0 = time.perf_counter()
    prepared = prepare_stream(cfg.data, P, EncoderConfig(**cfg.encoder.model_dump()))
    stream = prepared.stream
    log(f"prepared {len(stream.rows):,} rows in {stream.n_periods} periods ({time.perf_counter() - t0:.1f}s); "
        f"pretraining Θ0 on periods 1..{P}")
    model, optim_state = pretrain(cfg, stream, seed)
    model.eval()
    rows = stream.periods(1, P)
    encoder = pretrain_encoder(prepared.encoder, rows, stream.feature_map)

    (md.path / "config.yaml").write_text(dump_config(cfg))
    info = {"format": FORMAT, "run": run, "seed": seed, "pretrain_periods": P, "pretrain_rows": len(rows),
            "feature_map": stream.feature_map.model_dump(), "created": time.time(),
            "user": encoder.schema.user}
    (md.path / "service.json").write_text(json.dumps(info, indent=2))
    md.save_encoder(encoder)
    _torch_save_synced({"columns": rows.data, "bounds": stream.bounds[:P],
                        "feature_map": stream.feature_map.model_dump()}, md.path / "pretrain.pt")
    spec = cfg.runs[run]
    engine = RunEngine(cfg, spec, seed, stream.feature_map)  # the same initial state as an offline run
    engine_state = engine.state_dict()
    state = {"optim": optim_state, "strategy": engine_state["strategy"], "generator": engine_state["generator"],
             "rng": engine_state["rng"], "run": run}
    meta = {"created": time.time(), "trained_through": P, "update_periods": list(range(1, P + 1)),
            "serves_period": P + 1, "parent": None, "composition": composition(cfg, run),
            "model": cfg.model, "validation": None, "n_train": len(rows), "n_holdout": 0}
    for name in ("config.yaml", "service.json", "encoder.json"):
        _fsync_file(md.path / name)
    slog = ServeLog(md.log_path)
    slog.open_period(P + 1)
    version = md.publish(model, model, state, meta, number=1)
    slog.record_published(1, None, version.meta)
    slog.close()
    log(f"bootstrapped {md.path}: version 1 (Θ0) serves period {P + 1} ({time.perf_counter() - t0:.1f}s)")
    return md
