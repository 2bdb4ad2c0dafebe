"""Every script in examples/ runs from a clean clone (no ../shared data) and checks its own result.

Each runs in a fresh interpreter, as a user would start it; CI-sized (seconds each).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_the_examples_are_found() -> None:
    assert {p.name for p in EXAMPLES} >= {"own_training_loop.py", "custom_model_asmg.py", "online_serving.py"}


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(script: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = [sys.executable, str(script)]
    if script.name == "custom_model_asmg.py":
        args.append(str(tmp_path / "out"))
    # Run from elsewhere: an example must not depend on the working directory or on ../shared.
    done = subprocess.run(args, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{script.name} failed:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.rstrip().endswith("ok"), done.stdout
    if script.name == "custom_model_asmg.py":
        assert (tmp_path / "out" / "periods.png").stat().st_size > 10_000
        assert (tmp_path / "out" / "periods.csv").read_text().startswith("run,seed,period,phase,auc")
