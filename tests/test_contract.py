"""Every registered run component passes the contract suite (reloop.checks)."""

import pytest
from conftest import tiny_config

from reloop.checks import ALL_CHECKS, CONTRACT_CASES
from reloop.config import RunSpec


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("case", sorted(CONTRACT_CASES))
def test_contract(case, check, stream):
    cfg = tiny_config()
    check(cfg, stream, RunSpec(**CONTRACT_CASES[case]))


def _cases_using(kind: str) -> set[str]:
    """The component names of ``kind`` that some contract case exercises."""
    from reloop.components import one_key
    from reloop.memory.config import MemoryConfig
    from reloop.update.generators.config import parse_generator

    names: set[str] = set()
    for spec in CONTRACT_CASES.values():
        run = RunSpec(**spec)
        if kind == "update":
            names.add(one_key(run.update, "update")[0])
        elif kind == "loss":
            names.add(one_key(run.loss, "loss")[0])
        elif kind == "generator":
            names.add(parse_generator(run.generator)[0])
        elif kind == "memory" and run.memory is not None:
            mem = MemoryConfig.parse(run.memory)
            names |= {mem.kind, "adaptive" if mem.adaptive else "fixed"}
    return names


def test_every_known_component_has_a_contract_case():
    """Enumerates every component name the config accepts; one without a contract case fails here
    (a new update, loss, generator or memory kind cannot join without passing the suite)."""
    from reloop.components import LOSS_NAMES, UPDATE_NAMES
    from reloop.update.generators.config import GENERATORS

    known = {
        "update": set(UPDATE_NAMES),
        "loss": set(LOSS_NAMES),
        "generator": set(GENERATORS),
        "memory": {"sketch", "exact", "adaptive", "fixed"},
    }
    missing = {kind: sorted(names - _cases_using(kind)) for kind, names in known.items()}
    assert not any(missing.values()), f"components without a contract case in reloop.checks: {missing}"
