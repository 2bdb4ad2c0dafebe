"""configs/recommended.yaml: the runs users copy, named as documented, valid with any data block."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from reloop.config import parse_config
from reloop.preflight import preflight

RECOMMENDED = Path(__file__).resolve().parents[1] / "configs" / "recommended.yaml"


@pytest.mark.parametrize(
    "data",
    [
        {"source": "synthetic", "periods": {"count": 31, "by": "rows"}},
        {
            "source": "csv",
            "path": "configs/data/clicks.csv",
            "time": "ts",
            "label": "label",
            "features": {"user_id": "categorical", "item_id": "categorical"},
            "periods": {"count": 31, "by": "rows"},
        },
    ],
)
def test_recommended_runs_parse_with_any_data_block_and_can_act(data):
    raw = yaml.safe_load(RECOMMENDED.read_text())
    assert list(raw) == ["runs"], "recommended.yaml holds runs only: users bring their own data block"
    cfg = parse_config({**raw, "data": data})
    assert list(cfg.runs) == ["IU", "ReLoop", "ReLoop2", "ASMG", "combined"]
    assert cfg.runs["combined"].combine is not None
    assert set(cfg.runs["combined"].combine.experts or []) == {"IU", "ReLoop", "ReLoop2", "ASMG"}
    assert not [f for f in preflight(cfg, [4000] * 31) if f.level == "error"]


def test_the_demo_runs_the_recommended_runs():
    """README (a) runs `reloop demo`: its runs are recommended.yaml's, unchanged (plus the no-update floor)."""
    from reloop.config import demo_config_path

    demo = yaml.safe_load(demo_config_path().read_text())["runs"]
    rec = yaml.safe_load(RECOMMENDED.read_text())["runs"]
    assert {k: v for k, v in demo.items() if k != "no-update"} == rec
