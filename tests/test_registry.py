"""One registry per component kind (reloop.registry): a component registered by decorator is usable from a
config, enumerated, named in errors; options are validated once; choices dump in the form written."""

from __future__ import annotations

import copy
import pickle
from typing import Annotated, Any, ClassVar

import pytest
import yaml
from pydantic import field_validator

from reloop.components import LOSSES, UPDATES, build_loss, build_update, registries
from reloop.config import ConfigError, RunSpec, dump_config, parse_config
from reloop.registry import Choice, Registry, Strict, number
from reloop.update.losses import CrossEntropy
from reloop.update.strategies import Incremental

BASE = {
    "data": {"source": "synthetic", "periods": {"count": 8}},
    "protocol": {"pretrain": 3, "warmup": 1, "valid": 1, "test": 2},
}

VALIDATIONS: list[int] = []  # one entry per validation of the toy update's options


class ToyUpdate(Incremental):
    """IU that remembers its options (a stand-in for a user's strategy)."""

    class Options(Strict):
        shorthand: ClassVar[str] = "passes"
        search_space: ClassVar[dict[str, list[Any]]] = {"passes": [1, 2]}
        passes: int = 1
        note: str = "x"

        @field_validator("passes")
        @classmethod
        def _count(cls, v: int) -> int:
            VALIDATIONS.append(v)
            if v < 1:
                raise ValueError(f"expected at least one pass, got {v}")
            return v

    def __init__(self, passes: int = 1, note: str = "x") -> None:
        self.passes, self.note = passes, note


class ToyLoss(CrossEntropy):
    class Options(Strict):
        shorthand: ClassVar[str] = "weight"
        weight: Annotated[float, number("a number in [0, 1]", lambda x: 0 <= x <= 1)] = 0.2
        gain: float = 1.0

    def __init__(self, weight: float = 0.2, gain: float = 1.0) -> None:
        self.weight, self.gain = weight, gain


@pytest.fixture
def toys():
    """Register the toy update and loss for one test, and remove them after."""
    UPDATES.register("toy_update")(ToyUpdate)
    LOSSES.register("toy_loss")(ToyLoss)
    VALIDATIONS.clear()
    try:
        yield
    finally:
        UPDATES.unregister("toy_update")
        LOSSES.unregister("toy_loss")


def _config(**run: Any) -> dict[str, Any]:
    return {**copy.deepcopy(BASE), "runs": {"T": run}}


def test_a_registered_component_is_usable_from_a_config_and_enumerated(toys):
    cfg = parse_config(_config(update={"toy_update": 3}, loss={"toy_loss": 0.4, "gain": 2.0}))
    spec = cfg.runs["T"]
    assert isinstance(spec.update, Choice) and spec.update.name == "toy_update"
    strategy = build_update(spec.update)
    assert isinstance(strategy, ToyUpdate) and (strategy.passes, strategy.note) == (3, "x")
    loss = build_loss(spec.loss).loss
    assert isinstance(loss, ToyLoss) and (loss.weight, loss.gain) == (0.4, 2.0)
    assert "toy_update" in registries()["update"] and "toy_loss" in registries()["loss"]
    assert ToyUpdate.name == "toy_update"


def test_a_removed_component_is_unknown_again(toys):
    UPDATES.unregister("toy_update")
    with pytest.raises(ConfigError, match="runs.T.update: unknown update 'toy_update'"):
        parse_config(_config(update="toy_update"))
    UPDATES.register("toy_update")(ToyUpdate)  # for the fixture's cleanup


def test_unknown_names_list_the_registered_ones(toys):
    with pytest.raises(ConfigError) as e:
        parse_config(_config(update="nope"))
    assert str(e.value) == f"runs.T.update: unknown update 'nope'; choose one of {sorted(UPDATES)}"
    assert "'toy_update'" in str(e.value) and "'incremental'" in str(e.value)
    with pytest.raises(ValueError, match=r"^loss: unknown loss 'nope'; choose one of \[.*'toy_loss'"):
        build_loss("nope")


def test_option_errors_name_their_dotted_path(toys):
    cases = {
        "update": ({"toy_update": 0}, "runs.T.update.toy_update: expected at least one pass, got 0"),
        "loss": ({"toy_loss": 2}, "runs.T.loss.toy_loss: expected a number in [0, 1], got 2"),
    }
    for slot, (value, message) in cases.items():
        with pytest.raises(ConfigError) as e:
            parse_config(_config(**{slot: value}))
        assert str(e.value) == message
    with pytest.raises(ConfigError) as e:
        parse_config(_config(update={"toy_update": {"passes": 2, "nope": 1}}, loss={"toy_loss": 0.1, "gian": 1}))
    assert str(e.value) == (
        "runs.T.update.toy_update.nope: Extra inputs are not permitted; "
        "runs.T.loss.gian: Extra inputs are not permitted"
    )


def test_options_are_validated_once(toys):
    """Parsed with the config, then built, copied, compared and pickled without validating again."""
    cfg = parse_config(_config(update={"toy_update": {"passes": 2}}))
    assert VALIDATIONS == [2]
    spec = cfg.runs["T"]
    build_update(spec.update)
    spec.update.build()
    copy.deepcopy(cfg)
    cfg.model_copy(deep=True)
    spec.model_dump(mode="json")
    assert VALIDATIONS == [2]


def test_choices_dump_in_the_form_written(toys):
    runs = {
        "A": {"update": {"toy_update": 2}, "loss": {"toy_loss": None, "gain": 3.0}},
        "B": {"update": "incremental", "loss": "self_correction", "generator": {"asmg_gru": {"k": 2}}},
        "C": {"update": {"full": {"start": "scratch"}}, "memory": {"exact": {"size": 50}, "lambda": "auto"}},
    }
    cfg = parse_config({**copy.deepcopy(BASE), "runs": runs})
    dumped = yaml.safe_load(dump_config(cfg))["runs"]
    assert dumped["A"] == {**runs["A"], "generator": "identity", "memory": None, "combine": None}
    assert dumped["B"]["generator"] == {"asmg_gru": {"k": 2}} and dumped["B"]["loss"] == "self_correction"
    assert dumped["C"]["memory"] == runs["C"]["memory"]
    assert parse_config(yaml.safe_load(dump_config(cfg))) == cfg
    assert cfg.runs["B"].loss == {"self_correction": 0.5}  # the same choice, spelt out


def test_specs_pickle_by_their_yaml_form():
    spec = RunSpec(update={"batch": 3}, loss={"distill": 0.2}, memory={"sketch": {"bits": 4}})
    back = pickle.loads(pickle.dumps(spec))
    assert back == spec and back.update.options == spec.update.options


def test_registration_is_checked():
    reg: Registry[Any] = Registry("probe_kind")

    class NoOptions:
        pass

    with pytest.raises(TypeError, match="needs a pydantic Options class"):
        reg.register("x")(NoOptions)

    class One:
        Options = Strict

    reg.register("one")(One)
    with pytest.raises(ValueError, match="'one' is already registered"):
        reg.register("one")(type("Other", (), {"Options": Strict}))
    assert list(reg) == ["one"] and reg["one"] is One and One.name == "one"
    Registry._kinds.pop("probe_kind")


def test_a_choice_owns_its_yaml_form():
    """Changing the mapping a spec was made from, or a dump of it, leaves the spec as parsed."""
    raw = {"update": {"replay": {"ratio": 0.2}}, "memory": {"exact": {"size": 40}}}
    spec = RunSpec(**raw)
    raw["update"]["replay"]["ratio"] = 0.9
    raw["memory"]["exact"]["size"] = 5
    dumped = spec.model_dump()
    dumped["update"]["replay"]["ratio"] = 0.7
    dumped["memory"]["exact"]["size"] = 7
    assert spec.model_dump() == {
        **RunSpec().model_dump(),
        "update": {"replay": {"ratio": 0.2}},
        "memory": {"exact": {"size": 40}},
    }


def test_a_registered_data_source_is_usable_from_a_config(tmp_path):
    """A source registered with ``@SOURCES.register`` is accepted by ``data.source``, listed in the unknown-
    source message and loaded by ``load_source`` (fails if any of the three keeps its own list)."""
    from typing import Literal

    from reloop.data.sources import SOURCES, load_source
    from reloop.data.sources.config import SyntheticSourceConfig
    from reloop.data.sources.synthetic import load_synthetic

    class EchoConfig(SyntheticSourceConfig):
        source: Literal["echo"]  # type: ignore[assignment]

    loaded: list[str] = []

    @SOURCES.register("echo")
    class Echo:
        Options = EchoConfig

        @staticmethod
        def load(cfg: EchoConfig):
            loaded.append(cfg.source)
            return load_synthetic(SyntheticSourceConfig(**{**cfg.model_dump(), "source": "synthetic"}))

    try:
        raw = {**BASE, "data": {"source": "echo", "periods": {"count": 8}, "synthetic": {"rows_per_period": 20}}}
        cfg = parse_config(raw)
        log = load_source(cfg.data)
        assert loaded == ["echo"] and log.frame.height > 0
        with pytest.raises(ConfigError, match=r"choose one of \['csv', 'echo', 'movielens'"):
            parse_config({**BASE, "data": {"source": "nope"}})
    finally:
        SOURCES.unregister("echo")
    with pytest.raises(ConfigError, match="unknown source 'echo'"):
        parse_config(raw)
