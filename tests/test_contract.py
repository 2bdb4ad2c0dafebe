"""Every registered run component passes the contract suite (reloop.checks)."""
import pytest

from reloop.checks import ALL_CHECKS, CONTRACT_CASES
from reloop.config import RunSpec

from conftest import tiny_config


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("case", sorted(CONTRACT_CASES))
def test_contract(case, check, stream):
    cfg = tiny_config()
    check(cfg, stream, RunSpec(**CONTRACT_CASES[case]))
