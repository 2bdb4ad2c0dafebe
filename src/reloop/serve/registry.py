"""Model versions on disk, published atomically, and the bootstrap of an empty model directory.

Layout of a model directory::

    DIR/config.yaml        the resolved run config the service was bootstrapped from
    DIR/service.json       run name, pretraining periods/rows, format version
    DIR/encoder.json       encoder snapshot (ids of the pretraining periods; the log's ``vocab`` table
                           holds every id assigned since, so the snapshot is only a starting point)
    DIR/pretrain.pt        encoded rows of the pretraining periods (batch/full updates read them)
    DIR/log.sqlite3        the durable log (``reloop.serve.log``)
    DIR/versions/000001/   serving.safetensors (Θ*, what serves), base.safetensors (Θ, the update
                           chain), state.pt (optimizer, strategy, generator, RNG), meta.json
    DIR/CURRENT            the published version number, replaced atomically

Nothing read from a model directory can run code: model files are safetensors with JSON metadata
(``reloop.models.base.save_model``); ``state.pt`` and ``pretrain.pt`` hold plain containers of
tensors and numbers and are read with ``torch.load(weights_only=True)``, which refuses any pickle
that would call a function; the rest is JSON or YAML (``safe_load``). Versions written before this
format (``serving.pt``/``base.pt``) are read the same safe way. Every problem reading a file is a
one-line :class:`RegistryError` (:class:`VersionError` / :class:`IncompatibleVersion` for a version).

Publishing writes a version into a temporary directory, fsyncs every file and the directory,
renames it into ``versions/`` and only then replaces ``CURRENT`` (write a temporary file, fsync,
``os.replace``, fsync the directory). A reader that sees a version number in ``CURRENT`` therefore
always finds the complete version; a crash in between leaves the previous version serving.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from reloop.config import Config, dump_config, expert_spec, experts_of, parse_config
from reloop.data.encode import EncoderConfig, FeatureEncoder
from reloop.data.schema import N_RESERVED, FeatureMap
from reloop.data.tensors import PeriodTensors
from reloop.models.base import (
    CheckpointError,
    CTRModel,
    IncompatibleCheckpoint,
    load_model,
    save_model,
)

logger = logging.getLogger("reloop.serve")

FORMAT = 1
OUR_FILES = {
    "config.yaml",
    "service.json",
    "encoder.json",
    "pretrain.pt",
    "versions",
    "CURRENT",
    "log.sqlite3",
    "log.sqlite3-wal",
    "log.sqlite3-shm",
    "retrain.lock",
    "CURRENT.tmp",
    "experts",  # combine runs: DIR/experts/<name>/{versions, CURRENT}
    "combine.sqlite3",
    "combine.sqlite3-wal",
    "combine.sqlite3-shm",
}
EXPERTS_DIR = "experts"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$")
SERVING, BASE = "serving.safetensors", "base.safetensors"
LEGACY = {SERVING: "serving.pt", BASE: "base.pt"}  # versions written before the safetensors format


def is_ours(name: str) -> bool:
    """A file name a model directory may hold (ours, or one of our hidden temporary files)."""
    return name in OUR_FILES or (name.startswith(".") and name.endswith(".tmp"))


class RegistryError(RuntimeError):
    """A model directory is missing, foreign or inconsistent (the message is one line)."""


class VersionError(RegistryError):
    """A version that cannot be read: missing, truncated, corrupt or not a reloop file."""

    def __init__(self, version: int | None, reason: str) -> None:
        super().__init__(reason)
        self.version = version


class IncompatibleVersion(VersionError):
    """A readable version built for another model than the service's (see :func:`model_fingerprint`)."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` that never runs code from the file (plain containers and tensors only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def model_fingerprint(model: CTRModel, key: str) -> dict[str, Any]:
    """What must not change between two versions one service swaps: the model's name and every
    option, the feature map, every tensor's name and shape, and the error memory's key and width."""
    return {
        "model": model.config(),
        "feature_map": model.feature_map.model_dump(),
        "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
        "memory": {"key": key, "dim": model.key_dim(key)},
    }


def fingerprint_diff(got: dict[str, Any], want: dict[str, Any]) -> str:
    """The first differences of two fingerprints, one line (empty when equal)."""
    out = []
    for part in ("model", "feature_map", "shapes", "memory"):
        a, b = got.get(part), want.get(part)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            out += [f"{part}.{k}: {a.get(k)!r} vs {b.get(k)!r} serving" for k in keys[:3]]
        else:
            out.append(f"{part} differs")
    return "; ".join(out)[:500]


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
            raise RegistryError(
                f"{self.path} is not a bootstrapped model directory (no CURRENT file); "
                "start `reloop serve --config CONFIG --model-dir DIR` once to create it"
            )

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
        return self._json(self.path / "service.json")

    def config(self) -> Config:
        """The config the directory was bootstrapped with; a corrupt file is a one-line RegistryError."""
        from reloop.config import ConfigError

        path = self.path / "config.yaml"
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise RegistryError(f"{path}: not a readable config ({_one_line(e)})") from None
        if not isinstance(raw, dict):
            raise RegistryError(f"{path}: not a readable config (the top level is not a mapping)")
        try:
            return parse_config(raw)
        except ConfigError as e:
            raise RegistryError(f"{path}: invalid config: {str(e).splitlines()[0][:300]}") from None

    def meta(self, number: int) -> dict[str, Any]:
        try:
            return self._json(self.version_path(number) / "meta.json")
        except RegistryError as e:
            raise VersionError(number, f"version {number}: {e}") from None

    @staticmethod
    def _json(path: Path) -> dict[str, Any]:
        try:
            value = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise RegistryError(f"{path}: not readable ({_one_line(e)})") from None
        if not isinstance(value, dict):
            raise RegistryError(f"{path}: not readable (expected a JSON object)")
        return value

    def list_versions(self) -> list[int]:
        if not self.versions.exists():
            return []
        return sorted(int(p.name) for p in self.versions.iterdir() if p.is_dir() and p.name.isdigit())

    def encoder(self) -> FeatureEncoder:
        path = self.path / "encoder.json"
        try:
            return FeatureEncoder.from_state(self._json(path))
        except RegistryError:
            raise
        except Exception as e:  # noqa: BLE001 - a well-formed JSON file that is not an encoder state
            raise RegistryError(f"{path}: not an encoder state ({_one_line(e)})") from None

    def user_capacity(self) -> tuple[int, int]:
        """``(capacity, overflow)`` of the online user index, by the encoder's own sizing rule
        (``FeatureEncoder.fit_capacities``: pretraining count × headroom, overflow share) on the
        pretraining users. Written to ``service.json`` at bootstrap; computed once for older dirs."""
        info = self.info()
        if "user_capacity" in info:
            return int(info["user_capacity"]), int(info["user_overflow"])
        rows, _, _ = self.pretrain_rows()
        users = rows.data.get("user")
        n = int(users.max()) + 1 if users is not None and len(users) else 0
        cap, overflow = capacity_for(n, self.encoder().config)
        write_atomic(
            self.path / "service.json", json.dumps({**info, "user_capacity": cap, "user_overflow": overflow}, indent=2)
        )
        return cap, overflow

    def save_encoder(self, encoder: FeatureEncoder) -> None:
        self.save_encoder_state(encoder.state_dict())

    def save_encoder_state(self, state: dict[str, Any]) -> None:
        write_atomic(self.path / "encoder.json", json.dumps(state, default=_np_default))

    def pretrain_rows(self) -> tuple[PeriodTensors, list[tuple[int, int]], FeatureMap]:
        path = self.path / "pretrain.pt"
        try:
            blob = safe_torch_load(path)
            return PeriodTensors(blob["columns"]), [tuple(b) for b in blob["bounds"]], FeatureMap(**blob["feature_map"])
        except Exception as e:  # noqa: BLE001 - missing, truncated, a refused pickle: one line
            raise RegistryError(f"{path}: not readable ({_one_line(e)})") from None

    def feature_map(self) -> FeatureMap:
        return FeatureMap(**self.info()["feature_map"])

    # -- models --------------------------------------------------------------------------------
    def _model_file(self, number: int, name: str) -> Path:
        path = self.version_path(number) / name
        if not path.exists() and (self.version_path(number) / LEGACY[name]).exists():
            path = self.version_path(number) / LEGACY[name]
        return path

    def _load(self, number: int, path: Path, expect_config: dict[str, Any] | None) -> CTRModel:
        if not self.version_path(number).is_dir():
            raise VersionError(number, f"version {number}: no directory {self.version_path(number)}")
        try:
            model = load_model(path, self.feature_map(), expect_config=expect_config)
        except IncompatibleCheckpoint as e:
            raise IncompatibleVersion(number, f"version {number}: {e}") from None
        except (CheckpointError, OSError) as e:
            raise VersionError(number, f"version {number}: {_one_line(e)}") from None
        model.eval()
        return model

    def load_serving(self, number: int, expect_config: dict[str, Any] | None = None) -> CTRModel:
        """Θ* of a version; with ``expect_config`` a model of another name or options is refused
        (``IncompatibleVersion``) before it is built."""
        return self._load(number, self._model_file(number, SERVING), expect_config)

    def load_base(self, number: int, expect_config: dict[str, Any] | None = None) -> CTRModel:
        path = self._model_file(number, BASE)
        if not path.exists():
            path = self._model_file(number, SERVING)
        return self._load(number, path, expect_config)

    def load_state(self, number: int) -> dict[str, Any]:
        path = self.version_path(number) / "state.pt"
        try:
            state = safe_torch_load(path)
        except Exception as e:  # noqa: BLE001 - missing, truncated, a refused pickle: one line
            raise VersionError(number, f"version {number}: {path.name}: {_one_line(e)}") from None
        if not isinstance(state, dict):
            raise VersionError(number, f"version {number}: {path.name}: not a state mapping")
        return state

    def publish(
        self, base: CTRModel, serving: CTRModel, state: dict[str, Any], meta: dict[str, Any], number: int | None = None
    ) -> Version:
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
            save_model(serving, tmp / SERVING)
            _fsync_file(tmp / SERVING)
            if base is not serving:
                save_model(base, tmp / BASE)
                _fsync_file(tmp / BASE)
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


# -- combine runs: one chain of versions per expert (reloop.serve.ensemble) ----------------------
def combine_names(cfg: Config, run: str) -> list[str]:
    """The Hedge's experts for a ``combine:`` run, the run itself first (``experts_of``), each a safe
    directory name (``RegistryError`` naming ``runs.<run>.combine.experts`` otherwise)."""
    names = experts_of(cfg, run)
    bad = [n for n in names[1:] if not _SAFE_NAME.match(n)]
    if bad:
        raise RegistryError(
            f"runs.{run}.combine.experts: {bad[0]!r} cannot name a directory (letters, digits, '_', '.', '-')"
        )
    if len(names) < 2:
        raise RegistryError(f"runs.{run}.combine.experts: no other run to combine with")
    return names


class ExpertDir(ModelDir):
    """Expert ``name``'s chain inside a combine run's model directory: ``DIR/experts/<name>/{versions,
    CURRENT}``. Config, service info, encoder, pretraining rows and feature map are the parent's.

    ``pin`` (set by the service) is the version the serving set names: :meth:`current_version` returns it,
    so a :class:`~reloop.serve.host.ModelHost` over this directory loads exactly that version.
    """

    def __init__(self, parent: ModelDir, name: str) -> None:
        super().__init__(parent.path / EXPERTS_DIR / name)
        self.parent = parent
        self.name = name
        self.pin: int | None = None

    def info(self) -> dict[str, Any]:
        return self.parent.info()

    def config(self) -> Config:
        return self.parent.config()

    def encoder(self) -> FeatureEncoder:
        return self.parent.encoder()

    def user_capacity(self) -> tuple[int, int]:
        return self.parent.user_capacity()

    def save_encoder_state(self, state: dict[str, Any]) -> None:
        """The parent's live encoder owns the snapshot: nothing to write here."""

    def pretrain_rows(self) -> tuple[PeriodTensors, list[tuple[int, int]], FeatureMap]:
        return self.parent.pretrain_rows()

    def feature_map(self) -> FeatureMap:
        return self.parent.feature_map()

    def current_version(self) -> int:
        return self.pin if self.pin is not None else super().current_version()

    def current_stamp(self) -> tuple[int, int] | None:
        return (self.pin, 0) if self.pin is not None else super().current_stamp()


def expert_pins(meta: dict[str, Any], names: Sequence[str], version: int) -> dict[str, int]:
    """``{expert: version}`` a top-level version serves with (``VersionError`` when its meta lacks one)."""
    pins = meta.get("experts")
    if not isinstance(pins, dict) or any(not isinstance(pins.get(n), int) for n in names):
        raise VersionError(version, f"version {version}: meta.json does not name a version of every expert {names}")
    return {n: int(pins[n]) for n in names}


def _np_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# -- bootstrap ---------------------------------------------------------------------------------
def pick_run(cfg: Config, run: str | None) -> str:
    """The run a service hosts: ``run``, or the config's first. A ``combine:`` run hosts its own chain
    and one per expert (``combine_names``: each a safe directory name)."""
    if run is None:
        run = next(iter(cfg.runs))
    if run not in cfg.runs:
        raise RegistryError(f"--run {run!r}: the config has no such run (runs: {', '.join(cfg.runs)})")
    if cfg.runs[run].combine is not None:
        combine_names(cfg, run)
    return run


def composition(cfg: Config, run: str) -> dict[str, Any]:
    """The run's choices as written in YAML (JSON values: they go into ``meta.json`` and ``/model``); a
    ``combine.replicas`` expert also says its seed offset."""
    spec_of, offset = expert_spec(cfg, run)
    spec = spec_of.model_dump(mode="json")
    extra = {"seed_offset": offset} if offset else {}
    return {"run": run, **{k: spec[k] for k in ("update", "loss", "generator", "memory")}, **extra}


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
        state["users"] = state["users"][: max(k, 0)]
    return FeatureEncoder.from_state(state)


def capacity_for(n: int, config: EncoderConfig) -> tuple[int, int]:
    """``(capacity, overflow)`` of a table that saw ``n`` ids in the pretraining periods: the rule of
    ``FeatureEncoder.fit_capacities`` (``max(min_capacity, ⌈n·headroom⌉)``, overflow
    ``max(8, ⌈capacity·overflow_share⌉)``)."""
    import math

    cap = max(config.min_capacity, math.ceil(n * config.headroom))
    return cap, max(8, math.ceil(cap * config.overflow_share))


def bootstrap(
    cfg: Config, model_dir: str | Path, run: str | None = None, seed: int | None = None, log=logger.info
) -> ModelDir:
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
    log(
        f"prepared {len(stream.rows):,} rows in {stream.n_periods} periods ({time.perf_counter() - t0:.1f}s); "
        f"pretraining Θ0 on periods 1..{P}"
    )
    model, optim_state = pretrain(cfg, stream, seed)
    model.eval()
    rows = stream.periods(1, P)
    encoder = pretrain_encoder(prepared.encoder, rows, stream.feature_map)

    (md.path / "config.yaml").write_text(dump_config(cfg))
    info = {
        "format": FORMAT,
        "run": run,
        "seed": seed,
        "pretrain_periods": P,
        "pretrain_rows": len(rows),
        "feature_map": stream.feature_map.model_dump(),
        "created": time.time(),
        "user": encoder.schema.user,
    }
    info["user_capacity"], info["user_overflow"] = capacity_for(len(encoder.users), encoder.config)
    (md.path / "service.json").write_text(json.dumps(info, indent=2))
    md.save_encoder(encoder)
    _torch_save_synced(
        {"columns": rows.data, "bounds": stream.bounds[:P], "feature_map": stream.feature_map.model_dump()},
        md.path / "pretrain.pt",
    )
    spec = cfg.runs[run]
    engine = RunEngine(cfg, spec, seed, stream.feature_map)  # the same initial state as an offline run
    state = engine.version_state(optim_state, run)
    meta = {
        "created": time.time(),
        "trained_through": P,
        "update_periods": list(range(1, P + 1)),
        "serves_period": P + 1,
        "parent": None,
        "composition": composition(cfg, run),
        "model": cfg.model,
        "validation": None,
        "n_train": len(rows),
        "n_holdout": 0,
    }
    for name in ("config.yaml", "service.json", "encoder.json"):
        _fsync_file(md.path / name)
    if spec.combine is not None:  # every expert's chain starts from the seed's Θ0, as offline (run_seed)
        pins: dict[str, int] = {}
        for expert in combine_names(cfg, run)[1:]:
            e_spec, k = expert_spec(cfg, expert)  # a replica: the Θ0 and random stream of seed + k
            e_model, e_optim = (model, optim_state) if k == 0 else pretrain(cfg, stream, seed + k)
            e_model.eval()
            e_state = RunEngine(cfg, e_spec, seed + k, stream.feature_map).version_state(e_optim, expert)
            meta_e = {**meta, "composition": composition(cfg, expert)}
            ExpertDir(md, expert).publish(e_model, e_model, e_state, meta_e, 1)
            pins[expert] = 1
        meta["experts"] = pins
    slog = ServeLog(md.log_path)
    slog.open_period(P + 1)
    version = md.publish(model, model, state, meta, number=1)
    slog.record_published(1, None, version.meta)
    slog.close()
    log(f"bootstrapped {md.path}: version 1 (Θ0) serves period {P + 1} ({time.perf_counter() - t0:.1f}s)")
    return md
