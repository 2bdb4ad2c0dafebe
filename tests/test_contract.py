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
    """The component names of ``kind`` (a registry's slot; ``lambda`` for the memory's λ mode) that some
    contract case exercises."""
    names: set[str] = set()
    for spec in CONTRACT_CASES.values():
        run = RunSpec(**spec)
        if kind == "memory":
            names |= {run.memory.kind} if run.memory is not None else set()
        elif kind == "lambda":
            names |= {"adaptive" if run.memory.adaptive else "fixed"} if run.memory is not None else set()
        else:
            names.add(getattr(run, kind).name)
    return names


def test_every_known_component_has_a_contract_case():
    """Enumerates every registered update, loss, generator and memory kind (reloop.components.registries):
    one without a contract case fails here, so a new component cannot join without passing the suite."""
    from reloop.components import registries

    known = {kind: set(registry) for kind, registry in registries().items()}
    known["lambda"] = {"adaptive", "fixed"}
    missing = {kind: sorted(names - _cases_using(kind)) for kind, names in known.items()}
    assert not any(missing.values()), f"components without a contract case in reloop.checks: {missing}"


def test_a_registered_component_without_a_case_is_reported():
    """The enumeration reads the registry: a component registered now (and removed after) is missing."""
    from reloop.components import UPDATES
    from reloop.update.strategies import Incremental

    @UPDATES.register("contract_probe")
    class Probe(Incremental):
        pass

    try:
        assert "contract_probe" in set(UPDATES) - _cases_using("update")
    finally:
        UPDATES.unregister("contract_probe")
    assert "contract_probe" not in UPDATES
