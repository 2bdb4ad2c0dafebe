"""Data-parallel training on PyTorch's engine (gloo on CPU), with 2 processes on this machine.

Tolerances: with ``data_parallel="split"`` two processes train on exactly the rows one process trains on,
batch by batch, and DDP averages the share-weighted gradients, so every optimizer step is the
single-process step up to float summation order (the two halves of a batch are summed separately, then
added). Those ~1e-7 relative differences pass through Adam's 1/sqrt(v) and a few hundred steps; we
allow 1e-4 on parameters, 1e-3 on AUC and 1e-4 on the training loss (the observed differences are ~1e-6,
~0 and ~1e-8). The ``local`` mode (each rank trains its own share, global batch = 2 x batch_size) sees
other batches than one process, so it is only held to an AUC within 0.02 of it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from conftest import TINY_SCHEMA, tiny_frame

from reloop import distributed as rd
from reloop.protocol.metrics import global_auc

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(n: int = 8000):
    from reloop.data.encode import FeatureEncoder
    from reloop.data.tensors import PeriodTensors

    frame = tiny_frame(n)
    enc = FeatureEncoder(TINY_SCHEMA)
    enc.fit_capacities(frame.slice(0, n // 2))
    rows = PeriodTensors(enc.transform(frame))
    # train and test after the planted flip (n // 2): a stationary stretch
    return enc.feature_map(), rows.slice(n // 2, n - 1000), rows.slice(n - 1000, n)


def _train(rows, feature_map, data_parallel="auto", epochs=2):
    from reloop.models import build_model
    from reloop.protocol.metrics import auc
    from reloop.update.losses import CrossEntropy
    from reloop.update.trainer import TrainConfig, make_optimizer, predict_rows, train_rows

    torch.manual_seed(0)
    model = build_model({"name": "deepfm", "embedding_dim": 8, "hidden_units": [32, 16]}, feature_map)
    cfg = TrainConfig(batch_size=128, lr=5e-3)
    optimizer = make_optimizer(model, cfg)
    loss = train_rows(
        model,
        optimizer,
        rows,
        CrossEntropy(),
        cfg,
        torch.Generator().manual_seed(0),
        epochs=epochs,
        data_parallel=data_parallel,
    )
    return model, loss, auc, predict_rows


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    env = rd.init_distributed("cpu")
    try:
        feature_map, train, test = _setup()
        result: dict = {"rank": env.rank, "world": env.world_size}
        # 1. the same rows on every rank, each global batch split across ranks
        model, loss, auc, predict_rows = _train(train, feature_map)
        logits, _ = predict_rows(model, test)
        result["split"] = {
            "loss": loss,
            "auc": auc(test.data["label"].numpy(), torch.sigmoid(logits).numpy()),
            "state": {k: v.clone() for k, v in model.state_dict().items()},
        }
        # 2. each rank trains its own share (DistributedSampler-like split), batches of its own
        mine = rd.shard_rows(train, shuffle=True, seed=1)
        model, loss, auc, predict_rows = _train(mine, feature_map, data_parallel="local")
        logits, _ = predict_rows(model, test)
        result["local"] = {
            "loss": loss,
            "auc": auc(test.data["label"].numpy(), torch.sigmoid(logits).numpy()),
            "rows": len(mine),
            "state": {k: v.clone() for k, v in model.state_dict().items()},
        }
        # 3. each rank streams its own share of encoded Parquet shards (uneven: DDP's Join evens the steps)
        from reloop.data.shards import ShardedPeriod

        period = ShardedPeriod(f"{out}.shards", rank=env.rank, world=env.world_size, read_rows=300)
        model, loss, auc, predict_rows = _train(period, feature_map, epochs=1)
        logits, _ = predict_rows(model, test)
        result["stream"] = {
            "loss": loss,
            "rows": len(period),
            "auc": auc(test.data["label"].numpy(), torch.sigmoid(logits).numpy()),
            "state": {k: v.clone() for k, v in model.state_dict().items()},
        }
        # 4. metrics over every rank's rows: sums and an exact global AUC
        mine_test = test.take(rd.shard_indices(len(test)))  # 1000 rows: 500 per rank, no padding
        probs = torch.sigmoid(predict_rows(model, mine_test)[0])
        result["global_auc"] = global_auc(mine_test.data["label"], probs)
        all_probs = torch.sigmoid(predict_rows(model, test)[0])
        result["full_auc"] = auc(test.data["label"].numpy(), all_probs.numpy())
        result["gathered"] = rd.all_gather_rows(torch.full((env.rank + 1, 2), float(env.rank)))
        result["sums"] = rd.all_reduce_sums({"n": len(mine_test), "one": 1.0})
        torch.save(result, f"{out}.rank{rank}")
    finally:
        rd.shutdown()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from reloop.data.shards import write_tensors

    out = str(tmp_path_factory.mktemp("ddp") / "res")
    write_tensors(_setup()[1], f"{out}.shards", row_group_rows=700)
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(2)]


def test_two_processes_match_one_process(two_ranks):
    feature_map, train, test = _setup()
    model, loss, auc, predict_rows = _train(train, feature_map)
    p = torch.sigmoid(predict_rows(model, test)[0]).numpy()
    one_auc = auc(test.data["label"].numpy(), p)
    for res in two_ranks:
        split = res["split"]
        assert abs(split["auc"] - one_auc) < 1e-3, (split["auc"], one_auc)
        assert abs(split["loss"] - loss) < 1e-4
        diff = max((split["state"][k] - v).abs().max().item() for k, v in model.state_dict().items())
        assert diff < 1e-4, diff
    assert one_auc > 0.6  # the planted signal is learnt at all


def test_ranks_stay_identical_and_local_mode_learns(two_ranks):
    a, b = two_ranks
    for mode in ("split", "local", "stream"):
        for k in a[mode]["state"]:
            assert torch.equal(a[mode]["state"][k], b[mode]["state"][k]), (mode, k)
    feature_map, train, test = _setup()
    assert a["local"]["rows"] + b["local"]["rows"] == len(train) + len(train) % 2  # padded like DistributedSampler
    assert abs(a["local"]["auc"] - a["split"]["auc"]) < 0.02
    assert a["stream"]["rows"] + b["stream"]["rows"] == len(train) and a["stream"]["rows"] != b["stream"]["rows"]
    assert a["stream"]["auc"] > 0.6 and a["stream"]["loss"] == b["stream"]["loss"]


def test_metrics_are_reduced_over_ranks(two_ranks):
    a, b = two_ranks
    assert a["sums"]["one"] == 2.0 and a["sums"]["n"] == 1000.0
    # the global AUC is the AUC of every row (gathered), not a mean of per-rank AUCs
    assert a["global_auc"] == b["global_auc"]
    assert abs(a["global_auc"] - a["full_auc"]) < 1e-12
    # variable-length gather, in rank order
    assert a["gathered"].tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]


def test_shard_indices_match_distributed_sampler():
    from torch.utils.data import DistributedSampler

    for n, world in ((10, 3), (12, 4), (7, 2), (5, 8)):
        for rank in range(world):
            for drop_last in (False, True):
                ref = list(
                    DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False, drop_last=drop_last)
                )
                assert rd.shard_indices(n, rank, world, drop_last=drop_last).tolist() == ref
    parts = [rd.shard_indices(100, r, 4, shuffle=True, seed=3) for r in range(4)]
    assert sorted(torch.cat(parts).tolist()) == list(range(100))
    assert rd.shard_bounds(10, 0, 3) == (0, 4) and rd.shard_bounds(10, 2, 3) == (7, 10)


def test_single_process_environment_is_a_world_of_one(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    rd.shutdown()
    env = rd.init_distributed("cpu")
    assert (env.rank, env.world_size, env.is_main, env.distributed) == (0, 1, True, False)
    assert rd.all_reduce_sums({"x": 2.0}) == {"x": 2.0}
    assert rd.backend_for("cuda") == "nccl" and rd.backend_for("cpu") == "gloo"
    assert rd.env_from_torchrun({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (1, 4, 1)
    rd.shutdown()


def test_protocol_under_torchrun_matches_one_process(tmp_path):
    """``torchrun -m``: 2 processes run the protocol; rank 0 writes results equal to one process's."""
    from reloop.config import load_config
    from reloop.protocol.experiment import run_experiment
    from reloop.protocol.report import read_periods

    cfg = {
        "data": {
            "source": "synthetic",
            "periods": {"count": 8, "by": "rows"},
            "cache": str(tmp_path / "cache"),
            "synthetic": {"users": 200, "items": 150, "rows_per_period": 1200, "seed": 5},
        },
        "model": {"name": "deepfm", "embedding_dim": 8, "hidden_units": [16]},
        "train": {"epochs": 1, "pretrain_epochs": 2, "batch_size": 256, "lr": 0.005},
        "protocol": {"pretrain": 3, "warmup": 1, "valid": 1, "test": 2, "seeds": [0]},
        "runs": {"IU": {"update": "incremental"}},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from pathlib import Path\n"
        "from reloop.config import load_config\n"
        "from reloop.protocol.scaleout import run_experiment_distributed\n"
        "run_experiment_distributed(load_config(sys.argv[1]), Path(sys.argv[2]), show_progress=False)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(script),
            str(path),
            str(tmp_path / "ddp"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    torch.set_num_threads(1)
    run_experiment(load_config(path), tmp_path / "one", show_progress=False)
    ddp, one = read_periods(tmp_path / "ddp" / "periods.csv"), read_periods(tmp_path / "one" / "periods.csv")
    assert [r["period"] for r in ddp] == [r["period"] for r in one]
    np.testing.assert_allclose([float(r["auc"]) for r in ddp], [float(r["auc"]) for r in one], atol=1e-3)
    np.testing.assert_allclose([float(r["logloss"]) for r in ddp], [float(r["logloss"]) for r in one], atol=1e-3)
    assert (tmp_path / "ddp" / "_ranks" / "rank1" / "periods.csv").exists()  # rank 1 kept to its own folder
